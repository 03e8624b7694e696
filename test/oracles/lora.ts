/**
 * Test oracles for LoRA merging: the merge rule in plain TypeScript, float64, independent of
 * `ops.lora_merge` (which the product uses). Tests only; not shipped.
 */
import type { LoraTerm } from '../../lib/lora/parse.js';

/**
 * Reference implementation of the merge rule in plain TypeScript (float64, rounded once to float32):
 * `W + Σ scale · reshape(up @ down)`. The product merges with
 * `ops.lora_merge` on the model's device (lib/lora/manager.ts).
 */
export function mergeLoraF64(w: Float32Array, wShape: readonly number[], terms: readonly LoraTerm[]): Float32Array {
  const out = wShape[0]!;
  const inner = w.length / out;
  const acc = Float64Array.from(w);
  for (const t of terms) {
    const r = t.down.shape[0]!;
    const up = t.up.data;
    const down = t.down.data;
    for (let o = 0; o < out; o++) {
      const row = o * inner;
      for (let k = 0; k < r; k++) {
        const u = t.scale * up[o * r + k]!;
        if (u === 0) continue;
        const d0 = k * inner;
        for (let j = 0; j < inner; j++) acc[row + j]! += u * down[d0 + j]!;
      }
    }
  }
  return Float32Array.from(acc);
}

/**
 * Exactly the float64 delta `Σ scale · up @ down` of one parameter (tests compare its Frobenius norm
 * with the reference's `delta_fro_by_parameter`).
 */
export function loraDeltaF64(wShape: readonly number[], terms: readonly LoraTerm[]): Float64Array {
  const out = wShape[0]!;
  const inner = wShape.slice(1).reduce((a, b) => a * b, 1);
  const acc = new Float64Array(out * inner);
  for (const t of terms) {
    const r = t.down.shape[0]!;
    for (let o = 0; o < out; o++) {
      for (let k = 0; k < r; k++) {
        const u = t.scale * t.up.data[o * r + k]!;
        for (let j = 0; j < inner; j++) acc[o * inner + j]! += u * t.down.data[k * inner + j]!;
      }
    }
  }
  return acc;
}
