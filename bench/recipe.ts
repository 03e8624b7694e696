/**
 * The Horse-21 recipe (docs/method.md §Recipes: four legacy+attn variants — fine-grained prompt, ControlNet canny
 * multi-step 60→50 (12 UNet + ControlNet forwards), LoRA a1, LoRA b1), full-size SD1.5 architecture with
 * random weights, CPU float32.
 *
 *   ours     — one `loadPipeline` + `extractRecipe(p, 'horse21', images, { loras })`: images decoded and
 *              VAE-encoded once, prompt embeddings cached, canny once, each LoRA merged once.
 *   baseline — what the reference scripts do (extract_feature.py once per variant): per variant a fresh
 *              `loadPipeline`, `setLora` when the variant has one, `extract` with that variant's options
 *              (re-decoding and re-encoding image and prompt), `dispose`.
 * Ratio = baseline seconds ÷ ours seconds (target ≥ 1.5). Both run after one untimed warm-up extraction.
 *
 * `processes` part: the same comparison the literal way, one process per run as the reference scripts run
 * (`extract_feature.py` once per variant): ours = one `diffusion-features recipe` command, baseline = one
 * `diffusion-features extract` command per variant with that variant's flags. Each process pays its own
 * start, model load and first-call warm-up (allocator cache, oneDNN primitives), as the reference's do;
 * in-process, the baseline inherits those from the runs before it. The weight files are read once
 * before, so both sides start with a warm page cache.
 *
 * Then variant batching (`batchVariants`): two variants of one schedule (ControlNet, one step, two
 * noise draws — the shape of the correspondence recipe's feature5/feature6 and feature1/feature2) as
 * one batch-2 UNet/ControlNet call against two batch-1 calls, same pipeline, alternated, best of
 * BENCH_RECIPE_REPEATS (2). This is what `batchVariants: 'auto'` is decided on, per device.
 *
 * LoRA files: two random kohya LoCon-style rank-8 files for the full UNet (bench/py/make_lora.py, cached
 * under bench/.out).
 *
 * Env: BENCH_RECIPE_SIZE (512), BENCH_RECIPE_IMAGES (1), BENCH_RECIPE_PARTS (main,processes,batching),
 * BENCH_RECIPE_DEVICE (cpu), BENCH_RECIPE_DTYPE (float32), DF_BENCH_SD15, OMP_NUM_THREADS.
 */
import { createReadStream, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import os from 'node:os';
import { setNumThreads } from '../lib/native.js';
import { loadPipeline, type LoadOptions } from '../lib/pipeline/index.js';
import { engineOf } from '../lib/pipeline/facade.js';
import type { Device } from '../lib/native.js';
import { RECIPES, extractRecipe, variantOptions, type Recipe } from '../lib/recipes.js';
import type { LoraSpec } from '../lib/lora/index.js';
import { OUT, ROOT, fullSizeDir, py, table, fmt, threads, since } from './common.js';
import { benchImages } from './pipeline.js';

async function loraFiles(): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const [slot, seed] of [['a1', 1], ['b1', 2]] as const) {
    const f = join(OUT, `lora-${slot}-r8.safetensors`);
    if (!existsSync(f)) await py('make_lora.py', [f, '--rank', '8', '--seed', String(seed)]);
    out[slot] = f;
  }
  return out;
}

/** Wraps an async method of `obj` to add its wall time to `acc[key(args)]`. */
function timeMethod<T extends object>(obj: T, name: keyof T & string, acc: Record<string, number>, key: (args: unknown[]) => string): void {
  const orig = (obj[name] as (...a: unknown[]) => Promise<unknown>).bind(obj);
  (obj as Record<string, unknown>)[name] = async (...args: unknown[]) => {
    const t0 = performance.now();
    try {
      return await orig(...args);
    } finally {
      const k = key(args);
      acc[k] = (acc[k] ?? 0) + since(t0);
    }
  };
}

/** Two same-schedule variants batched vs one after the other (see the module comment). */
async function batching(dir: string, size: number, images: string[], load: Required<LoadOptions>): Promise<string> {
  const repeats = Number(process.env.BENCH_RECIPE_REPEATS ?? 2);
  const pair: Recipe = {
    name: 'pair',
    task: 'bench',
    description: 'two noise draws of one ControlNet one-step variant',
    loraSlots: [],
    variants: [
      { name: 'draw0', prompt: 'a photo', layers: 'legacy', control: 'canny', seed: 0 },
      { name: 'draw1', prompt: 'a photo', layers: 'legacy', control: 'canny', seed: 1 },
    ],
  };
  const p = await loadPipeline(dir, load);
  const best: Record<string, number> = { batched: Infinity, separate: Infinity };
  try {
    // warm-up: first calls of each shape
    for (const bv of [true, false]) (await extractRecipe(p, pair, images, { size, batchVariants: bv })).forEach((r) => r.dispose());
    for (let k = 0; k < repeats; k++) {
      for (const bv of [true, false]) {
        const t0 = performance.now();
        (await extractRecipe(p, pair, images, { size, batchVariants: bv })).forEach((r) => r.dispose());
        const key = bv ? 'batched' : 'separate';
        best[key] = Math.min(best[key]!, since(t0));
      }
    }
  } finally {
    p.dispose();
  }
  return [
    `Variant batching: 2 variants (ControlNet + UNet, one step, legacy layers, two noise draws), ${size} px, ${images.length} image(s), ${load.device} ${load.dtype}, best of ${repeats} after a warm-up`,
    '',
    table(['mode', 'seconds'], [
      ['batched (one batch-2 call)', fmt(best.batched!)],
      ['separate (two batch-1 calls)', fmt(best.separate!)],
    ]),
    '',
    `ratio (separate / batched): **${(best.separate! / best.batched!).toFixed(2)}** (> 1: batching is faster on this device)`,
  ].join('\n');
}

/** Ours and the baseline as separate CLI processes (see the module comment). */
async function horse21Processes(dir: string, size: number, images: string[], loras: Record<string, string>, recipe: Recipe, load: Required<LoadOptions>): Promise<string> {
  const cli = join(ROOT, 'dist', 'cli.js');
  if (!existsSync(cli)) throw new Error('recipe bench (processes): dist/cli.js is missing; run `npx tsup` first');
  for (const f of ['unet.pt', 'controlnet.pt', 'vae_encoder.pt', 'text_encoder.pt']) {
    await new Promise<void>((res, rej) => createReadStream(join(dir, f)).on('data', () => undefined).on('end', res).on('error', rej));
  }
  const exec = promisify(execFile);
  const tmp = mkdtempSync(join(tmpdir(), 'df-bench-recipe-'));
  const common = ['--weights', dir, '--device', load.device, '--dtype', load.dtype, '--size', String(size)];
  const timed = async (args: string[]): Promise<number> => {
    const t0 = performance.now();
    await exec(process.execPath, [cli, ...args], { maxBuffer: 1 << 24 });
    return since(t0);
  };
  try {
    const ours = await timed(['recipe', '--recipe', recipe.name, ...common, ...Object.entries(loras).flatMap(([k, f]) => ['--lora-slot', `${k}=${f}`]), '--out', join(tmp, 'ours'), ...images]);
    const base: [string, number][] = [];
    for (const v of recipe.variants) {
      const args = ['extract', ...common, '--layers', typeof v.layers === 'string' ? v.layers : v.layers.join(','), '--prompt', v.prompt, '--seed', String(v.seed ?? 0), '--no-progress'];
      if (v.attention) args.push('--attention');
      if (v.control) args.push('--control', v.control);
      if (v.denoiseFrom !== undefined) args.push('--denoise-from', String(v.denoiseFrom));
      for (const slot of v.lora ?? []) args.push('--lora', loras[slot]!);
      base.push([v.name, await timed([...args, '--out', join(tmp, v.name), ...images])]);
    }
    const baseTotal = base.reduce((a, [, x]) => a + x, 0);
    return [
      `Horse-21 recipe, one process per run (the reference scripts' way), ${size} px, ${images.length} image(s), ${load.device} ${load.dtype}, ${threads()} threads`,
      '',
      table(['process', 'seconds'], [
        ['ours: `diffusion-features recipe --recipe horse21`', fmt(ours)],
        ...base.map(([n, x]) => [`baseline: \`diffusion-features extract\` for ${n}`, fmt(x)]),
        ['baseline total', fmt(baseTotal)],
      ]),
      '',
      `ratio (baseline / ours): **${(baseTotal / ours).toFixed(2)}** (target ≥ 1.5)`,
    ].join('\n');
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

export async function run(): Promise<string> {
  const parts = (process.env.BENCH_RECIPE_PARTS ?? 'main,processes,batching').split(',');
  const size = Number(process.env.BENCH_RECIPE_SIZE ?? 512);
  const device = (process.env.BENCH_RECIPE_DEVICE ?? 'cpu') as Device;
  const dtype = (process.env.BENCH_RECIPE_DTYPE ?? 'float32') as Required<LoadOptions>['dtype'];
  const nImages = Number(process.env.BENCH_RECIPE_IMAGES ?? 1);
  setNumThreads(threads());
  const dir = await fullSizeDir();
  const loras = await loraFiles();
  const images = benchImages(nImages);
  const recipe = RECIPES.horse21!;
  const load: Required<LoadOptions> = { device, dtype };
  const sections: string[] = [];
  if (parts.includes('main')) sections.push(await horse21(dir, size, nImages, images, loras, recipe, load));
  if (parts.includes('processes')) sections.push(await horse21Processes(dir, size, images, loras, recipe, load));
  if (parts.includes('batching')) sections.push(await batching(dir, size, images, load));
  return sections.join('\n\n');
}

async function horse21(
  dir: string,
  size: number,
  nImages: number,
  images: string[],
  loras: Record<string, string>,
  recipe: Recipe,
  load: Required<LoadOptions>,
): Promise<string> {

  // Untimed warm-up, so that neither side pays the process's first calls (page cache of the weight
  // files, the CPU allocator cache, oneDNN primitives) alone: the baseline runs after ours and would
  // otherwise inherit them warm.
  {
    const w = await loadPipeline(dir, load);
    try {
      (await w.extract(images, { layers: 'legacy', attention: true, control: 'canny', size })).forEach((f) => f.dispose());
    } finally {
      w.dispose();
    }
  }

  // --- ours: one pipeline, shared work ---
  const ours: Record<string, number> = {};
  const load0 = os.loadavg()[0]!;
  let cpu0 = process.cpuUsage();
  let t0 = performance.now();
  const tAll = t0;
  const p = await loadPipeline(dir, load);
  ours.load = since(t0);
  let variantsOut = 0;
  try {
    timeMethod(p.lora, 'swap', ours, (a) => ((a[0] as LoraSpec[]).length ? 'lora merge' : 'lora restore'));
    timeMethod(engineOf(p), 'prepareBatch', ours, () => 'decode + VAE (shared)');
    timeMethod(engineOf(p), 'runVariants', ours, (a) => (a[1] as { plan: { settings: Record<string, string> } }[]).map((it) => it.plan.settings.variant ?? '?').join('+'));
    t0 = performance.now();
    const res = await extractRecipe(p, recipe, images, { loras, size });
    ours.recipe = since(t0);
    variantsOut = Object.keys(res[0]!.variants).length;
    res.forEach((r) => r.dispose());
  } finally {
    p.dispose();
  }
  ours.total = since(tAll);
  let c = process.cpuUsage(cpu0);
  const oursCpu = (c.user + c.system) / 1e6;
  const load1 = os.loadavg()[0]!;
  cpu0 = process.cpuUsage();

  // --- baseline: each variant separately, fresh load each time ---
  const base: Record<string, number> = {};
  const tBase = performance.now();
  for (const v of recipe.variants) {
    t0 = performance.now();
    const q = await loadPipeline(dir, load);
    base[`${v.name} load`] = since(t0);
    try {
      if (v.lora?.length) {
        t0 = performance.now();
        await q.setLora(v.lora.map((s) => ({ file: loras[s]!, scale: 1 })));
        base[`${v.name} lora merge`] = since(t0);
      }
      t0 = performance.now();
      const res = await q.extract(images, variantOptions(v, { size }));
      base[`${v.name} extract`] = since(t0);
      res.forEach((f) => f.dispose());
    } finally {
      q.dispose();
    }
  }
  base.total = since(tBase);
  c = process.cpuUsage(cpu0);
  const baseCpu = (c.user + c.system) / 1e6;

  const sum = (o: Record<string, number>, re: RegExp) => Object.entries(o).filter(([k]) => re.test(k)).reduce((a, [, x]) => a + x, 0);
  const rows: (string | number)[][] = [
    ['model load', fmt(ours.load!), fmt(sum(base, / load$/))],
    ['LoRA merge', fmt((ours['lora merge'] ?? 0) + (ours['lora restore'] ?? 0)), fmt(sum(base, / lora merge$/))],
    ['decode + VAE (shared)', fmt(ours['decode + VAE (shared)'] ?? 0), 'in each extract'],
    ...recipe.variants.map((v) => [
      `${v.name}${v.control ? ' (ControlNet, 12 steps)' : ''}${v.lora ? ` (LoRA ${v.lora.join('+')})` : ''}`,
      fmt(ours[v.name] ?? 0),
      fmt(base[`${v.name} extract`] ?? 0),
    ]),
    ['**total**', `**${fmt(ours.total)}**`, `**${fmt(base.total!)}**`],
    ['CPU seconds (process, all threads)', fmt(oursCpu), fmt(baseCpu)],
    ['load average at start', load0.toFixed(1), load1.toFixed(1)],
  ];
  const ratio = base.total! / ours.total!;
  // Work no implementation can share: every variant's own UNet (and ControlNet) forwards. The
  // multi-step variants as measured here; each one-step variant at the fastest one-step time seen
  // (so a first-call warm-up does not count). Even with model load, decode, VAE and prompts free,
  // ours cannot take less than this.
  const multi = recipe.variants.filter((v) => v.denoiseFrom !== undefined);
  const single = recipe.variants.filter((v) => v.denoiseFrom === undefined);
  const timed = single.map((v) => ours[v.name]).filter((x): x is number => x !== undefined);
  if (timed.length !== single.length || multi.some((v) => ours[v.name] === undefined)) throw new Error('recipe bench: a variant was not timed (did Engine.runVariants change?)');
  const fastestSingle = Math.min(...timed);
  const floor = multi.reduce((a, v) => a + ours[v.name]!, 0) + single.length * fastestSingle;
  return [
    `Horse-21 recipe (${recipe.variants.length} variants, ${variantsOut} computed), ${size} px, ${nImages} image(s), SD1.5 full size (random weights), ${load.device} ${load.dtype}, ${threads()} threads; LoRA a1/b1: random kohya LoCon rank 8 (160 UNet modules each)`,
    '',
    table(['seconds', 'ours (one pipeline + extractRecipe)', 'baseline (fresh run per variant)'], rows),
    '',
    `ratio (baseline / ours): **${ratio.toFixed(2)}** (target ≥ 1.5); ${fmt((nImages * 60) / ours.total!)} vs ${fmt((nImages * 60) / base.total!)} images/min.`,
    `CPU-time ratio (baseline / ours): ${(baseCpu / oursCpu).toFixed(2)} (less sensitive to other load on this shared machine).`,
    `unsharable forwards (${multi.map((v) => v.name).join(', ')} as measured + ${single.length} one-step forwards at ${fmt(fastestSingle)} s): ${fmt(floor)} s = ${((100 * floor) / ours.total!).toFixed(0)}% of ours; the best ratio any implementation of shared work could reach in this run: ${(base.total! / floor).toFixed(2)}.`,
    `ours: 'lora restore' (un-merge to base at the end) = ${fmt(ours['lora restore'] ?? 0)} s, included in LoRA merge.`,
  ].join('\n');
}
