/**
 * `diffusion-features` command line (every command: README.md "CLI").
 *
 * @module
 */
import { Command, Option } from 'commander';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { bundledModelDir, readModelJson, defaultSize } from './pipeline/index.js';
import { writePng } from './io/png.js';
import { SafetensorsFile } from './io/safetensors.js';
import { RECIPES } from './recipes.js';
import { cannyImage } from './control.js';
import { visualizeFile } from './tools/visualize.js';
import { gateScoreFiles } from './tools/gate-score.js';
import { correspondenceFiles } from './tools/correspondence.js';
import { ClipTokenizer } from './tokenizer.js';
import type { Device } from './native.js';
import { intArg, floatArg, parseLoraArg, loraSlotArg } from './cli/args.js';
import { runExtract, runRecipe, reportCliError, type ExtractCli, type RecipeCli } from './cli/extract.js';

export { parseLoraArg, runExtract };

/** Largest --batch-size (the pipeline's bound). */
const MAX_BATCH = 1024;

const program = new Command();
program
  .name('diffusion-features')
  .description('Diffusion features (Stable Diffusion 1.5) and GATE for Node.js')
  .version((createRequire(import.meta.url)('../package.json') as { version: string }).version, '-V, --version')
  .showHelpAfterError();

program
  .command('extract')
  .description('extract diffusion features: one DIR/<image>.safetensors per image (float32 C×h×w per layer id)')
  .requiredOption('--weights <dir>', 'exported weights folder (weights/export.py)')
  .option('--layers <spec>', 'legacy | practical | amalgamation | amalgamation_small | full | FILE.json | id,id,…', 'legacy')
  .option('--prompt <text>', 'prompt shared by all images', '')
  .option('--t <n>', 'nominal timestep (0-999)', intArg('--t', 0, 999), 50)
  .option('--seed <n>', 'noise seed (image k of the command uses its own streams)', intArg('--seed', 0, Number.MAX_SAFE_INTEGER), 0)
  .option('--noise <file>', 'safetensors with noise (N×4×h×w) and optional vae_noise: reproducible bit for bit')
  .addOption(new Option('--posterior <kind>', 'VAE posterior').choices(['sample', 'mean']).default('sample'))
  .addOption(new Option('--timestep-mode <mode>', 'reference: UNet at t+1 like the reference; exact: at t').choices(['reference', 'exact']).default('reference'))
  .option('--attention', 'add the aggregated up-cross attention feature `attn`')
  .addOption(new Option('--control <type>', 'ControlNet conditioning').choices(['canny']))
  .option('--control-scale <x>', 'ControlNet conditioning scale (-100 to 100)', floatArg('--control-scale', -100, 100), 1)
  .option('--denoise-from <n>', 'multi-step denoising start (GATE: 60), needs --control', intArg('--denoise-from', 1, 999))
  .addOption(new Option('--scheduler <kind>', 'multi-step scheduler').choices(['plms', 'ddim']).default('plms'))
  .option('--lora <file[:scale]>', 'LoRA safetensors merged into the UNet (repeatable)', parseLoraArg, [])
  .addOption(new Option('--recipe <name>', 'compute a GATE recipe instead (docs/method.md §Recipes; same as the recipe command)').choices(Object.keys(RECIPES)))
  .option('--lora-slot <slot=file[:scale]>', 'with --recipe: LoRA file for a recipe slot (repeatable)', loraSlotArg, {})
  .option('--skip-missing-lora', 'with --recipe: skip variants whose LoRA slot has no file')
  .addOption(new Option('--batch-variants <mode>', 'with --recipe: run variants of one schedule as one batched UNet call (auto: on CUDA)').choices(['auto', 'on', 'off']).default('auto'))
  .option('--lora-text-encoder', 'also apply the text-encoder part of the LoRA files')
  .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('auto'))
  .addOption(new Option('--dtype <dtype>', 'compute dtype').choices(['auto', 'float32', 'float16']).default('auto'))
  .option('--size <n>', 'images are resized to N×N (default: the default_size of model.json, 512 for SD1.5)', intArg('--size', 64, 4096))
  .option('--batch-size <n>', 'images per model call', intArg('--batch-size', 1, MAX_BATCH), 1)
  .option('--feature-resize <r>', 'average-pool features by r', intArg('--feature-resize', 1, 64), 1)
  .option('--max-pixels <n>', 'refuse images with more source pixels (default 16383², sharp\'s limit)', intArg('--max-pixels', 1, Number.MAX_SAFE_INTEGER))
  .option('--max-image-bytes <n>', 'refuse image files larger than this (default 256 MiB)', intArg('--max-image-bytes', 1, Number.MAX_SAFE_INTEGER))
  .option('--aggregate', 'also store `packaged`: all features resized to the largest and concatenated (docs/method.md §Packaging)')
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
  .description('compute every feature variant of a GATE recipe (docs/method.md §Recipes), sharing decode/VAE/prompt/canny work')
  .requiredOption('--weights <dir>', 'exported weights folder (with controlnet.pt for recipes that use ControlNet)')
  .addOption(new Option('--recipe <name>', 'GATE task recipe').choices(Object.keys(RECIPES)).makeOptionMandatory())
  .option('--lora-slot <slot=file[:scale]>', 'LoRA file for a recipe slot, e.g. a1=horse_a1.safetensors (repeatable)', loraSlotArg, {})
  .option('--skip-missing-lora', 'skip variants whose LoRA slot has no file')
  .option('--seed <n>', 'base noise seed', intArg('--seed', 0, Number.MAX_SAFE_INTEGER), 0)
  .option('--size <n>', 'images are resized to N×N (default: the model default_size)', intArg('--size', 64, 4096))
  .option('--batch-size <n>', 'images per model call', intArg('--batch-size', 1, MAX_BATCH), 1)
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
  .option('--size <n>', 'resize to N×N first', intArg('--size', 1, 16384), 512)
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
  .description('PCA of each feature to RGB (docs/method.md §Visualisation), one panel per layer id')
  .requiredOption('--out <png>', 'output PNG')
  .argument('<file>', 'a features .safetensors written by extract')
  .action(async (file: string, o: { out: string }) => {
    const r = await visualizeFile(file, o.out);
    console.error(`wrote ${o.out} (${r.panels.join(', ')})`);
  });

program
  .command('gate-score')
  .description('GATE Laplacian content-shift score (docs/method.md §GATE score) of features against a t=0 reference and an anchor')
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
  .description('nearest-neighbour semantic correspondence and PCK@0.1 on SPair-71k-style pair JSON files (docs/method.md §Correspondence)')
  .requiredOption('--features <dir>', 'folder of <image>.safetensors features')
  .option('--layer <id>', "tensor to use (default 'packaged', else all layers bilinearly resized and concatenated)")
  .option('--alpha <a>', 'PCK threshold', floatArg('--alpha', 0, 1), 0.1)
  .argument('<pairs...>', 'pair JSON files')
  .action(async (pairs: string[], o: { features: string; layer?: string; alpha: number }) => {
    const r = await correspondenceFiles(o.features, pairs, { layer: o.layer, alpha: o.alpha });
    console.log(JSON.stringify(r, null, 1));
  });

(await import('./cli/queue.js')).registerQueueCommands(program); // worker, enqueue, queue-status (issue 13)
(await import('./cli/heads.js')).registerHeadCommands(program); // train-segmenter, segment, train-amalgamation (issue 14)
(await import('./cli/serve.js')).registerServeCommand(program); // serve (issue 13)
(await import('./cli/export.js')).registerExportCommand(program); // export: runs weights/export.py (issue 12)
program.parseAsync(process.argv).catch(reportCliError);

export { program };
