/**
 * Safetensors reader and writer (pure TypeScript, no dependencies).
 *
 * Format: `u64 LE header length N` · `N bytes of JSON header` · data section. The header maps tensor
 * names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the data section) and may
 * hold a `__metadata__` object of string → string.
 *
 * The reader validates everything before any tensor is touched (header length within the file, JSON
 * object, known dtypes, integer shapes, offsets inside the data section, byte size = prod(shape) ×
 * dtype size, no overlapping tensors), so no access can read out of bounds. Every error names the file.
 *
 * Files up to {@link EAGER_LIMIT} bytes are read whole; larger files keep only the header in memory
 * and read each tensor on demand.
 *
 * @module
 */
import { closeSync, constants as fsConstants, openSync, readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { writeFileAtomic } from './atomic.js';
import { bfloat16BitsToFloat32, float16BitsToFloat32 } from './half.js';
import { endianness } from 'node:os';
import {
  InvalidArgumentError, InvalidFileError, NotFoundError, fileError,
} from '../errors.js';

export { float16BitsToFloat32, bfloat16BitsToFloat32, float32ToFloat16Bits, float32ToBfloat16Bits } from './half.js';

/** Safetensors dtype names supported by this package. */
export type StDType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

/** Description of one tensor in a safetensors file. */
export interface StTensorInfo {
  /** Tensor name (header key). */
  name: string;
  /** Element type. */
  dtype: StDType;
  /** Shape (empty for scalars). */
  shape: number[];
  /** Start offset in bytes, relative to the data section. */
  begin: number;
  /** End offset (exclusive) in bytes, relative to the data section. */
  end: number;
}

/** A tensor to encode: dtype, shape and its little-endian bytes (any typed array / DataView). */
export interface StTensorInput {
  /** Element type the bytes represent. */
  dtype: StDType;
  /** Shape; `prod(shape) × size(dtype)` must equal `data.byteLength`. */
  shape: readonly number[];
  /** The raw data (e.g. a Float32Array for F32, a Uint16Array of half bits for F16). */
  data: ArrayBufferView;
}

/** Bytes per element of each dtype. */
export const DTYPE_SIZE: Readonly<Record<StDType, number>> = Object.freeze({
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1,
});

/** Files at most this large (bytes) are read into memory whole by {@link SafetensorsFile.open}. */
export const EAGER_LIMIT = 1 << 30;

/** Maximum accepted header size (the reference implementation's limit is 100 MB). */
const MAX_HEADER = 100 * 1024 * 1024;

const LITTLE_ENDIAN = endianness() === 'LE';

function assertLittleEndian(): void {
  if (!LITTLE_ENDIAN) throw new Error('safetensors: big-endian hosts are not supported');
}

function isStDType(s: unknown): s is StDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_SIZE, s);
}

// ---------------------------------------------------------------------------------------------
// header parsing

interface ParsedHeader {
  metadata: Record<string, string>;
  tensors: Map<string, StTensorInfo>;
  dataStart: number;
}

function product(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function parseHeader(source: string, headerBytes: Uint8Array, headerLen: number, fileSize: number): ParsedHeader {
  const bad = (problem: string): never => {
    throw new InvalidFileError(source, `invalid safetensors file: ${problem}`);
  };
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (e) {
    bad(`header is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) bad('header JSON is not an object');
  const dataStart = 8 + headerLen;
  const dataLen = fileSize - dataStart;
  const metadata: Record<string, string> = {};
  const tensors = new Map<string, StTensorInfo>();
  for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) bad('__metadata__ is not an object');
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== 'string') bad(`__metadata__ value for "${k}" is not a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) bad(`entry "${name}" is not an object`);
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (!isStDType(dtype)) bad(`tensor "${name}" has unsupported dtype ${JSON.stringify(dtype)}`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      bad(`tensor "${name}" has an invalid shape ${JSON.stringify(shape)}`);
    }
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)
    ) {
      bad(`tensor "${name}" has invalid data_offsets ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as number[];
    if (end < begin) bad(`tensor "${name}" has data_offsets end < begin (${begin}, ${end})`);
    if (end > dataLen) {
      bad(`tensor "${name}" data_offsets [${begin}, ${end}] lie outside the data section (${dataLen} bytes; file truncated?)`);
    }
    const expected = product(shape as number[]) * DTYPE_SIZE[dtype as StDType];
    if (end - begin !== expected) {
      bad(
        `tensor "${name}" has ${end - begin} bytes but shape ${JSON.stringify(shape)} × ${dtype} needs ${expected}`,
      );
    }
    tensors.set(name, { name, dtype: dtype as StDType, shape: [...(shape as number[])], begin, end });
  }
  const spans = [...tensors.values()].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < spans.length; i++) {
    if (spans[i].begin < spans[i - 1].end) bad(`tensors "${spans[i - 1].name}" and "${spans[i].name}" overlap`);
  }
  return { metadata, tensors, dataStart };
}

function readHeaderLength(source: string, prefix: Uint8Array, fileSize: number): number {
  if (fileSize < 8) throw new InvalidFileError(source, `invalid safetensors file: only ${fileSize} bytes (needs an 8-byte header length)`);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(fileSize - 8)) {
    throw new InvalidFileError(source, `invalid safetensors file: header length ${n} exceeds the file size (${fileSize} bytes)`);
  }
  if (n > BigInt(MAX_HEADER)) throw new InvalidFileError(source, `invalid safetensors file: header length ${n} is too large`);
  if (n < 2n) throw new InvalidFileError(source, `invalid safetensors file: header length ${n} is too small`);
  return Number(n);
}

// ---------------------------------------------------------------------------------------------
// reader

/** Source of tensor bytes: an in-memory data section or a file read lazily. */
type ByteSource =
  | { kind: 'memory'; data: Uint8Array }
  | { kind: 'file'; path: string; dataStart: number };

/** A validated safetensors file (in memory or read lazily from disk). */
export class SafetensorsFile {
  /** The `__metadata__` map (string → string); empty when the file has none. */
  readonly metadata: Record<string, string>;
  /** Path or description used in error messages. */
  readonly source: string;
  private readonly tensors: Map<string, StTensorInfo>;
  private readonly bytes: ByteSource;

  private constructor(source: string, header: ParsedHeader, bytes: ByteSource) {
    this.source = source;
    this.metadata = header.metadata;
    this.tensors = header.tensors;
    this.bytes = bytes;
  }

  /**
   * Open and validate a safetensors file. Reads the header first; files up to {@link EAGER_LIMIT}
   * bytes are then read whole, larger ones are read tensor by tensor on access.
   * @throws FileNotFoundError when the file cannot be opened; InvalidFileError when it is malformed.
   */
  static async open(path: string): Promise<SafetensorsFile> {
    let fh;
    try {
      // non-blocking open: a FIFO must not block us (it is then refused by the fstat below)
      fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    } catch (e) {
      // ENOENT → E_FILE_NOT_FOUND; EACCES/EPERM/EISDIR… → E_FILE_ACCESS
      throw fileError(path, e, 'file');
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new InvalidFileError(path, 'not a regular file');
      const size = st.size;
      const prefix = new Uint8Array(8);
      const { bytesRead } = await fh.read(prefix, 0, Math.min(8, size), 0);
      const n = readHeaderLength(path, prefix, bytesRead < 8 ? bytesRead : size);
      const headerBytes = new Uint8Array(n);
      await readExactly(fh, headerBytes, 8, path);
      const header = parseHeader(path, headerBytes, n, size);
      if (size > EAGER_LIMIT) return new SafetensorsFile(path, header, { kind: 'file', path, dataStart: header.dataStart });
      const data = new Uint8Array(size - header.dataStart);
      await readExactly(fh, data, header.dataStart, path);
      return new SafetensorsFile(path, header, { kind: 'memory', data });
    } finally {
      await fh.close();
    }
  }

  /**
   * Parse and validate a safetensors file held in memory. The buffer is referenced, not copied.
   * @param buf the whole file's bytes
   * @param source name used in error messages
   * @throws InvalidFileError when malformed.
   */
  static fromBuffer(buf: Uint8Array, source = '<buffer>'): SafetensorsFile {
    const n = readHeaderLength(source, buf.subarray(0, 8), buf.byteLength);
    const header = parseHeader(source, buf.subarray(8, 8 + n), n, buf.byteLength);
    return new SafetensorsFile(source, header, { kind: 'memory', data: buf.subarray(header.dataStart) });
  }

  /** Tensor names in header order. */
  names(): string[] {
    return [...this.tensors.keys()];
  }

  /** Whether a tensor of this name exists. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /**
   * Dtype, shape and offsets of a tensor.
   * @throws NotFoundError when absent.
   */
  info(name: string): StTensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new NotFoundError(`${this.source}: no tensor named "${name}"`);
    return { ...t, shape: [...t.shape] };
  }

  /** A copy of the tensor's raw little-endian bytes (8-byte aligned, safe to view as any typed array). */
  raw(name: string): Uint8Array {
    const t = this.info(name);
    const len = t.end - t.begin;
    const out = new Uint8Array(len);
    if (len === 0) return out;
    if (this.bytes.kind === 'memory') {
      out.set(this.bytes.data.subarray(t.begin, t.end));
    } else {
      const fd = openSync(this.bytes.path, 'r');
      try {
        let off = 0;
        while (off < len) {
          const r = readSync(fd, out, off, len - off, this.bytes.dataStart + t.begin + off);
          if (r === 0) throw new InvalidFileError(this.source, `file shrank while reading tensor "${name}"`);
          off += r;
        }
      } finally {
        closeSync(fd);
      }
    }
    return out;
  }

  /**
   * The tensor as a new Float32Array (row-major). F16/BF16 are converted exactly; F64 is rounded;
   * integer and BOOL tensors are converted to their values.
   */
  float32(name: string): Float32Array {
    assertLittleEndian();
    const t = this.info(name);
    const b = this.raw(name).buffer as ArrayBuffer;
    switch (t.dtype) {
      case 'F32': return new Float32Array(b);
      case 'F16': return float16BitsToFloat32(new Uint16Array(b));
      case 'BF16': return bfloat16BitsToFloat32(new Uint16Array(b));
      case 'F64': return Float32Array.from(new Float64Array(b));
      case 'I64': return Float32Array.from(new BigInt64Array(b), Number);
      default: return Float32Array.from(intView(t.dtype, b));
    }
  }

  /** The tensor as a new Float64Array (exact for every dtype except I64 beyond ±2^53). */
  float64(name: string): Float64Array {
    assertLittleEndian();
    const t = this.info(name);
    const b = this.raw(name).buffer as ArrayBuffer;
    switch (t.dtype) {
      case 'F64': return new Float64Array(b);
      case 'F32': return Float64Array.from(new Float32Array(b));
      case 'F16': case 'BF16': return Float64Array.from(this.float32(name));
      case 'I64': return Float64Array.from(new BigInt64Array(b), Number);
      default: return Float64Array.from(intView(t.dtype, b));
    }
  }

  /**
   * The tensor as a new BigInt64Array. Only integer and BOOL dtypes are accepted.
   * @throws InvalidArgumentError for floating-point tensors.
   */
  int64(name: string): BigInt64Array {
    assertLittleEndian();
    const t = this.info(name);
    const b = this.raw(name).buffer as ArrayBuffer;
    if (t.dtype === 'I64') return new BigInt64Array(b);
    if (t.dtype.startsWith('F') || t.dtype === 'BF16') {
      throw new InvalidArgumentError(`${this.source}: tensor "${name}" is ${t.dtype}, not an integer tensor`);
    }
    const v = intView(t.dtype, b);
    const out = new BigInt64Array(v.length);
    for (let i = 0; i < v.length; i++) out[i] = BigInt(v[i]);
    return out;
  }
}

function intView(dtype: StDType, b: ArrayBuffer): Int32Array | Int16Array | Int8Array | Uint8Array {
  switch (dtype) {
    case 'I32': return new Int32Array(b);
    case 'I16': return new Int16Array(b);
    case 'I8': return new Int8Array(b);
    case 'U8': case 'BOOL': return new Uint8Array(b);
    default: throw new Error(`internal: ${dtype} is not a small integer dtype`);
  }
}

async function readExactly(
  fh: FileHandle, dst: Uint8Array, position: number, source: string,
): Promise<void> {
  let off = 0;
  while (off < dst.length) {
    const { bytesRead } = await fh.read(dst, off, dst.length - off, position + off);
    if (bytesRead === 0) throw new InvalidFileError(source, 'unexpected end of file');
    off += bytesRead;
  }
}

// ---------------------------------------------------------------------------------------------
// writer

function buildHeader(
  tensors: Record<string, StTensorInput>, metadata?: Record<string, string>,
): { header: Uint8Array; views: Uint8Array[]; total: number } {
  const h: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new InvalidArgumentError(`safetensors metadata "${k}" must be a string, got ${typeof v}`);
    }
    h.__metadata__ = { ...metadata };
  }
  const views: Uint8Array[] = [];
  let off = 0;
  for (const [name, t] of Object.entries(tensors)) {
    if (name === '__metadata__') throw new InvalidArgumentError('"__metadata__" cannot be used as a tensor name');
    if (!isStDType(t.dtype)) throw new InvalidArgumentError(`tensor "${name}": unsupported dtype ${JSON.stringify(t.dtype)}`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new InvalidArgumentError(`tensor "${name}": invalid shape ${JSON.stringify(t.shape)}`);
    }
    if (!ArrayBuffer.isView(t.data)) throw new InvalidArgumentError(`tensor "${name}": data must be a typed array or DataView`);
    const need = product(t.shape) * DTYPE_SIZE[t.dtype];
    if (t.data.byteLength !== need) {
      throw new InvalidArgumentError(
        `tensor "${name}": ${t.data.byteLength} data bytes but shape ${JSON.stringify(t.shape)} × ${t.dtype} needs ${need}`,
      );
    }
    views.push(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    h[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [off, off + need] };
    off += need;
  }
  const json = new TextEncoder().encode(JSON.stringify(h));
  const padded = Math.ceil(json.length / 8) * 8;
  const header = new Uint8Array(8 + padded);
  new DataView(header.buffer).setBigUint64(0, BigInt(padded), true);
  header.set(json, 8);
  header.fill(0x20, 8 + json.length);
  return { header, views, total: header.length + off };
}

/**
 * Encode tensors (in the given key order) and optional string metadata into safetensors bytes.
 * The header is padded with spaces to a multiple of 8 bytes.
 * @throws InvalidArgumentError on a bad dtype/shape/byte-size or non-string metadata.
 */
export function encodeSafetensors(
  tensors: Record<string, StTensorInput>, metadata?: Record<string, string>,
): Uint8Array {
  const { header, views, total } = buildHeader(tensors, metadata);
  const out = new Uint8Array(total);
  out.set(header, 0);
  let off = header.length;
  for (const v of views) {
    out.set(v, off);
    off += v.length;
  }
  return out;
}

/**
 * Write tensors to a safetensors file atomically (temporary file in the same directory + rename).
 * Tensors are stored in the given key order; data is streamed, not concatenated in memory.
 * @throws InvalidArgumentError on bad input (nothing is written); a DiffusionFeaturesError with code
 * `E_WRITE_FAILED` when the file system fails (no partial file is left).
 */
export async function writeSafetensors(
  path: string, tensors: Record<string, StTensorInput>, metadata?: Record<string, string>,
): Promise<void> {
  const { header, views } = buildHeader(tensors, metadata);
  await writeFileAtomic(path, [header, ...views]);
}
