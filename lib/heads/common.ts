/**
 * Shared parts of the trained heads: progress type, option checks, the native fit wrapper, packing an
 * image's buckets into raw tensors. Internal (the public names are re-exported by lib/heads/index.ts).
 *
 * @module
 */
import type { RawTensor } from '../../binding/index.cjs';
import { AbortError, InvalidArgumentError } from '../errors.js';
import type { FeatureArray } from '../tools/common.js';
import { nativeCall, type RawFitProgress, type RawHead, type RawHeadAddon } from './raw.js';
import { packBucket, type InputLayout } from './data.js';

export { throwIfAborted as checkSignal } from '../errors.js';

export const FEATURE_EXTS = ['.safetensors', '.npy'] as const;
export const MASK_EXTS = ['.png', '.npy'] as const;

/** Progress of a training run. */
export interface TrainProgress {
  /** Ensemble member being trained (0-based; always 0 for the amalgamation network). */
  member: number;
  /** Members in all. */
  members: number;
  epoch: number;
  /** Optimizer steps of this member so far. */
  step: number;
  /** Loss of the latest step and the best batch loss so far. */
  loss: number;
  bestLoss: number;
  seconds: number;
  /** 'load' while reading data, 'train', 'validate', 'save'. */
  stage: 'load' | 'train' | 'validate' | 'save';
}

/** `v` checked as an integer in 1..max (InvalidArgumentError naming `name`), or `dflt` when undefined. */
export function positiveInt(v: number | undefined, dflt: number, name: string, max = 1e9): number {
  if (v === undefined) return dflt;
  if (!Number.isSafeInteger(v) || v < 1 || v > max) throw new InvalidArgumentError(`${name} must be an integer in 1..${max}, got ${v}`);
  return v;
}

/** Runs one native fit, wiring progress and the abort signal. */
export async function fit(head: RawHead, data: RawTensor[], opts: Parameters<RawHead['fit']>[1], onProgress: ((p: RawFitProgress) => void) | undefined, signal?: AbortSignal) {
  const run = await nativeCall(() => head.fit(data, opts, onProgress));
  const onAbort = () => run.abort();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return await nativeCall(() => run.promise);
  } catch (err) {
    if (signal?.aborted) throw new AbortError('training aborted', { cause: signal.reason });
    throw err;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** A float32 raw tensor of `data` (caller disposes). */
export function tensorOf(A: RawHeadAddon, data: Float32Array, shape: number[]): RawTensor {
  return A.RawTensor.fromTypedArray(data, shape, 'float32');
}

/** Disposes raw tensors / heads, ignoring the already disposed. */
export function release(...xs: ({ dispose(): void } | undefined)[]): void {
  for (const x of xs) x?.dispose();
}

/** The layout's buckets packed for one image, as raw tensors (caller disposes). */
export function packedBuckets(A: RawHeadAddon, tensors: Map<string, FeatureArray>, layout: InputLayout): RawTensor[] {
  const [H, W] = layout.grid;
  return layout.buckets.map((b) => tensorOf(A, packBucket(tensors, b, H, W), [b.channels, H, W]));
}
