/**
 * `diffusion-features` command line (DESIGN.md §3).
 *
 * @module
 */
import { Command, Option, InvalidArgumentError as CliArgError } from 'commander';
import cliProgress from 'cli-progress';
import { createRequire } from 'node:module';
import { existsSync, mkdirSync } from 'node:fs';
import { rename, rm, mkdtemp } from 'node:fs/promises';
import { join, basename, extname, resolve, dirname } from 'node:path';
import { loadPipeline, bundledModelDir, readModelJson, defaultSize, type ExtractOptions, type ImageFeatures, type Pipeline } from './pipeline/index.js';
import { readNoiseFile, writeFeatures, writeRecipeResult } from './io/features.js';
import { writeNpy } from './io/npy.js';
import { writePng } from './io/png.js';
import { SafetensorsFile } from './io/safetensors.js';
import { RECIPES, extractRecipe } from './recipes.js';
import { cannyImage } from './control.js';
import { visualizeFile } from './tools/visualize.js';
import { gateScoreFiles } from './tools/gate-score.js';
import { correspondenceFiles } from './tools/correspondence.js';
import { ClipTokenizer } from './tokenizer.js';
import { DiffusionFeaturesError, InvalidArgumentError } from './errors.js';
import { Tensor, type Device } from './native.js';

const program = new Command();
program
  .name('diffusion-features')
  .description('Diffusion features (Stable Diffusion 1.5) and GATE for Node.js')
  .version((createRequire(import.meta.url)('../package.json') as { version: string }).version, '-V, --version')
  .showHelpAfterError();

function intArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n)) throw new CliArgError(`${name} must be an integer, got '${v}'`);
    return n;
  };
}

function floatArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n)) throw new CliArgError(`${name} must be a number, got '${v}'`);
    return n;
  };
}

/** `FILE[:SCALE]` → {file, scale}. */
export function parseLoraArg(v: string, prev: { file: string; scale: number }[] = []): { file: string; scale: number }[] {
  const m = /^(.*?)(?::(-?[0-9]*\.?[0-9]+(?:e-?[0-9]+)?))?$/i.exec(v);
  const file = m?.[1] ?? v;
  const scale = m?.[2] !== undefined ? Number(m[2]) : 1;
  if (!file) throw new CliArgError(`--lora expects FILE[:SCALE], got '${v}'`);
  return [...prev, { file, scale }];
}

function outputPathFor(outDir: string, name: string, format: 'safetensors' | 'npy'): string {
  return format === 'safetensors' ? join(outDir, `${name}.safetensors`) : join(outDir, name);
}

async function writeNpyDir(path: string, f: ImageFeatures): Promise<void> {
  const parent = dirname(path);
  const tmp = await mkdtemp(join(parent, `.${basename(path)}.tmp-`));
  try {
    for (const [id, t] of Object.entries(f.features)) await writeNpy(join(tmp, `${id}.npy`), t.toFloat32Array(), t.shape);
    if (f.packaged) await writeNpy(join(tmp, 'packaged.npy'), f.packaged.toFloat32Array(), f.packaged.shape);
    await rm(path, { recursive: true, force: true });
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

interface ExtractCli {
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
  lora: { file: string; scale: number }[];
  loraTextEncoder?: boolean;
  device: Device;
  dtype: 'auto' | 'float32' | 'float16';
  size?: number;
  batchSize: number;
  featureResize: number;
  aggregate?: boolean;
  format: 'safetensors' | 'npy';
  overwrite?: boolean;
  out: string;
  progress: boolean;
}

/** Runs `extract`; returns the process exit code. */
export async function runExtract(images: string[], o: ExtractCli, pipelineIn?: Pipeline): Promise<number> {
  mkdirSync(o.out, { recursive: true });
  const todo: string[] = [];
  let skipped = 0;
  const seen = new Map<string, string>();
  for (const img of images) {
    const name = basename(img, extname(img));
    const prev = seen.get(name);
    if (prev !== undefined) {
      console.error(`error: ${img} and ${prev} would both write ${name}; rename one`);
      return 2;
    }
    seen.set(name, img);
    if (!o.overwrite && existsSync(outputPathFor(o.out, name, o.format))) skipped++;
    else todo.push(img);
  }
  if (skipped) console.error(`${skipped} image(s) already have output in ${o.out} (use --overwrite to redo them)`);
  if (!todo.length) return 0;

  const pipeline = pipelineIn ?? (await loadPipeline(o.weights, { device: o.device, dtype: o.dtype }));
  const bar = o.progress
    ? new cliProgress.SingleBar(
        { format: 'extract |{bar}| {value}/{total} images | {stage} | eta {eta_formatted}', stream: process.stderr, hideCursor: true },
        cliProgress.Presets.shades_classic,
      )
    : null;
  const failures: string[] = [];
  let written = 0;
  try {
    if (o.lora.length) await pipeline.setLora(o.lora, { textEncoder: !!o.loraTextEncoder });
    const noise = o.noise ? await readNoiseFile(o.noise) : undefined;
    const base: ExtractOptions = {
      layers: o.layers,
      prompt: o.prompt,
      t: o.t,
      seed: o.seed,
      noise,
      posterior: o.posterior,
      timestepMode: o.timestepMode,
      attention: o.attention,
      control: o.control ?? null,
      controlScale: o.controlScale,
      denoiseFrom: o.denoiseFrom,
      scheduler: o.scheduler,
      size: o.size,
      featureResize: o.featureResize,
      packaged: o.aggregate,
    };
    if (noise && noise.noise.shape[0]! < images.length) {
      throw new InvalidArgumentError(`${o.noise}: noise has ${noise.noise.shape[0]} rows for ${images.length} images`);
    }
    bar?.start(todo.length, 0, { stage: 'load' });
    const save = async (f: ImageFeatures): Promise<void> => {
      try {
        const path = outputPathFor(o.out, f.name, o.format);
        if (o.format === 'npy') await writeNpyDir(path, f);
        else await writeFeatures(path, f);
        written++;
      } finally {
        f.dispose();
      }
    };
    // Noise rows follow the order of the images given on the command line.
    const rowOf = (img: string): number => images.indexOf(img);
    const runBatch = async (batch: string[]): Promise<void> => {
      const opts: ExtractOptions = { ...base, onProgress: (p) => bar?.update(doneCount + p.done, { stage: p.stage }) };
      if (noise) {
        // select this batch's rows: pass the whole file and an offset through per-image calls
        for (const img of batch) {
          const r = rowOf(img);
          const res = await pipeline.extract([img], { ...opts, noise: await sliceNoise(noise, r) });
          for (const f of res) await save(f);
        }
        return;
      }
      const res = await pipeline.extract(batch, { ...opts, seed: o.seed, seedOffset: images.indexOf(batch[0]!) });
      for (const f of res) await save(f);
    };
    // Batches hold consecutive command-line images, so image k always uses the noise streams of k.
    const batches: string[][] = [];
    for (const img of todo) {
      const last = batches[batches.length - 1];
      const prev = last?.[last.length - 1];
      if (last && last.length < o.batchSize && prev !== undefined && images.indexOf(prev) + 1 === images.indexOf(img)) last.push(img);
      else batches.push([img]);
    }
    let doneCount = 0;
    for (const batch of batches) {
      try {
        await runBatch(batch);
      } catch (err) {
        if (!isImageError(err)) throw err;
        // isolate the unreadable image(s) of the batch; the others still run
        for (const img of batch) {
          try {
            await runBatch([img]);
          } catch (e) {
            if (!isImageError(e)) throw e;
            failures.push(`${img}: ${(e as Error).message}`);
          }
        }
      }
      doneCount += batch.length;
      bar?.update(doneCount, { stage: 'saved' });
    }
  } finally {
    bar?.stop();
    if (!pipelineIn) pipeline.dispose();
  }
  console.error(`wrote ${written} file(s) to ${resolve(o.out)}${skipped ? `, skipped ${skipped} existing` : ''}${failures.length ? `, ${failures.length} failed` : ''}`);
  for (const f of failures) console.error(`  failed: ${f}`);
  return failures.length ? 1 : 0;
}

function isImageError(err: unknown): boolean {
  return err instanceof DiffusionFeaturesError && (err.code === 'E_IMAGE_DECODE' || err.code === 'E_FILE_NOT_FOUND');
}

async function sliceNoise(n: { noise: Tensor; vaeNoise?: Tensor }, row: number) {
  const take = (t: Tensor) => {
    const [N, ...rest] = t.shape;
    const per = rest.reduce((a, b) => a * b, 1);
    if (row >= N!) throw new InvalidArgumentError(`noise file has ${N} rows, image ${row} needs one`);
    return Tensor.fromFloat32Array(t.toFloat32Array().subarray(row * per, (row + 1) * per), [1, ...rest]);
  };
  return { noise: take(n.noise), vaeNoise: n.vaeNoise ? take(n.vaeNoise) : undefined };
}

interface RecipeCli {
  weights: string;
  recipe: string;
  loraSlot?: Record<string, { file: string; scale: number }>;
  skipMissingLora?: boolean;
  seed: number;
  size?: number;
  batchSize: number;
  batchVariants?: 'auto' | 'on' | 'off';
  device: Device;
  dtype: 'auto' | 'float32' | 'float16';
  overwrite?: boolean;
  out: string;
}

function loraSlotArg(v: string, prev: Record<string, { file: string; scale: number }> = {}): Record<string, { file: string; scale: number }> {
  const eq = v.indexOf('=');
  if (eq <= 0) throw new CliArgError(`--lora-slot expects SLOT=FILE[:SCALE], got '${v}'`);
  const [spec] = parseLoraArg(v.slice(eq + 1));
  return { ...prev, [v.slice(0, eq)]: spec! };
}

/** Runs a GATE recipe over images (`extract --recipe` / `recipe`); returns the exit code. */
export async function runRecipe(images: string[], o: RecipeCli): Promise<number> {
    mkdirSync(o.out, { recursive: true });
    const todo = images.filter((img) => o.overwrite || !existsSync(join(o.out, `${basename(img, extname(img))}.safetensors`)));
    if (todo.length < images.length) console.error(`${images.length - todo.length} image(s) already have output (use --overwrite)`);
    if (!todo.length) return 0;
    const pipeline = await loadPipeline(o.weights, { device: o.device, dtype: o.dtype });
    const bar = process.stderr.isTTY
      ? new cliProgress.SingleBar({ format: 'recipe |{bar}| {value}/{total} images | {variant} {stage}', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic)
      : null;
    bar?.start(todo.length, 0, { variant: '', stage: 'load' });
    try {
      const results = await extractRecipe(pipeline, o.recipe, todo, {
        loras: o.loraSlot ?? {},
        skipMissingLora: o.skipMissingLora,
        seed: o.seed,
        size: o.size,
        batchSize: o.batchSize,
        batchVariants: o.batchVariants === 'on' ? true : o.batchVariants === 'off' ? false : 'auto',
        amalgamate: true,
        onProgress: (p) => bar?.update(p.done, { variant: p.variant, stage: p.stage }),
      });
      for (const r of results) {
        try {
          await writeRecipeResult(join(o.out, `${r.name}.safetensors`), r, o.recipe);
        } finally {
          r.dispose();
        }
      }
      bar?.stop();
      console.error(`wrote ${results.length} file(s) to ${resolve(o.out)} (recipe ${o.recipe}: ${Object.keys(results[0]?.variants ?? {}).join(', ')})`);
    } finally {
      bar?.stop();
      pipeline.dispose();
    }
    return 0;
  }

program
  .command('extract')
  .description('extract diffusion features: one DIR/<image>.safetensors per image (float32 C×h×w per layer id)')
  .requiredOption('--weights <dir>', 'exported weights folder (weights/export.py)')
  .option('--layers <spec>', 'legacy | practical | amalgamation | amalgamation_small | full | FILE.json | id,id,…', 'legacy')
  .option('--prompt <text>', 'prompt shared by all images', '')
  .option('--t <n>', 'nominal timestep', intArg('--t'), 50)
  .option('--seed <n>', 'noise seed (image k of the command uses its own streams)', intArg('--seed'), 0)
  .option('--noise <file>', 'safetensors with noise (N×4×h×w) and optional vae_noise: reproducible bit for bit')
  .addOption(new Option('--posterior <kind>', 'VAE posterior').choices(['sample', 'mean']).default('sample'))
  .addOption(new Option('--timestep-mode <mode>', 'reference: UNet at t+1 like the reference; exact: at t').choices(['reference', 'exact']).default('reference'))
  .option('--attention', 'add the aggregated up-cross attention feature `attn`')
  .addOption(new Option('--control <type>', 'ControlNet conditioning').choices(['canny']))
  .option('--control-scale <x>', 'ControlNet conditioning scale', floatArg('--control-scale'), 1)
  .option('--denoise-from <n>', 'multi-step denoising start (GATE: 60), needs --control', intArg('--denoise-from'))
  .addOption(new Option('--scheduler <kind>', 'multi-step scheduler').choices(['plms', 'ddim']).default('plms'))
  .option('--lora <file[:scale]>', 'LoRA safetensors merged into the UNet (repeatable)', parseLoraArg, [])
  .addOption(new Option('--recipe <name>', 'compute a GATE recipe instead (GATE_SPEC §7; same as the recipe command)').choices(Object.keys(RECIPES)))
  .option('--lora-slot <slot=file[:scale]>', 'with --recipe: LoRA file for a recipe slot (repeatable)', loraSlotArg, {})
  .option('--skip-missing-lora', 'with --recipe: skip variants whose LoRA slot has no file')
  .addOption(new Option('--batch-variants <mode>', 'with --recipe: run variants of one schedule as one batched UNet call (auto: on CUDA)').choices(['auto', 'on', 'off']).default('auto'))
  .option('--lora-text-encoder', 'also apply the text-encoder part of the LoRA files')
  .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('auto'))
  .addOption(new Option('--dtype <dtype>', 'compute dtype').choices(['auto', 'float32', 'float16']).default('auto'))
  .option('--size <n>', 'images are resized to N×N (default: the default_size of model.json, 512 for SD1.5)', intArg('--size'))
  .option('--batch-size <n>', 'images per model call', intArg('--batch-size'), 1)
  .option('--feature-resize <r>', 'average-pool features by r', intArg('--feature-resize'), 1)
  .option('--aggregate', 'also store `packaged`: all features resized to the largest and concatenated (GATE_SPEC §3.5)')
  .addOption(new Option('--format <fmt>', 'output format').choices(['safetensors', 'npy']).default('safetensors'))
  .option('--overwrite', 'redo images whose output exists')
  .option('--no-progress', 'no progress bar')
  .requiredOption('--out <dir>', 'output folder')
  .argument('<images...>', 'image files (any format sharp reads)')
  .action(async (images: string[], o: ExtractCli & { recipe?: string; loraSlot?: RecipeCli['loraSlot']; skipMissingLora?: boolean; batchVariants?: RecipeCli['batchVariants'] }) => {
    if (o.recipe) {
      process.exitCode = await runRecipe(images, { ...o, recipe: o.recipe });
      return;
    }
    process.exitCode = await runExtract(images, o);
  });

program
  .command('recipe')
  .description('compute every feature variant of a GATE recipe (GATE_SPEC §7), sharing decode/VAE/prompt/canny work')
  .requiredOption('--weights <dir>', 'exported weights folder (with controlnet.pt for recipes that use ControlNet)')
  .addOption(new Option('--recipe <name>', 'GATE task recipe').choices(Object.keys(RECIPES)).makeOptionMandatory())
  .option('--lora-slot <slot=file[:scale]>', 'LoRA file for a recipe slot, e.g. a1=horse_a1.safetensors (repeatable)', loraSlotArg, {})
  .option('--skip-missing-lora', 'skip variants whose LoRA slot has no file')
  .option('--seed <n>', 'base noise seed', intArg('--seed'), 0)
  .option('--size <n>', 'images are resized to N×N (default: the model default_size)', intArg('--size'))
  .option('--batch-size <n>', 'images per model call', intArg('--batch-size'), 1)
  .addOption(new Option('--batch-variants <mode>', 'run variants of one schedule as one batched UNet call (auto: on CUDA)').choices(['auto', 'on', 'off']).default('auto'))
  .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('auto'))
  .addOption(new Option('--dtype <dtype>', 'compute dtype').choices(['auto', 'float32', 'float16']).default('auto'))
  .option('--overwrite', 'redo images whose output exists')
  .requiredOption('--out <dir>', 'output folder: DIR/<image>.safetensors with <variant>/<layer id> tensors and `amalgamated`')
  .argument('<images...>', 'image files')
  .action(async (images: string[], o: RecipeCli) => {
    process.exitCode = await runRecipe(images, o);
  });

program
  .command('layers')
  .description('list every legal layer id with its shape (C×h×w at the default size)')
  .requiredOption('--weights <dir>', 'exported weights folder')
  .option('--json', 'print JSON')
  .action((o: { weights: string; json?: boolean }) => {
    const m = readModelJson(o.weights);
    if (o.json) console.log(JSON.stringify(m.layers, null, 1));
    else for (const [id, shape] of Object.entries(m.layers)) console.log(`${id}\t${shape.join('×')}`);
  });

program
  .command('tokenize')
  .description('print the token ids per chunk, exactly as the text encoder gets them (JSON)')
  .requiredOption('--weights <dir>', 'exported weights folder (vocab.json, merges.txt)')
  .argument('<text>', 'the prompt')
  .action(async (text: string, o: { weights: string }) => {
    const tok = await ClipTokenizer.fromDir(o.weights);
    console.log(JSON.stringify(tok.chunks(text)));
  });

program
  .command('control-image')
  .description('write the control image the ControlNet sees (canny of the resized image)')
  .addOption(new Option('--type <type>', 'control type').choices(['canny']).default('canny'))
  .option('--size <n>', 'resize to N×N first', intArg('--size'), 512)
  .option('--weights <dir>', 'weights folder (only ops are needed; default: the bundled model)')
  .addOption(new Option('--device <device>', 'cpu | cuda | auto').default('cpu'))
  .requiredOption('--out <png>', 'output PNG')
  .argument('<image>', 'input image')
  .action(async (image: string, o: { size: number; out: string; weights?: string; device: Device }) => {
    const { mask, width, height } = await cannyImage(image, o.size, o.device);
    await writePng(o.out, mask, width, height, 1);
    console.error(`wrote ${o.out} (${width}×${height}, canny 100/200)`);
  });

program
  .command('demo')
  .description('extract the legacy preset from a bundled photo with the bundled tiny model')
  .option('--out <dir>', 'output folder', 'diffusion-features-demo')
  .addOption(new Option('--device <device>', 'cpu | cuda | auto').default('auto'))
  .action(async (o: { out: string; device: Device }) => {
    const weights = bundledModelDir();
    const image = join(weights, '..', 'demo', 'astronaut.png');
    const model = readModelJson(weights);
    console.error(`demo: bundled tiny SD1.5-shaped model (random weights) at ${weights}`);
    const code = await runExtract([image], {
      weights,
      layers: 'legacy',
      prompt: 'a photo of an astronaut',
      t: 50,
      seed: 0,
      posterior: 'sample',
      timestepMode: 'reference',
      controlScale: 1,
      scheduler: 'plms',
      lora: [],
      device: o.device,
      dtype: 'auto',
      size: defaultSize(model),
      batchSize: 1,
      featureResize: 1,
      aggregate: true,
      format: 'safetensors',
      overwrite: true,
      out: o.out,
      progress: !!process.stderr.isTTY,
    });
    const out = resolve(o.out, 'astronaut.safetensors');
    if (code === 0) {
      const f = await SafetensorsFile.open(out);
      console.log(`features of ${image}\n  written to ${out}`);
      for (const name of f.names()) console.log(`  ${name}: float32 ${f.info(name).shape.join('×')}`);
      console.log(`  settings: ${JSON.stringify(f.metadata)}`);
    }
    process.exitCode = code;
  });

program
  .command('visualize')
  .description('PCA of each feature to RGB (GATE_SPEC §9), one panel per layer id')
  .requiredOption('--out <png>', 'output PNG')
  .argument('<file>', 'a features .safetensors written by extract')
  .action(async (file: string, o: { out: string }) => {
    const r = await visualizeFile(file, o.out);
    console.error(`wrote ${o.out} (${r.panels.join(', ')})`);
  });

program
  .command('gate-score')
  .description('GATE Laplacian content-shift score (GATE_SPEC §7.4) of features against a t=0 reference and an anchor')
  .requiredOption('--reference <file>', 'features at t=0 (timestep 1)')
  .requiredOption('--anchor <file>', 'features of the anchor (e.g. no technique)')
  .option('--layer <id>', 'layer id to score (default: every common id)')
  .argument('<files...>', 'features of the technique(s) to score')
  .action(async (files: string[], o: { reference: string; anchor: string; layer?: string }) => {
    const rows = await gateScoreFiles(o.reference, o.anchor, files, o.layer);
    console.log(JSON.stringify(rows, null, 1));
  });

program
  .command('correspondence')
  .description('nearest-neighbour semantic correspondence and PCK@0.1 on SPair-71k-style pair JSON files (GATE_SPEC §8.1)')
  .requiredOption('--features <dir>', 'folder of <image>.safetensors features')
  .option('--layer <id>', "tensor to use (default 'packaged', else all layers bilinearly resized and concatenated)")
  .option('--alpha <a>', 'PCK threshold', floatArg('--alpha'), 0.1)
  .argument('<pairs...>', 'pair JSON files')
  .action(async (pairs: string[], o: { features: string; layer?: string; alpha: number }) => {
    const r = await correspondenceFiles(o.features, pairs, { layer: o.layer, alpha: o.alpha });
    console.log(JSON.stringify(r, null, 1));
  });

(await import('./cli/queue.js')).registerQueueCommands(program); // worker, enqueue, queue-status (issue 13)
(await import('./cli/heads.js')).registerHeadCommands(program); // train-segmenter, segment, train-amalgamation (issue 14)
(await import('./cli/serve.js')).registerServeCommand(program); // serve (issue 13)
(await import('./cli/export.js')).registerExportCommand(program); // export: runs weights/export.py (issue 12)
program.parseAsync(process.argv).catch((err: unknown) => {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = process.exitCode && process.exitCode !== 0 ? process.exitCode : 1;
});

export { program };
