/**
 * The extraction pipeline: images and a prompt in, named diffusion features out.
 *
 * It reproduces generic-diffusion-feature's `FeatureExtractor.extract` (GATE_SPEC §1–§5) over the
 * TorchScript exports of `weights/export.py`, loaded once through the native addon:
 *
 *   decode + resize (sharp) → [-1,1] → VAE posterior (sample or mean) × scaling → add noise at the
 *   noise timestep → [ControlNet canny → PLMS denoising steps] → hooked UNet forward at the extraction
 *   timestep → requested taps (+ the aggregated attention feature `attn`) → optional `featureResize`,
 *   packaging (§3.5) → per-image CPU float32 tensors.
 *
 * All tensor math that is not a model runs in `models/ops.pt` (TorchScript), on the device the models
 * run on; nothing blocks the event loop.
 *
 * @module
 */
import { existsSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join, resolve, basename, extname } from 'node:path';
import { Tensor, ScriptModule, cudaAvailable, resolveDevice, type Device, type DType, type IValue } from './native.js';
import { ClipTokenizer } from './tokenizer.js';
import { loadImage } from './image.js';
import { SafetensorsFile, encodeSafetensors, writeSafetensors, type StTensorInput } from './safetensors.js';
import { resolveLayerSpec, sortForwardOrder, attentionMapIds, type AttentionCategory } from './layers.js';
import {
  DiffusionFeaturesError,
  FileNotFoundError,
  InvalidArgumentError,
  InvalidFileError,
} from './errors.js';
import { LoraManager, type LoraSpec } from './lora.js';
import { packageRoot } from './ops.js';

/** The bundled tiny SD1.5-shaped model (random weights) used by `demo` and the tests. */
export function bundledModelDir(): string {
  return join(packageRoot(), 'models', 'micro');
}

/** Versions of model.json this release reads. */
const SUPPORTED_FORMATS = [1];

/** What `weights/export.py` writes into `model.json` (the fields the pipeline reads). */
export interface ModelJson {
  format_version: number;
  scaling_factor: number;
  sample_size?: number;
  configs: Record<string, Record<string, unknown>>;
  scheduler?: Record<string, unknown>;
  torch_version?: string;
  components?: string[];
  layers: Record<string, number[]>;
  [k: string]: unknown;
}

/** Options of {@link loadPipeline}. */
export interface LoadOptions {
  /** `'auto'` (default) picks CUDA when a GPU and a CUDA libtorch are present, else the CPU. */
  device?: Device;
  /** `'auto'` (default) picks float16 on CUDA and float32 on the CPU. */
  dtype?: 'auto' | 'float32' | 'float16' | 'bfloat16';
}

/** One image handed to {@link Pipeline.extract}: a path, raw bytes, or named bytes. */
export type ImageInput = string | Buffer | Uint8Array | { name: string; data: Buffer | Uint8Array };

/** Progress report of a long call. */
export interface Progress {
  /** What is running: `'decode'`, `'vae'`, `'text'`, `'denoise'`, `'unet'`, `'handoff'`. */
  stage: string;
  /** Images finished so far in this call. */
  done: number;
  /** Images in this call. */
  total: number;
  /** Denoising step within the current batch (multi-step only). */
  step?: number;
  /** Denoising steps per batch (multi-step only). */
  steps?: number;
}

/** Options of {@link Pipeline.extract}. Every field has the reference's default. */
export interface ExtractOptions {
  /** A preset (`legacy` default, `practical`, `amalgamation`, `amalgamation_small`, `full`), a layer-config JSON file, or ids. */
  layers?: string | readonly string[];
  /** The prompt shared by all images (default `''`). Prompts of more than 70 words are chunked (GATE_SPEC §2). */
  prompt?: string;
  /** Nominal timestep (default 50). */
  t?: number;
  /** `'reference'` (default): the UNet runs at t+1 as generic-diffusion-feature does; `'exact'`: at t. */
  timestepMode?: 'reference' | 'exact';
  /** Seed of the VAE posterior and latent noise (default 0). Image i of the call uses its own streams. */
  seed?: number;
  /**
   * Index of the first image of this call in a larger run (default 0): image k uses the noise streams
   * of (seed, seedOffset + k), so results do not depend on how a run is split into calls or batches.
   */
  seedOffset?: number;
  /** Caller-supplied noise: `noise` (N×4×h×w) and optionally `vaeNoise`; first dim runs over the images of the call. */
  noise?: { noise: Tensor; vaeNoise?: Tensor };
  /** `'sample'` (default, reference) or `'mean'` of the VAE posterior. */
  posterior?: 'sample' | 'mean';
  /** Aggregated attention feature `attn`: `true` = `['up_cross']` (GATE), or a list of categories. */
  attention?: boolean | readonly AttentionCategory[];
  /** ControlNet conditioning (`'canny'`), needs `controlnet.pt` in the weights folder. */
  control?: 'canny' | null;
  /** ControlNet conditioning scale (default 1). */
  controlScale?: number;
  /** Multi-step denoising start (GATE uses 60 with t=50): noise at denoiseFrom+1, PLMS down to t. Needs `control`. */
  denoiseFrom?: number;
  /** Denoising scheduler: `'plms'` (default, reference) or `'ddim'`. */
  scheduler?: 'plms' | 'ddim';
  /** Images are resized to size×size (default: the model's `default_size` from model.json, 512 for SD1.5). */
  size?: number;
  /** Images per model call (default 1). */
  batchSize?: number;
  /** Average-pool every feature by this factor (default 1 = off, GATE_SPEC §3.3). */
  featureResize?: number;
  /** Also return the §3.5 packaged tensor (all features resized to the largest and concatenated). */
  packaged?: boolean;
  /** Cancels the call between model calls. */
  signal?: AbortSignal;
  /** Called as work advances. */
  onProgress?: (p: Progress) => void;
}

/** The features of one image. Tensors are CPU float32, C×h×w; `toFloat32Array()` is zero-copy. */
export interface ImageFeatures {
  /** The image's name (file basename without extension, or the given name). */
  name: string;
  /** Per layer id (and `attn`), in forward order. */
  features: Record<string, Tensor>;
  /** §3.5 packaging, when asked for. */
  packaged?: Tensor;
  /** The settings that produced these features (strings, also written into output metadata). */
  settings: Record<string, string>;
  /** Releases the tensors. */
  dispose(): void;
  [Symbol.dispose](): void;
}

/** Disposes tensors at the end of a scope. */
export class Scope {
  private readonly items: Tensor[] = [];
  add<T extends Tensor>(t: T): T {
    this.items.push(t);
    return t;
  }
  addAll(v: IValue): void {
    if (v instanceof Tensor) this.items.push(v);
    else if (Array.isArray(v)) v.forEach((x) => this.addAll(x));
    else if (v && typeof v === 'object') Object.values(v).forEach((x) => this.addAll(x));
  }
  dispose(): void {
    for (const t of this.items.splice(0)) if (!t.disposed) t.dispose();
  }
}

function asTensor(v: IValue, what: string): Tensor {
  if (!(v instanceof Tensor)) throw new DiffusionFeaturesError('E_INVALID_FILE', `${what}: expected a tensor from the model`);
  return v;
}

function checkInt(name: string, v: number | undefined, min: number, max: number): void {
  if (v === undefined) return;
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new InvalidArgumentError(`${name} must be an integer in [${min}, ${max}], got ${String(v)}`);
  }
}

/** Noise stream of image `index` for `kind` (0 = VAE posterior, 1 = latent): independent of batching. */
function streamSeed(seed: number, index: number, kind: 0 | 1): bigint {
  return (BigInt(seed) * 1_000_003n + BigInt(index) * 2n + BigInt(kind)) & 0x7fff_ffff_ffff_ffffn;
}

function imageName(input: ImageInput, index: number): string {
  if (typeof input === 'string') return basename(input, extname(input));
  if (input instanceof Uint8Array) return `image${index}`;
  return input.name;
}

/** Reads and validates `model.json` of a weights folder. */
export function readModelJson(dir: string): ModelJson {
  const path = join(dir, 'model.json');
  if (!existsSync(path)) {
    throw new FileNotFoundError(path, 'not a diffusion-features weights folder (model.json is missing); create one with `python3 weights/export.py --from <SD1.5 folder> --out <dir>`');
  }
  let json: ModelJson;
  try {
    json = JSON.parse(readFileSync(path, 'utf8')) as ModelJson;
  } catch (err) {
    throw new InvalidFileError(path, `not valid JSON (${(err as Error).message})`);
  }
  if (!SUPPORTED_FORMATS.includes(json.format_version)) {
    throw new DiffusionFeaturesError(
      'E_INCOMPATIBLE_MODEL',
      `${path}: format_version ${String(json.format_version)} is not supported by this release (reads ${SUPPORTED_FORMATS.join(', ')}); re-export the weights with this version's weights/export.py`,
    );
  }
  if (typeof json.scaling_factor !== 'number' || !json.layers || typeof json.layers !== 'object') {
    throw new InvalidFileError(path, 'missing scaling_factor or layers');
  }
  return json;
}

/** Loads the models of a weights folder once; see {@link Pipeline}. */
export async function loadPipeline(weightsDir: string, options: LoadOptions = {}): Promise<Pipeline> {
  const dir = resolve(weightsDir);
  const model = readModelJson(dir);
  for (const f of ['unet.pt', 'vae_encoder.pt', 'text_encoder.pt', 'vocab.json', 'merges.txt']) {
    if (!existsSync(join(dir, f))) {
      throw new DiffusionFeaturesError('E_INCOMPATIBLE_MODEL', `${dir}: the weights folder is missing ${f} (re-run weights/export.py)`);
    }
  }
  const device = resolveDevice(options.device ?? 'auto') as Device;
  const isCuda = device.startsWith('cuda');
  const dtypeOpt = options.dtype ?? 'auto';
  const dtype: DType = dtypeOpt === 'auto' ? (isCuda ? 'float16' : 'float32') : dtypeOpt;
  if (isCuda && !cudaAvailable()) throw new InvalidArgumentError(`device '${device}' requested but CUDA is not available`);

  const load = (f: string, dt: DType = dtype) => ScriptModule.load(join(dir, f), { device, dtype: dt });
  const tokenizer = await ClipTokenizer.fromDir(dir);
  const [unet, vae, text, ops] = await Promise.all([
    load('unet.pt'),
    load('vae_encoder.pt'),
    load('text_encoder.pt'),
    ScriptModule.load(join(packageRoot(), 'models', 'ops.pt'), { device: device as Device }),
  ]);
  return new Pipeline(dir, model, device, dtype, { unet, vae, text, ops }, tokenizer);
}

/** @internal Resolved options of one extraction variant. */
export interface Plan {
  size: number;
  latent: number;
  batchSize: number;
  seed: number;
  featureResize: number;
  controlScale: number;
  posterior: 'sample' | 'mean';
  scheduler: 'plms' | 'ddim';
  userIds: string[];
  categories: AttentionCategory[];
  mapIds: Map<AttentionCategory, string[]>;
  capture: string[];
  minQ: number;
  maxQ: number;
  denoiseSteps: number[];
  noiseT: number;
  unetT: number;
  settings: Record<string, string>;
}

/** @internal A decoded, VAE-encoded batch shared by the variants of a recipe. */
export interface BatchContext {
  scope: Scope;
  start: number;
  B: number;
  total: number;
  names: string[];
  u8: Tensor;
  mean: Tensor;
  logvar: Tensor;
  cond: Tensor | null;
}

interface Modules {
  unet: ScriptModule;
  vae: ScriptModule;
  text: ScriptModule;
  ops: ScriptModule;
  controlnet?: ScriptModule;
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
  private readonly m: Modules;
  private readonly promptCache = new Map<string, Tensor>();
  private queue: Promise<unknown> = Promise.resolve();
  private disposed = false;

  /** @internal use {@link loadPipeline} */
  constructor(dir: string, model: ModelJson, device: Device, dtype: DType, modules: Modules, tokenizer: ClipTokenizer) {
    this.weightsDir = dir;
    this.model = model;
    this.device = device;
    this.dtype = dtype;
    this.m = modules;
    this.tokenizer = tokenizer;
    this.lora = new LoraManager(modules.unet, modules.text);
  }

  /** Every legal layer id with its C×h×w shape at the default size. */
  layers(): Record<string, number[]> {
    return { ...this.model.layers };
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.disposed) return Promise.reject(new DiffusionFeaturesError('E_INVALID_ARGUMENT', 'pipeline has been disposed'));
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Applies LoRA files (merged into the loaded weights; replaces any active LoRA). An empty list
   * restores the base weights. Queued with extraction calls.
   */
  setLora(loras: readonly LoraSpec[], opts: { textEncoder?: boolean } = {}): Promise<void> {
    return this.serial(async () => {
      await this.lora.swap(loras, opts);
      if (opts.textEncoder || this.promptCache.size) this.clearPromptCache();
    });
  }

  private clearPromptCache(): void {
    for (const t of this.promptCache.values()) t.dispose();
    this.promptCache.clear();
  }

  /** Token ids per chunk exactly as the text encoder gets them (GATE_SPEC §2). */
  tokenize(text: string): number[][] {
    return this.tokenizer.chunks(text);
  }

  /**
   * The prompt embedding (1×L×D on the pipeline's device), cached by text. The returned tensor is
   * owned by the cache: do not dispose it.
   */
  encodePrompt(text: string): Promise<Tensor> {
    return this.serial(() => this.encodePromptNow(text));
  }

  private async encodePromptNow(text: string): Promise<Tensor> {
    const cached = this.promptCache.get(text);
    if (cached && !cached.disposed) return cached;
    const scope = new Scope();
    try {
      const parts: Tensor[] = [];
      for (const ids of this.tokenizer.chunks(text)) {
        const idsT = scope.add(Tensor.fromInt64Array(ids, [1, ids.length]));
        const onDev = scope.add(await idsT.to(this.device));
        parts.push(scope.add(asTensor(await this.m.text.forward(onDev), 'text_encoder')));
      }
      const emb = parts.length === 1 ? parts[0]! : scope.add(asTensor(await this.m.ops.call('cat', parts, 1), 'ops.cat'));
      const kept = await emb.to(this.device, this.dtype);
      if (this.promptCache.size >= 64) {
        const [oldest] = this.promptCache.keys();
        this.promptCache.get(oldest!)!.dispose();
        this.promptCache.delete(oldest!);
      }
      this.promptCache.set(text, kept);
      return kept;
    } finally {
      scope.dispose();
    }
  }

  private async controlnet(): Promise<ScriptModule> {
    if (this.m.controlnet) return this.m.controlnet;
    const path = join(this.weightsDir, 'controlnet.pt');
    if (!existsSync(path)) {
      throw new DiffusionFeaturesError('E_INCOMPATIBLE_MODEL', `${this.weightsDir}: ControlNet requested but controlnet.pt is missing (export it with --components controlnet)`);
    }
    this.m.controlnet = await ScriptModule.load(path, { device: this.device as Device, dtype: this.dtype });
    return this.m.controlnet;
  }

  /** The canny control image the ControlNet sees, as uint8 H×W (0/255) per image, at `size`. */
  async controlImage(image: ImageInput, size = 512): Promise<{ mask: Uint8Array; width: number; height: number }> {
    const img = await loadImage(typeof image === 'string' || image instanceof Uint8Array ? image : image.data, size);
    const t = Tensor.fromUint8Array(img.data, [1, size, size, 3]);
    try {
      const edges = asTensor(await this.m.ops.call('canny', t, 100, 200), 'ops.canny');
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
    return this.serial(async () => {
      const plan = await this.plan(images, options);
      const results: ImageFeatures[] = [];
      try {
        for (let start = 0; start < images.length; start += plan.batchSize) {
          const ctx = await this.prepareBatch(images, start, plan, options);
          try {
            results.push(...(await this.runVariant(ctx, plan, options)));
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
    });
  }

  /** @internal Runs `fn` in this pipeline's call queue (used by recipes). */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.serial(fn);
  }

  /** @internal Validates options and resolves layers, attention maps and timesteps. */
  async plan(images: readonly ImageInput[], o: ExtractOptions): Promise<Plan> {
    if (!Array.isArray(images) || images.length === 0) throw new InvalidArgumentError('extract: give at least one image');
    const size = o.size ?? this.defaultSize();
    checkInt('size', size, 64, 4096);
    if (size % 64 !== 0) throw new InvalidArgumentError(`size must be a multiple of 64, got ${size}`);
    const t = o.t ?? 50;
    checkInt('t', t, 0, 999);
    const batchSize = o.batchSize ?? 1;
    checkInt('batchSize', batchSize, 1, 1024);
    const featureResize = o.featureResize ?? 1;
    checkInt('featureResize', featureResize, 1, 64);
    const seed = o.seed ?? 0;
    checkInt('seed', seed, 0, Number.MAX_SAFE_INTEGER);
    checkInt('seedOffset', o.seedOffset, 0, Number.MAX_SAFE_INTEGER);
    const controlScale = o.controlScale ?? 1;
    if (!Number.isFinite(controlScale)) throw new InvalidArgumentError('controlScale must be a finite number');
    const posterior = o.posterior ?? 'sample';
    if (posterior !== 'sample' && posterior !== 'mean') throw new InvalidArgumentError(`posterior must be 'sample' or 'mean', got '${String(posterior)}'`);
    const mode = o.timestepMode ?? 'reference';
    if (mode !== 'reference' && mode !== 'exact') throw new InvalidArgumentError(`timestepMode must be 'reference' or 'exact', got '${String(mode)}'`);
    const scheduler = o.scheduler ?? 'plms';
    if (scheduler !== 'plms' && scheduler !== 'ddim') throw new InvalidArgumentError(`scheduler must be 'plms' or 'ddim', got '${String(scheduler)}'`);
    if (o.control != null && o.control !== 'canny') throw new InvalidArgumentError(`control must be 'canny', got '${String(o.control)}'`);
    if (o.denoiseFrom !== undefined) {
      checkInt('denoiseFrom', o.denoiseFrom, t + 1, 999);
      if (o.denoiseFrom - t > 50) throw new InvalidArgumentError(`denoiseFrom - t must be at most 50 (the reference's other branch is a bug), got ${o.denoiseFrom - t}`);
      if (!o.control) throw new InvalidArgumentError("denoiseFrom needs control: 'canny' (as in the reference, multi-step denoising runs with ControlNet)");
    }
    const spec = await resolveLayerSpec(o.layers ?? 'legacy');
    const categories: AttentionCategory[] =
      o.attention === true ? ['up_cross'] : Array.isArray(o.attention) ? [...(o.attention as AttentionCategory[])] : spec.attention ? ['up_cross'] : [];
    const userIds = sortForwardOrder(spec.ids);
    const latent = size / 8;
    // Attention maps kept by the reference: 16² and 32² layers at 512 px, i.e. (size/32)² ≤ n_q ≤ (size/16)².
    const minQ = (size / 32) ** 2;
    const maxQ = (size / 16) ** 2;
    const defaultLatent = this.defaultSize() / 8;
    const mapIds = new Map<AttentionCategory, string[]>();
    for (const c of categories) {
      mapIds.set(
        c,
        attentionMapIds(c).filter((id) => {
          const shape = this.model.layers[id];
          if (!shape) return false;
          const n = shape[1]! * (latent / defaultLatent) ** 2; // maps are heads×n_q×n_k at the default size
          return n >= minQ && n <= maxQ;
        }),
      );
    }
    const capture = sortForwardOrder([...new Set([...userIds, ...[...mapIds.values()].flat()])]);
    const unknown = capture.filter((id) => !(id in this.model.layers));
    if (unknown.length) {
      throw new DiffusionFeaturesError('E_UNKNOWN_LAYER', `layer id(s) not in this model's model.json: ${unknown.join(', ')}`);
    }
    if (o.noise) {
      for (const [name, tensor] of [['noise', o.noise.noise], ['vaeNoise', o.noise.vaeNoise]] as const) {
        const n = tensor?.shape;
        if (n && (n.length !== 4 || n[0]! < images.length || n[1] !== 4 || n[2] !== latent || n[3] !== latent)) {
          throw new InvalidArgumentError(`${name} must be N×4×${latent}×${latent} with N ≥ ${images.length} (one row per image), got ${n.join('×')}`);
        }
      }
    }
    const ops = this.m.ops;
    let denoiseSteps: number[] = [];
    let noiseT: number;
    let unetT: number;
    if (o.denoiseFrom !== undefined) {
      const all = (await ops.call('plms_timesteps', o.denoiseFrom, t)) as number[];
      noiseT = all[0]!;
      denoiseSteps = all.slice(0, -1);
      unetT = all[all.length - 1]!;
    } else {
      unetT = (await ops.call('unet_timestep', t, mode)) as number;
      noiseT = unetT;
    }
    const settings: Record<string, string> = {
      layers: userIds.join(','),
      attention: categories.join(','),
      prompt: o.prompt ?? '',
      t: String(t),
      timestep_mode: mode,
      unet_timestep: String(unetT),
      noise_timestep: String(noiseT),
      seed: o.noise ? 'noise supplied' : String(seed),
      posterior,
      control: o.control ?? '',
      control_scale: String(controlScale),
      denoise_from: o.denoiseFrom === undefined ? '' : String(o.denoiseFrom),
      scheduler: o.denoiseFrom === undefined ? '' : scheduler,
      size: String(size),
      feature_resize: String(featureResize),
      device: this.device,
      dtype: this.dtype,
      lora: this.lora.describe(),
    };
    return { size, latent, batchSize, seed, featureResize, controlScale, posterior, scheduler, userIds, categories, mapIds, capture, minQ, maxQ, denoiseSteps, noiseT, unetT, settings };
  }

  private defaultSize(): number {
    const d = this.model.default_size;
    return typeof d === 'number' ? d : 512;
  }

  /** @internal Decodes a batch and encodes it with the VAE (work shared by all variants of a recipe). */
  async prepareBatch(images: readonly ImageInput[], start: number, plan: Pick<Plan, 'size' | 'batchSize'>, o: Pick<ExtractOptions, 'signal' | 'onProgress'>): Promise<BatchContext> {
    const scope = new Scope();
    try {
      const { size } = plan;
      const batch = images.slice(start, start + plan.batchSize);
      const B = batch.length;
      if (o.signal?.aborted) throw new DiffusionFeaturesError('E_ABORTED', 'extraction aborted');
      o.onProgress?.({ stage: 'decode', done: start, total: images.length });
      const decoded = await Promise.all(batch.map((img) => loadImage(typeof img === 'string' || img instanceof Uint8Array ? img : img.data, size)));
      const pixels = new Uint8Array(B * size * size * 3);
      decoded.forEach((d, i) => pixels.set(d.data, i * size * size * 3));
      const u8 = scope.add(await scope.add(Tensor.fromUint8Array(pixels, [B, size, size, 3])).to(this.device as Device));
      if (o.signal?.aborted) throw new DiffusionFeaturesError('E_ABORTED', 'extraction aborted');
      o.onProgress?.({ stage: 'vae', done: start, total: images.length });
      const pre = scope.add(asTensor(await this.m.ops.call('preprocess', u8), 'preprocess'));
      const x = scope.add(await pre.to(this.device as Device, this.dtype));
      const moments = (await this.m.vae.forward(x)) as IValue[];
      scope.addAll(moments);
      const [mean, logvar] = moments as [Tensor, Tensor];
      return { scope, start, B, total: images.length, names: batch.map((img, i) => imageName(img, start + i)), u8, mean, logvar, cond: null };
    } catch (err) {
      scope.dispose();
      throw err;
    }
  }

  /** @internal Runs one set of extraction options on a prepared batch. */
  async runVariant(ctx: BatchContext, plan: Plan, o: ExtractOptions): Promise<ImageFeatures[]> {
    return (await this.runVariants(ctx, [{ plan, o }]))[0]!;
  }

  /**
   * @internal Whether two planned variants can run as one batched UNet (and ControlNet) call: same
   * schedule (control, scale, timesteps, scheduler, posterior, resize) and prompt embeddings of the
   * same length. Prompt, noise seed, layers and attention may differ.
   */
  batchable(a: { plan: Plan; o: ExtractOptions }, b: { plan: Plan; o: ExtractOptions }): boolean {
    const same = (x: number[], y: number[]): boolean => x.length === y.length && x.every((v, i) => v === y[i]);
    return (
      (a.o.control ?? null) === (b.o.control ?? null) &&
      a.plan.controlScale === b.plan.controlScale &&
      a.plan.size === b.plan.size &&
      a.plan.noiseT === b.plan.noiseT &&
      a.plan.unetT === b.plan.unetT &&
      same(a.plan.denoiseSteps, b.plan.denoiseSteps) &&
      a.plan.scheduler === b.plan.scheduler &&
      a.plan.posterior === b.plan.posterior &&
      a.plan.featureResize === b.plan.featureResize &&
      this.tokenizer.chunks(a.o.prompt ?? '').length === this.tokenizer.chunks(b.o.prompt ?? '').length
    );
  }

  /**
   * @internal Runs several variants (see {@link Pipeline.batchable}) on one prepared batch as one
   * batched denoising loop and final forward: the batch is variant-major (V·B rows), each variant
   * with its own prompt embedding and noise draws, the captured layers the union of theirs. Progress
   * and abort go through the first variant's options. Resolves to the features per variant.
   */
  async runVariants(ctx: BatchContext, items: readonly { plan: Plan; o: ExtractOptions }[]): Promise<ImageFeatures[][]> {
    if (items.length === 0) return [];
    for (const it of items.slice(1)) {
      if (!this.batchable(items[0]!, it)) throw new InvalidArgumentError('runVariants: the variants do not share a schedule and cannot be batched');
    }
    const ops = this.m.ops;
    const scope = new Scope();
    const { start, B, total } = ctx;
    const V = items.length;
    const head = items[0]!;
    const { latent } = head.plan;
    const progress = (p: Omit<Progress, 'total'>): void => head.o.onProgress?.({ ...p, total });
    const aborted = (): void => {
      if (head.o.signal?.aborted) throw new DiffusionFeaturesError('E_ABORTED', 'extraction aborted');
    };
    const cat0 = async (xs: Tensor[], what: string): Promise<Tensor> =>
      xs.length === 1 ? xs[0]! : scope.add(asTensor(await ops.call('cat', xs, 0), what));
    try {
      const dev = this.device as Device;
      const noiseFor = async (plan: Plan, o: ExtractOptions, kind: 0 | 1): Promise<Tensor> => {
        const given = kind === 0 ? o.noise?.vaeNoise : o.noise?.noise;
        if (given) {
          const rows = scope.add(asTensor(await ops.call('rows', given, start, B), 'ops.rows'));
          return scope.add(await rows.to(dev, this.dtype));
        }
        const parts: Tensor[] = [];
        for (let i = 0; i < B; i++) {
          const seed = streamSeed(plan.seed, (o.seedOffset ?? 0) + start + i, kind);
          parts.push(scope.add(await Tensor.randn([1, 4, latent, latent], { seed, device: dev, dtype: this.dtype })));
        }
        return cat0(parts, 'ops.cat');
      };
      const sample = head.plan.posterior === 'sample';
      const latentParts: Tensor[] = [];
      for (const { plan, o } of items) {
        const vaeNoise = sample ? await noiseFor(plan, o, 0) : null;
        const z0 = scope.add(asTensor(await ops.call('posterior', ctx.mean, ctx.logvar, vaeNoise, sample, this.model.scaling_factor), 'posterior'));
        const noise = await noiseFor(plan, o, 1);
        latentParts.push(scope.add(asTensor(await ops.call('add_noise', z0, noise, plan.noiseT), 'add_noise')));
      }
      let latents = await cat0(latentParts, 'ops.cat');

      progress({ stage: 'text', done: start });
      const ehsParts: Tensor[] = [];
      for (const { o } of items) {
        const ehs1 = await this.encodePromptNow(o.prompt ?? '');
        ehsParts.push(B === 1 ? ehs1 : scope.add(asTensor(await ops.call('repeat_batch', ehs1, B), 'repeat_batch')));
      }
      const ehs = await cat0(ehsParts, 'ops.cat');

      const control = head.o.control === 'canny';
      if (control && !ctx.cond) {
        const edges = ctx.scope.add(asTensor(await ops.call('canny', ctx.u8, 100.0, 200.0), 'canny'));
        const img = ctx.scope.add(asTensor(await ops.call('control_image', edges), 'control_image'));
        ctx.cond = ctx.scope.add(await img.to(dev, this.dtype));
      }
      const cond = control ? (V === 1 ? ctx.cond : scope.add(asTensor(await ops.call('repeat_batch', ctx.cond!, V), 'repeat_batch'))) : null;
      const stepTensor = async (ts: number): Promise<Tensor> => scope.add(await scope.add(Tensor.fromInt64Array([ts], [1])).to(dev));
      const unetAt = async (lat: Tensor, ts: number, cap: string[]): Promise<Record<string, Tensor>> => {
        const tsT = await stepTensor(ts);
        let down: Tensor[] | null = null;
        let mid: Tensor | null = null;
        if (cond) {
          const cn = await this.controlnet();
          const res = (await cn.forward(lat, tsT, ehs, cond, head.plan.controlScale)) as Tensor[];
          scope.addAll(res);
          down = res.slice(0, -1);
          mid = res[res.length - 1]!;
        }
        const out = (await this.m.unet.forward(lat, tsT, ehs, cap, down, mid)) as Record<string, Tensor>;
        scope.addAll(out);
        return out;
      };

      // Multi-step denoising (GATE_SPEC §5.4); the PLMS/DDIM updates are elementwise, so one batched
      // loop is the same as one loop per variant.
      const { denoiseSteps, scheduler, unetT } = head.plan;
      if (denoiseSteps.length) {
        let ets: Tensor[] = [];
        let counter = 0;
        let cur: Tensor | null = null;
        for (let k = 0; k < denoiseSteps.length; k++) {
          aborted();
          progress({ stage: 'denoise', done: start, step: k + 1, steps: denoiseSteps.length });
          const ts = denoiseSteps[k]!;
          const eps = (await unetAt(latents, ts, [])).out!;
          if (scheduler === 'plms') {
            const r = (await ops.call('plms_step', eps, ts, latents, ets, counter, cur)) as [Tensor, Tensor[], number, Tensor | null];
            scope.addAll(r as IValue);
            [latents, ets, counter, cur] = r;
          } else {
            const prev = denoiseSteps[k + 1] ?? unetT;
            latents = scope.add(asTensor(await ops.call('ddim_step', eps, ts, prev, latents), 'ddim_step'));
          }
        }
      }

      aborted();
      progress({ stage: 'unet', done: start });
      const capture = sortForwardOrder([...new Set(items.flatMap((it) => it.plan.capture))]);
      const out = await unetAt(latents, unetT, capture);

      progress({ stage: 'handoff', done: start });
      const results: ImageFeatures[][] = [];
      try {
        for (let v = 0; v < V; v++) {
          const { plan, o } = items[v]!;
          const rowsOf = async (t: Tensor): Promise<Tensor> => (V === 1 ? t : scope.add(asTensor(await ops.call('rows', t, v * B, B), 'ops.rows')));
          const feats: Record<string, Tensor> = {};
          for (const id of plan.userIds) {
            const f = out[id];
            if (!f) throw new DiffusionFeaturesError('E_UNKNOWN_LAYER', `the UNet did not return layer '${id}'`);
            feats[id] = await rowsOf(f);
          }
          const attnParts: Tensor[] = [];
          for (const c of plan.categories) {
            const maps: Tensor[] = [];
            for (const id of plan.mapIds.get(c) ?? []) maps.push(await rowsOf(out[id]!));
            if (maps.length) attnParts.push(scope.add(asTensor(await ops.call('aggregate_attention', maps, latent, plan.minQ, plan.maxQ), 'aggregate_attention')));
          }
          if (attnParts.length) feats.attn = attnParts.length === 1 ? attnParts[0]! : scope.add(asTensor(await ops.call('cat', attnParts, 1), 'ops.cat'));
          if (plan.featureResize > 1) {
            for (const id of Object.keys(feats)) {
              if (id === 'attn') continue;
              feats[id] = scope.add(asTensor(await ops.call('feature_resize', feats[id]!, plan.featureResize), 'feature_resize'));
            }
          }
          const toSplit: Record<string, Tensor> = { ...feats };
          if (o.packaged) toSplit.packaged = scope.add(asTensor(await ops.call('package', Object.values(feats)), 'package'));
          const perImage = (await ops.call('split_to_cpu', toSplit)) as Record<string, Tensor>[];
          results.push(
            perImage.map((d, i) => {
              const ordered: Record<string, Tensor> = {};
              for (const k of Object.keys(feats)) ordered[k] = d[k]!;
              const packaged = d.packaged;
              const all = [...Object.values(ordered), ...(packaged ? [packaged] : [])];
              const dispose = (): void => all.forEach((x) => !x.disposed && x.dispose());
              return { name: ctx.names[i]!, features: ordered, packaged, settings: plan.settings, dispose, [Symbol.dispose]: dispose };
            }),
          );
        }
      } catch (err) {
        results.flat().forEach((r) => r.dispose());
        throw err;
      }
      return results;
    } finally {
      scope.dispose();
    }
  }

  /** Releases every model and cached tensor. Further calls reject. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.clearPromptCache();
    this.lora.dispose();
    for (const m of [this.m.unet, this.m.vae, this.m.text, this.m.ops, this.m.controlnet]) m?.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** The safetensors tensors of one image's features (float32, named by layer id) plus settings metadata. */
export function featureTensors(f: ImageFeatures): Record<string, StTensorInput> {
  const out: Record<string, StTensorInput> = {};
  const add = (name: string, t: Tensor): void => {
    out[name] = { dtype: 'F32', shape: t.shape, data: t.toFloat32Array() };
  };
  for (const [id, t] of Object.entries(f.features)) add(id, t);
  if (f.packaged) add('packaged', f.packaged);
  return out;
}

/** Serialises one image's features as safetensors bytes (what the CLI writes and the service returns). */
export function encodeFeatures(f: ImageFeatures): Uint8Array {
  return encodeSafetensors(featureTensors(f), { format: 'diffusion-features', ...f.settings });
}

/** Writes one image's features to `path` atomically. */
export async function writeFeatures(path: string, f: ImageFeatures): Promise<void> {
  await writeSafetensors(path, featureTensors(f), { format: 'diffusion-features', ...f.settings });
}

/** Reads a `--noise` safetensors file: `noise` (N×4×h×w) and optional `vae_noise`. */
export async function readNoiseFile(path: string): Promise<{ noise: Tensor; vaeNoise?: Tensor }> {
  const f = await SafetensorsFile.open(path);
  if (!f.has('noise')) throw new InvalidFileError(path, "no tensor named 'noise'");
  const mk = (name: string) => Tensor.fromFloat32Array(f.float32(name), f.info(name).shape);
  return { noise: mk('noise'), vaeNoise: f.has('vae_noise') ? mk('vae_noise') : undefined };
}

/** Reads a file fully (helper for callers that hold paths). */
export async function readBytes(path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new FileNotFoundError(path, (err as Error).message);
  }
}
