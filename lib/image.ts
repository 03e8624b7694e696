/**
 * Image loading: decode (sharp), EXIF orientation, resize to `size`×`size` and convert to RGB exactly
 * as the reference does (docs/method.md §Images: PIL `img.resize((size, size))` with its default filter
 * *before* `.convert('RGB')`, no crop).
 *
 * Two resamplers:
 * - `'pil'` (default): a TypeScript port of Pillow 9.4's resampler — BICUBIC (a = −0.5, support
 *   scaled by the reduction factor, 22-bit fixed-point coefficients, horizontal pass then vertical pass,
 *   each rounded and clipped to 8 bits), images with alpha resized premultiplied (`RGBa`/`La`) and
 *   un-premultiplied afterwards, NEAREST for palette and 1-bit images. Bit-exact with Pillow on the
 *   reference goldens (see test/image.test.ts).
 * - `'sharp'`: libvips `fit: 'fill', kernel: 'cubic'` for reductions (no axis enlarged) — faster on
 *   huge inputs; on the 451×300 → 128 photo within ±1 of PIL (≈82% of values exact, mean |Δ| ≈ 0.18;
 *   measured in test/image.test.ts). With alpha, low-alpha pixels can differ more after
 *   un-premultiplying. Enlargements (either axis) fall back to the PIL port: libvips's upsampler is
 *   up to ~50 grey levels off PIL there and the inputs are small anyway.
 *
 * Deviations from the reference's PIL path, by design: EXIF orientation is applied (PIL's `open`
 * ignores it); 16-bit images are reduced to 8 bits by sharp (PIL clips 16-bit greyscale to 0–255
 * instead of scaling); embedded ICC profiles are ignored like PIL does, except for CMYK images, which
 * sharp converts to sRGB.
 *
 * Hostile input (every path and byte count comes from a caller): only regular files are read (no
 * FIFO, device, socket or folder), at most `maxBytes` of them; images over `maxPixels` source pixels
 * are refused before decoding; `signal` stops reading, and stops the resize between rows. Decoding and
 * resizing of images over {@link INLINE_PIXELS} source pixels run off the event loop: a small pool of
 * worker threads (node:worker_threads, created on first use, unref'd when idle) decodes them with
 * sharp and runs the PIL resize, so a 16k×16k PNG does not stall the event loop: only the encoded
 * bytes and the size×size result cross threads.
 *
 * @module
 */
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { basename, extname } from 'node:path';
import { Worker } from 'node:worker_threads';
import sharp from 'sharp';
import {
  AbortError, DiffusionFeaturesError, FileAccessError, ImageDecodeError, InvalidArgumentError, LimitExceededError, fileError,
} from './errors.js';
import { imageCore, type ResampleMode } from './image-core.js';

/** Resampling implementation used by {@link loadImage}. */
export type { ResampleMode };

/** Options of {@link loadImage}. */
export interface LoadImageOptions {
  /** Resampler (default `'pil'`, bit-exact with the reference). */
  resample?: ResampleMode;
  /** Name to report for Buffer inputs (default `'buffer'`); file inputs use their base name. */
  name?: string;
  /** Stops reading the file and the resize; the promise rejects with an `AbortError` (`E_ABORTED`). */
  signal?: AbortSignal;
  /** Largest accepted encoded size in bytes (default {@link DEFAULT_MAX_IMAGE_BYTES}); over it: `E_LIMIT_EXCEEDED`. */
  maxBytes?: number;
  /**
   * Largest accepted source image in pixels, width × height (default {@link DEFAULT_MAX_PIXELS}, sharp's
   * `limitInputPixels`); over it: `E_LIMIT_EXCEEDED`, checked from the header before decoding.
   */
  maxPixels?: number;
  /**
   * Where to decode and resize: `'auto'` (default) uses the worker threads for images over
   * {@link INLINE_PIXELS} pixels; `true` always; `false` never (on the calling thread, as before).
   */
  offThread?: boolean | 'auto';
}

/** A decoded, resized RGB image. */
export interface LoadedImage {
  /** `size × size × 3` bytes, RGB, row-major HWC. */
  data: Uint8Array;
  /** Width of the source image (after EXIF orientation). */
  width: number;
  /** Height of the source image (after EXIF orientation). */
  height: number;
  /** Output side length (`size`). */
  size: number;
  /** File base name without extension (or the `name` option for buffers). */
  name: string;
}

/** Largest accepted output side. */
export const MAX_IMAGE_SIZE = 16384;


/** Default of {@link LoadImageOptions.maxBytes}: 256 MiB. */
export const DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024;

/** Default of {@link LoadImageOptions.maxPixels}: sharp's `limitInputPixels` default, 16383 × 16383. */
export const DEFAULT_MAX_PIXELS = 0x3fff * 0x3fff;

/** Images with at most this many source pixels are decoded on the calling thread in `'auto'` mode. */
export const INLINE_PIXELS = 512 * 512;

const core = imageCore(sharp);

/**
 * Resize 8-bit interleaved pixels like Pillow 9.4's `Image.resize(size)` with its default filter:
 * NEAREST when `nearest` (palette / 1-bit images), else BICUBIC (premultiplied when there is alpha,
 * i.e. 2 or 4 channels). Same size returns a copy. Runs on the calling thread.
 */
export function pilResize(
  data: Uint8Array, width: number, height: number, channels: number, outW: number, outH: number, nearest = false,
): Uint8Array {
  if (!(data instanceof Uint8Array) || data.length !== width * height * channels) {
    throw new InvalidArgumentError(`pilResize: ${data?.length} bytes for ${width}×${height}×${channels}`);
  }
  return core.pilResize(data, width, height, channels, outW, outH, nearest);
}

/** PIL's `.convert('RGB')` of L / LA / RGB / RGBA pixels: grey replicated, alpha dropped (no compositing). */
export function toRGB(data: Uint8Array, channels: number): Uint8Array {
  return core.toRGB(data, channels);
}

/**
 * The reference's pixel normalisation (diffusers `VaeImageProcessor.preprocess`): uint8 HWC RGB →
 * float32 CHW, `x / 255 * 2 − 1` evaluated in float32 exactly as NumPy/PyTorch do.
 * @param data `size × size × 3` RGB bytes
 * @param size side length
 * @param out optional destination of length `3 × size × size` (e.g. a slice of a batch buffer)
 */
export function preprocessImage(data: Uint8Array, size: number, out?: Float32Array): Float32Array {
  const hw = size * size;
  if (data.length !== hw * 3) throw new InvalidArgumentError(`preprocessImage: expected ${hw * 3} bytes, got ${data.length}`);
  const dst = out ?? new Float32Array(3 * hw);
  if (dst.length !== 3 * hw) throw new InvalidArgumentError(`preprocessImage: output must hold ${3 * hw} values`);
  const lut = new Float32Array(256);
  for (let v = 0; v < 256; v++) lut[v] = Math.fround(Math.fround(v / 255) * 2 - 1);
  for (let i = 0; i < hw; i++) {
    dst[i] = lut[data[i * 3]];
    dst[hw + i] = lut[data[i * 3 + 1]];
    dst[2 * hw + i] = lut[data[i * 3 + 2]];
  }
  return dst;
}


// ---- worker pool -------------------------------------------------------------------------------

interface Job {
  bytes: Uint8Array;
  /** The bytes are ours (read from a file): their buffer may be transferred, not copied. */
  owned: boolean;
  size: number;
  resample: ResampleMode;
  maxPixels: number;
  resolve: (v: { data: Uint8Array; width: number; height: number }) => void;
  reject: (e: unknown) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

interface Slot {
  worker: Worker;
  abort: Int32Array;
  job?: Job;
}

// The worker decodes (sharp, in that thread) and resizes, so neither the decoded pixels nor the work
// touch the main thread: only the encoded bytes go in and size×size×3 bytes come back. It is never
// terminated while sharp may be decoding (an abort rejects at once and stops the resize between rows;
// the decode finishes in the background and its result is dropped).
const WORKER_SOURCE = (sharpPath: string): string => `
'use strict';
var __name = (f) => f;
const { parentPort, workerData } = require('node:worker_threads');
const abort = new Int32Array(workerData.abort);
const core = (${imageCore.toString()})(require(${JSON.stringify(sharpPath)}), abort);
parentPort.on('message', (m) => {
  core.decodeResize(m.bytes instanceof Uint8Array ? m.bytes : new Uint8Array(m.bytes), m.size, m.resample, m.maxPixels).then(
    (r) => parentPort.postMessage({ ok: true, data: r.data, width: r.width, height: r.height }, [r.data.buffer]),
    (e) => parentPort.postMessage({ ok: false, kind: e && e.kind || 'decode', message: String(e && e.message || e) }),
  );
});
`;

class ImagePool {
  private readonly slots: Slot[] = [];
  private readonly queue: Job[] = [];
  private source?: string;
  private broken = false;

  constructor(private readonly max: number) {}

  /** Whether worker threads can be used (false after a worker could not be started). */
  get usable(): boolean {
    return !this.broken;
  }

  run(job: Job): void {
    this.queue.push(job);
    this.pump();
  }

  private spawn(): Slot | undefined {
    try {
      this.source ??= WORKER_SOURCE(createRequire(import.meta.url).resolve('sharp'));
      const abort = new Int32Array(new SharedArrayBuffer(4));
      const worker = new Worker(this.source, { eval: true, execArgv: [], workerData: { abort: abort.buffer }, name: 'diffusion-features image' });
      const slot: Slot = { worker, abort };
      worker.on('message', (m: { ok: boolean; data?: Uint8Array; width?: number; height?: number; kind?: string; message?: string }) => {
        const job = slot.job;
        slot.job = undefined;
        Atomics.store(slot.abort, 0, 0);
        if (job) {
          if (job.onAbort) job.signal?.removeEventListener('abort', job.onAbort);
          if (m.ok) job.resolve({ data: m.data!, width: m.width!, height: m.height! });
          else job.reject(Object.assign(new Error(m.message), { kind: m.kind }));
        }
        this.pump();
      });
      const fail = (err: unknown): void => {
        const i = this.slots.indexOf(slot);
        if (i >= 0) this.slots.splice(i, 1);
        const job = slot.job;
        slot.job = undefined;
        job?.reject(Object.assign(new Error(`image worker stopped (${(err as Error)?.message ?? String(err)})`), { kind: 'decode' }));
        this.pump();
      };
      worker.on('error', fail);
      worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
      worker.unref();
      this.slots.push(slot);
      return slot;
    } catch {
      this.broken = true;
      return undefined;
    }
  }

  private pump(): void {
    while (this.queue.length) {
      let slot = this.slots.find((s) => !s.job);
      if (!slot && this.slots.length < this.max) slot = this.spawn();
      if (!slot) {
        if (this.broken && this.slots.length === 0) {
          // no thread could be started: run the waiting jobs here rather than fail them
          for (const job of this.queue.splice(0)) core.decodeResize(job.bytes, job.size, job.resample, job.maxPixels).then(job.resolve, job.reject);
        }
        return;
      }
      const job = this.queue.shift()!;
      if (job.signal?.aborted) {
        job.reject(Object.assign(new Error('image loading aborted'), { kind: 'aborted' }));
        continue;
      }
      slot.job = job;
      Atomics.store(slot.abort, 0, 0);
      if (job.signal) {
        const s = slot;
        job.onAbort = () => Atomics.store(s.abort, 0, 1);
        job.signal.addEventListener('abort', job.onAbort, { once: true });
      }
      slot.worker.ref();
      // Bytes in shared memory (e.g. serve's request bodies) are read by the worker in place; a caller's
      // ArrayBuffer is never transferred (it would be detached under them): copied instead.
      if (job.bytes.buffer instanceof SharedArrayBuffer) {
        slot.worker.postMessage({ bytes: job.bytes, size: job.size, resample: job.resample, maxPixels: job.maxPixels });
        continue;
      }
      const whole = job.bytes.byteOffset === 0 && job.bytes.byteLength === job.bytes.buffer.byteLength && job.bytes.buffer instanceof ArrayBuffer;
      const bytes = job.owned && whole ? (job.bytes.buffer as ArrayBuffer) : new Uint8Array(job.bytes).buffer; // (Buffer#slice does not copy)
      slot.worker.postMessage({ bytes, size: job.size, resample: job.resample, maxPixels: job.maxPixels }, [bytes]);
    }
    for (const s of this.slots) if (!s.job) s.worker.unref();
  }
}

let pool: ImagePool | undefined;
let poolSize = Math.max(1, Math.min(2, availableParallelism()));
function imagePool(): ImagePool {
  pool ??= new ImagePool(poolSize);
  return pool;
}

/**
 * Sets how many worker threads decode and resize large images (default min(2, CPU count)); `0` does
 * it on the calling thread as releases before 0.2 did (blocking the event loop for large images; for
 * benchmarks and for hosts that forbid threads). Idle workers of the previous pool are left to exit.
 */
export function setImageThreads(n: number): void {
  if (!Number.isSafeInteger(n) || n < 0 || n > 64) throw new InvalidArgumentError(`image threads must be an integer in [0, 64], got ${String(n)}`);
  poolSize = n;
  pool = undefined;
}

function decodeOffThread(bytes: Uint8Array, owned: boolean, size: number, resample: ResampleMode, maxPixels: number, signal?: AbortSignal) {
  return new Promise<{ data: Uint8Array; width: number; height: number }>((resolve, reject) => {
    // an abort rejects at once; the worker stops at its next check and its result is dropped
    const onAbort = (): void => reject(Object.assign(new Error('image loading aborted'), { kind: 'aborted' }));
    signal?.addEventListener('abort', onAbort, { once: true });
    const done = (): void => signal?.removeEventListener('abort', onAbort);
    imagePool().run({
      bytes, owned, size, resample, maxPixels, signal,
      resolve: (v) => { done(); resolve(v); },
      reject: (e) => { done(); reject(e); },
    });
  });
}

// ---- reading -----------------------------------------------------------------------------------

const READ_CHUNK = 4 * 1024 * 1024;

/**
 * Reads a whole regular file, at most `maxBytes` bytes, checking `signal` between chunks. The file
 * is opened non-blocking (a FIFO cannot block the open) and checked with fstat on the opened handle
 * (no race between the check and the read).
 */
async function readImageFile(path: string, maxBytes: number, signal?: AbortSignal): Promise<Uint8Array> {
  let fh;
  try {
    fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | (fsConstants.O_NOCTTY ?? 0));
  } catch (e) {
    throw fileError(path, e, 'image file');
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) {
      const what = st.isDirectory() ? 'a directory' : st.isFIFO() ? 'a FIFO' : st.isCharacterDevice() ? 'a character device' : st.isBlockDevice() ? 'a block device' : st.isSocket() ? 'a socket' : 'not a regular file';
      throw new FileAccessError(path, `is ${what}, not an image file (only regular files are read)`);
    }
    if (st.size > maxBytes) throw new LimitExceededError(`${path}: image file is ${st.size} bytes, over the limit of ${maxBytes} (maxBytes)`);
    const buf = new Uint8Array(st.size);
    let off = 0;
    while (off < buf.length) {
      if (signal?.aborted) throw new AbortError(`reading ${path} aborted`, { cause: signal.reason });
      const { bytesRead } = await fh.read(buf, off, Math.min(READ_CHUNK, buf.length - off), off);
      if (bytesRead === 0) break;
      off += bytesRead;
    }
    return off === buf.length ? buf : buf.subarray(0, off);
  } catch (e) {
    throw fileError(path, e, 'image file');
  } finally {
    await fh.close().catch(() => undefined);
  }
}

function checkLimit(name: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new InvalidArgumentError(`${name} must be a positive integer, got ${String(v)}`);
  return v;
}

function displayName(input: string | Uint8Array, opts: LoadImageOptions): string {
  if (typeof input === 'string') return basename(input, extname(input));
  return opts.name ?? 'buffer';
}

/**
 * Load an image file (or encoded bytes) of any format sharp reads and return it as `size × size`
 * RGB bytes, resized as the reference does (see the module doc).
 * @param input a file path, or the encoded image bytes
 * @param size output side length in pixels (e.g. 512)
 * @throws FileNotFoundError (`E_FILE_NOT_FOUND`) for a missing file; FileAccessError (`E_FILE_ACCESS`)
 * for an unreadable file or one that is not a regular file; LimitExceededError (`E_LIMIT_EXCEEDED`)
 * over `maxBytes`/`maxPixels`; ImageDecodeError (`E_IMAGE_DECODE`) for an empty, truncated, corrupt or
 * non-image input; AbortError (`E_ABORTED`) when `signal` aborts; InvalidArgumentError for bad options
 */
export async function loadImage(
  input: string | Uint8Array, size: number, opts: LoadImageOptions = {},
): Promise<LoadedImage> {
  if (opts === null || typeof opts !== 'object') throw new InvalidArgumentError('loadImage options must be an object');
  if (!Number.isSafeInteger(size) || size < 1 || size > MAX_IMAGE_SIZE) {
    throw new InvalidArgumentError(`image size must be an integer in [1, ${MAX_IMAGE_SIZE}], got ${size}`);
  }
  const resample = opts.resample ?? 'pil';
  if (resample !== 'pil' && resample !== 'sharp') throw new InvalidArgumentError(`resample must be 'pil' or 'sharp', got ${JSON.stringify(resample)}`);
  const maxBytes = checkLimit('maxBytes', opts.maxBytes, DEFAULT_MAX_IMAGE_BYTES);
  const maxPixels = checkLimit('maxPixels', opts.maxPixels, DEFAULT_MAX_PIXELS);
  const offThread = opts.offThread ?? 'auto';
  if (offThread !== true && offThread !== false && offThread !== 'auto') throw new InvalidArgumentError(`offThread must be true, false or 'auto', got ${String(offThread)}`);
  const { signal } = opts;
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidArgumentError('signal must be an AbortSignal');
  const label = typeof input === 'string' ? input : opts.name ?? '<buffer>';
  const aborted = (): AbortError => new AbortError(`loading ${label} aborted`, { cause: signal?.reason });
  if (signal?.aborted) throw aborted();
  let bytes: Uint8Array;
  const owned = typeof input === 'string';
  if (typeof input === 'string') {
    if (input.length === 0) throw new InvalidArgumentError('image path is empty');
    if (input.includes('\0')) throw new InvalidArgumentError(`image path ${JSON.stringify(input)} contains a NUL character`);
    bytes = await readImageFile(input, maxBytes, signal);
  } else if (input instanceof Uint8Array) {
    if (input.length > maxBytes) throw new LimitExceededError(`${label}: image is ${input.length} bytes, over the limit of ${maxBytes} (maxBytes)`);
    bytes = input;
  } else {
    throw new InvalidArgumentError(`loadImage input must be a file path or a Buffer/Uint8Array, got ${input === null ? 'null' : typeof input}`);
  }
  if (bytes.length === 0) throw new ImageDecodeError(label, 'empty file (0 bytes)');
  if (signal?.aborted) throw aborted();

  let r: { data: Uint8Array; width: number; height: number };
  try {
    let off = offThread === true && poolSize > 0;
    if (offThread === 'auto' && poolSize > 0 && imagePool().usable) {
      const meta = await sharp(bytes, { limitInputPixels: false }).metadata().catch(() => undefined);
      off = !!meta && (meta.width ?? 0) * (meta.height ?? 0) > INLINE_PIXELS;
    }
    r = off ? await decodeOffThread(bytes, owned, size, resample, maxPixels, signal) : await core.decodeResize(bytes, size, resample, maxPixels);
  } catch (e) {
    const kind = (e as { kind?: string }).kind;
    const msg = (e as Error).message;
    if (kind === 'aborted' || signal?.aborted) throw aborted();
    if (kind === 'limit') throw new LimitExceededError(`${label}: ${msg} (maxPixels)`, { cause: e });
    if (e instanceof DiffusionFeaturesError) throw e;
    throw new ImageDecodeError(label, msg, { cause: e });
  }
  if (signal?.aborted) throw aborted();
  return { data: r.data, width: r.width, height: r.height, size, name: displayName(input, opts) };
}
