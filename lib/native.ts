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
import type { RawAddon, RawCancelToken, RawDType, RawModule, RawTensor } from '../binding/index.cjs';
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
function addon(): Addon {
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
function native<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw toError(err);
  }
}

async function nativeAsync<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toError(err);
  }
}

function invalid(message: string): NativeError {
  return new NativeError('E_INVALID_ARGUMENT', message);
}

/**
 * Runs native work that accepts a cancel token, tied to `signal`: when the signal aborts, the work is
 * cancelled if it has not started on its torch thread yet (it is then never run), and the promise rejects
 * at once with an {@link AbortError} either way (a result that arrives later is disposed by `discard`).
 */
async function abortable<T>(signal: AbortSignal | undefined, what: string, start: (token: RawCancelToken | null) => Promise<T>,
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

function checkDType(dtype: DType | undefined, what: string): RawDType | null {
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

// ------------------------------------------------------------------------------------------ values
/** Deepest nesting of arrays/objects accepted in call() arguments (TorchScript types are far shallower). */
const MAX_ARG_DEPTH = 64;
/** Longest array accepted in call() arguments (a sparse array may claim 2^32 - 1 elements). */
const MAX_LIST_LENGTH = 2 ** 24;

/** `ancestors`: the arrays/objects being converted above `v` (a repeat is a cycle). */
function toRawArgs(v: IValue, where: string, A: Addon, ancestors: object[] = []): unknown {
  if (v instanceof Tensor) return rawTensorOf(v, where);
  if (v === null || v === undefined) return v;
  if (typeof v === 'function' || typeof v === 'symbol') throw invalid(`${where}: a ${typeof v} cannot be passed to TorchScript`);
  if (typeof v !== 'object') return v;
  if (ancestors.includes(v)) throw invalid(`${where}: the argument contains itself (a cyclic structure cannot be passed to TorchScript)`);
  if (ancestors.length >= MAX_ARG_DEPTH) throw invalid(`${where}: arguments nested more than ${MAX_ARG_DEPTH} levels deep`);
  const inner = [...ancestors, v];
  if (Array.isArray(v) && v.length > MAX_LIST_LENGTH) {
    throw new NativeError('E_LIMIT_EXCEEDED', `${where}: a list of ${v.length} elements is longer than the ${MAX_LIST_LENGTH} accepted`);
  }
  if (Array.isArray(v)) return v.map((x, i) => toRawArgs(x, `${where}[${i}]`, A, inner));
  if (ArrayBuffer.isView(v)) throw invalid(`${where}: a typed array must be wrapped in a Tensor (e.g. Tensor.fromFloat32Array)`);
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    Object.defineProperty(out, k, { value: toRawArgs(x, `${where}['${k}']`, A, inner), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

/** Disposes every tensor inside a result that nobody will receive (an aborted call). */
function disposeResult(v: IValue): void {
  if (v instanceof Tensor) v.dispose();
  else if (Array.isArray(v)) v.forEach(disposeResult);
  else if (v !== null && typeof v === 'object') Object.values(v).forEach(disposeResult);
}

function fromRawResult(v: unknown, A: Addon): IValue {
  if (v === null || v === undefined || typeof v !== 'object') return v as IValue;
  if (v instanceof (A.RawTensor as unknown as new () => RawTensor)) return wrapTensor(v as RawTensor);
  if (Array.isArray(v)) return v.map((x) => fromRawResult(x, A));
  const out: Record<string, IValue> = {};
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    // an own property even for '__proto__' (assignment would replace the result's prototype)
    Object.defineProperty(out, k, { value: fromRawResult(x, A), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

// ------------------------------------------------------------------------------------------ ScriptModule
const moduleRegistry = new FinalizationRegistry<RawModule>((raw) => {
  try {
    raw.dispose();
  } catch {
    /* already gone */
  }
});

/** Description of one parameter or buffer of a {@link ScriptModule}. */
export interface ParameterInfo {
  name: string;
  shape: number[];
  dtype: DType;
}

/**
 * A TorchScript module (a `torch.jit.save` file) loaded into libtorch. Calls run off the JS thread and
 * return Promises; calls on one module are serialized (it is safe to issue them concurrently).
 */
export class ScriptModule {
  #raw: RawModule | null;

  private constructor(raw: RawModule) {
    this.#raw = raw;
    moduleRegistry.register(this, raw, this);
  }

  #live(what: string): RawModule {
    if (this.#raw === null) throw new NativeError('E_DISPOSED', `ScriptModule.${what}: module has been disposed (use after dispose())`);
    return this.#raw;
  }

  /**
   * Loads a TorchScript file onto `device` (default 'cpu'). With `dtype`, floating-point parameters and
   * buffers are cast to it (integer/bool ones keep theirs). The module is put in eval mode; it is not frozen,
   * so parameters stay updatable with {@link ScriptModule.setParameter}.
   * Rejects with E_FILE_NOT_FOUND for a missing file and E_INVALID_FILE for one that is not TorchScript.
   */
  static async load(path: string, opts: { device?: Device; dtype?: DType; signal?: AbortSignal } = {}): Promise<ScriptModule> {
    if (typeof path !== 'string' || path === '') throw invalid('ScriptModule.load(path): path must be a non-empty string');
    const device = resolveDevice(opts.device ?? 'cpu');
    const dtype = checkDType(opts.dtype, 'ScriptModule.load');
    const raw = await abortable(opts.signal, `ScriptModule.load(${path})`, (token) => addon().loadModule(path, device, dtype, token),
      (m) => m.dispose());
    return new ScriptModule(raw);
  }

  /** Calls `forward`. See {@link ScriptModule.call}. */
  forward(...args: IValue[]): Promise<IValue> {
    return this.call('forward', ...args);
  }

  /**
   * Calls method `method` with `args`, converted by the method's TorchScript schema: a JS number becomes an
   * `int` or a `float` as the schema says, arrays become `List[T]` or `Tuple[...]`, plain objects
   * `Dict[str, T]`, null/undefined `None` (for `Optional[T]`); omitted trailing arguments take their
   * defaults. Results: Tensor → {@link Tensor}, int/float → number, bool, str, List/Tuple → array,
   * Dict → object (insertion order), None → null. A wrong argument count or type rejects with a message
   * naming the method and its signature.
   */
  async call(method: string, ...args: IValue[]): Promise<IValue> {
    return this.invoke(method, args);
  }

  /**
   * {@link ScriptModule.call} with the arguments as an array and options. With `signal`, a call still
   * waiting for its turn (calls on one module run one at a time) is dropped when the signal aborts, and
   * the promise rejects at once with an `AbortError` (code E_ABORTED); a call already running finishes in
   * the background and its result is disposed.
   */
  async invoke(method: string, args: readonly IValue[], opts: { signal?: AbortSignal } = {}): Promise<IValue> {
    const raw = this.#live('call');
    if (typeof method !== 'string') throw invalid('ScriptModule.call(method): method must be a string');
    if (!Array.isArray(args)) throw invalid('ScriptModule.invoke(method, args): args must be an array');
    const A = addon();
    const rawArgs = args.map((a, i) => toRawArgs(a, `${method}() argument ${i + 1}`, A));
    return abortable(opts.signal, `${method}()`, async (token) => fromRawResult(await raw.call(method, rawArgs, token), A),
      disposeResult);
  }

  /** Names of the module's methods (e.g. ['forward', 'encode']). */
  methods(): string[] {
    return native(() => this.#live('methods').methods());
  }

  /** The TorchScript signature of `method` (default 'forward'), e.g. "forward(x: Tensor, n: int = 3) -> Tensor". */
  signature(method = 'forward'): string {
    return native(() => this.#live('signature').schema(method));
  }

  /** All parameters (recursively, with dotted names as in the state dict). */
  parameters(): ParameterInfo[] {
    return native(() => this.#live('parameters').parameters()) as ParameterInfo[];
  }

  /** All buffers (recursively, dotted names). */
  buffers(): ParameterInfo[] {
    return native(() => this.#live('buffers').buffers()) as ParameterInfo[];
  }

  /** A copy of the parameter (or buffer) `name`, on the module's device. Rejects with E_NOT_FOUND for an unknown name. */
  async getParameter(name: string): Promise<Tensor> {
    const raw = this.#live('getParameter');
    return wrapTensor(await nativeAsync(() => raw.getParameter(name)));
  }

  /**
   * Copies `value` into the parameter (or buffer) `name` in place (converted to the parameter's dtype and
   * device, without autograd). The shape must match exactly; unknown names reject with E_NOT_FOUND.
   * Serialized with the module's other calls.
   */
  async setParameter(name: string, value: Tensor): Promise<void> {
    const raw = this.#live('setParameter');
    const v = rawTensorOf(value, `setParameter('${name}', value): value`);
    await nativeAsync(() => raw.setParameter(name, v));
  }

  /** The device the module was loaded onto (e.g. 'cpu', 'cuda:0'). */
  get device(): string {
    return native(() => this.#live('device').device());
  }

  /** The requested dtype, else the dtype of its first floating parameter, else null. */
  get dtype(): DType | null {
    return native(() => this.#live('dtype').dtype()) as DType | null;
  }

  /** The file it was loaded from. */
  get path(): string {
    return native(() => this.#live('path').path());
  }

  /** Whether {@link ScriptModule.dispose} was called. */
  get disposed(): boolean {
    return this.#raw === null;
  }

  /** Releases the module (calls already in flight finish first). Idempotent. */
  dispose(): void {
    if (this.#raw === null) return;
    moduleRegistry.unregister(this);
    const raw = this.#raw;
    this.#raw = null;
    raw.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
