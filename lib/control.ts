/**
 * ControlNet control images (docs/method.md §ControlNet): the canny edge map the ControlNet sees, computed as the
 * reference does — image resized to `size × size` (PIL bicubic), then OpenCV's multi-channel
 * `Canny(rgb, 100, 200)` (`ops.canny`, integer-exact), 0/255.
 *
 * @module
 */
import { Tensor, type Device } from './native.js';
import { loadImage } from './image.js';
import { InvalidArgumentError } from './errors.js';
import { loadOps } from './ops.js';

/** A single-channel edge map, row-major, 0 or 255. */
export interface CannyImage {
  mask: Uint8Array;
  width: number;
  height: number;
}

/** Options of {@link cannyImage}. */
export interface CannyOptions {
  /** Lower hysteresis threshold (reference: 100). */
  low?: number;
  /** Upper hysteresis threshold (reference: 200). */
  high?: number;
}

/**
 * The canny control image of `image` at `size × size`.
 * @param image an image file path or its encoded bytes
 * @param size side length the image is resized to first (default 512)
 * @param device where `ops.canny` runs (default the CPU)
 */
export async function cannyImage(
  image: string | Uint8Array,
  size = 512,
  device: Device = 'cpu',
  opts: CannyOptions = {},
): Promise<CannyImage> {
  const low = opts.low ?? 100;
  const high = opts.high ?? 200;
  if (!Number.isFinite(low) || !Number.isFinite(high) || low < 0 || high < 0) {
    throw new InvalidArgumentError(`canny thresholds must be non-negative numbers, got ${low}/${high}`);
  }
  const img = await loadImage(image, size);
  const ops = await loadOps(device);
  const cpu = Tensor.fromUint8Array(img.data, [1, size, size, 3]);
  const owned = [cpu];
  try {
    const input = ops.device === 'cpu' ? cpu : await cpu.to(ops.device as Device);
    if (input !== cpu) owned.push(input);
    const edges = await ops.canny(input, low, high);
    owned.push(edges);
    const f = await edges.to('cpu', 'float32');
    owned.push(f);
    const v = f.toFloat32Array();
    const mask = new Uint8Array(v.length);
    for (let i = 0; i < v.length; i++) mask[i] = v[i]!;
    return { mask, width: size, height: size };
  } finally {
    for (const t of owned) if (!t.disposed) t.dispose();
  }
}
