/**
 * IEEE-754 binary16 and bfloat16 ↔ float32 conversion (exact widening; round-to-nearest-even narrowing,
 * as torch and NumPy do), for the safetensors and npy readers and writers.
 *
 * @module
 */
let HALF_TABLE: Float32Array | undefined;

/** Lazily built 65536-entry table: IEEE half bits → float32 value (exact). */
function halfTable(): Float32Array {
  if (HALF_TABLE) return HALF_TABLE;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    let v: number;
    if (e === 0) v = m * 2 ** -24; // subnormal (or zero)
    else if (e === 31) v = m === 0 ? Infinity : NaN;
    else v = (1 + m / 1024) * 2 ** (e - 15);
    t[h] = s * v;
  }
  HALF_TABLE = t;
  return t;
}

/** Convert IEEE-754 binary16 bit patterns to float32 values (exact). */
export function float16BitsToFloat32(bits: Uint16Array): Float32Array {
  const t = halfTable();
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = t[bits[i]];
  return out;
}

/** Convert bfloat16 bit patterns to float32 values (exact: bf16 is the top half of a float32). */
export function bfloat16BitsToFloat32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return out;
}

const F32_SCRATCH = new Float32Array(1);
const U32_SCRATCH = new Uint32Array(F32_SCRATCH.buffer);

/** Convert one float32 value's bits to binary16 bits with round-to-nearest-even (as torch/numpy do). */
function f32BitsToHalf(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const e = (x >>> 23) & 0xff;
  let m = x & 0x7fffff;
  if (e === 0xff) return sign | 0x7c00 | (m ? 0x200 | (m >>> 13) : 0); // inf / NaN (keep quiet NaN)
  const he = e - 127 + 15;
  if (he >= 0x1f) return sign | 0x7c00; // overflow → inf
  if (he <= 0) {
    if (he < -10) return sign; // underflow → ±0
    m |= 0x800000; // implicit leading one
    const shift = 14 - he;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (he << 10) | (m >>> 13);
  const rem = m & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++; // may carry into exponent: still correct
  return sign | half;
}

/** Convert float32 values to IEEE-754 binary16 bit patterns (round to nearest even, overflow → ±inf). */
export function float32ToFloat16Bits(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    F32_SCRATCH[0] = values[i];
    out[i] = f32BitsToHalf(U32_SCRATCH[0]);
  }
  return out;
}

/** Convert float32 values to bfloat16 bit patterns (round to nearest even; NaN stays NaN). */
export function float32ToBfloat16Bits(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    F32_SCRATCH[0] = values[i];
    const x = U32_SCRATCH[0];
    if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) out[i] = (x >>> 16) | 0x40;
    else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}
