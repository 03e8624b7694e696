/**
 * The public option and result types of the extraction pipeline ({@link Pipeline}).
 *
 * @module
 */
import type { Device, Tensor } from '../native.js';
import type { AttentionCategory } from '../layers.js';
import type { Pipeline } from './facade.js';

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
  /** The prompt shared by all images (default `''`). Prompts of more than 70 words are chunked (docs/method.md §Prompts). */
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
  /** Average-pool every feature by this factor (default 1 = off, docs/method.md §Layers). */
  featureResize?: number;
  /** Also return the packaged tensor: all features resized to the largest and concatenated (docs/method.md §Packaging). */
  packaged?: boolean;
  /**
   * Cancels the call: image reading and resizing stop, and the call stops between model calls. A call
   * still waiting in the pipeline's queue rejects at once. The rejection is an `AbortError`
   * (`E_ABORTED`, `cause` = the signal's reason).
   */
  signal?: AbortSignal;
  /** Largest accepted source image in pixels (default 16383², sharp's limit); over it: `E_LIMIT_EXCEEDED`. */
  maxPixels?: number;
  /** Largest accepted encoded image in bytes (default 256 MiB); over it: `E_LIMIT_EXCEEDED`. */
  maxImageBytes?: number;
  /** Called as work advances. */
  onProgress?: (p: Progress) => void;
}

/** The features of one image. Tensors are CPU float32, C×h×w; `toFloat32Array()` is zero-copy. */
export interface ImageFeatures {
  /** The image's name (file basename without extension, or the given name). */
  name: string;
  /** Per layer id (and `attn`), in forward order. */
  features: Record<string, Tensor>;
  /** The packaged tensor (docs/method.md §Packaging), when asked for. */
  packaged?: Tensor;
  /** The settings that produced these features (strings, also written into output metadata). */
  settings: Record<string, string>;
  /** Releases the tensors. */
  dispose(): void;
  [Symbol.dispose](): void;
}
