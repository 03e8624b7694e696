/**
 * Event-loop responsiveness under hostile-sized inputs (issue 10, target: longest stall < 50 ms):
 *
 * 1. `extract` of one 16000×16000 PNG (256 M pixels, under the default 16383² limit) on the bundled
 *    micro model at 128 px — the decode runs in libuv's pool, the Pillow-exact resize in the image
 *    worker threads; baseline: the same extract with `setImageThreads(0)` (the resize on the JS
 *    thread, as before this change).
 * 2. 20 uploads of a 4000×3000 JPEG arriving at once at `serve` (`POST /v1/extract`, in this
 *    process, micro model, size 64); baseline: the same with the resize on the JS thread.
 *
 * The stall is the largest event-loop delay seen by `monitorEventLoopDelay` (5 ms resolution) during
 * the work, plus a control: the same monitor over an idle second (what the machine's load alone gives).
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { join } from 'node:path';
import sharp from 'sharp';
import { loadPipeline } from '../lib/pipeline/index.js';
import { setImageThreads } from '../lib/image.js';
import { ROOT, fmt, table } from './common.js';

const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');

/** Runs `fn` under an event-loop delay monitor; returns its longest stall and the wall time (ms). */
async function stall(fn: () => Promise<unknown>): Promise<{ maxMs: number; p99Ms: number; wallMs: number }> {
  const h = monitorEventLoopDelay({ resolution: 5 });
  h.enable();
  const t0 = performance.now();
  await fn();
  const wallMs = performance.now() - t0;
  await new Promise((r) => setTimeout(r, 50)); // a stall is only recorded at the next loop turn
  h.disable();
  return { maxMs: h.max / 1e6, p99Ms: h.percentile(99) / 1e6, wallMs };
}

export async function run(): Promise<string> {
  const rows: (string | number)[][] = [];
  const idle = await stall(() => new Promise((r) => setTimeout(r, 1000)));
  rows.push(['idle 1 s (control: machine load alone)', '-', fmt(idle.maxMs), '-', '-', '-']);

  // 1. one 16000² PNG through extract
  const side = Number(process.env.DF_BENCH_EVENTLOOP_SIDE ?? 16000);
  const png = await sharp({ create: { width: side, height: side, channels: 3, background: { r: 90, g: 140, b: 200 } }, limitInputPixels: false })
    .png({ compressionLevel: 9 })
    .toBuffer();
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  try {
    const extract = async () => (await pipe.extract([png], { size: 128 })).forEach((f) => f.dispose());
    await pipe.extract([join(ROOT, 'test', 'fixtures', 'images', 'chelsea.png')], { size: 128 }).then((r) => r.forEach((f) => f.dispose())); // warm-up
    setImageThreads(0);
    const base = await stall(extract);
    setImageThreads(2);
    const ours = await stall(extract);
    rows.push([`extract, one ${side}² PNG (${(png.length / 1024).toFixed(0)} KB), micro model, 128 px`, fmt(base.maxMs), fmt(ours.maxMs), fmt(base.maxMs / ours.maxMs), fmt(ours.wallMs / 1000), ours.maxMs < 50 ? 'yes' : 'no']);

    // 2. 20 uploads at once to serve
    let serveRow: (string | number)[];
    try {
      const { createServer } = await import('../lib/serve/index.js');
      const jpeg = await sharp({ create: { width: 4000, height: 3000, channels: 3, background: { r: 30, g: 60, b: 90 } } })
        .composite([{ input: Buffer.from(Uint8Array.from({ length: 400 * 300 * 3 }, (_, i) => (i * 2654435761) >>> 24)), raw: { width: 400, height: 300, channels: 3 }, tile: true }])
        .jpeg({ quality: 90 })
        .toBuffer();
      const server = await createServer({ pipeline: pipe, maxQueue: 32, maxBodyBytes: 32 * 2 ** 20 });
      const url = await server.listen({ port: 0 });
      try {
        const uploads = async () => {
          const rs = await Promise.all(
            Array.from({ length: 20 }, () => fetch(`${url}/v1/extract?size=64&layers=legacy`, { method: 'POST', body: jpeg, headers: { 'content-type': 'image/jpeg' } }).then(async (r) => ({ status: r.status, bytes: (await r.arrayBuffer()).byteLength }))),
          );
          const bad = rs.filter((r) => r.status !== 200);
          if (bad.length) throw new Error(`${bad.length} of 20 uploads failed (status ${bad[0]!.status})`);
        };
        setImageThreads(0);
        const sBase = await stall(uploads);
        setImageThreads(2);
        const sOurs = await stall(uploads);
        serveRow = [`serve, 20 uploads of a 4000×3000 JPEG (${(jpeg.length / 1024).toFixed(0)} KB) at once, size 64`, fmt(sBase.maxMs), fmt(sOurs.maxMs), fmt(sBase.maxMs / sOurs.maxMs), fmt(sOurs.wallMs / 1000), sOurs.maxMs < 50 ? 'yes' : 'no'];
      } finally {
        await server.close();
      }
    } catch (e) {
      serveRow = [`serve, 20 uploads: not measured (${(e as Error).message.slice(0, 120)})`, '-', '-', '-', '-', '-'];
    }
    rows.push(serveRow);
  } finally {
    setImageThreads(2);
    pipe.dispose();
  }
  return [
    table(['work', 'baseline: resize on the JS thread, longest stall (ms)', 'ours: longest stall (ms)', 'ratio (baseline / ours)', 'ours: wall (s)', '< 50 ms'], rows),
    '',
    'Stall = longest event-loop delay (monitorEventLoopDelay, 5 ms resolution) while the work runs; the idle row is what the machine alone gives.',
  ].join('\n');
}
