/**
 * Resizing for the tools, in plain TypeScript: PIL's NEAREST for 8-bit panels, torch's bilinear
 * (align_corners False) for float features.
 *
 * @module
 */
import type { FeatureArray } from './common.js';

/** PIL `Image.resize(..., NEAREST)` of interleaved 8-bit pixels. */
export function resizeNearest(data: Uint8Array, w: number, h: number, channels: number, outW: number, outH: number): Uint8Array {
  const out = new Uint8Array(outW * outH * channels);
  const sx = w / outW;
  const sy = h / outH;
  for (let y = 0; y < outH; y++) {
    const yi = Math.min(h - 1, Math.floor((y + 0.5) * sy));
    for (let x = 0; x < outW; x++) {
      const xi = Math.min(w - 1, Math.floor((x + 0.5) * sx));
      const s = (yi * w + xi) * channels;
      const d = (y * outW + x) * channels;
      for (let c = 0; c < channels; c++) out[d + c] = data[s + c]!;
    }
  }
  return out;
}

/** Output size that makes the short side `short` (aspect kept, rounded). */
export function shortSideSize(w: number, h: number, short: number): [number, number] {
  const s = short / Math.min(w, h);
  return [Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))];
}

/** `torch.nn.functional.interpolate(x[None], (outH, outW), mode='bilinear', align_corners=False)[0]`. */
export function resizeBilinear(x: FeatureArray, outH: number, outW: number): FeatureArray {
  const [C, H, W] = x.shape as [number, number, number];
  if (H === outH && W === outW) return { data: x.data, shape: [C, H, W] };
  const out = new Float32Array(C * outH * outW);
  const src = (o: number, scale: number, size: number): [number, number, number] => {
    let r = (o + 0.5) * scale - 0.5;
    if (r < 0) r = 0;
    const i0 = Math.floor(r);
    const i1 = i0 < size - 1 ? i0 + 1 : i0;
    return [i0, i1, r - i0];
  };
  const ys = Array.from({ length: outH }, (_, i) => src(i, H / outH, H));
  const xs = Array.from({ length: outW }, (_, i) => src(i, W / outW, W));
  for (let c = 0; c < C; c++) {
    const base = c * H * W;
    for (let y = 0; y < outH; y++) {
      const [y0, y1, ly] = ys[y]!;
      for (let xo = 0; xo < outW; xo++) {
        const [x0, x1, lx] = xs[xo]!;
        const a = x.data[base + y0 * W + x0]!;
        const b = x.data[base + y0 * W + x1]!;
        const cc = x.data[base + y1 * W + x0]!;
        const d = x.data[base + y1 * W + x1]!;
        out[(c * outH + y) * outW + xo] = (1 - ly) * ((1 - lx) * a + lx * b) + ly * ((1 - lx) * cc + lx * d);
      }
    }
  }
  return { data: out, shape: [C, outH, outW] };
}
