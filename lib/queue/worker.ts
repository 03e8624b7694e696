/**
 * The scale-out worker (docs/scale-out.md): BullMQ jobs in, `OUT/<name>.safetensors` out, exactly as
 * `extract` (or `recipe`) run on that image alone with the same settings writes it.
 *
 * - One pipeline per device; jobs held by this process are grouped by settings into batches of up to
 *   `batchSize` and handed to whichever pipeline is free.
 * - Running a batch and writing its outputs is lib/queue/execute.ts: a job's noise is that of the
 *   image alone; an existing output with the same recorded settings completes the job without a write
 *   (a re-run after a crash or a Redis restart costs a header read); outputs are published without
 *   clobbering, so a taken-over job is never written twice or half.
 * - Broken input (undecodable image, unknown layer, changed file, mismatching existing output) fails
 *   its job once with the reason; out-of-memory, I/O and Redis trouble are retried with backoff.
 * - A worker that dies (kill -9, a lost host) stops renewing its job locks; BullMQ's stalled check in
 *   the other workers moves those jobs back to wait within `lockDurationMs + stalledIntervalMs`.
 * - Temporaries of dead writers in `out` are removed when a worker starts.
 *
 * @module
 */
import { EventEmitter } from 'node:events';
import { hostname } from 'node:os';
import { mkdir } from 'node:fs/promises';
import { Worker, UnrecoverableError, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Device } from '../native.js';
import { AbortError, InvalidArgumentError } from '../errors.js';
import { loadPipeline, type Pipeline } from '../pipeline/index.js';
import { cleanStaleTemps } from '../outputs.js';
import { checkJobData, settingsKey, type JobData, type JobProgress, type JobResult } from './job.js';
import { checkQueueName, connectRedis, type RedisTarget } from './redis.js';
import { isTransient, JobExecutor, reasonOf, type Held, type Slot } from './execute.js';

/** Options of {@link runWorker}. */
export interface WorkerOptions {
  /** Redis URL or connection (the connection must have `maxRetriesPerRequest: null`). */
  redis: RedisTarget;
  /** Queue name (default `diffusion-features`). */
  queue?: string;
  /** Exported weights folder (ignored when `pipelines` is given). */
  weights: string;
  /** Pipelines to serve instead of loading one per device (the caller keeps ownership: not disposed on close). */
  pipelines?: readonly Pipeline[];
  /** Output folder (a shared volume across hosts). */
  out: string;
  /** One pipeline per device (default `['auto']`); `cuda:0,cuda:1` serves both from one process. */
  devices?: readonly Device[];
  /** Compute dtype (default `'auto'`: float16 on CUDA, float32 on the CPU). */
  dtype?: 'auto' | 'float32' | 'float16';
  /** Jobs with the same settings run as one batch of up to this many images (default 1). */
  batchSize?: number;
  /** How long a batch waits for more jobs of its settings when fewer than `batchSize` are held (ms; default 50). */
  batchWaitMs?: number;
  /** Job lock duration (ms; default 30000): a dead worker's jobs are free after at most this long. */
  lockDurationMs?: number;
  /** How often this worker looks for stalled jobs (ms; default 20000). Takeover ≤ lock + interval. */
  stalledIntervalMs?: number;
  /** Times a job may stall (its worker died) before it fails (default 2). */
  maxStalledCount?: number;
  /** Stops the worker gracefully (as {@link FeatureWorker.close}). */
  signal?: AbortSignal;
  /** Log lines (default: none). */
  log?: (line: string) => void;
}

/** Events of a {@link FeatureWorker}. */
export interface FeatureWorkerEvents {
  /** A job finished; `result.written` is false when its output was already there. */
  completed: [id: string, result: JobResult, data: JobData];
  /** A job failed; `willRetry` is true for transient failures with attempts left. */
  failed: [id: string, reason: string, data: JobData | undefined, willRetry: boolean];
  /** Redis or BullMQ trouble (the worker keeps going and reconnects). */
  error: [err: Error];
  /** Progress of a job. */
  progress: [id: string, progress: JobProgress];
}

/** A running worker. Close it with {@link FeatureWorker.close}; `closed` settles when it has stopped. */
export class FeatureWorker extends EventEmitter<FeatureWorkerEvents> {
  /** Settles when the worker has stopped and released its pipelines. */
  readonly closed: Promise<void>;
  private readonly held: Held[] = [];
  private readonly slots: Slot[];
  private readonly abort = new AbortController();
  private bull!: Worker<JobData, JobResult>;
  private closing: Promise<void> | undefined;
  private markClosed!: () => void;
  private batchTimer: NodeJS.Timeout | undefined;
  private readonly batchSize: number;
  private readonly log: (line: string) => void;
  private redis!: Redis;
  private ownRedis = false;
  private readonly exec: JobExecutor;

  /** @internal use {@link runWorker} */
  constructor(private readonly o: WorkerOptions, pipelines: Pipeline[]) {
    super();
    this.slots = pipelines.map((pipeline) => ({ pipeline, busy: false, lora: '' }));
    this.batchSize = o.batchSize ?? 1;
    this.log = o.log ?? (() => undefined);
    this.closed = new Promise((r) => (this.markClosed = r));
    this.exec = new JobExecutor(o.out, this.abort.signal, (batch) => this.progress(batch));
  }

  /** @internal */
  start(): void {
    const o = this.o;
    this.ownRedis = typeof o.redis === 'string';
    this.redis = typeof o.redis === 'string' ? connectRedis(o.redis, 'durable') : o.redis;
    const lockDuration = o.lockDurationMs ?? 30_000;
    this.bull = new Worker<JobData, JobResult>(checkQueueName(o.queue), (job) => this.hold(job), {
      connection: this.redis,
      concurrency: this.batchSize * this.slots.length,
      lockDuration,
      stalledInterval: o.stalledIntervalMs ?? 20_000,
      maxStalledCount: o.maxStalledCount ?? 2,
      drainDelay: 2,
      autorun: true,
      // recorded on each job as processedBy: which host/process holds it
      name: `${hostname()}:${process.pid}`,
    });
    this.bull.on('error', (err) => {
      this.log(`redis/bullmq: ${err.message}`);
      if (this.listenerCount('error')) this.emit('error', err);
    });
    this.bull.on('completed', (job, result) => this.emit('completed', job.id ?? '', result, job.data));
    this.bull.on('failed', (job, err) => {
      if (!job) return;
      const willRetry = !(err instanceof UnrecoverableError) && job.attemptsMade < (job.opts.attempts ?? 1);
      this.emit('failed', job.id ?? '', err.message, job.data, willRetry);
    });
    o.signal?.addEventListener('abort', () => void this.close(), { once: true });
  }

  /** Devices of this worker's pipelines. */
  get devices(): string[] {
    return this.slots.map((s) => s.pipeline.device);
  }

  /**
   * Stops taking jobs, finishes (and writes) every job this worker holds, then releases the
   * pipelines. With `force`, running work is aborted and held jobs are left to the stalled check of
   * the other workers (they are taken over within a minute).
   */
  close(opts: { force?: boolean } = {}): Promise<void> {
    if (opts.force) {
      this.abort.abort(new AbortError('worker stopped'));
      for (const h of this.held.splice(0)) h.reject(new AbortError('worker stopped'));
    }
    this.closing ??= (async () => {
      try {
        await this.bull.close(!!opts.force);
      } catch (e) {
        this.log(`close: ${(e as Error).message}`);
      }
      while (this.slots.some((s) => s.busy)) await new Promise((r) => setTimeout(r, 20));
      if (!this.o.pipelines?.length) for (const s of this.slots) s.pipeline.dispose();
      if (this.ownRedis) this.redis.disconnect();
      this.markClosed();
    })();
    if (opts.force) void this.bull.close(true).catch(() => undefined);
    return this.closing;
  }

  /** BullMQ's processor: validates the job and holds it until a pipeline takes its batch. */
  private hold(job: Job<JobData, JobResult>): Promise<JobResult> {
    let data: JobData;
    try {
      data = checkJobData(job.data);
    } catch (e) {
      return Promise.reject(new UnrecoverableError(reasonOf(e)));
    }
    return new Promise<JobResult>((resolve, reject) => {
      this.held.push({ job, data, key: settingsKey(data.settings), resolve, reject });
      this.pump();
    });
  }

  /** Starts batches on free pipelines. */
  private pump(): void {
    if (this.batchTimer) return;
    const free = this.slots.find((s) => !s.busy);
    if (!free || !this.held.length) return;
    const head = this.held[0]!;
    const same = this.held.filter((h) => h.key === head.key);
    const want = head.data.settings.kind === 'extract' ? this.batchSize : 1;
    if (same.length < want && (this.o.batchWaitMs ?? 50) > 0 && !this.abort.signal.aborted && !this.closing) {
      // give the other jobs BullMQ is fetching a moment to arrive
      this.batchTimer = setTimeout(() => {
        this.batchTimer = undefined;
        this.dispatch();
      }, this.o.batchWaitMs ?? 50);
      return;
    }
    this.dispatch();
  }

  private dispatch(): void {
    for (;;) {
      const free = this.slots.find((s) => !s.busy);
      if (!free || !this.held.length) return;
      const head = this.held[0]!;
      const want = head.data.settings.kind === 'extract' ? this.batchSize : 1;
      const batch: Held[] = [];
      for (let i = 0; i < this.held.length && batch.length < want; ) {
        if (this.held[i]!.key === head.key) batch.push(...this.held.splice(i, 1));
        else i++;
      }
      free.busy = true;
      void this.runBatch(free, batch).finally(() => {
        free.busy = false;
        this.pump();
      });
    }
  }

  private progress(batch: readonly Held[]): (p: Omit<JobProgress, 'total'>) => void {
    let last = 0;
    return (p) => {
      const now = Date.now();
      if (now - last < 250 && p.stage !== 'done') return;
      last = now;
      const full: JobProgress = { ...p, total: batch.length };
      for (const h of batch) {
        h.job.updateProgress(full as unknown as object).catch(() => undefined);
        this.emit('progress', h.job.id ?? '', full);
      }
    };
  }

  /** Runs one batch (jobs of the same settings) on one pipeline; settles every job of it. */
  private async runBatch(slot: Slot, batch: Held[]): Promise<void> {
    const settle = (h: Held, e: unknown): void => {
      if (this.abort.signal.aborted || isTransient(e)) {
        // a forced stop is not the job's fault: it goes back to the queue (retried) rather than failing
        this.log(`job ${h.job.id} (${h.data.image}): transient failure, will retry: ${reasonOf(e)}`);
        h.reject(e instanceof Error ? e : new Error(String(e)));
      } else {
        this.log(`job ${h.job.id} (${h.data.image}) failed: ${reasonOf(e)}`);
        h.reject(new UnrecoverableError(reasonOf(e)));
      }
    };
    try {
      if (batch[0]!.data.settings.kind === 'recipe') {
        for (const h of batch) {
          try {
            h.resolve(await this.exec.runRecipeJob(slot, h));
          } catch (e) {
            settle(h, e);
          }
        }
        return;
      }
      const results = await this.exec.runExtractBatch(slot, batch);
      batch.forEach((h, i) => {
        const r = results[i]!;
        if (r instanceof Error || !('output' in r)) settle(h, r);
        else h.resolve(r);
      });
    } catch (e) {
      for (const h of batch) settle(h, e);
    }
  }
}

/**
 * Starts a worker: cleans stale temporaries in `out`, loads one pipeline per device, then takes jobs
 * until {@link FeatureWorker.close} (or `signal`). Resolves once it is taking jobs.
 */
export async function runWorker(o: WorkerOptions): Promise<FeatureWorker> {
  const batchSize = o.batchSize ?? 1;
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 256) throw new InvalidArgumentError(`batch size must be an integer in [1, 256], got ${String(batchSize)}`);
  checkQueueName(o.queue);
  await mkdir(o.out, { recursive: true });
  const removed = await cleanStaleTemps(o.out);
  if (removed.length) o.log?.(`removed ${removed.length} stale temporary file(s) in ${o.out}`);
  if (o.pipelines?.length) {
    const w = new FeatureWorker(o, [...o.pipelines]);
    w.start();
    return w;
  }
  const devices = o.devices?.length ? o.devices : (['auto'] as Device[]);
  const pipelines: Pipeline[] = [];
  try {
    for (const d of devices) pipelines.push(await loadPipeline(o.weights, { device: d, dtype: o.dtype ?? 'auto' }));
  } catch (e) {
    pipelines.forEach((p) => p.dispose());
    throw e;
  }
  const w = new FeatureWorker(o, pipelines);
  w.start();
  return w;
}
