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
 * resizing of images over {@link INLINE_PIXELS} source pixels run off the event loop: sharp decodes in
 * libuv's pool, the pixels move to a worker a chunk per loop turn, and the PIL resize runs in a
 * small pool of worker threads (node:worker_threads, pure JS, created on first use, unref'd when
 * idle), so a 16k×16k PNG does not stall the event loop.
 *
 * @module
 */
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';
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

type Result = { data: Uint8Array; width: number; height: number };

/** One worker thread; it resizes one image at a time. */
interface Slot {
  worker: Worker;
  busy: boolean;
  /** Settles the current image's promise (set while busy). */
  settle?: { resolve: (v: Result) => void; reject: (e: unknown) => void };
}

// The worker only resizes (pure JS, no native module), so terminating it on abort is always safe.
// Protocol per image: {begin: raw header + byte count}, {chunk, off}… (transferred), {end}.
const WORKER_SOURCE = (): string => `
'use strict';
var __name = (f) => f;
const { parentPort } = require('node:worker_threads');
const core = (${imageCore.toString()})(null);
let buf = null;
let head = null;
parentPort.on('message', (m) => {
  if (m.begin) {
    head = m.begin;
    buf = new Uint8Array(head.n);
  } else if (m.chunk) {
    buf.set(new Uint8Array(m.chunk), m.off);
  } else if (m.end) {
    try {
      const r = core.finish({ ...head.raw, pixels: buf }, head.size);
      parentPort.postMessage({ ok: true, data: r.data, width: r.width, height: r.height }, [r.data.buffer]);
    } catch (e) {
      parentPort.postMessage({ ok: false, kind: (e && e.kind) || 'decode', message: String((e && e.message) || e) });
    }
    buf = null;
    head = null;
  }
});
`;

class ImagePool {
  private readonly slots: Slot[] = [];
  private readonly waiting: ((s: Slot | undefined) => void)[] = [];
  private broken = false;

  constructor(private readonly max: number) {}

  /** Whether worker threads can be used (false after a worker could not be started). */
  get usable(): boolean {
    return !this.broken;
  }

  /** A free worker (started on demand), or undefined when none can be started. */
  acquire(): Promise<Slot | undefined> {
    const free = this.slots.find((s) => !s.busy) ?? (this.slots.length < this.max ? this.spawn() : undefined);
    if (free) {
      free.busy = true;
      free.worker.ref();
      return Promise.resolve(free);
    }
    if (this.slots.length === 0) return Promise.resolve(undefined);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  /** Gives a worker back (or, when it was terminated, lets a waiter start a new one). */
  release(slot: Slot): void {
    slot.busy = false;
    slot.settle = undefined;
    const next = this.waiting.shift();
    if (!next) {
      slot.worker.unref();
      return;
    }
    if (this.slots.includes(slot)) {
      slot.busy = true;
      next(slot);
    } else {
      void this.acquire().then(next);
    }
  }

  private spawn(): Slot | undefined {
    if (this.broken) return undefined;
    try {
      const worker = new Worker(WORKER_SOURCE(), { eval: true, execArgv: [], name: 'diffusion-features image' });
      const slot: Slot = { worker, busy: false };
      worker.on('message', (m: { ok: boolean; data?: Uint8Array; width?: number; height?: number; kind?: string; message?: string }) => {
        if (m.ok) slot.settle?.resolve({ data: m.data!, width: m.width!, height: m.height! });
        else slot.settle?.reject(Object.assign(new Error(m.message), { kind: m.kind }));
      });
      const gone = (err: unknown): void => {
        const i = this.slots.indexOf(slot);
        if (i >= 0) this.slots.splice(i, 1);
        slot.settle?.reject(Object.assign(new Error(`image worker stopped (${(err as Error)?.message ?? String(err)})`), { kind: 'decode' }));
      };
      worker.on('error', gone);
      worker.on('exit', (code) => gone(new Error(`exit code ${code}`)));
      worker.unref();
      this.slots.push(slot);
      return slot;
    } catch {
      this.broken = true;
      return undefined;
    }
  }
}

let pool: ImagePool | undefined;
let poolSize = Math.max(1, Math.min(2, availableParallelism()));
function imagePool(): ImagePool {
  pool ??= new ImagePool(poolSize);
  return pool;
}

/**
 * Sets how many worker threads resize large images (default min(2, CPU count)); `0` resizes on the
 * calling thread as releases before 0.2 did (blocking the event loop for large images; for
 * benchmarks and for hosts that forbid threads). Idle workers of the previous pool are left to exit.
 */
export function setImageThreads(n: number): void {
  if (!Number.isSafeInteger(n) || n < 0 || n > 64) throw new InvalidArgumentError(`image threads must be an integer in [0, 64], got ${String(n)}`);
  poolSize = n;
  pool = undefined;
}

/** Bytes handed to a worker per event-loop turn (one memcpy of this size, then a transfer). */
const HANDOFF_CHUNK = 2 * 1024 * 1024;

const abortedError = (): Error => Object.assign(new Error('image loading aborted'), { kind: 'aborted' });

/**
 * Decodes with sharp (in libuv's pool), hands the pixels to a worker thread a chunk per event-loop
 * turn (copied chunk by chunk, then transferred), and resizes them there. An abort rejects at once and
 * terminates the worker.
 */
async function decodeOffThread(bytes: Uint8Array, size: number, resample: ResampleMode, maxPixels: number, signal?: AbortSignal): Promise<Result> {
  const raw = await core.decodeRaw(bytes, size, resample, maxPixels);
  if (signal?.aborted) throw abortedError();
  const slot = await imagePool().acquire();
  if (!slot) return core.finish(raw, size); // no thread could be started: resize here
  try {
    if (signal?.aborted) throw abortedError();
    const result = new Promise<Result>((resolve, reject) => (slot.settle = { resolve, reject }));
    result.catch(() => undefined);
    const onAbort = (): void => {
      slot.settle?.reject(abortedError());
      void slot.worker.terminate();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const { pixels, ...rest } = raw;
      const n = pixels.length;
      slot.worker.postMessage({ begin: { raw: rest, n, size } });
      for (let off = 0; off < n; off += HANDOFF_CHUNK) {
        if (signal?.aborted) throw abortedError();
        const chunk = pixels.slice(off, Math.min(n, off + HANDOFF_CHUNK));
        slot.worker.postMessage({ chunk: chunk.buffer, off }, [chunk.buffer]);
        if (off + HANDOFF_CHUNK < n) await new Promise((r) => setImmediate(r));
      }
      slot.worker.postMessage({ end: true });
      return await result;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  } finally {
    imagePool().release(slot);
  }
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
    r = off ? await decodeOffThread(bytes, size, resample, maxPixels, signal) : await core.decodeResize(bytes, size, resample, maxPixels);
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
