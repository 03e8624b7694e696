/**
 * The scale-out worker (DESIGN.md §8): BullMQ jobs in, `OUT/<name>.safetensors` out, exactly as
 * `extract` (or `recipe`) run on that image alone with the same settings writes it.
 *
 * - One pipeline per device; jobs held by this process are grouped by settings into batches of up to
 *   `batchSize` and handed to whichever pipeline is free.
 * - A job's noise is that of the image alone (stream index 0 of its seed): in a batch each image gets
 *   the same draws it would get alone, so a job never depends on its neighbours or on enqueue order.
 * - Before any work, an existing output with the same recorded settings completes the job without a
 *   write (a re-run after a crash or a Redis restart costs a header read). Outputs are staged under a
 *   temporary name and published without clobbering (a hard link), so two workers that both ran a
 *   taken-over job never write it twice, and a reader never sees half a file.
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
import { mkdir, link, rename } from 'node:fs/promises';
import { Worker, UnrecoverableError, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import { Tensor, type Device } from '../native.js';
import { DiffusionFeaturesError, isDiffusionFeaturesError } from '../errors.js';
import { loadPipeline, type Pipeline, type ExtractOptions, type ImageFeatures, type ImageInput } from '../pipeline/index.js';
import { engineOf } from '../pipeline/facade.js';
import { streamSeed } from '../pipeline/batch.js';
import { readNoiseFile, writeFeatures, writeFeaturesNpyContent, writeRecipeResult } from '../io/features.js';
import { outputPathFor, checkExistingOutput, cleanStaleTemps, tempPathFor, removeTemp, replaceOutputDir, SettingsMismatchError } from '../outputs.js';
import { extractRecipe } from '../recipes.js';
import { canonicalJson, checkJobData, pathExists, readJobFile, settingsKey, type ExtractJobSettings, type JobData, type JobProgress, type JobResult, type LoraRef, type RecipeJobSettings } from './job.js';
import { checkQueueName, connectRedis, type RedisTarget } from './redis.js';

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

interface Held {
  job: Job<JobData, JobResult>;
  data: JobData;
  key: string;
  resolve: (r: JobResult) => void;
  reject: (e: unknown) => void;
}

interface Slot {
  pipeline: Pipeline;
  busy: boolean;
  /** canonical JSON of the merged LoRA set ('' = base weights). */
  lora: string;
}

/** Error codes that mean the input is wrong: fail at once, never retry. */
function isTransient(e: unknown): boolean {
  if (isDiffusionFeaturesError(e)) {
    if (e.code === 'E_OUT_OF_MEMORY') return true;
    if (e.code === 'E_TORCH') return /out of memory|CUDA error|cudaError|CUBLAS_STATUS_ALLOC_FAILED/i.test(e.message);
    if (e.code === 'E_WRITE_FAILED') return !/EACCES|EPERM|EROFS|ENAMETOOLONG/.test(e.message);
    return false;
  }
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code && ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ESTALE', 'EIO', 'ENOSPC', 'EBUSY', 'EAGAIN', 'EMFILE', 'ENFILE', 'ENOMEM'].includes(code)) return true;
  return /Connection is closed|Stream isn't writeable|READONLY|LOADING|CLUSTERDOWN|out of memory/i.test((e as Error | undefined)?.message ?? '');
}

/** The reason recorded on a failed job: the error code and message (ours name files and ids, never contents). */
function reasonOf(e: unknown): string {
  if (isDiffusionFeaturesError(e)) return `${e.code}: ${e.message}`;
  return e instanceof Error ? e.message : String(e);
}

/** The recorded settings an existing output must match to count as this job's (the device may differ). */
function comparable(settings: Record<string, string>): Record<string, string> {
  const { device: _device, ...rest } = settings;
  return rest;
}

/** Same noise for every image of a batch: each gets stream 0 of `seed`, as if it ran alone. */
async function aloneNoise(seed: number, latent: number, B: number, kinds: readonly (0 | 1)[]): Promise<{ noise: Tensor; vaeNoise?: Tensor }> {
  const make = async (kind: 0 | 1): Promise<Tensor> => {
    const one = await Tensor.randn([1, 4, latent, latent], { seed: streamSeed(seed, 0, kind), device: 'cpu', dtype: 'float32' });
    try {
      const src = one.toFloat32Array();
      const all = new Float32Array(src.length * B);
      for (let i = 0; i < B; i++) all.set(src, i * src.length);
      return Tensor.fromFloat32Array(all, [B, 4, latent, latent]);
    } finally {
      one.dispose();
    }
  };
  return { noise: await make(1), vaeNoise: kinds.includes(0) ? await make(0) : undefined };
}

/** Rows `[0, 0, …]` (B times) of a noise file's tensors: what each image would get alone. */
function firstRow(t: Tensor, B: number): Tensor {
  const [, ...rest] = t.shape;
  const per = rest.reduce((a, b) => a * b, 1);
  const src = t.toFloat32Array().subarray(0, per);
  const all = new Float32Array(per * B);
  for (let i = 0; i < B; i++) all.set(src, i * per);
  return Tensor.fromFloat32Array(all, [B, ...rest]);
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

  /** @internal use {@link runWorker} */
  constructor(private readonly o: WorkerOptions, pipelines: Pipeline[]) {
    super();
    this.slots = pipelines.map((pipeline) => ({ pipeline, busy: false, lora: '' }));
    this.batchSize = o.batchSize ?? 1;
    this.log = o.log ?? (() => undefined);
    this.closed = new Promise((r) => (this.markClosed = r));
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
      this.abort.abort(new DiffusionFeaturesError('E_ABORTED', 'worker stopped'));
      for (const h of this.held.splice(0)) h.reject(new DiffusionFeaturesError('E_ABORTED', 'worker stopped'));
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
            h.resolve(await this.runRecipeJob(slot, h));
          } catch (e) {
            settle(h, e);
          }
        }
        return;
      }
      const results = await this.runExtractBatch(slot, batch);
      batch.forEach((h, i) => {
        const r = results[i]!;
        if (r instanceof Error || !('output' in r)) settle(h, r);
        else h.resolve(r);
      });
    } catch (e) {
      for (const h of batch) settle(h, e);
    }
  }

  /** Merges the LoRA set of a job into the pipeline unless it already is (files checked against their hashes). */
  private async useLora(slot: Slot, lora: readonly LoraRef[], textEncoder: boolean): Promise<void> {
    const key = lora.length ? canonicalJson({ lora, textEncoder }) : '';
    if (slot.lora === key) return;
    for (const l of lora) await verifyFile(l.file, l.sha256, 'LoRA file');
    slot.lora = '\0changing';
    await slot.pipeline.setLora(
      lora.map((l) => ({ file: l.file, scale: l.scale })),
      { textEncoder },
    );
    slot.lora = key;
  }

  /** Extract jobs of one settings key: one result (or error) per job, in order. */
  private async runExtractBatch(slot: Slot, batch: Held[]): Promise<(JobResult | Error)[]> {
    const t0 = performance.now();
    const s = batch[0]!.data.settings as ExtractJobSettings;
    const out: (JobResult | Error | undefined)[] = batch.map(() => undefined);
    const fail = (i: number, e: unknown): void => {
      out[i] = e instanceof Error ? e : new Error(String(e));
    };
    try {
      await this.useLora(slot, s.lora, s.loraTextEncoder);
    } catch (e) {
      return batch.map(() => (e instanceof Error ? e : new Error(String(e))));
    }
    const engine = engineOf(slot.pipeline);
    const fileNoise = s.noise ? await loadNoise(s.noise.file, s.noise.sha256).catch((e: unknown) => e as Error) : undefined;
    if (fileNoise instanceof Error) return batch.map(() => fileNoise);
    try {
      const base: ExtractOptions = {
        layers: [...s.layers],
        attention: s.attention,
        prompt: s.prompt,
        t: s.t,
        seed: s.seed,
        posterior: s.posterior,
        timestepMode: s.timestepMode,
        control: s.control,
        controlScale: s.controlScale,
        denoiseFrom: s.denoiseFrom ?? undefined,
        scheduler: s.scheduler,
        size: s.size ?? undefined,
        featureResize: s.featureResize,
        packaged: s.aggregate,
        signal: this.abort.signal,
      };
      // What `extract` records for this image alone: the existing-output check and every write use it.
      const aloneOpts: ExtractOptions = fileNoise ? { ...base, noise: { noise: firstRow(fileNoise.noise, 1), vaeNoise: fileNoise.vaeNoise && firstRow(fileNoise.vaeNoise, 1) } } : base;
      let expected: Record<string, string>;
      try {
        expected = { ...(await engine.plan(['alone'], aloneOpts)).settings, packaged: s.aggregate ? 'true' : 'false' };
      } finally {
        disposeNoise(aloneOpts.noise);
      }
      // 1. outputs already there; 2. image bytes (checked against the enqueued hash)
      const todo: { i: number; path: string; input: ImageInput }[] = [];
      for (let i = 0; i < batch.length; i++) {
        const h = batch[i]!;
        try {
          const path = outputPathFor(this.o.out, h.data.name, s.format);
          if (await this.existing(path, expected, s.overwrite)) {
            out[i] = { output: path, written: false, batch: batch.length, seconds: 0 };
            continue;
          }
          const { data } = await verifyFile(h.data.image, h.data.sha256, 'image');
          todo.push({ i, path, input: { name: h.data.name, data } });
        } catch (e) {
          fail(i, e);
        }
      }
      // 3. extract: all together, or one by one when an image in the batch is broken
      const run = async (items: typeof todo): Promise<ImageFeatures[]> => {
        const B = items.length;
        let noise: ExtractOptions['noise'];
        if (fileNoise) noise = { noise: firstRow(fileNoise.noise, B), vaeNoise: fileNoise.vaeNoise && firstRow(fileNoise.vaeNoise, B) };
        else if (B > 1) {
          const size = s.size ?? (typeof slot.pipeline.model.default_size === 'number' ? slot.pipeline.model.default_size : 512);
          noise = await aloneNoise(s.seed, size / 8, B, s.posterior === 'sample' ? [0, 1] : [1]);
        }
        try {
          return await slot.pipeline.extract(
            items.map((x) => x.input),
            { ...base, noise, batchSize: B, onProgress: (p) => this.progress(items.map((x) => batch[x.i]!))({ stage: p.stage, done: p.done, step: p.step, steps: p.steps }) },
          );
        } finally {
          disposeNoise(noise);
        }
      };
      let groups: (typeof todo)[] = todo.length ? [todo] : [];
      if (todo.length > 1) {
        try {
          const feats = await run(todo);
          await this.writeAll(todo, feats, expected, s, out, batch.length, t0);
          groups = [];
        } catch (e) {
          if (!isInputError(e)) throw e;
          groups = todo.map((x) => [x]);
        }
      }
      for (const g of groups) {
        try {
          const feats = await run(g);
          await this.writeAll(g, feats, expected, s, out, batch.length, t0);
        } catch (e) {
          fail(g[0]!.i, e);
        }
      }
    } finally {
      disposeNoise(fileNoise);
    }
    return out.map((r) => r ?? new Error('internal: job not settled'));
  }

  private async writeAll(
    items: { i: number; path: string }[],
    feats: ImageFeatures[],
    expected: Record<string, string>,
    s: ExtractJobSettings,
    out: (JobResult | Error | undefined)[],
    batch: number,
    t0: number,
  ): Promise<void> {
    try {
      for (let k = 0; k < items.length; k++) {
        const { i, path } = items[k]!;
        const f = { ...feats[k]!, settings: { ...feats[k]!.settings, ...stripPackaged(expected) } };
        try {
          const written = await this.publish(path, expected, s.overwrite, (tmp) => (s.format === 'npy' ? writeFeaturesNpyContent(tmp, f) : writeFeatures(tmp, f)), s.format === 'npy');
          out[i] = { output: path, written, batch, seconds: (performance.now() - t0) / 1000 };
        } catch (e) {
          out[i] = e instanceof Error ? e : new Error(String(e));
        }
      }
    } finally {
      feats.forEach((f) => f.dispose());
    }
  }

  /** Whether an output with these settings exists (then the job is done); throws on a mismatch unless `overwrite`. */
  private async existing(path: string, expected: Record<string, string>, overwrite: boolean): Promise<boolean> {
    try {
      const r = await checkExistingOutput(path, comparable(expected));
      return r.exists && !overwrite;
    } catch (e) {
      if (overwrite && e instanceof SettingsMismatchError) return false;
      throw e;
    }
  }

  /**
   * Writes an output under a temporary name, then publishes it: without `overwrite`, only if no
   * output is there (a hard link for files, a rename onto nothing for npy folders), so a second writer
   * of the same job finds the first one's output and writes nothing. Returns whether it wrote.
   */
  private async publish(path: string, expected: Record<string, string>, overwrite: boolean, write: (tmp: string) => Promise<void>, dir: boolean): Promise<boolean> {
    await mkdir(this.o.out, { recursive: true });
    const tmp = tempPathFor(path);
    try {
      await write(tmp);
      if (overwrite) {
        if (dir) await replaceOutputDir(tmp, path);
        else await rename(tmp, path);
        return true;
      }
      try {
        if (dir) {
          if (await pathExists(path)) throw Object.assign(new Error('exists'), { code: 'EEXIST' });
          await rename(tmp, path);
        } else {
          await link(tmp, path);
        }
        return true;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EEXIST' || code === 'ENOTEMPTY') {
          await this.existing(path, expected, false); // same settings: done; else the mismatch error
          return false;
        }
        if (!dir && (code === 'EPERM' || code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'EXDEV')) {
          // no hard links on this file system: publish by rename unless an output appeared
          if (await pathExists(path)) {
            await this.existing(path, expected, false);
            return false;
          }
          await rename(tmp, path);
          return true;
        }
        throw e;
      }
    } finally {
      await removeTemp(tmp);
    }
  }

  private async runRecipeJob(slot: Slot, h: Held): Promise<JobResult> {
    const t0 = performance.now();
    const s = h.data.settings as RecipeJobSettings;
    const path = outputPathFor(this.o.out, h.data.name, 'safetensors');
    const expected = { recipe: s.recipe };
    if (await this.existing(path, expected, s.overwrite)) return { output: path, written: false, batch: 1, seconds: 0 };
    for (const l of Object.values(s.loraSlots)) await verifyFile(l.file, l.sha256, 'LoRA file');
    const { data } = await verifyFile(h.data.image, h.data.sha256, 'image');
    slot.lora = '\0recipe';
    const [r] = await extractRecipe(slot.pipeline, s.recipe, [{ name: h.data.name, data }], {
      loras: Object.fromEntries(Object.entries(s.loraSlots).map(([k, l]) => [k, { file: l.file, scale: l.scale }])),
      skipMissingLora: s.skipMissingLora,
      seed: s.seed,
      size: s.size ?? undefined,
      batchSize: 1,
      batchVariants: s.batchVariants === 'on' ? true : s.batchVariants === 'off' ? false : 'auto',
      amalgamate: true,
      signal: this.abort.signal,
      onProgress: (p) => this.progress([h])({ stage: `${p.variant} ${p.stage}`, done: p.done, step: p.step, steps: p.steps }),
    });
    slot.lora = ''; // extractRecipe restores the base weights
    try {
      const written = await this.publish(path, expected, s.overwrite, (tmp) => writeRecipeResult(tmp, r!, s.recipe), false);
      return { output: path, written, batch: 1, seconds: (performance.now() - t0) / 1000 };
    } finally {
      r!.dispose();
    }
  }
}

/** `packaged` is what the reader adds from the tensor list, not a metadata key. */
function stripPackaged(s: Record<string, string>): Record<string, string> {
  const { packaged: _p, ...rest } = s;
  return rest;
}

function isInputError(e: unknown): boolean {
  return isDiffusionFeaturesError(e) && ['E_IMAGE_DECODE', 'E_FILE_NOT_FOUND', 'E_FILE_ACCESS', 'E_LIMIT_EXCEEDED', 'E_INVALID_FILE'].includes(e.code);
}


function disposeNoise(n: { noise: Tensor; vaeNoise?: Tensor } | undefined): void {
  if (!n) return;
  if (!n.noise.disposed) n.noise.dispose();
  if (n.vaeNoise && !n.vaeNoise.disposed) n.vaeNoise.dispose();
}

/** Reads a file a job names and checks it still has the bytes it had when the job was enqueued. */
async function verifyFile(file: string, sha256: string, what: string): Promise<{ data: Buffer }> {
  const r = await readJobFile(file);
  if (r.sha256 !== sha256) throw new DiffusionFeaturesError('E_INVALID_FILE', `${file}: the ${what} changed since the job was enqueued (its bytes differ); enqueue it again`);
  return { data: r.data };
}

async function loadNoise(file: string, sha256: string): Promise<{ noise: Tensor; vaeNoise?: Tensor }> {
  await verifyFile(file, sha256, 'noise file');
  return readNoiseFile(file);
}

/**
 * Starts a worker: cleans stale temporaries in `out`, loads one pipeline per device, then takes jobs
 * until {@link FeatureWorker.close} (or `signal`). Resolves once it is taking jobs.
 */
export async function runWorker(o: WorkerOptions): Promise<FeatureWorker> {
  const batchSize = o.batchSize ?? 1;
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 256) throw new DiffusionFeaturesError('E_INVALID_ARGUMENT', `batch size must be an integer in [1, 256], got ${String(batchSize)}`);
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
