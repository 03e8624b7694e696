/**
 * The native layer: typed wrappers over the libtorch Node-API addon (`src/`, loaded by `binding/`).
 *
 * - {@link Tensor}: a handle on one libtorch tensor. CPU float32 contiguous tensors are handed to JS
 *   without a copy ({@link Tensor.toFloat32Array}).
 * - {@link ScriptModule}: a TorchScript module; calls run on the addon's torch threads (never the JS
 *   thread) and return Promises, arguments are converted by the method's TorchScript schema.
 * - Device helpers: {@link cudaAvailable}, {@link deviceCount}, {@link resolveDevice},
 *   {@link setNumThreads}, {@link libtorchVersion}.
 *
 * Native resources are released by `dispose()` (or `using`); a FinalizationRegistry frees whatever is
 * garbage-collected without having been disposed, as a safety net only (GC timing is not memory pressure
 * aware for GPU memory: dispose explicitly).
 *
 * Every error thrown or rejected by this module is a {@link NativeError} (a `DiffusionFeaturesError`) with
 * a `code`: `E_INVALID_ARGUMENT`, `E_FILE_NOT_FOUND`, `E_INVALID_FILE`, `E_NOT_FOUND`, `E_DISPOSED`,
 * `E_OUT_OF_MEMORY` (an allocation failed, CPU or CUDA), `E_LIMIT_EXCEEDED` (no thread could be started,
 * a list argument too long), `E_ABORTED` (an `AbortError`), `E_TORCH` (libtorch raised; the message is
 * libtorch's, without C++ backtrace) or `E_NATIVE_LOAD`.
 *
 * The addon is safe in any number of `worker_threads` Workers, and across their termination with calls in
 * flight; on `process.exit()` it lets running calls end (up to `DIFFUSION_FEATURES_EXIT_GRACE_MS`,
 * default 3000) before libtorch is torn down.
 *
 * @module
 */
import { createRequire } from 'node:module';
import type { RawAddon, RawCancelToken, RawDType, RawTensor } from '../binding/index.cjs';
import { AbortError, DiffusionFeaturesError, throwIfAborted, type ErrorCode } from './errors.js';

/** A device name. `'auto'` means `'cuda:0'` when CUDA is available, else `'cpu'`. */
export type Device = 'cpu' | 'cuda' | `cuda:${number}` | 'auto';
/** Tensor element types supported across the boundary. */
export type DType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'uint8' | 'bool';
/** A value passed to / returned from a TorchScript method. */
export type IValue = Tensor | number | boolean | string | null | undefined | IValue[] | { [k: string]: IValue };

/** Error raised by the native layer. `code` is one of the codes listed in the module documentation. */
export class NativeError extends DiffusionFeaturesError {
  constructor(code: string, message: string, options?: ErrorOptions) {
    super(code as ErrorCode, message, options);
  }
}

// ------------------------------------------------------------------------------------------ addon
interface BindingModule {
  load(): RawAddon;
  binaryPath(): string | null;
}
const requireHere = createRequire(import.meta.url);
let binding: BindingModule | undefined;
let addonCache: Addon | undefined;

type Addon = RawAddon;

/** The raw addon, loaded on first use (so importing the library never fails for lack of the binary). */
/** @internal (lib/native/module.ts) */
export function addon(): Addon {
  if (addonCache) return addonCache;
  binding ??= requireHere('../binding/index.cjs') as BindingModule;
  try {
    addonCache = binding.load() as unknown as Addon;
  } catch (err) {
    throw toError(err);
  }
  return addonCache;
}

/** Path of the loaded native binary (loads it if needed). */
export function nativeBinaryPath(): string {
  addon();
  return binding!.binaryPath()!;
}

/** Build facts of the loaded addon: libtorch version, whether it was built with CUDA, ATen's parallel info. */
export function nativeBuildInfo(): { torchVersion: string; cuda: boolean; napiVersion: number; parallel: string } {
  return addon().buildInfo();
}

function toError(err: unknown): Error {
  if (err instanceof DiffusionFeaturesError) return err;
  if (err instanceof Error) {
    const code = typeof (err as { code?: unknown }).code === 'string' ? (err as unknown as { code: string }).code : 'E_TORCH';
    return new NativeError(code, err.message, { cause: err });
  }
  return new NativeError('E_TORCH', String(err));
}

/** Calls `fn`, converting native errors to {@link NativeError}. */
/** @internal (lib/native/module.ts) */
export function native<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw toError(err);
  }
}

/** @internal (lib/native/module.ts) */
export async function nativeAsync<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toError(err);
  }
}

/** @internal (lib/native/module.ts) */
export function invalid(message: string): NativeError {
  return new NativeError('E_INVALID_ARGUMENT', message);
}

/**
 * Runs native work that accepts a cancel token, tied to `signal`: when the signal aborts, the work is
 * cancelled if it has not started on its torch thread yet (it is then never run), and the promise rejects
 * at once with an {@link AbortError} either way (a result that arrives later is disposed by `discard`).
 */
/** @internal (lib/native/module.ts) */
export async function abortable<T>(signal: AbortSignal | undefined, what: string, start: (token: RawCancelToken | null) => Promise<T>,
  discard: (value: T) => void): Promise<T> {
  if (signal === undefined) return nativeAsync(() => start(null));
  if (!(signal instanceof AbortSignal)) throw invalid(`${what}: signal must be an AbortSignal`);
  throwIfAborted(signal, what);
  const A = addon();
  const token = A.createCancelToken();
  const work = nativeAsync(() => start(token));
  let onAbort: (() => void) | undefined;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => {
      A.cancel(token);
      reject(new AbortError(`${what} aborted`, { cause: signal.reason }));
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
  let delivered = false; // the caller got the work's result
  try {
    return await Promise.race([work.then((v) => {
      if (!signal.aborted) delivered = true;
      return v;
    }), aborted]);
  } finally {
    signal.removeEventListener('abort', onAbort!);
    if (!delivered) work.then(discard, () => {});
  }
}

// ------------------------------------------------------------------------------------------ devices
/** Whether libtorch sees a usable CUDA device (false with a CPU-only libtorch). */
export function cudaAvailable(): boolean {
  return native(() => addon().cudaAvailable());
}

/** Number of CUDA devices libtorch sees (0 without CUDA). */
export function deviceCount(): number {
  return native(() => addon().deviceCount());
}

/**
 * Resolves a {@link Device} to a concrete libtorch device name: `'auto'` → `'cuda:0'` if CUDA is available,
 * else `'cpu'`; `'cuda'` → `'cuda:0'`. Throws (E_INVALID_ARGUMENT) for CUDA when it is not available, for an
 * index beyond {@link deviceCount}, and for anything that is not a device name.
 */
export function resolveDevice(d: Device): string {
  if (d === 'cpu') return 'cpu';
  if (d === 'auto') return cudaAvailable() ? 'cuda:0' : 'cpu';
  const m = typeof d === 'string' ? /^cuda(?::(\d+))?$/.exec(d) : null;
  if (!m) throw invalid(`invalid device '${String(d)}' (expected 'cpu', 'cuda', 'cuda:N' or 'auto')`);
  const index = m[1] === undefined ? 0 : Number(m[1]);
  const n = deviceCount();
  if (n === 0) {
    throw invalid(`device '${d}' requested but CUDA is not available (libtorch ${libtorchVersion()}` +
      `${nativeBuildInfo().cuda ? '' : ', addon built without CUDA'}); use 'cpu' or 'auto'`);
  }
  if (index >= n) throw invalid(`device '${d}' requested but only ${n} CUDA device(s) are available (cuda:0..cuda:${n - 1})`);
  return `cuda:${index}`;
}

/**
 * Sets libtorch's intra-op thread count for every later call (each torch thread applies it before its next
 * job; OpenMP's per-thread setting, never libtorch's global reset while work runs). Set on load to the
 * core count unless OMP_NUM_THREADS is set. `n` must be an integer from 1 to {@link maxThreads}
 * (E_INVALID_ARGUMENT otherwise); when the process cannot start that many threads (a thread limit) it
 * throws E_LIMIT_EXCEEDED and the setting is unchanged.
 */
export function setNumThreads(n: number): void {
  const max = maxThreads();
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > max) {
    throw invalid(`setNumThreads(n): n must be an integer from 1 to ${max}, got ${String(n)}`);
  }
  native(() => addon().setNumThreads(n));
}

/** The largest intra-op thread count {@link setNumThreads} accepts: max(256, 4 × hardware threads). */
export function maxThreads(): number {
  return native(() => addon().maxThreads());
}

/** libtorch's intra-op thread count. */
export function getNumThreads(): number {
  return native(() => addon().getNumThreads());
}

/**
 * Turns TorchScript's graph-executor optimisation (profiling and shape specialisation) on or off for
 * every later call. Off by default: for these models it brings no warm-call speed-up on the CPU, while
 * the first two calls of each new input shape run up to ~2× slower. `DIFFUSION_FEATURES_JIT_OPTIMIZE=1`
 * turns it on at load.
 */
export function setJitOptimize(on: boolean): void {
  if (typeof on !== 'boolean') throw invalid(`setJitOptimize(on): on must be a boolean, got ${String(on)}`);
  native(() => addon().setJitOptimize(on));
}

/** Whether TorchScript graph-executor optimisation is on (see {@link setJitOptimize}). */
export function getJitOptimize(): boolean {
  return native(() => addon().getJitOptimize());
}

/** State of the addon's caching CPU allocator (see {@link emptyCpuCache}). */
export interface CpuCacheInfo {
  /** False when turned off with `DIFFUSION_FEATURES_CPU_CACHE_MB=0`. */
  enabled: boolean;
  /** Most bytes of free blocks kept for reuse (default 4 GiB; `DIFFUSION_FEATURES_CPU_CACHE_MB`). */
  limitBytes: number;
  /** Bytes of free blocks held for reuse now. */
  cachedBytes: number;
  /** Bytes of cached-size blocks handed out and not yet freed. */
  inUseBytes: number;
  /** Large allocations served from the cache. */
  hits: number;
  /** Large allocations that went to the system. */
  misses: number;
}

/**
 * The caching CPU allocator. CPU tensors of 1 MiB or more are allocated through it: freed blocks are
 * kept (by size class) and handed out again, so the activations of a large model are not page-faulted
 * and zero-filled by the system on every forward (the SD1.5 VAE encoder at 512 px ran about 1.7×
 * faster on 2 cores). The process therefore keeps up to `limitBytes` of freed memory; see
 * {@link emptyCpuCache} and {@link setCpuCacheLimit}.
 */
export function cpuCache(): CpuCacheInfo {
  return native(() => addon().cpuCache());
}

/** Returns every cached free block to the system and gives the number of bytes released. */
export function emptyCpuCache(): number {
  return native(() => addon().emptyCpuCache());
}

/** Sets the most bytes of free blocks the CPU cache keeps (0: keep none); frees what is above it. */
export function setCpuCacheLimit(bytes: number): void {
  if (typeof bytes !== 'number' || !Number.isSafeInteger(bytes) || bytes < 0) {
    throw invalid(`setCpuCacheLimit(bytes): bytes must be a non-negative integer, got ${String(bytes)}`);
  }
  native(() => addon().setCpuCacheLimit(bytes));
}

/** The libtorch version the addon was compiled against (e.g. '1.13.0'). */
export function libtorchVersion(): string {
  return native(() => addon().libtorchVersion());
}

// ------------------------------------------------------------------------------------------ Tensor
const DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'uint8', 'bool'];

/** @internal (lib/native/module.ts) */
export function checkDType(dtype: DType | undefined, what: string): RawDType | null {
  if (dtype === undefined) return null;
  if (!DTYPES.includes(dtype)) throw invalid(`${what}: unknown dtype '${String(dtype)}' (expected ${DTYPES.join(', ')})`);
  return dtype;
}

function checkShape(shape: readonly number[], length: number, what: string): number[] {
  if (!Array.isArray(shape) || shape.some((s) => !Number.isInteger(s) || s < 0)) {
    throw invalid(`${what}: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
  }
  const n = shape.reduce((a, b) => a * b, 1);
  if (length >= 0 && n !== length) throw invalid(`${what}: data has ${length} elements but shape [${shape.join(', ')}] needs ${n}`);
  return [...shape];
}

const tensorRegistry = new FinalizationRegistry<RawTensor>((raw) => {
  try {
    raw.dispose();
  } catch {
    /* already gone */
  }
});

let wrapTensor: (raw: RawTensor) => Tensor;
let rawTensorOf: (t: Tensor, what: string) => RawTensor;

/**
 * A handle on one libtorch tensor (CPU or CUDA). Tensors are immutable from JS except through the
 * zero-copy view of {@link Tensor.toFloat32Array}. Release with {@link Tensor.dispose} (or `using`).
 */
export class Tensor {
  #raw: RawTensor | null;
  #shape: number[] | undefined;
  #dtype: DType | undefined;
  #device: string | undefined;

  static {
    wrapTensor = (raw) => new Tensor(raw);
    rawTensorOf = (t, what) => {
      if (!(t instanceof Tensor)) throw invalid(`${what} must be a Tensor`);
      if (t.#raw === null) throw new NativeError('E_DISPOSED', `${what}: Tensor has been disposed (use after dispose())`);
      return t.#raw;
    };
  }

  private constructor(raw: RawTensor) {
    this.#raw = raw;
    tensorRegistry.register(this, raw, this);
  }

  #live(what: string): RawTensor {
    if (this.#raw === null) throw new NativeError('E_DISPOSED', `Tensor.${what}: Tensor has been disposed (use after dispose())`);
    return this.#raw;
  }

  /** A new CPU float32 tensor holding a copy of `data` (later changes to `data` are not seen by the tensor). */
  static fromFloat32Array(data: Float32Array, shape: readonly number[]): Tensor {
    if (!(data instanceof Float32Array)) throw invalid('Tensor.fromFloat32Array(data): data must be a Float32Array');
    const s = checkShape(shape, data.length, 'Tensor.fromFloat32Array');
    return new Tensor(native(() => addon().RawTensor.fromTypedArray(data, s, 'float32')));
  }

  /** A new CPU int64 tensor (copy). Plain numbers must be safe integers. */
  static fromInt64Array(data: BigInt64Array | readonly number[], shape: readonly number[]): Tensor {
    let arr: BigInt64Array;
    if (data instanceof BigInt64Array) arr = data;
    else if (Array.isArray(data)) {
      arr = new BigInt64Array(data.length);
      data.forEach((v, i) => {
        if (!Number.isSafeInteger(v)) throw invalid(`Tensor.fromInt64Array: element ${i} (${v}) is not a safe integer`);
        arr[i] = BigInt(v);
      });
    } else throw invalid('Tensor.fromInt64Array(data): data must be a BigInt64Array or an array of integers');
    const s = checkShape(shape, arr.length, 'Tensor.fromInt64Array');
    return new Tensor(native(() => addon().RawTensor.fromTypedArray(arr, s, 'int64')));
  }

  /** A new CPU int32 tensor (copy). */
  static fromInt32Array(data: Int32Array, shape: readonly number[]): Tensor {
    if (!(data instanceof Int32Array)) throw invalid('Tensor.fromInt32Array(data): data must be an Int32Array');
    const s = checkShape(shape, data.length, 'Tensor.fromInt32Array');
    return new Tensor(native(() => addon().RawTensor.fromTypedArray(data, s, 'int32')));
  }

  /** A new CPU uint8 tensor (copy), e.g. H×W×3 image bytes. */
  static fromUint8Array(data: Uint8Array, shape: readonly number[]): Tensor {
    if (!(data instanceof Uint8Array)) throw invalid('Tensor.fromUint8Array(data): data must be a Uint8Array');
    const s = checkShape(shape, data.length, 'Tensor.fromUint8Array');
    return new Tensor(native(() => addon().RawTensor.fromTypedArray(data, s, 'uint8')));
  }

  /**
   * Standard-normal samples drawn from a CPU generator seeded with `seed` (float32), then moved to
   * `device`/`dtype`: the same seed gives the same values on every device (as `torch.randn(..., generator=
   * torch.Generator().manual_seed(seed))` in Python).
   */
  static async randn(shape: readonly number[], opts: { seed: bigint | number; device?: Device; dtype?: DType }): Promise<Tensor> {
    const s = checkShape(shape, -1, 'Tensor.randn');
    const seed = opts?.seed;
    if (typeof seed === 'number' ? !Number.isSafeInteger(seed) || seed < 0 : typeof seed !== 'bigint' || seed < 0n) {
      throw invalid(`Tensor.randn: seed must be a non-negative integer or bigint, got ${String(seed)}`);
    }
    const device = resolveDevice(opts.device ?? 'cpu');
    const dtype = checkDType(opts.dtype, 'Tensor.randn');
    return new Tensor(await nativeAsync(() => addon().RawTensor.randn(s, BigInt(seed), device, dtype)));
  }

  /** Sizes of the dimensions. */
  get shape(): number[] {
    this.#shape ??= native(() => this.#live('shape').shape());
    return [...this.#shape];
  }

  /** Element type. */
  get dtype(): DType {
    this.#dtype ??= native(() => this.#live('dtype').dtype()) as DType;
    return this.#dtype;
  }

  /** Device name, e.g. 'cpu' or 'cuda:0'. */
  get device(): string {
    this.#device ??= native(() => this.#live('device').device());
    return this.#device;
  }

  /** Whether {@link Tensor.dispose} was called. */
  get disposed(): boolean {
    return this.#raw === null;
  }

  /** Number of elements. */
  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /**
   * A tensor on `device` with element type `dtype` (default: unchanged), computed off the JS thread.
   * When nothing changes the result shares this tensor's storage (it is still a separate handle).
   */
  async to(device: Device, dtype?: DType): Promise<Tensor> {
    const raw = this.#live('to');
    const dev = resolveDevice(device);
    const dt = checkDType(dtype, 'Tensor.to');
    return new Tensor(await nativeAsync(() => raw.to(dev, dt)));
  }

  /**
   * The elements as a Float32Array (row-major). For a CPU float32 contiguous tensor this is a zero-copy
   * view over the tensor's own memory: writes through it change the tensor, and the memory stays valid
   * as long as the view is reachable, even after {@link Tensor.dispose}. Any other tensor (another dtype,
   * non-contiguous, CUDA through pinned host memory) is converted once and the result handed over the
   * same way. Where the runtime forbids external buffers (e.g. Electron) the data is copied once.
   */
  toFloat32Array(): Float32Array {
    const raw = this.#live('toFloat32Array');
    return native(() => raw.toFloat32Array());
  }

  /** The elements as plain numbers (row-major; bool → 0/1; int64 beyond 2^53 loses precision). For small tensors. */
  toArray(): number[] {
    const raw = this.#live('toArray');
    return native(() => raw.toArray());
  }

  /** Whether this tensor and `other` start at the same memory (alias check, mainly for tests). */
  sharesMemoryWith(other: Tensor): boolean {
    const raw = this.#live('sharesMemoryWith');
    return native(() => raw.sameStorage(rawTensorOf(other, 'sharesMemoryWith(other)')));
  }

  /** Releases this handle's reference to the tensor memory. Idempotent. Later use throws (E_DISPOSED). */
  dispose(): void {
    if (this.#raw === null) return;
    tensorRegistry.unregister(this);
    const raw = this.#raw;
    this.#raw = null;
    raw.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** @internal */
  toString(): string {
    return this.#raw === null ? 'Tensor(disposed)' : `Tensor(${this.dtype}[${this.shape.join(', ')}] on ${this.device})`;
  }
}

/** @internal (lib/native/module.ts): wraps a raw tensor handle of a result. */
export function tensorFromRaw(raw: RawTensor): Tensor {
  return wrapTensor(raw);
}
/** @internal (lib/native/module.ts): the live raw handle of a Tensor argument (E_DISPOSED when gone). */
export function rawOfTensor(t: Tensor, what: string): RawTensor {
  return rawTensorOf(t, what);
}

export { ScriptModule, type ParameterInfo } from './native/module.js';
