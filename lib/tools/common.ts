/**
 * What the analysis tools share: the in-memory feature type, shape checks, and running `models/ops.pt`
 * on features that may be native tensors or plain arrays.
 *
 * @module
 */
import { Tensor, type Device } from '../native.js';
import { InvalidArgumentError } from '../errors.js';
import { loadOps, type Ops } from '../ops.js';

/** A float32 feature held in memory: C×H×W, row-major. */
export interface FeatureArray {
  data: Float32Array;
  shape: readonly number[];
}

/** A feature as a native tensor or a plain array. */
export type FeatureInput = Tensor | FeatureArray;

/** An (x, y) point in pixels. */
export type Point = readonly [number, number];

export function isTensorLike(x: FeatureInput): x is Tensor {
  return typeof (x as Tensor).toFloat32Array === 'function' && typeof (x as Tensor).dispose === 'function';
}

export function shapeOf(x: FeatureInput): number[] {
  return [...x.shape];
}

export function check3d(x: FeatureInput, what: string): [number, number, number] {
  const s = shapeOf(x);
  if (s.length !== 3 || s.some((d) => !Number.isSafeInteger(d) || d < 1)) {
    throw new InvalidArgumentError(`${what}: expected a C×H×W feature, got shape [${s.join(', ')}]`);
  }
  return s as [number, number, number];
}

/** Throws unless `b` has the shape of `a`. */
export function sameShape(a: FeatureInput, b: FeatureInput, what: string): void {
  const sa = shapeOf(a);
  const sb = shapeOf(b);
  if (sa.length !== sb.length || sa.some((d, i) => d !== sb[i])) {
    throw new InvalidArgumentError(`${what}: shape [${sb.join(', ')}] differs from the reference's [${sa.join(', ')}]`);
  }
}

/** Runs `fn` with `xs` as float32 tensors on the ops device of `device`; temporaries are disposed. */
export async function withTensors<R>(device: Device, xs: FeatureInput[], fn: (ops: Ops, ts: Tensor[]) => Promise<R>): Promise<R> {
  const ops = await loadOps(device);
  const owned: Tensor[] = [];
  try {
    const ts: Tensor[] = [];
    for (const x of xs) {
      let t: Tensor;
      if (isTensorLike(x)) {
        t = x;
      } else {
        t = Tensor.fromFloat32Array(x.data, [...x.shape]);
        owned.push(t);
      }
      if (t.device !== ops.device || t.dtype !== 'float32') {
        const moved = await t.to(ops.device as Device, 'float32');
        if (moved !== t) owned.push(moved);
        t = moved;
      }
      ts.push(t);
    }
    return await fn(ops, ts);
  } finally {
    for (const t of owned) if (!t.disposed) t.dispose();
  }
}

/** Copies an op's result to a CPU float32 {@link FeatureArray} and disposes the tensor. */
export async function toFeatureArray(pending: Promise<Tensor>): Promise<FeatureArray> {
  const r = await pending;
  try {
    const cpu = await r.to('cpu', 'float32');
    try {
      return { data: Float32Array.from(cpu.toFloat32Array()), shape: [...cpu.shape] };
    } finally {
      if (cpu !== r) cpu.dispose();
    }
  } finally {
    r.dispose();
  }
}
