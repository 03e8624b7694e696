/**
 * Planning one extraction variant: validates {@link ExtractOptions} and resolves them into a
 * {@link Plan} — the layer ids to return, the attention maps to capture, the timesteps (noise,
 * denoising steps, extraction) and the settings recorded with the features. No tensor work besides
 * asking `ops` for the reference's timesteps.
 *
 * @module
 */
import { Tensor, type Device, type DType } from '../native.js';
import { ATTENTION_CATEGORIES, isMapId, resolveLayerSpec, sortForwardOrder, attentionMapIds, type AttentionCategory } from '../layers.js';
import { InvalidArgumentError, UnknownLayerError } from '../errors.js';
import type { Ops } from '../ops.js';
import { defaultSize, type ModelJson } from './model-json.js';
import type { ExtractOptions, ImageInput } from './types.js';

/** Resolved options of one extraction variant. */
export interface Plan {
  size: number;
  /** size / 8. */
  latent: number;
  batchSize: number;
  seed: number;
  featureResize: number;
  controlScale: number;
  posterior: 'sample' | 'mean';
  scheduler: 'plms' | 'ddim';
  /** The layer ids the caller asked for, in forward order. */
  userIds: string[];
  /** Attention categories aggregated into `attn`. */
  categories: AttentionCategory[];
  /** Per category, the attention-map ids kept at this size. */
  mapIds: Map<AttentionCategory, string[]>;
  /** Everything the UNet forward must return (user ids and maps), in forward order. */
  capture: string[];
  minQ: number;
  maxQ: number;
  /** UNet timesteps of the denoising steps (empty for one-step extraction). */
  denoiseSteps: number[];
  /** Timestep the latents are noised to. */
  noiseT: number;
  /** Timestep of the feature-extracting UNet forward. */
  unetT: number;
  /** The settings recorded with the features (strings). */
  settings: Record<string, string>;
}

/** What planning needs to know about the loaded pipeline. */
export interface PlanEnv {
  model: ModelJson;
  device: Device;
  dtype: DType;
  ops: Ops;
  /** The merged LoRA set, as recorded in the settings. */
  lora: string;
}

/** Largest accepted |controlScale| (the reference uses 1). */
export const MAX_CONTROL_SCALE = 100;

/** Largest accepted |value| in caller-supplied noise (standard normal draws stay far below). */
export const MAX_NOISE_ABS = 1000;

/** Checks the image list and the option kinds so that bad input is a typed error, not a TypeError. */
function checkInputs(images: readonly ImageInput[], o: ExtractOptions): void {
  images.forEach((img, i) => {
    const ok = typeof img === 'string' || img instanceof Uint8Array || (img !== null && typeof img === 'object' && typeof (img as { name?: unknown }).name === 'string' && (img as { data?: unknown }).data instanceof Uint8Array);
    if (!ok) throw new InvalidArgumentError(`images[${i}] must be a file path, a Buffer/Uint8Array or { name, data }, got ${img === null ? 'null' : Array.isArray(img) ? 'an array' : typeof img}`);
  });
  if (o === null || typeof o !== 'object') throw new InvalidArgumentError('extract options must be an object');
  if (o.prompt !== undefined && typeof o.prompt !== 'string') throw new InvalidArgumentError(`prompt must be a string, got ${o.prompt === null ? 'null' : typeof o.prompt}`);
  if (o.onProgress !== undefined && typeof o.onProgress !== 'function') throw new InvalidArgumentError(`onProgress must be a function, got ${o.onProgress === null ? 'null' : typeof o.onProgress}`);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new InvalidArgumentError('signal must be an AbortSignal');
  if (o.attention !== undefined && typeof o.attention !== 'boolean') {
    if (!Array.isArray(o.attention) || !o.attention.every((c) => typeof c === 'string' && (ATTENTION_CATEGORIES as readonly string[]).includes(c))) {
      throw new InvalidArgumentError(`attention must be true/false or a list of ${ATTENTION_CATEGORIES.join(', ')}`);
    }
  }
  if (o.packaged !== undefined && typeof o.packaged !== 'boolean') throw new InvalidArgumentError('packaged must be true or false');
  if (o.noise !== undefined && (o.noise === null || typeof o.noise !== 'object' || !(o.noise.noise instanceof Tensor) || (o.noise.vaeNoise !== undefined && !(o.noise.vaeNoise instanceof Tensor)))) {
    throw new InvalidArgumentError('noise must be { noise: Tensor, vaeNoise?: Tensor }');
  }
}

/** Caller noise must be finite and of sane magnitude (NaN/Inf/3e38 would make every feature NaN). */
function checkNoiseValues(name: string, t: Tensor): void {
  const v = t.toFloat32Array();
  for (let i = 0; i < v.length; i++) {
    const x = v[i]!;
    if (!(Math.abs(x) <= MAX_NOISE_ABS)) throw new InvalidArgumentError(`${name} holds ${Number.isNaN(x) ? 'NaN' : x} at index ${i}; noise must be finite with |x| ≤ ${MAX_NOISE_ABS}`);
  }
}

function checkInt(name: string, v: number | undefined, min: number, max: number): void {
  if (v === undefined) return;
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new InvalidArgumentError(`${name} must be an integer in [${min}, ${max}], got ${String(v)}`);
  }
}

/** Validates options and resolves layers, attention maps and timesteps. */
export async function planVariant(env: PlanEnv, images: readonly ImageInput[], o: ExtractOptions): Promise<Plan> {
  const { model } = env;
  if (!Array.isArray(images) || images.length === 0) throw new InvalidArgumentError('extract: give at least one image');
  checkInputs(images, o);
  const size = o.size ?? defaultSize(model);
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
  if (typeof controlScale !== 'number' || !Number.isFinite(controlScale) || Math.abs(controlScale) > MAX_CONTROL_SCALE) {
    throw new InvalidArgumentError(`controlScale must be a finite number in [-${MAX_CONTROL_SCALE}, ${MAX_CONTROL_SCALE}], got ${String(controlScale)}`);
  }
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
  if (userIds.length === 0 && categories.length === 0) {
    throw new UnknownLayerError(`layers: the layer spec ${JSON.stringify(typeof o.layers === 'string' ? o.layers.slice(0, 80) : o.layers ?? 'legacy').slice(0, 100)} selects no layer (give a preset, ids, or attention)`);
  }
  const latent = size / 8;
  // Attention maps kept by the reference: 16² and 32² layers at 512 px, i.e. (size/32)² ≤ n_q ≤ (size/16)².
  const minQ = (size / 32) ** 2;
  const maxQ = (size / 16) ** 2;
  const defaultLatent = defaultSize(model) / 8;
  const mapIds = new Map<AttentionCategory, string[]>();
  for (const c of categories) {
    mapIds.set(
      c,
      attentionMapIds(c).filter((id) => {
        const shape = model.layers[id];
        if (!shape) return false;
        const n = shape[1]! * (latent / defaultLatent) ** 2; // maps are heads×n_q×n_k at the default size
        return n >= minQ && n <= maxQ;
      }),
    );
  }
  const capture = sortForwardOrder([...new Set([...userIds, ...[...mapIds.values()].flat()])]);
  const unknown = capture.filter((id) => !(id in model.layers));
  if (unknown.length) throw new UnknownLayerError(`layer id(s) not in this model's model.json: ${unknown.join(', ')}`, unknown);
  if (o.noise) {
    for (const [name, tensor] of [['noise', o.noise.noise], ['vaeNoise', o.noise.vaeNoise]] as const) {
      const n = tensor?.shape;
      if (n && (n.length !== 4 || n[0]! < images.length || n[1] !== 4 || n[2] !== latent || n[3] !== latent)) {
        throw new InvalidArgumentError(`${name} must be N×4×${latent}×${latent} with N ≥ ${images.length} (one row per image), got ${n.join('×')}`);
      }
    }
  }
  if (o.noise) {
    for (const [name, tensor] of [['noise', o.noise.noise], ['vaeNoise', o.noise.vaeNoise]] as const) if (tensor) checkNoiseValues(name, tensor);
  }
  if (featureResize > 1) {
    for (const id of userIds) {
      const shape = model.layers[id];
      if (!shape || shape.length < 3) continue;
      const scale = size / defaultSize(model);
      // spatial maps scale with the image side; attention maps' query count with its square (keys stay 77)
      const dims = isMapId(id) ? [Math.round(shape[1]! * scale * scale), shape[2]!] : [Math.round(shape[1]! * scale), Math.round(shape[2]! * scale)];
      if (featureResize > Math.min(...dims)) {
        throw new InvalidArgumentError(`featureResize ${featureResize} is larger than layer ${id} (${dims.join('×')} at size ${size}); at most ${Math.min(...dims)}`);
      }
    }
  }
  let denoiseSteps: number[] = [];
  let noiseT: number;
  let unetT: number;
  if (o.denoiseFrom !== undefined) {
    const all = await env.ops.plmsTimesteps(o.denoiseFrom, t);
    noiseT = all[0]!;
    denoiseSteps = all.slice(0, -1);
    unetT = all[all.length - 1]!;
  } else {
    unetT = await env.ops.unetTimestep(t, mode);
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
    device: env.device,
    dtype: env.dtype,
    lora: env.lora,
  };
  return { size, latent, batchSize, seed, featureResize, controlScale, posterior, scheduler, userIds, categories, mapIds, capture, minQ, maxQ, denoiseSteps, noiseT, unetT, settings };
}
