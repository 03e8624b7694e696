/**
 * GATE's per-task feature recipes (docs/method.md §Recipes) and {@link extractRecipe}, which computes every
 * variant of a recipe while doing the shared work once: images are decoded and VAE-encoded once per
 * batch, prompt embeddings are cached, the canny control image is computed once per batch, and the
 * variants that share weights (the same LoRA set) run back to back so each LoRA is merged once; those
 * that also share a schedule can run as one batched UNet call ({@link RecipeOptions.batchVariants}).
 *
 * LoRA weights are the user's (GATE distributes its own); a recipe names LoRA *slots* (`a1`, `b1`, …)
 * that the caller maps to files.
 *
 * @module
 */
import type { Tensor } from './native.js';
import { InvalidArgumentError } from './errors.js';
import type { ExtractOptions, ImageFeatures, ImageInput, Progress } from './pipeline/types.js';
import { engineOf, type Pipeline } from './pipeline/facade.js';
import { defaultSize } from './pipeline/model-json.js';
import type { Plan } from './pipeline/plan.js';
import type { BatchContext } from './pipeline/batch.js';
import type { LoraSpec } from './lora/parse.js';
import { loadOps } from './ops.js';

/** One feature variant of a recipe: its prompt, techniques, timestep and layers. */
export interface RecipeVariant {
  /** Name of the variant (GATE's bucket name: `feature1`, …, `attn`). */
  name: string;
  prompt: string;
  /** Layer preset or ids (GATE: `legacy`). An empty list gives the attention feature only. */
  layers: string | readonly string[];
  /** Adds the aggregated up-cross attention feature `attn`. */
  attention?: boolean;
  control?: 'canny';
  denoiseFrom?: number;
  /** LoRA slots merged for this variant. */
  lora?: readonly string[];
  /**
   * Noise seed offset of the variant. Every variant of a shipped recipe has its own (its index), so
   * each draws fresh noise as the reference's separate runs do (GATE's "two runs" = two draws);
   * the seed used is recorded in the variant's settings.
   */
  seed?: number;
  t?: number;
}

/** A GATE task recipe. */
export interface Recipe {
  name: string;
  task: string;
  description: string;
  /** LoRA slots the recipe uses (the caller supplies a file for each). */
  loraSlots: readonly string[];
  variants: readonly RecipeVariant[];
}

const VOC_CLASSES =
  'aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, motorbike, person, potted plant, sheep, train, tv monitor';
const QUALITY = 'high quality, best quality, highly realistic, masterpiece';
const LEGACY = 'legacy';
const UPSAMPLERS = ['up-level0-upsampler-out', 'up-level1-upsampler-out', 'up-level2-upsampler-out'] as const;

/** The recipes of docs/method.md §Recipes, verbatim prompts (prompts are data). */
export const RECIPES: Readonly<Record<string, Recipe>> = Object.freeze({
  correspondence: {
    name: 'correspondence',
    task: 'SPair-71k semantic correspondence (docs/method.md §Recipes)',
    description: 'six 3520-channel legacy features (fine-grained prompt ×2 noise draws, LoRA A/B, ControlNet multi-step ×2) and one 154-channel attention feature',
    loraSlots: ['loraA', 'loraB'],
    variants: [
      { name: 'feature1', prompt: `a photo of ${VOC_CLASSES}, high quality, best quality, highly realistic, masterpiece, high resolution`, layers: LEGACY, seed: 0 },
      { name: 'feature2', prompt: `a photo of ${VOC_CLASSES}, high quality, best quality, highly realistic, masterpiece, high resolution`, layers: LEGACY, seed: 1 },
      { name: 'feature3', prompt: 'a photo', layers: LEGACY, lora: ['loraA'], seed: 2 },
      { name: 'feature4', prompt: 'a photo', layers: LEGACY, lora: ['loraB'], seed: 3 },
      { name: 'feature5', prompt: 'a photo', layers: LEGACY, control: 'canny', denoiseFrom: 60, seed: 4 },
      { name: 'feature6', prompt: 'a photo', layers: LEGACY, control: 'canny', denoiseFrom: 60, seed: 5 },
      { name: 'attn', prompt: `a photo of ${VOC_CLASSES}`, layers: [], attention: true, control: 'canny', denoiseFrom: 60, lora: ['loraA'], seed: 6 },
    ],
  },
  horse21: {
    name: 'horse21',
    task: 'Horse-21 label-scarce segmentation (docs/method.md §Recipes)',
    description: 'four 3674-channel features (legacy + attn): fine-grained prompt, ControlNet multi-step, LoRA a1, LoRA b1',
    loraSlots: ['a1', 'b1'],
    variants: [
      { name: 'feature1', prompt: `a horse, ${QUALITY}`, layers: LEGACY, attention: true, seed: 0 },
      { name: 'feature2', prompt: 'a horse', layers: LEGACY, attention: true, control: 'canny', denoiseFrom: 60, seed: 1 },
      { name: 'feature3', prompt: 'a horse', layers: LEGACY, attention: true, lora: ['a1'], seed: 2 },
      { name: 'feature4', prompt: 'a horse', layers: LEGACY, attention: true, lora: ['b1'], seed: 3 },
    ],
  },
  bedroom28: {
    name: 'bedroom28',
    task: 'Bedroom-28 label-scarce segmentation (docs/method.md §Recipes)',
    description: 'three 3674-channel features: prompt (no quality words, on purpose), ControlNet multi-step, one LoRA',
    loraSlots: ['lora'],
    variants: [
      { name: 'feature1', prompt: 'a photo of a tidy and well-designed bedroom', layers: LEGACY, attention: true, seed: 0 },
      { name: 'feature2', prompt: 'a bedroom', layers: LEGACY, attention: true, control: 'canny', denoiseFrom: 60, seed: 1 },
      { name: 'feature3', prompt: 'a bedroom', layers: LEGACY, attention: true, lora: ['lora'], seed: 2 },
    ],
  },
  ade20k: {
    name: 'ade20k',
    task: 'ADE20K standard segmentation (docs/method.md §Recipes)',
    description: 'three one-step extractors of the three upsampler outputs: prompt; prompt + ControlNet + LoRA 2a; prompt + ControlNet + LoRA 2b',
    loraSlots: ['lora2a', 'lora2b'],
    variants: (() => {
      const prompt = 'a highly realistic photo of the real world. It can be an indoor scene, or an outdoor scene, or a photo of nature. high quality.';
      return [
        { name: 'extractor1', prompt, layers: UPSAMPLERS, seed: 0 },
        { name: 'extractor2', prompt, layers: UPSAMPLERS, control: 'canny' as const, lora: ['lora2a'], seed: 1 },
        { name: 'extractor3', prompt, layers: UPSAMPLERS, control: 'canny' as const, lora: ['lora2b'], seed: 2 },
      ];
    })(),
  },
  cityscapes: {
    name: 'cityscapes',
    task: 'CityScapes standard segmentation (docs/method.md §Recipes)',
    description: 'three one-step extractors of the three upsampler outputs: prompt; prompt + ControlNet + LoRA 13; prompt + ControlNet + LoRA 17',
    loraSlots: ['13', '17'],
    variants: (() => {
      const prompt = 'An urban street scene with multiple lanes, various buildings, traffic lights, cars in the lanes, and pedestrians, highly realistic.';
      return [
        { name: 'extractor1', prompt, layers: UPSAMPLERS, seed: 0 },
        { name: 'extractor2', prompt, layers: UPSAMPLERS, control: 'canny' as const, lora: ['13'], seed: 1 },
        { name: 'extractor3', prompt, layers: UPSAMPLERS, control: 'canny' as const, lora: ['17'], seed: 2 },
      ];
    })(),
  },
});

/** Options of {@link extractRecipe}. */
export interface RecipeOptions {
  /** LoRA file (and scale) per slot of the recipe. */
  loras?: Record<string, string | LoraSpec>;
  /** Skip variants whose LoRA slots have no file instead of failing. */
  skipMissingLora?: boolean;
  /** Base seed; variant `seed` values are added to it. */
  seed?: number;
  size?: number;
  batchSize?: number;
  /**
   * Run variants that share weights and schedule (same LoRA set, control, timesteps; prompt and noise
   * seed may differ, e.g. GATE's "two noise draws") as one batched UNet/ControlNet call per step.
   * `'auto'` (default): on CUDA, where one batched call keeps the GPU busier than two small ones; on
   * the CPU only when asked, since there a batch of two costs about as much as two calls (see
   * bench/results). Results match separate runs to float rounding (batched kernels may sum in
   * another order).
   */
  batchVariants?: boolean | 'auto';
  /** Also compute the amalgamated tensor (all variants packaged and concatenated, in recipe order). */
  amalgamate?: boolean;
  signal?: AbortSignal;
  onProgress?: (p: Progress & { variant: string }) => void;
}

/** Per image: every variant's features, and the amalgamated tensor when asked for. */
export interface RecipeResult {
  name: string;
  variants: Record<string, ImageFeatures>;
  /**
   * Channel concatenation of every variant's packaged features (docs/method.md §Packaging: its layers resized to the
   * largest and concatenated in forward order, then `attn`), variants in recipe order, all resized
   * (nearest) to the largest spatial size.
   */
  amalgamated?: Tensor;
  dispose(): void;
  [Symbol.dispose](): void;
}

/** Looks a recipe up by name, with a clear error. */
export function getRecipe(name: string): Recipe {
  const r = typeof name === 'string' && Object.prototype.hasOwnProperty.call(RECIPES, name) ? RECIPES[name] : undefined;
  if (!r) throw new InvalidArgumentError(`unknown recipe '${name}' (known: ${Object.keys(RECIPES).join(', ')})`);
  return r;
}

/**
 * The {@link ExtractOptions} one variant of a recipe runs with under `opts` (what {@link extractRecipe}
 * plans; benchmarks use it to run a variant on its own). `opts.size` defaults to 512 here; the recipe
 * run passes the model's default size.
 */
export function variantOptions(v: RecipeVariant, opts: Pick<RecipeOptions, 'seed' | 'size' | 'batchSize' | 'amalgamate' | 'signal'> = {}): ExtractOptions {
  return {
    layers: typeof v.layers === 'string' ? v.layers : [...v.layers],
    prompt: v.prompt,
    attention: v.attention ?? false,
    control: v.control ?? null,
    denoiseFrom: v.denoiseFrom,
    t: v.t ?? 50,
    seed: (opts.seed ?? 0) + (v.seed ?? 0),
    size: opts.size ?? 512,
    batchSize: opts.batchSize ?? 1,
    packaged: !!opts.amalgamate,
    signal: opts.signal,
  };
}

function loraKey(v: RecipeVariant): string {
  return [...(v.lora ?? [])].sort().join('+');
}

/**
 * Computes every variant of `recipe` for `images`. Shared work (decode, VAE encode, prompt
 * encodings, canny) is done once; variants are grouped by LoRA set so each LoRA is merged once per
 * chunk of images, and with `batchVariants` variants of one schedule share batched UNet calls. The
 * pipeline's LoRA state is restored to none at the end.
 */
export async function extractRecipe(
  pipeline: Pipeline,
  recipe: string | Recipe,
  images: readonly ImageInput[],
  opts: RecipeOptions = {},
): Promise<RecipeResult[]> {
  const r = typeof recipe === 'string' ? getRecipe(recipe) : recipe;
  const loras = opts.loras ?? {};
  const missing = r.loraSlots.filter((s) => !(s in loras) && r.variants.some((v) => v.lora?.includes(s)));
  if (missing.length && !opts.skipMissingLora) {
    throw new InvalidArgumentError(`recipe '${r.name}' needs LoRA files for slot(s) ${missing.join(', ')} (pass loras: { ${missing.map((m) => `'${m}': 'file.safetensors'`).join(', ')} } or skipMissingLora)`);
  }
  const unknownSlots = Object.keys(loras).filter((s) => !r.loraSlots.includes(s));
  if (unknownSlots.length) throw new InvalidArgumentError(`recipe '${r.name}' has no LoRA slot(s) ${unknownSlots.join(', ')} (slots: ${r.loraSlots.join(', ')})`);
  const variants = r.variants.filter((v) => !(v.lora ?? []).some((s) => missing.includes(s)));
  const bv = opts.batchVariants ?? 'auto';
  if (bv !== 'auto' && typeof bv !== 'boolean') throw new InvalidArgumentError(`batchVariants must be true, false or 'auto', got '${String(bv)}'`);
  const batchVariants = bv === 'auto' ? pipeline.device.startsWith('cuda') : bv;
  const engine = engineOf(pipeline);
  const groups = new Map<string, RecipeVariant[]>();
  for (const v of variants) {
    const k = loraKey(v);
    groups.set(k, [...(groups.get(k) ?? []), v]);
  }
  const optionsOf = (v: RecipeVariant): ExtractOptions => variantOptions(v, { ...opts, size: opts.size ?? defaultSize(pipeline.model) });

  return engine.run(async () => {
    const perImage: Record<string, ImageFeatures>[] = images.map(() => ({}));
    const results: RecipeResult[] = [];
    try {
      const plans = new Map<string, Plan>();
      for (const v of variants) plans.set(v.name, await engine.plan(images, optionsOf(v)));
      const batchSize = opts.batchSize ?? 1;
      const size = opts.size ?? defaultSize(pipeline.model);
      // Chunks of images keep the shared per-batch state bounded while amortising LoRA merges.
      const chunk = Math.max(batchSize, 32);
      for (let c0 = 0; c0 < images.length; c0 += chunk) {
        const chunkImages = images.slice(c0, c0 + chunk);
        const contexts: BatchContext[] = [];
        try {
          for (let s = 0; s < chunkImages.length; s += batchSize) {
            contexts.push(await engine.prepareBatch(chunkImages, s, { size, batchSize }, { signal: opts.signal }));
          }
          for (const [, group] of groups) {
            const specs: LoraSpec[] = (group[0]!.lora ?? []).map((slot) => {
              const l = loras[slot]!;
              return typeof l === 'string' ? { file: l, scale: 1 } : l;
            });
            await pipeline.lora.applyNow(specs, {});
            const items = group.map((v) => ({
              v,
              plan: { ...plans.get(v.name)!, settings: { ...plans.get(v.name)!.settings, lora: pipeline.lora.describe(), recipe: r.name, variant: v.name } },
              o: { ...optionsOf(v), seedOffset: c0 } as ExtractOptions,
            }));
            // Variants that can share one batched call (same schedule), in recipe order.
            const batches: (typeof items)[] = [];
            for (const it of items) {
              const b = batchVariants ? batches.find((bb) => engine.batchable(bb[0]!, it)) : undefined;
              if (b) b.push(it);
              else batches.push([it]);
            }
            for (const batch of batches) {
              const label = batch.map((it) => it.v.name).join('+');
              const onProgress = opts.onProgress ? (p: Progress) => opts.onProgress!({ ...p, done: c0 + p.done, total: images.length, variant: label }) : undefined;
              const run = batch.map((it, k) => ({ plan: it.plan, o: k === 0 ? { ...it.o, onProgress } : it.o }));
              for (const ctx of contexts) {
                const res = await engine.runVariants(ctx, run);
                res.forEach((perV, k) =>
                  perV.forEach((f, i) => {
                    perImage[c0 + ctx.start + i]![batch[k]!.v.name] = f;
                  }),
                );
              }
            }
          }
        } finally {
          contexts.forEach((c) => c.scope.dispose());
        }
      }
      const cpuOps = opts.amalgamate ? await loadOps('cpu') : null;
      for (let i = 0; i < images.length; i++) {
        const vs = perImage[i]!;
        const ordered: Record<string, ImageFeatures> = {};
        for (const v of variants) ordered[v.name] = vs[v.name]!;
        const amalgamated = cpuOps ? await cpuOps.package(Object.values(ordered).map((f) => f.packaged!)) : undefined;
        const dispose = (): void => {
          Object.values(ordered).forEach((f) => f.dispose());
          if (amalgamated && !amalgamated.disposed) amalgamated.dispose();
        };
        results.push({ name: Object.values(ordered)[0]!.name, variants: ordered, amalgamated, dispose, [Symbol.dispose]: dispose });
      }
      return results;
    } catch (err) {
      perImage.forEach((vs) => Object.values(vs).forEach((f) => f.dispose()));
      throw err;
    } finally {
      await pipeline.lora.applyNow([], {});
    }
  }, opts.signal instanceof AbortSignal ? opts.signal : undefined);
}
