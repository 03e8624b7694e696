/**
 * One measurement of bench/eventloop.ts, in a process of its own (so one case's garbage, threads and
 * heap do not weigh on the next): `node --import tsx bench/eventloop-case.ts <case> <imageThreads>`.
 *
 * - `idle`: the monitor over an idle second (what the machine alone gives).
 * - `extract`: `extract` of one side² PNG (DF_BENCH_EVENTLOOP_SIDE, default 16000) at 128 px.
 * - `serve`: starts `serve` (in this process) and prints `{"url": …}`; the parent process sends the
 *   uploads (a client is another process, as in production) between `start` and `stop` lines on stdin.
 *
 * Prints one JSON line `{"maxMs", "p99Ms", "wallMs"}`: the longest event-loop delay seen by
 * monitorEventLoopDelay (5 ms resolution) while the work ran.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import sharp from 'sharp';
import { loadPipeline } from '../lib/pipeline/index.js';
import { setImageThreads } from '../lib/image.js';
import { ROOT } from './common.js';

const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const [kind, threadsArg] = process.argv.slice(2);
setImageThreads(Number(threadsArg ?? 2));

function monitor(): { stop: () => Promise<{ maxMs: number; p99Ms: number; wallMs: number }> } {
  const h = monitorEventLoopDelay({ resolution: 5 });
  h.enable();
  const t0 = performance.now();
  if (process.env.DF_BENCH_EVENTLOOP_TRACE) {
    // diagnostics: when the stalls over 40 ms happened (stderr)
    let last = t0;
    const iv = setInterval(() => {
      const now = performance.now();
      if (now - last > 40) console.error(`stall ${(now - last).toFixed(0)} ms ending at +${(now - t0).toFixed(0)} ms`);
      last = now;
    }, 2);
    iv.unref();
  }
  return {
    async stop() {
      const wallMs = performance.now() - t0;
      await new Promise((r) => setTimeout(r, 50)); // a stall is only recorded at the next loop turn
      h.disable();
      return { maxMs: h.max / 1e6, p99Ms: h.percentile(99) / 1e6, wallMs };
    },
  };
}

if (kind === 'idle') {
  const m = monitor();
  await new Promise((r) => setTimeout(r, 1000));
  console.log(JSON.stringify(await m.stop()));
} else if (kind === 'extract') {
  const side = Number(process.env.DF_BENCH_EVENTLOOP_SIDE ?? 16000);
  const png = await sharp({ create: { width: side, height: side, channels: 3, background: { r: 90, g: 140, b: 200 } }, limitInputPixels: false })
    .png({ compressionLevel: 9 })
    .toBuffer();
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  await pipe.extract([join(ROOT, 'test', 'fixtures', 'images', 'chelsea.png')], { size: 128 }).then((r) => r.forEach((f) => f.dispose())); // warm-up
  const m = monitor();
  (await pipe.extract([png], { size: 128 })).forEach((f) => f.dispose());
  const r = await m.stop();
  pipe.dispose();
  console.log(JSON.stringify({ ...r, pngBytes: png.length }));
} else if (kind === 'serve') {
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  const { createServer } = await import('../lib/serve/index.js');
  const server = await createServer({ pipeline: pipe, maxQueue: 32, maxBodyBytes: 32 * 2 ** 20 });
  const url = await server.listen({ port: 0, host: '127.0.0.1' });
  console.log(JSON.stringify({ url }));
  let m: ReturnType<typeof monitor> | undefined;
  for await (const line of createInterface({ input: process.stdin })) {
    if (line === 'start') m = monitor();
    if (line === 'stop' && m) {
      console.log(JSON.stringify(await m.stop()));
      break;
    }
  }
  process.stdin.destroy(); // the parent's pipe would keep this process alive
  await server.close();
  pipe.dispose();
  process.exit(0);
} else {
  console.error(`unknown case ${kind}`);
  process.exit(2);
}
