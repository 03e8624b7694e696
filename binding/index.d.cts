/** Raw surface of the diffusion-features addon (see lib/native.ts for the typed, documented API). */

export type RawDType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

export interface RawTensor {
  shape(): number[];
  dtype(): RawDType;
  device(): string;
  disposed(): boolean;
  /** Resolves to a new handle (may share storage when nothing changes). device must be resolved ('cpu', 'cuda:0'). */
  to(device: string, dtype?: RawDType | null): Promise<RawTensor>;
  /** Zero-copy view for CPU float32 contiguous tensors, else one converted copy handed over the same way. */
  toFloat32Array(): Float32Array;
  toArray(): number[];
  sameStorage(other: RawTensor): boolean;
  dispose(): void;
}

export interface RawTensorStatic {
  /** Copies `data` into a new CPU tensor. Float32Array→float32, Float64Array→float64, BigInt64Array→int64,
   *  Int32Array→int32, Uint8Array→uint8|bool. */
  fromTypedArray(data: Float32Array | Float64Array | BigInt64Array | Int32Array | Uint8Array, shape: readonly number[], dtype: RawDType): RawTensor;
  randn(shape: readonly number[], seed: bigint, device: string, dtype: RawDType | null): Promise<RawTensor>;
  new (...args: never[]): RawTensor;
}

export interface RawParameterInfo { name: string; shape: number[]; dtype: RawDType }

export interface RawModule {
  /** Arguments are converted by the method's TorchScript schema; raw tensors inside results are RawTensor. */
  call(method: string, args: unknown[], cancel?: RawCancelToken | null): Promise<unknown>;
  methods(): string[];
  /** "forward(x: Tensor, n: int = 3) -> Tensor" */
  schema(method?: string): string;
  parameters(): RawParameterInfo[];
  buffers(): RawParameterInfo[];
  getParameter(name: string): Promise<RawTensor>;
  setParameter(name: string, value: RawTensor): Promise<void>;
  device(): string;
  dtype(): RawDType | null;
  path(): string;
  disposed(): boolean;
  dispose(): void;
}

/** An opaque native cancel flag: a queued job whose token is cancelled rejects at once and never runs. */
export type RawCancelToken = { readonly __cancelToken: unique symbol };

export interface RawAddon {
  RawTensor: RawTensorStatic;
  RawModule: { new (...args: never[]): RawModule };
  loadModule(path: string, device: string, dtype: RawDType | null, cancel?: RawCancelToken | null): Promise<RawModule>;
  /** Upper bound of setNumThreads: max(256, 4 x cores). */
  maxThreads(): number;
  createCancelToken(): RawCancelToken;
  cancel(token: RawCancelToken): void;
  /** Torch-thread pool of this env: executors, threads started, jobs queued and running. */
  workerStats(): { executors: number; started: number; queued: number; running: number };
  cudaAvailable(): boolean;
  deviceCount(): number;
  setNumThreads(n: number): void;
  getNumThreads(): number;
  setJitOptimize(on: boolean): void;
  getJitOptimize(): boolean;
  cpuCache(): { enabled: boolean; limitBytes: number; cachedBytes: number; inUseBytes: number; hits: number; misses: number };
  emptyCpuCache(): number;
  setCpuCacheLimit(bytes: number): void;
  /** The thread count seen by a pool thread (where calls run): checks that setNumThreads reaches them. */
  workerNumThreads(): Promise<number>;
  libtorchVersion(): string;
  buildInfo(): { torchVersion: string; cuda: boolean; napiVersion: number; parallel: string };
}

export class NativeLoadError extends Error {
  readonly code: 'E_NATIVE_LOAD';
  readonly reasons: string[];
}

/** A libtorch found at run time (binding/libtorch.cjs). */
export interface LibtorchInfo {
  via: string;
  libDir: string;
  /** e.g. '1.13.0a0', '2.11.0+cu130' */
  version: string;
  /** major.minor, e.g. '1.13' */
  short: string;
  /** 'cpu', 'cu130' (CUDA 13.0), or 'cuda' when the CUDA version is unknown */
  variant: string;
  cudaVersion: string | null;
  libs: Record<string, string>;
  stamp: [string, number, number];
}

export type Verdict = { ok: true; info: { torchVersion: string; cuda: boolean; napiVersion: number; parallel: string } | null } | { ok: false; reason: string };

/** Loads (once per process, after a child-process test load whose verdict is cached on disk) and returns the raw addon. */
export function load(): RawAddon;
/** Path of the loaded binary, or null before load(). */
export function binaryPath(): string | null;
/** What was loaded, or null before load(). ms: time load() took. */
export function loadedInfo(): { file: string; kind: 'env' | 'prebuild' | 'local'; libtorch: LibtorchInfo; ms: number } | null;
/** Files the loader would try, in order. */
export function candidates(): string[];
export function prebuilds(): { file: string; torch: string; variant: string; sourceHash: string | null; meta: Record<string, unknown> }[];
export function testLoad(file: string, lt?: LibtorchInfo | null): Verdict;
export function sourceHash(dir?: string): string | null;
export const libtorch: {
  locate(opts?: { refresh?: boolean }): { found: LibtorchInfo | null; tried: string[]; cached: boolean };
  describe(libDir: string, via: string, prefix: string | null): LibtorchInfo | null;
  label(lt: LibtorchInfo): string;
  cacheDir(): string;
};
