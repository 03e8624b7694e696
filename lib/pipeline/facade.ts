/**
 * The extraction pipeline: images and a prompt in, named diffusion features out.
 *
 * It reproduces generic-diffusion-feature's `FeatureExtractor.extract` (docs/method.md) over the
 * TorchScript exports of `weights/export.py`, loaded once through the native addon. {@link Pipeline}
 * is the public facade; the work is done by the stages of its engine (`./engine.ts`), which the
 * recipes drive directly. All tensor math that is not a model runs in `models/ops.pt` on the device
 * the models run on; nothing blocks the event loop.
 *
 * @module
 */
import { resolve } from 'node:path';
import { Tensor, ScriptModule, cudaAvailable, resolveDevice, libtorchVersion, type Device, type DType } from '../native.js';
import { checkModelCompat } from '../compat.js';
import { ClipTokenizer } from '../tokenizer.js';
import { loadImage } from '../image.js';
import { InvalidArgumentError } from '../errors.js';
import type { LoraManager } from '../lora/manager.js';
import type { LoraSpec } from '../lora/parse.js';
import { loadOps } from '../ops.js';
import { checkWeightsFolder, readModelJson, type ModelJson } from './model-json.js';
import { Engine } from './engine.js';
import type { ExtractOptions, ImageFeatures, ImageInput, LoadOptions } from './types.js';

const engines = new WeakMap<Pipeline, Engine>();

/** @internal The engine behind a pipeline (for the recipes and benchmarks; not part of the public API). */
export function engineOf(pipeline: Pipeline): Engine {
  const e = engines.get(pipeline);
  if (!e) throw new InvalidArgumentError('not a Pipeline created by loadPipeline');
  return e;
}

/** Loads the models of a weights folder once; see {@link Pipeline}. */
export async function loadPipeline(weightsDir: string, options: LoadOptions = {}): Promise<Pipeline> {
  const dir = resolve(weightsDir);
  const model = readModelJson(dir);
  checkWeightsFolder(dir);
  checkModelCompat(model, libtorchVersion(), dir); // E_INCOMPATIBLE_MODEL: e.g. a torch 2.x export on libtorch 1.13
  const device = resolveDevice(options.device ?? 'auto') as Device;
  const isCuda = device.startsWith('cuda');
  const dtypeOpt = options.dtype ?? 'auto';
  const dtype: DType = dtypeOpt === 'auto' ? (isCuda ? 'float16' : 'float32') : dtypeOpt;
  if (isCuda && !cudaAvailable()) throw new InvalidArgumentError(`device '${device}' requested but CUDA is not available`);

  const load = (f: string) => ScriptModule.load(resolve(dir, f), { device, dtype });
  const tokenizer = await ClipTokenizer.fromDir(dir);
  const [unet, vae, text, ops] = await Promise.all([load('unet.pt'), load('vae_encoder.pt'), load('text_encoder.pt'), loadOps(device)]);
  return new Pipeline(new Engine(dir, model, device, dtype, { unet, vae, text }, ops, tokenizer));
}

/**
 * A loaded model set. One pipeline serves many calls; calls are queued, so it is safe to call
 * {@link Pipeline.extract} concurrently. Release it with {@link Pipeline.dispose}.
 */
export class Pipeline {
  /** The resolved device (`'cpu'`, `'cuda:0'`, …). */
  readonly device: Device;
  /** Compute dtype of the models. */
  readonly dtype: DType;
  /** The weights folder. */
  readonly weightsDir: string;
  /** Its model.json. */
  readonly model: ModelJson;
  /** The tokenizer of the weights folder. */
  readonly tokenizer: ClipTokenizer;
  /** LoRA merging into this pipeline's UNet (and optionally text encoder). */
  readonly lora: LoraManager;

  /** @internal use {@link loadPipeline} */
  constructor(engine: Engine) {
    engines.set(this, engine);
    this.weightsDir = engine.weightsDir;
    this.model = engine.model;
    this.device = engine.device;
    this.dtype = engine.dtype;
    this.tokenizer = engine.tokenizer;
    this.lora = engine.lora;
  }

  /** Every legal layer id with its C×h×w shape at the default size. */
  layers(): Record<string, number[]> {
    return { ...this.model.layers };
  }

  /**
   * Applies LoRA files (merged into the loaded weights; replaces any active LoRA). An empty list
   * restores the base weights. Queued with extraction calls.
   */
  setLora(loras: readonly LoraSpec[], opts: { textEncoder?: boolean } = {}): Promise<void> {
    const e = engineOf(this);
    return e.run(async () => {
      await e.lora.applyNow(loras, opts);
      if (opts.textEncoder || e.promptCacheSize) e.clearPromptCache();
    });
  }

  /** Token ids per chunk exactly as the text encoder gets them (docs/method.md §Prompts). */
  tokenize(text: string): number[][] {
    return this.tokenizer.chunks(text);
  }

  /**
   * The prompt embedding (1×L×D on the pipeline's device), cached by text. The returned tensor is
   * owned by the cache: do not dispose it.
   */
  encodePrompt(text: string): Promise<Tensor> {
    const e = engineOf(this);
    return e.run(() => e.encodePrompt(text));
  }

  /** The canny control image the ControlNet sees, as uint8 H×W (0/255) per image, at `size`. */
  async controlImage(image: ImageInput, size = 512): Promise<{ mask: Uint8Array; width: number; height: number }> {
    const img = await loadImage(typeof image === 'string' || image instanceof Uint8Array ? image : image.data, size);
    const t = Tensor.fromUint8Array(img.data, [1, size, size, 3]);
    try {
      const edges = await engineOf(this).ops.canny(t, 100, 200);
      try {
        const cpu = await edges.to('cpu', 'uint8');
        try {
          return { mask: Uint8Array.from(cpu.toArray()), width: size, height: size };
        } finally {
          cpu.dispose();
        }
      } finally {
        edges.dispose();
      }
    } finally {
      t.dispose();
    }
  }

  /**
   * Extracts features of `images`. Resolves to one {@link ImageFeatures} per image, in order.
   * Rejects with a clear error on bad input (unreadable image, unknown layer id, …).
   */
  extract(images: readonly ImageInput[], options: ExtractOptions = {}): Promise<ImageFeatures[]> {
    const e = engineOf(this);
    return e.run(async () => {
      const plan = await e.plan(images, options);
      const results: ImageFeatures[] = [];
      try {
        for (let start = 0; start < images.length; start += plan.batchSize) {
          const ctx = await e.prepareBatch(images, start, plan, options);
          try {
            results.push(...(await e.runVariants(ctx, [{ plan, o: options }]))[0]!);
          } finally {
            ctx.scope.dispose();
          }
          options.onProgress?.({ stage: 'done', done: Math.min(start + plan.batchSize, images.length), total: images.length });
        }
        return results;
      } catch (err) {
        results.forEach((r) => r.dispose());
        throw err;
      }
    }, options?.signal instanceof AbortSignal ? options.signal : undefined); // a non-signal is refused by plan()
  }

  /** Releases every model and cached tensor. Further calls reject. */
  dispose(): void {
    engineOf(this).dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
