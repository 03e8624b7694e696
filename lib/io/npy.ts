/**
 * NumPy `.npy` (format version 1.0) writer and reader for float arrays.
 *
 * Written files are little-endian, C order, with the header padded so the data starts on a 64-byte
 * boundary (as `numpy.save` does). `float16` output is rounded to nearest even, like NumPy's
 * `astype(np.float16)`. Writes are atomic (temporary file + rename).
 *
 * @module
 */
import { readFile } from 'node:fs/promises';
import { FileNotFoundError, InvalidArgumentError, InvalidFileError } from '../errors.js';
import { float16BitsToFloat32, float32ToFloat16Bits } from './half.js';
import { writeFileAtomic } from './atomic.js';

/** Element types supported by the `.npy` writer. */
export type NpyDType = 'float32' | 'float16';

/** A decoded `.npy` array (values converted to float32). */
export interface NpyArray {
  /** Element type stored in the file. */
  dtype: NpyDType | 'float64' | 'uint8';
  /** Shape (empty for a 0-d array). */
  shape: number[];
  /** Values in C order. */
  data: Float32Array;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
const DESCR: Record<NpyDType, string> = { float32: '<f4', float16: '<f2' };

function checkShape(shape: readonly number[], length: number): void {
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new InvalidArgumentError(`npy: invalid shape ${JSON.stringify(shape)}`);
  }
  const n = shape.reduce((a, b) => a * b, 1);
  if (n !== length) throw new InvalidArgumentError(`npy: shape ${JSON.stringify(shape)} needs ${n} values, got ${length}`);
}

/** Build the 64-byte-aligned v1.0 header for the given dtype and shape. */
function npyHeader(dtype: NpyDType, shape: readonly number[]): Uint8Array {
  const tuple = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let dict = `{'descr': '${DESCR[dtype]}', 'fortran_order': False, 'shape': ${tuple}, }`;
  const total = Math.ceil((10 + dict.length + 1) / 64) * 64;
  dict = dict.padEnd(total - 10 - 1, ' ') + '\n';
  const out = new Uint8Array(total);
  out.set(MAGIC, 0);
  out[6] = 1;
  out[7] = 0;
  new DataView(out.buffer).setUint16(8, dict.length, true);
  out.set(new TextEncoder().encode(dict), 10);
  return out;
}

/**
 * Encode float32 values as `.npy` chunks (header, data) in the requested dtype.
 * @param data values in C order
 * @param shape array shape; its product must equal `data.length`
 * @param dtype stored element type (default float32)
 */
function npyChunks(data: Float32Array, shape: readonly number[], dtype: NpyDType): Uint8Array[] {
  if (!(data instanceof Float32Array)) throw new InvalidArgumentError('npy: data must be a Float32Array');
  if (dtype !== 'float32' && dtype !== 'float16') throw new InvalidArgumentError(`npy: unsupported dtype ${JSON.stringify(dtype)}`);
  checkShape(shape, data.length);
  const body = dtype === 'float16' ? float32ToFloat16Bits(data) : data;
  return [npyHeader(dtype, shape), new Uint8Array(body.buffer, body.byteOffset, body.byteLength)];
}

/**
 * Encode float32 values as the bytes of a `.npy` file.
 * @param data values in C order
 * @param shape array shape; its product must equal `data.length`
 * @param dtype stored element type (default float32)
 */
export function encodeNpy(data: Float32Array, shape: readonly number[], dtype: NpyDType = 'float32'): Uint8Array {
  const [h, b] = npyChunks(data, shape, dtype);
  const out = new Uint8Array(h.length + b.length);
  out.set(h, 0);
  out.set(b, h.length);
  return out;
}

/**
 * Write float32 values to a `.npy` file atomically (float32 or float16, little-endian, C order).
 * @param path destination path
 * @param data values in C order
 * @param shape array shape
 * @param dtype stored element type (default float32)
 */
export async function writeNpy(
  path: string, data: Float32Array, shape: readonly number[], dtype: NpyDType = 'float32',
): Promise<void> {
  await writeFileAtomic(path, npyChunks(data, shape, dtype));
}

/**
 * Decode `.npy` bytes (v1.0–3.0, little-endian or native `<f2`/`<f4`/`<f8`/`|u1`, C order).
 * @param buf file bytes
 * @param source name used in error messages
 * @throws InvalidFileError when malformed or of an unsupported layout
 */
export function decodeNpy(buf: Uint8Array, source = '<buffer>'): NpyArray {
  const bad = (p: string): never => {
    throw new InvalidFileError(source, `invalid .npy file: ${p}`);
  };
  if (buf.length < 10 || !MAGIC.every((m, i) => buf[i] === m)) bad('missing \\x93NUMPY magic');
  const major = buf[6];
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let hlen: number;
  let start: number;
  if (major === 1) {
    hlen = dv.getUint16(8, true);
    start = 10;
  } else if (major === 2 || major === 3) {
    if (buf.length < 12) bad('truncated header');
    hlen = dv.getUint32(8, true);
    start = 12;
  } else {
    return bad(`unsupported format version ${major}`);
  }
  if (start + hlen > buf.length) bad('header extends past the end of the file');
  const text = new TextDecoder().decode(buf.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(text)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(text)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(text)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) return bad(`unparseable header ${JSON.stringify(text.slice(0, 120))}${text.length > 120 ? ` (${text.length} characters)` : ''}`);
  if (fortran === 'True') bad('Fortran-order arrays are not supported');
  const shape = shapeText.split(',').map((s) => s.trim()).filter((s) => s.length > 0).map(Number);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) bad(`invalid shape (${shapeText})`);
  const n = shape.reduce((a, b) => a * b, 1);
  const kinds: Record<string, [NpyArray['dtype'], number]> = {
    '<f4': ['float32', 4], '<f2': ['float16', 2], '<f8': ['float64', 8], '|u1': ['uint8', 1], '<u1': ['uint8', 1],
  };
  const kind = kinds[descr];
  if (!kind) return bad(`unsupported dtype ${descr}`);
  const [dtype, size] = kind;
  const begin = start + hlen;
  if (buf.length - begin !== n * size) bad(`data is ${buf.length - begin} bytes, shape (${shape.join(', ')}) × ${descr} needs ${n * size}`);
  const bytes = new Uint8Array(buf.subarray(begin)).buffer; // copy (Buffer.slice would be a view)
  let data: Float32Array;
  if (dtype === 'float32') data = new Float32Array(bytes);
  else if (dtype === 'float16') data = float16BitsToFloat32(new Uint16Array(bytes));
  else if (dtype === 'float64') data = Float32Array.from(new Float64Array(bytes));
  else data = Float32Array.from(new Uint8Array(bytes));
  return { dtype, shape, data };
}

/**
 * Read a `.npy` file (see {@link decodeNpy}).
 * @throws FileNotFoundError when missing; InvalidFileError when malformed
 */
export async function readNpy(path: string): Promise<NpyArray> {
  let buf: Uint8Array;
  try {
    buf = await readFile(path);
  } catch (e) {
    throw new FileNotFoundError(path, `cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)})`, { cause: e });
  }
  return decodeNpy(buf, path);
}
