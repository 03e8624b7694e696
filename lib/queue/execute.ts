/**
 * Job execution of the scale-out worker: one batch of jobs (same settings) on one pipeline, from the
 * existing-output check through extraction to the atomic, non-clobbering publish of each output.
 * The BullMQ side (taking jobs, batching, settling, shutdown) is lib/queue/worker.ts.
 *
 * - A job's noise is that of the image alone (stream index 0 of its seed): in a batch each image gets
 *   the same draws it would get alone, so a job never depends on its neighbours or on enqueue order.
 * - An existing output with the same recorded settings completes the job without a write.
 * - Outputs are staged under a temporary name and published without clobbering (a hard link), so two
 *   workers that both ran a taken-over job never write it twice, and a reader never sees half a file.
 *
 * @module
 */
import { mkdir, link, rename } from 'node:fs/promises';
import type { Job } from 'bullmq';
import { Tensor } from '../native.js';
import { InvalidFileError, isDiffusionFeaturesError } from '../errors.js';
import type { Pipeline, ExtractOptions, ImageFeatures, ImageInput } from '../pipeline/index.js';
import { engineOf } from '../pipeline/facade.js';
import { streamSeed } from '../pipeline/batch.js';
import { readNoiseFile, writeFeatures, writeFeaturesNpyContent, writeRecipeResult } from '../io/features.js';
import { outputPathFor, checkExistingOutput, comparable, tempPathFor, removeTemp, replaceOutputDir, SettingsMismatchError } from '../outputs.js';
import { extractRecipe } from '../recipes.js';
import { canonicalJson, pathExists, readJobFile, type ExtractJobSettings, type JobData, type JobProgress, type JobResult, type LoraRef, type RecipeJobSettings } from './job.js';

/** A job this worker holds until a pipeline takes its batch. */
export interface Held {
  job: Job<JobData, JobResult>;
  data: JobData;
  key: string;
  resolve: (r: JobResult) => void;
  reject: (e: unknown) => void;
}

/** One pipeline of the worker. */
export interface Slot {
  pipeline: Pipeline;
  busy: boolean;
  /** canonical JSON of the merged LoRA set ('' = base weights). */
  lora: string;
}

/** Whether a failure is transient (retried with backoff); anything else means the input is wrong: fail at once. */
export function isTransient(e: unknown): boolean {
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
export function reasonOf(e: unknown): string {
  if (isDiffusionFeaturesError(e)) return `${e.code}: ${e.message}`;
  return e instanceof Error ? e.message : String(e);
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

/** Runs jobs on pipelines and writes their outputs into `out` (see the module doc). */
export class JobExecutor {
  /**
   * @param out the output folder
   * @param signal aborts running work (a forced stop)
   * @param progress progress reporter of a set of jobs
   */
  constructor(
    private readonly out: string,
    private readonly signal: AbortSignal,
    private readonly progress: (batch: readonly Held[]) => (p: Omit<JobProgress, 'total'>) => void,
  ) {}

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
  async runExtractBatch(slot: Slot, batch: Held[]): Promise<(JobResult | Error)[]> {
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
        signal: this.signal,
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
          const path = outputPathFor(this.out, h.data.name, s.format);
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
    await mkdir(this.out, { recursive: true });
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

  async runRecipeJob(slot: Slot, h: Held): Promise<JobResult> {
    const t0 = performance.now();
    const s = h.data.settings as RecipeJobSettings;
    const path = outputPathFor(this.out, h.data.name, 'safetensors');
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
      signal: this.signal,
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
  if (r.sha256 !== sha256) throw new InvalidFileError(file, `the ${what} changed since the job was enqueued (its bytes differ); enqueue it again`);
  return { data: r.data };
}

async function loadNoise(file: string, sha256: string): Promise<{ noise: Tensor; vaeNoise?: Tensor }> {
  await verifyFile(file, sha256, 'noise file');
  return readNoiseFile(file);
}
