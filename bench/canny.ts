/**
 * Canny control image at 512 px: ops.canny (TorchScript, runs where the UNet runs) through the addon
 * against OpenCV's cv2.Canny in Python on the same images, same run. Ratio = OpenCV s / ours s.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Tensor, setNumThreads, type Device } from '../lib/native.js';
import { loadOps } from '../lib/ops.js';
import { loadImage } from '../lib/image.js';
import { ROOT, py, table, fmt, threads } from './common.js';

export async function run(): Promise<string> {
  const reps = Number(process.env.BENCH_REPS ?? 5);
  const device = (process.env.DF_BENCH_DEVICE ?? 'cpu') as Device;
  setNumThreads(threads());
  const dir = join(ROOT, 'test', 'fixtures', 'images');
  const files = readdirSync(dir).filter((f) => f.endsWith('.png')).map((f) => join(dir, f));
  const ops = await loadOps(device);
  const imgs: Tensor[] = [];
  for (const f of files) {
    const img = await loadImage(f, 512);
    imgs.push(await Tensor.fromUint8Array(img.data, [1, 512, 512, 3]).to(device));
  }
  const once = async () => {
    for (const t of imgs) (await ops.canny(t, 100, 200)).dispose();
  };
  await once();
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) await once();
  const ours = (performance.now() - t0) / 1000 / reps / imgs.length;
  imgs.forEach((t) => t.dispose());
  // one batched call of all images (the pipeline's batch path)
  const cv = JSON.parse(await py('canny_cv2.py', [String(reps), ...files])) as { seconds: number };
  return [
    `canny 100/200 on ${files.length} photos at 512×512, ${device}, ${threads()} threads, ${reps} reps`,
    table(['implementation', 's / image', 'ratio (opencv/this)'], [
      ['ops.canny (TorchScript via addon)', fmt(ours), (cv.seconds / ours).toFixed(3)],
      ['cv2.Canny (OpenCV 4.6, C++ SIMD)', fmt(cv.seconds), '1'],
    ]),
  ].join('\n');
}
