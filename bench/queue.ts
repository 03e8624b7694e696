/**
 * Scale-out cost and throughput (issue 13), full-size SD1.5 architecture with random weights, CPU float32,
 * legacy preset at BENCH_QUEUE_SIZE (512) px, a real Redis started for the run (127.0.0.1, no persistence).
 *
 *   overhead   — the same images, each alone with its seed: baseline = in-process `extract` + atomic write
 *                of each image, one after the other, on a warm pipeline; ours = the same images as queue
 *                jobs (`enqueue` → an in-process `runWorker` serving the same warm pipeline → `waitForJobs`),
 *                timed from enqueue to the last completion. Overhead per job = (ours − baseline) / images;
 *                ratio = ours / baseline (target < 1.05). The two sides alternate, best of
 *                BENCH_QUEUE_REPEATS (2), so load from other work on the machine hits both.
 *   throughput — images/s through the queue with 1 and with 2 worker processes (`diffusion-features worker`)
 *                at BENCH_QUEUE_TP_SIZE (default: BENCH_QUEUE_SIZE) px,
 *                the cores split between them (OMP_NUM_THREADS = cores / workers), timed from enqueue to the
 *                last completion; model load is not timed (workers report ready first).
 *
 * Env: BENCH_QUEUE_SIZE (512), BENCH_QUEUE_TP_SIZE, BENCH_QUEUE_IMAGES (4), BENCH_QUEUE_REPEATS (2), BENCH_QUEUE_PARTS
 * (overhead,throughput), DF_BENCH_SD15, OMP_NUM_THREADS.
 */
import { mkdtempSync, rmSync, readdirSync, copyFileSync, mkdirSync } from 'node:fs';
import { tmpdir, loadavg } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { setNumThreads } from '../lib/native.js';
import { loadPipeline } from '../lib/pipeline/index.js';
import { writeFeatures } from '../lib/io/features.js';
import { outputNameFor, outputPathFor } from '../lib/outputs.js';
import { enqueue, waitForJobs } from '../lib/queue/enqueue.js';
import { runWorker } from '../lib/queue/worker.js';
import { startRedis } from '../test/helpers/redis.js';
import { benchImages } from './pipeline.js';
import { ROOT, fullSizeDir, table, fmt, threads, since } from './common.js';

/** Copies of the bench images under distinct names (distinct outputs, distinct jobs). */
function images(n: number, dir: string): string[] {
  return benchImages(n).map((p, i) => {
    const dst = join(dir, `img${i}.png`);
    copyFileSync(p, dst);
    return dst;
  });
}

export async function run(): Promise<string> {
  const size = Number(process.env.BENCH_QUEUE_SIZE ?? 512);
  const n = Number(process.env.BENCH_QUEUE_IMAGES ?? 4);
  const repeats = Number(process.env.BENCH_QUEUE_REPEATS ?? 2);
  const parts = (process.env.BENCH_QUEUE_PARTS ?? 'overhead,throughput').split(',');
  const cores = threads();
  const weights = await fullSizeDir();
  const work = mkdtempSync(join(tmpdir(), 'df-bench-queue-'));
  const redis = await startRedis();
  const lines: string[] = [`full-size SD1.5 (random weights), CPU float32, legacy preset, ${size} px, ${n} images, ${cores} threads, 1-min load at start ${loadavg()[0]!.toFixed(1)}`];
  try {
    const imgs = images(n, work);
    const opts = { layers: 'legacy', size, seed: 5 } as const;
    if (parts.includes('overhead')) {
      setNumThreads(cores);
      const pipe = await loadPipeline(weights, { device: 'cpu' });
      const out = join(work, 'direct');
      const warm = await pipe.extract([imgs[0]!], opts);
      warm.forEach((f) => f.dispose());
      const direct = async (): Promise<number> => {
        rmSync(out, { recursive: true, force: true });
        mkdirSync(out, { recursive: true });
        const t0 = performance.now();
        for (const img of imgs) {
          const [f] = await pipe.extract([img], opts);
          await writeFeatures(outputPathFor(out, outputNameFor(img), 'safetensors'), f!);
          f!.dispose();
        }
        return since(t0);
      };
      const qout = join(work, 'queued');
      // the worker serves the same warm pipeline: both sides run the same model state, alternately
      const worker = await runWorker({ redis: redis.url, weights, out: qout, pipelines: [pipe], batchSize: 1 });
      // warm the worker's pipeline with one job of other settings
      const w0 = await enqueue({ redis: redis.url, images: [imgs[0]!], extract: { ...opts, seed: 999 } });
      await waitForJobs({ redis: redis.url, jobs: w0.jobs });
      let round = 0;
      const queued = async (): Promise<number> => {
        round++;
        const t0 = performance.now();
        // a new seed per round: new job ids, nothing found already written
        const r = await enqueue({ redis: redis.url, images: imgs, extract: { ...opts, seed: 5 + round * 1000, overwrite: true } });
        const w = await waitForJobs({ redis: redis.url, jobs: r.jobs, pollMs: 20 });
        if (w.completed !== imgs.length) throw new Error(`queue side: ${w.completed}/${imgs.length} completed (${w.failed.map((f) => f.reason).join('; ')})`);
        return since(t0);
      };
      let bestDirect = Infinity;
      let bestQueued = Infinity;
      for (let k = 0; k < repeats; k++) {
        bestDirect = Math.min(bestDirect, await direct());
        bestQueued = Math.min(bestQueued, await queued());
      }
      await worker.close();
      pipe.dispose();
      const perJobMs = ((bestQueued - bestDirect) / imgs.length) * 1000;
      lines.push(
        '',
        '### overhead: queue jobs vs in-process extract of the same images (best of ' + repeats + ')',
        table(
          ['side', 'seconds', 's / image'],
          [
            ['baseline: in-process extract + write, each image alone', fmt(bestDirect), fmt(bestDirect / imgs.length)],
            ['ours: enqueue → worker → outputs, waitForJobs', fmt(bestQueued), fmt(bestQueued / imgs.length)],
          ],
        ),
        `overhead per job: ${fmt(perJobMs)} ms; ratio (ours / baseline): **${(bestQueued / bestDirect).toFixed(3)}** (target < 1.05)`,
      );
      console.log(lines.join('\n'));
    }
    if (parts.includes('throughput')) {
      const rows: (string | number)[][] = [];
      const tpSize = Number(process.env.BENCH_QUEUE_TP_SIZE ?? size);
      const tpOpts = { ...opts, size: tpSize };
      for (const workers of [1, 2]) {
        const out = join(work, `tp${workers}`);
        const per = Math.max(1, Math.floor(cores / workers));
        const procs = Array.from({ length: workers }, () => {
          const p = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), 'worker', '--redis', redis.url, '--queue', `tp${workers}`, '--weights', weights, '--out', out, '--device', 'cpu', '--dtype', 'float32'], {
            env: { ...process.env, OMP_NUM_THREADS: String(per) },
            stdio: ['ignore', 'ignore', 'pipe'],
          });
          let err = '';
          const ready = new Promise<void>((resolve, reject) => {
            p.stderr!.on('data', (d: Buffer) => {
              err += d.toString();
              if (/ready:/.test(err)) resolve();
            });
            p.on('exit', () => reject(new Error(`worker exited: ${err.slice(-500)}`)));
          });
          return { p, ready, exited: new Promise((r) => p.on('exit', r)) };
        });
        await Promise.all(procs.map((x) => x.ready));
        // one untimed warm-up job per worker
        const warm = await enqueue({ redis: redis.url, queue: `tp${workers}`, images: imgs.slice(0, workers), extract: { ...tpOpts, seed: 777 } });
        await waitForJobs({ redis: redis.url, queue: `tp${workers}`, jobs: warm.jobs, pollMs: 20 });
        const t0 = performance.now();
        const r = await enqueue({ redis: redis.url, queue: `tp${workers}`, images: imgs, extract: { ...tpOpts, overwrite: true } });
        const w = await waitForJobs({ redis: redis.url, queue: `tp${workers}`, jobs: r.jobs, pollMs: 20 });
        const s = since(t0);
        for (const x of procs) x.p.kill('SIGTERM');
        await Promise.all(procs.map((x) => x.exited));
        if (w.completed !== imgs.length) throw new Error(`throughput ${workers}: ${w.completed}/${imgs.length} completed`);
        rows.push([workers, per, imgs.length, fmt(s), fmt(imgs.length / s), readdirSync(out).filter((f) => f.endsWith('.safetensors')).length]);
      }
      lines.push('', `### throughput through the queue (worker processes on this machine, ${tpSize} px)`, table(['workers', 'threads each', 'images', 'seconds', 'images/s', 'outputs'], rows));
      const r1 = Number(rows[0]![4]);
      const r2 = Number(rows[1]![4]);
      lines.push(`2 workers / 1 worker: ${(r2 / r1).toFixed(2)}× (${cores} cores shared: two pipelines split the same cores, so no gain is expected on the CPU)`);
    }
  } finally {
    await redis.stop();
    rmSync(work, { recursive: true, force: true });
  }
  return lines.join('\n');
}
