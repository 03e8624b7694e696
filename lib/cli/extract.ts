/**
 * The work behind `extract` and `recipe` (the commands themselves are declared in lib/cli.ts):
 * output names and duplicates, resume with the settings check, batching, per-image failures, atomic
 * writes, and interruption (Ctrl-C / SIGTERM: stop at once, remove this run's temporaries, restore the
 * cursor, say how to resume, exit 130).
 *
 * @module
 */
import cliProgress from 'cli-progress';
import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { loadPipeline, type ExtractOptions, type ImageFeatures, type Pipeline } from '../pipeline/index.js';
import { engineOf } from '../pipeline/facade.js';
import { readNoiseFile, writeFeatures, writeFeaturesNpy, writeRecipeResult } from '../io/features.js';
import { extractRecipe, getRecipe } from '../recipes.js';
import { DiffusionFeaturesError, InvalidArgumentError, isDiffusionFeaturesError } from '../errors.js';
import {
  checkExistingOutput, cleanStaleTemps, comparable, outputNameFor, outputPathFor, removeOwnTempsSync, SettingsMismatchError,
  type OutputFormat,
} from '../outputs.js';
import { Tensor, type Device } from '../native.js';
import { cliMessage, type LoraArg } from './args.js';

/** Options of `extract` as commander parses them. */
export interface ExtractCli {
  weights: string;
  layers: string;
  prompt: string;
  t: number;
  seed: number;
  noise?: string;
  posterior: 'sample' | 'mean';
  timestepMode: 'reference' | 'exact';
  attention?: boolean;
  control?: 'canny';
  controlScale: number;
  denoiseFrom?: number;
  scheduler: 'plms' | 'ddim';
  lora: LoraArg[];
  loraTextEncoder?: boolean;
  device: Device;
  dtype: 'auto' | 'float32' | 'float16';
  size?: number;
  batchSize: number;
  featureResize: number;
  aggregate?: boolean;
  format: OutputFormat;
  overwrite?: boolean;
  maxPixels?: number;
  maxImageBytes?: number;
  out: string;
  progress: boolean;
}

/** Options of `recipe` (and `extract --recipe`). */
export interface RecipeCli {
  weights: string;
  recipe: string;
  loraSlot?: Record<string, LoraArg>;
  skipMissingLora?: boolean;
  seed: number;
  size?: number;
  batchSize: number;
  batchVariants?: 'auto' | 'on' | 'off';
  device: Device;
  dtype: 'auto' | 'float32' | 'float16';
  overwrite?: boolean;
  out: string;
  progress?: boolean;
}

/** Errors that concern one image (that image is skipped, the run goes on and exits 1 at the end). */
export function isImageError(err: unknown): boolean {
  return isDiffusionFeaturesError(err) && ['E_IMAGE_DECODE', 'E_FILE_NOT_FOUND', 'E_FILE_ACCESS', 'E_LIMIT_EXCEEDED'].includes(err.code);
}

/** Output names of the images, or the exit code 2 after reporting two inputs that would share one. */
function namesOf(images: readonly string[]): string[] | 2 {
  const seen = new Map<string, string>();
  const names: string[] = [];
  for (const img of images) {
    const name = outputNameFor(img);
    const prev = seen.get(name);
    if (prev !== undefined) {
      console.error(`error: ${img} and ${prev} would both write ${name}; rename one (nothing was extracted)`);
      return 2;
    }
    seen.set(name, img);
    names.push(name);
  }
  return names;
}

/**
 * Sorts images into to-do and already-done by what their output holds: done when its recorded
 * settings equal `expected`; a mismatch (without --overwrite) or a foreign file at the output path is
 * an error for that image.
 */
async function triage(paths: readonly string[], expected: Record<string, string>, overwrite: boolean): Promise<{ todo: number[]; skipped: number; errors: string[] }> {
  const todo: number[] = [];
  const errors: string[] = [];
  let skipped = 0;
  for (let i = 0; i < paths.length; i++) {
    try {
      const r = await checkExistingOutput(paths[i]!, expected);
      if (r.exists && !overwrite) skipped++;
      else todo.push(i);
    } catch (e) {
      if (overwrite && e instanceof SettingsMismatchError) todo.push(i);
      else errors.push(cliMessage((e as Error).message));
    }
  }
  return { todo, skipped, errors };
}

/**
 * Ctrl-C / SIGTERM during a run: stop at once, remove this process's temporaries in `out`, restore the
 * cursor, print how to resume, exit 130 (143 for SIGTERM). Returns the uninstaller.
 */
function onInterrupt(out: string, bar: () => { stop(): void } | null, status: () => string): () => void {
  const handler = (sig: NodeJS.Signals): void => {
    try {
      bar()?.stop();
    } catch {
      // the bar may be half-drawn
    }
    if (process.stderr.isTTY) process.stderr.write('\x1b[?25h');
    const removed = removeOwnTempsSync(out);
    process.stderr.write(
      `\ninterrupted (${sig}): ${status()}${removed.length ? `; removed ${removed.length} unfinished temporary file(s)` : ''}.\n` +
        'Run the same command again to resume: finished outputs are kept and skipped.\n',
    );
    process.exit(sig === 'SIGTERM' ? 143 : 130);
  };
  process.once('SIGINT', handler);
  process.once('SIGTERM', handler);
  return () => {
    process.removeListener('SIGINT', handler);
    process.removeListener('SIGTERM', handler);
  };
}

async function startRun(out: string): Promise<void> {
  mkdirSync(out, { recursive: true });
  const stale = await cleanStaleTemps(out);
  if (stale.length) console.error(`removed ${stale.length} temporary file(s) left in ${out} by an interrupted run`);
}

function progressBar(format: string, on: boolean): cliProgress.SingleBar | null {
  return on ? new cliProgress.SingleBar({ format, stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic) : null;
}

/** Row `row` of a noise file's tensors (1×…), as an image's own noise. */
function sliceNoise(n: { noise: Tensor; vaeNoise?: Tensor }, row: number, file: string) {
  const take = (t: Tensor) => {
    const [N, ...rest] = t.shape;
    const per = rest.reduce((a, b) => a * b, 1);
    if (row >= N!) throw new InvalidArgumentError(`--noise ${file} has ${N} rows, image ${row + 1} needs one`);
    return Tensor.fromFloat32Array(t.toFloat32Array().slice(row * per, (row + 1) * per), [1, ...rest]);
  };
  return { noise: take(n.noise), vaeNoise: n.vaeNoise ? take(n.vaeNoise) : undefined };
}

function disposeNoise(n: { noise: Tensor; vaeNoise?: Tensor } | undefined): void {
  n?.noise.dispose();
  n?.vaeNoise?.dispose();
}

/** Runs `extract`; returns the process exit code. */
export async function runExtract(images: string[], o: ExtractCli, pipelineIn?: Pipeline): Promise<number> {
  const names = namesOf(images);
  if (names === 2) return 2;
  await startRun(o.out);
  const paths = names.map((n) => outputPathFor(o.out, n, o.format));

  let written = 0;
  let todo: number[] = [];
  let bar: cliProgress.SingleBar | null = null;
  // installed before the models load, so that Ctrl-C at any point exits 130 the same way
  const uninstall = onInterrupt(o.out, () => bar, () => `${written} of ${todo.length || images.length} image(s) written to ${resolve(o.out)}`);
  let pipeline: Pipeline;
  try {
    pipeline = pipelineIn ?? (await loadPipeline(o.weights, { device: o.device, dtype: o.dtype }));
  } catch (e) {
    uninstall();
    throw e;
  }
  const ac = new AbortController();
  bar = progressBar('extract |{bar}| {value}/{total} images | {stage} | eta {eta_formatted}', o.progress);
  const failures: string[] = [];
  let noise: { noise: Tensor; vaeNoise?: Tensor } | undefined;
  let skipped = 0;
  try {
    if (o.lora.length) await pipeline.setLora(o.lora, { textEncoder: !!o.loraTextEncoder });
    noise = o.noise ? await readNoiseFile(o.noise) : undefined;
    if (noise && noise.noise.shape[0]! < images.length) {
      throw new InvalidArgumentError(`--noise ${o.noise}: noise has ${noise.noise.shape[0]} rows for ${images.length} images`);
    }
    const base: ExtractOptions = {
      layers: o.layers,
      prompt: o.prompt,
      t: o.t,
      seed: o.seed,
      posterior: o.posterior,
      timestepMode: o.timestepMode,
      attention: o.attention,
      control: o.control ?? null,
      controlScale: o.controlScale,
      denoiseFrom: o.denoiseFrom,
      scheduler: o.scheduler,
      size: o.size,
      batchSize: o.batchSize,
      featureResize: o.featureResize,
      packaged: o.aggregate,
      maxPixels: o.maxPixels,
      maxImageBytes: o.maxImageBytes,
      signal: ac.signal,
    };
    // what this run records for every image (and what an existing output must hold to be kept)
    const row0 = noise ? sliceNoise(noise, 0, o.noise!) : undefined;
    let expected: Record<string, string>;
    try {
      expected = { ...comparable((await engineOf(pipeline).plan([images[0]!], { ...base, noise: row0 })).settings), packaged: o.aggregate ? 'true' : 'false' };
    } finally {
      disposeNoise(row0);
    }
    const t = await triage(paths, expected, !!o.overwrite);
    todo = t.todo;
    skipped = t.skipped;
    if (t.errors.length) {
      for (const e of t.errors) console.error(`error: ${e}`);
      console.error('nothing was extracted');
      return 2;
    }
    if (skipped) console.error(`${skipped} image(s) already have output with these settings in ${o.out} (use --overwrite to redo them)`);
    if (!todo.length) return 0;

    bar?.start(todo.length, 0, { stage: 'load' });
    let doneCount = 0;
    const save = async (i: number, f: ImageFeatures): Promise<void> => {
      try {
        if (o.format === 'npy') await writeFeaturesNpy(paths[i]!, f);
        else await writeFeatures(paths[i]!, f);
        written++;
      } finally {
        f.dispose();
      }
    };
    const runBatch = async (batch: number[]): Promise<void> => {
      const opts: ExtractOptions = { ...base, onProgress: (p) => bar?.update(doneCount + p.done, { stage: p.stage }) };
      if (noise) {
        // each image takes its row of the noise file (rows follow the command line's order)
        for (const i of batch) {
          const own = sliceNoise(noise, i, o.noise!);
          try {
            const [f] = await pipeline.extract([images[i]!], { ...opts, noise: own, batchSize: 1 });
            await save(i, f!);
          } finally {
            disposeNoise(own);
          }
        }
        return;
      }
      // image k of the command always uses the noise streams of k, however the run is batched
      const res = await pipeline.extract(batch.map((i) => images[i]!), { ...opts, seedOffset: batch[0]! });
      for (let k = 0; k < res.length; k++) await save(batch[k]!, res[k]!);
    };
    // batches hold consecutive command-line images (so seedOffset + k is image k's own index)
    const batches: number[][] = [];
    for (const i of todo) {
      const last = batches[batches.length - 1];
      if (last && last.length < o.batchSize && last[last.length - 1]! + 1 === i) last.push(i);
      else batches.push([i]);
    }
    for (const batch of batches) {
      try {
        await runBatch(batch);
      } catch (err) {
        if (!isImageError(err) || batch.length === 1) {
          if (!isImageError(err)) throw err;
          failures.push(`${images[batch[0]!]}: ${(err as Error).message}`);
        } else {
          // isolate the unreadable image(s) of the batch; the others still run
          for (const i of batch) {
            try {
              await runBatch([i]);
            } catch (e) {
              if (!isImageError(e)) throw e;
              failures.push(`${images[i]}: ${(e as Error).message}`);
            }
          }
        }
      }
      doneCount += batch.length;
      bar?.update(doneCount, { stage: 'saved' });
    }
  } finally {
    bar?.stop();
    uninstall();
    disposeNoise(noise);
    if (!pipelineIn) pipeline.dispose();
  }
  console.error(`wrote ${written} file(s) to ${resolve(o.out)}${skipped ? `, skipped ${skipped} existing` : ''}${failures.length ? `, ${failures.length} failed` : ''}`);
  for (const f of failures) console.error(`  failed: ${f}`);
  return failures.length ? 1 : 0;
}

/** Runs a GATE recipe over images (`extract --recipe` / `recipe`); returns the exit code. */
export async function runRecipe(images: string[], o: RecipeCli): Promise<number> {
  getRecipe(o.recipe);
  const names = namesOf(images);
  if (names === 2) return 2;
  await startRun(o.out);
  const paths = names.map((n) => outputPathFor(o.out, n, 'safetensors'));
  const t = await triage(paths, { recipe: o.recipe }, !!o.overwrite);
  if (t.errors.length) {
    for (const e of t.errors) console.error(`error: ${e}`);
    console.error('nothing was extracted');
    return 2;
  }
  if (t.skipped) console.error(`${t.skipped} image(s) already have output (use --overwrite)`);
  if (!t.todo.length) return 0;
  let written = 0;
  let bar: cliProgress.SingleBar | null = null;
  const uninstall = onInterrupt(o.out, () => bar, () => `${written} of ${t.todo.length} image(s) written to ${resolve(o.out)}`);
  let pipeline: Pipeline;
  try {
    pipeline = await loadPipeline(o.weights, { device: o.device, dtype: o.dtype });
  } catch (e) {
    uninstall();
    throw e;
  }
  bar = progressBar('recipe |{bar}| {value}/{total} images | {variant} {stage}', o.progress ?? !!process.stderr.isTTY);
  const failures: string[] = [];
  let variants: string[] = [];
  const ac = new AbortController();
  bar?.start(t.todo.length, 0, { variant: '', stage: 'load' });
  let doneCount = 0;
  const runBatch = async (batch: number[]): Promise<void> => {
    const results = await extractRecipe(pipeline, o.recipe, batch.map((i) => images[i]!), {
      loras: o.loraSlot ?? {},
      skipMissingLora: o.skipMissingLora,
      seed: o.seed,
      size: o.size,
      batchSize: o.batchSize,
      batchVariants: o.batchVariants === 'on' ? true : o.batchVariants === 'off' ? false : 'auto',
      amalgamate: true,
      signal: ac.signal,
      onProgress: (p) => bar?.update(doneCount + p.done, { variant: p.variant, stage: p.stage }),
    });
    try {
      for (let k = 0; k < results.length; k++) {
        variants = Object.keys(results[k]!.variants);
        await writeRecipeResult(paths[batch[k]!]!, results[k]!, o.recipe);
        written++;
      }
    } finally {
      results.forEach((r) => r.dispose());
    }
  };
  try {
    // consecutive images per call (up to --batch-size), so results do not depend on the split
    for (let s = 0; s < t.todo.length; s += o.batchSize) {
      const batch = t.todo.slice(s, s + o.batchSize);
      try {
        await runBatch(batch);
      } catch (err) {
        if (!isImageError(err)) throw err;
        for (const i of batch.length > 1 ? batch : []) {
          try {
            await runBatch([i]);
          } catch (e) {
            if (!isImageError(e)) throw e;
            failures.push(`${images[i]}: ${(e as Error).message}`);
          }
        }
        if (batch.length === 1) failures.push(`${images[batch[0]!]}: ${(err as Error).message}`);
      }
      doneCount += batch.length;
      bar?.update(doneCount, { variant: '', stage: 'saved' });
    }
  } finally {
    bar?.stop();
    uninstall();
    pipeline.dispose();
  }
  console.error(`wrote ${written} file(s) to ${resolve(o.out)} (recipe ${o.recipe}: ${variants.join(', ')})${failures.length ? `, ${failures.length} failed` : ''}`);
  for (const f of failures) console.error(`  failed: ${f}`);
  return failures.length ? 1 : 0;
}

/** Prints a top-level CLI error (library messages phrased with CLI flags) and sets the exit code. */
export function reportCliError(err: unknown): void {
  const msg = err instanceof Error ? err.message : String(err);
  console.error(`error: ${err instanceof DiffusionFeaturesError ? cliMessage(msg) : msg}`);
  process.exitCode = process.exitCode && process.exitCode !== 0 ? process.exitCode : 1;
}
