/**
 * Scale-out commands (docs/scale-out.md): `worker`, `enqueue`, `queue-status`. The queue code (BullMQ,
 * ioredis) is imported only when one of them runs, so other commands do not load it.
 *
 * `enqueue` takes every option of `extract` (the same commander options, so the two never drift)
 * except those that belong to the worker: `--weights`, `--device`, `--dtype`, `--batch-size`, `--out`.
 *
 * @module
 */
import { Command, Option, InvalidArgumentError as CliArgError } from 'commander';
import { intArg } from './args.js';
import type { Device } from '../native.js';
import type { ExtractJobOptions } from '../queue/job.js';

/** Options of `extract` that a worker decides, not a job. */
const WORKER_SIDE = new Set(['weights', 'device', 'dtype', 'batchSize', 'out']);

function deviceList(v: string): Device[] {
  const ds = v.split(',').map((d) => d.trim());
  for (const d of ds) if (!/^(cpu|auto|cuda|cuda:\d{1,3})$/.test(d)) throw new CliArgError(`--device takes cpu, cuda, cuda:N or auto (comma-separated), got '${d}'`);
  return ds as Device[];
}

/** `enqueue`'s options: the queue's, the recipe's, and extract's (same names as {@link ExtractJobOptions}). */
interface EnqueueCli extends ExtractJobOptions {
  redis: string;
  queue: string;
  wait?: boolean;
  retryFailed?: boolean;
  attempts: number;
  backoff: number;
  progress: boolean;
  recipe?: string;
  loraSlot?: Record<string, { file: string; scale: number }>;
  skipMissingLora?: boolean;
  batchVariants?: 'auto' | 'on' | 'off';
}

/** Runs `enqueue`; returns the exit code. */
export async function runEnqueue(images: string[], o: EnqueueCli): Promise<number> {
  const { enqueue, waitForJobs } = await import('../queue/enqueue.js');
  const r = await enqueue({
    redis: o.redis,
    queue: o.queue,
    images,
    attempts: o.attempts,
    backoffMs: o.backoff,
    retryFailed: o.retryFailed,
    ...(o.recipe
      ? { recipe: { recipe: o.recipe, loraSlots: o.loraSlot, skipMissingLora: o.skipMissingLora, seed: o.seed, size: o.size, batchVariants: o.batchVariants, overwrite: o.overwrite } }
      : { extract: o }),
  });
  for (const x of r.rejected) console.error(`not enqueued: ${x.image}: ${x.reason}`);
  let code = r.rejected.length ? 1 : 0;
  if (o.wait && r.jobs.length) {
    const cliProgress = (await import('cli-progress')).default;
    const bar =
      o.progress && process.stderr.isTTY
        ? new cliProgress.SingleBar({ format: 'jobs |{bar}| {value}/{total} ended | {active} running | {failed} failed | eta {eta_formatted}', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic)
        : null;
    const unique = [...new Map(r.jobs.map((j) => [j.id, j])).values()];
    bar?.start(unique.length, 0, { active: 0, failed: 0 });
    const stop = new AbortController();
    const onSig = (): void => stop.abort();
    process.once('SIGINT', onSig);
    try {
      const w = await waitForJobs({
        redis: o.redis,
        queue: o.queue,
        jobs: unique,
        attempts: o.attempts,
        backoffMs: o.backoff,
        signal: stop.signal,
        onProgress: (p) => bar?.update(p.done, { active: p.active, failed: p.failed }),
      });
      bar?.stop();
      if (w.readded) console.error(`${w.readded} job(s) were lost by Redis (restarted without persistence?) and added again`);
      console.error(`${w.completed} job(s) completed, ${w.failed.length} failed`);
      for (const f of w.failed) console.error(`  failed: ${f.image}: ${f.reason}`);
      if (w.failed.length) code = 1;
    } finally {
      bar?.stop();
      process.removeListener('SIGINT', onSig);
    }
  }
  console.log(JSON.stringify({ added: r.added, duplicates: r.duplicates }));
  return code;
}

interface WorkerCli {
  redis: string;
  queue: string;
  weights: string;
  out: string;
  device: Device[];
  dtype: 'auto' | 'float32' | 'float16';
  batchSize: number;
  batchWait: number;
  lockDuration: number;
  stalledInterval: number;
  maxStalled: number;
  quiet?: boolean;
}

/** Runs `worker` until SIGTERM/SIGINT; returns the exit code (0 after a graceful stop). */
export async function runWorkerCli(o: WorkerCli): Promise<number> {
  const log = o.quiet ? () => undefined : (line: string) => console.error(`[worker ${process.pid}] ${line}`);
  // Signals are handled from the start: a stop asked for while the models load ends the worker right after.
  let signals = 0;
  let worker: import('../queue/worker.js').FeatureWorker | undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    signals++;
    if (signals === 1) {
      log(`${sig}: finishing held jobs, then exiting (send again to stop at once)`);
      void worker?.close();
    } else {
      log(`${sig}: stopping now; held jobs go back to the queue`);
      void worker?.close({ force: true });
      if (!worker) process.exit(130);
    }
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  try {
    const { runWorker } = await import('../queue/worker.js');
    const { redactUrl } = await import('../queue/redis.js');
    const w = await runWorker({
      redis: o.redis,
      queue: o.queue,
      weights: o.weights,
      out: o.out,
      devices: o.device,
      dtype: o.dtype,
      batchSize: o.batchSize,
      batchWaitMs: o.batchWait,
      lockDurationMs: o.lockDuration,
      stalledIntervalMs: o.stalledInterval,
      maxStalledCount: o.maxStalled,
      log,
    });
    worker = w;
    w.on('completed', (id, r, d) => log(`done ${id} ${d.image} -> ${r.output}${r.written ? '' : ' (already there)'}`));
    w.on('failed', (id, reason, d, retry) => log(`${retry ? 'will retry' : 'failed'} ${id} ${d?.image ?? ''}: ${reason}`));
    w.on('error', () => undefined);
    log(`ready: queue ${o.queue} on ${redactUrl(o.redis)}, devices ${w.devices.join(',')}, batch ${o.batchSize}`);
    if (signals) void w.close();
    await w.closed;
  } finally {
    process.removeListener('SIGTERM', onSignal);
    process.removeListener('SIGINT', onSignal);
  }
  log('stopped');
  return signals > 1 ? 130 : 0;
}

/** Registers `worker`, `enqueue` and `queue-status` on the program (after `extract`, whose options `enqueue` shares). */
export function registerQueueCommands(program: Command): void {
  const extract = program.commands.find((c) => c.name() === 'extract');
  if (!extract) throw new Error('registerQueueCommands: register the extract command first');
  const redisOpt = () => new Option('--redis <url>', 'Redis URL, e.g. redis://127.0.0.1:6379').makeOptionMandatory();
  const queueOpt = () => new Option('--queue <name>', 'queue name').default('diffusion-features');

  program
    .command('worker')
    .description('take extraction jobs from the queue until SIGTERM/SIGINT, then finish the held ones and exit 0')
    .addOption(redisOpt())
    .addOption(queueOpt())
    .requiredOption('--weights <dir>', 'exported weights folder')
    .requiredOption('--out <dir>', 'output folder (a shared volume across hosts)')
    .addOption(new Option('--device <list>', 'one pipeline per device: cpu | cuda | cuda:N | auto, comma-separated').argParser(deviceList).default(['auto'] as Device[], 'auto'))
    .addOption(new Option('--dtype <dtype>', 'compute dtype').choices(['auto', 'float32', 'float16']).default('auto'))
    .option('--batch-size <n>', 'jobs with the same settings per model call', intArg('--batch-size', 1, 256), 1)
    .option('--batch-wait <ms>', 'wait this long for more jobs of the same settings before a short batch', intArg('--batch-wait', 0, 60_000), 50)
    .option('--lock-duration <ms>', 'job lock; a dead worker’s jobs are taken over after at most lock + stalled interval', intArg('--lock-duration', 1, 600_000), 30_000)
    .option('--stalled-interval <ms>', 'how often to look for jobs of dead workers', intArg('--stalled-interval', 1, 600_000), 20_000)
    .option('--max-stalled <n>', 'times a job may lose its worker before it fails', intArg('--max-stalled', 1, 100), 2)
    .option('--quiet', 'no log lines')
    .action(async (o: WorkerCli) => {
      process.exitCode = await runWorkerCli(o);
    });

  const enq = program
    .command('enqueue')
    .description('add one extraction job per image (id from the image bytes and settings: the same work runs once); prints {"added":N,"duplicates":M} last')
    .addOption(redisOpt())
    .addOption(queueOpt())
    .option('--wait', 'show progress until every job ended; exit non-zero if any failed')
    .option('--retry-failed', 'run failed jobs of the same work again (default: they count as duplicates)')
    .option('--attempts <n>', 'attempts per job for transient failures (out of memory, I/O, Redis)', intArg('--attempts', 1, 100), 5)
    .option('--backoff <ms>', 'first retry delay, doubled per attempt', intArg('--backoff', 1, 3_600_000), 2000);
  for (const opt of extract.options) {
    if (!WORKER_SIDE.has(opt.attributeName()) && !enq.options.some((x) => x.attributeName() === opt.attributeName())) enq.addOption(opt);
  }
  enq.argument('<images...>', 'image files, as the workers see them').action(async (images: string[], o: EnqueueCli) => {
    process.exitCode = await runEnqueue(images, o);
  });

  program
    .command('queue-status')
    .description('print one JSON object: job counts by state and the failed jobs with their image and reason')
    .addOption(redisOpt())
    .addOption(queueOpt())
    .option('--max-failed <n>', 'list at most this many failed jobs', intArg('--max-failed', 1, Number.MAX_SAFE_INTEGER))
    .action(async (o: { redis: string; queue: string; maxFailed?: number }) => {
      const { queueStatus } = await import('../queue/enqueue.js');
      console.log(JSON.stringify(await queueStatus({ redis: o.redis, queue: o.queue, maxFailed: o.maxFailed })));
    });
}
