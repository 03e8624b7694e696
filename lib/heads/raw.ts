/**
 * The raw native surface of trainable heads (src/train.cc) and where the head templates live.
 *
 * @internal
 * @module
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RawDType, RawTensor } from '../../binding/index.cjs';
import { NativeError, nativeBuildInfo } from '../native.js';
import { DiffusionFeaturesError, FileNotFoundError } from '../errors.js';

/** A progress event of a native fit (sent every `progressEvery` steps and at the end of every epoch). */
export interface RawFitProgress {
  epoch: number;
  step: number;
  items: number;
  loss: number;
  bestLoss: number;
  seconds: number;
}

/** What a native fit resolves to. */
export interface RawFitResult {
  steps: number;
  epochs: number;
  stoppedEarly: boolean;
  seconds: number;
  /** The loss of every step, in order. */
  losses: Float32Array;
}

/** Options of a native fit (validated again natively). */
export interface RawFitOptions {
  items: number;
  lossMethod?: string;
  optimizer?: 'adam' | 'adamw';
  lr?: number;
  weightDecay?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  batchSize?: number;
  maxEpochs?: number;
  maxSteps?: number;
  earlyStopAfterEpoch?: number;
  patience?: number;
  minBatch?: number;
  progressEvery?: number;
  seed?: number | bigint;
}

export interface RawHead {
  configure(cfg: Record<string, number[]>, seed: number | bigint): Promise<void>;
  fit(data: RawTensor[], opts: RawFitOptions, onProgress?: (p: RawFitProgress) => void): { promise: Promise<RawFitResult>; abort(): void };
  call(method: string, args: unknown[]): Promise<unknown>;
  attributes(): Promise<Record<string, unknown>>;
  parameters(): Promise<{ name: string; shape: number[]; kind: 'parameter' | 'buffer' }[]>;
  save(path: string, meta?: string): Promise<void>;
  meta(): string;
  path(): string;
  device(): string;
  disposed(): boolean;
  dispose(): void;
}

export interface RawHeadAddon {
  loadHead(path: string, device: string): Promise<RawHead>;
  stackHeads(heads: RawHead[]): Promise<RawHead>;
  RawTensor: {
    fromTypedArray(data: Float32Array | BigInt64Array | Int32Array | Uint8Array, shape: readonly number[], dtype: RawDType): RawTensor;
  };
}

const requireHere = createRequire(import.meta.url);

function toError(err: unknown): Error {
  if (err instanceof DiffusionFeaturesError) return err;
  const code = typeof (err as { code?: unknown })?.code === 'string' ? (err as { code: string }).code : 'E_TORCH';
  return new NativeError(code, err instanceof Error ? err.message : String(err), { cause: err });
}

/** Runs a native call, converting its errors to {@link NativeError}s (DiffusionFeaturesErrors) with the native code. */
export async function nativeCall<T>(fn: () => Promise<T> | T): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toError(err);
  }
}

/** The addon (loaded through lib/native.ts so a missing binary gives its usual E_NATIVE_LOAD error). */
export function headAddon(): RawHeadAddon {
  nativeBuildInfo();
  const binding = requireHere(findUp('binding/index.cjs')) as { load(): RawHeadAddon };
  const a = binding.load();
  if (typeof a.loadHead !== 'function') {
    throw new NativeError('E_NATIVE_LOAD', 'the loaded native addon has no trainable heads (rebuild it: npm run build:native)');
  }
  return a;
}

function findUp(rel: string): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    if (existsSync(join(dir, rel))) return join(dir, rel);
    dir = dirname(dir);
  }
  throw new FileNotFoundError(rel, 'cannot locate the package root');
}

/** Path of a bundled head template (`models/heads/<name>.pt`). */
export function templatePath(name: 'pixel_classifier' | 'amalgamation'): string {
  return resolve(findUp(`models/heads/${name}.pt`));
}
