/**
 * The units an extraction works on: a prepared batch of images ({@link BatchContext}), a planned variant
 * ({@link Variant}), the tensor {@link Scope} that frees a stage's temporaries, and the per-image noise
 * streams ({@link streamSeed}) and names.
 *
 * @module
 */
import { basename, extname } from 'node:path';
import { Tensor, type IValue } from '../native.js';
import type { Plan } from './plan.js';
import type { ExtractOptions, ImageInput } from './types.js';

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

/** A decoded, VAE-encoded batch, shared by every variant run on it. Dispose with `scope.dispose()`. */
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

/** One planned variant with the options it was planned from. */
export interface Variant {
  plan: Plan;
  o: ExtractOptions;
}

/** Noise stream of image `index` for `kind` (0 = VAE posterior, 1 = latent): independent of batching. */
export function streamSeed(seed: number, index: number, kind: 0 | 1): bigint {
  return (BigInt(seed) * 1_000_003n + BigInt(index) * 2n + BigInt(kind)) & 0x7fff_ffff_ffff_ffffn;
}

/** The name of an image input: file basename without extension, the given name, or `image<index>`. */
export function imageName(input: ImageInput, index: number): string {
  if (typeof input === 'string') return basename(input, extname(input));
  if (input instanceof Uint8Array) return `image${index}`;
  return input.name;
}
