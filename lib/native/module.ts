/**
 * TorchScript modules over the addon: {@link ScriptModule}, and the conversion of call arguments and results
 * (JS values <-> TorchScript IValues, bounded: depth, cycles, list length). Split from lib/native.ts, which
 * re-exports it.
 *
 * @module
 */
import type { RawAddon as Addon, RawModule, RawTensor } from '../../binding/index.cjs';
import { AbortError } from '../errors.js';
import {
  type DType,
  type Device,
  type IValue,
  NativeError,
  Tensor,
  abortable,
  addon,
  checkDType,
  invalid,
  native,
  nativeAsync,
  rawOfTensor,
  resolveDevice,
  tensorFromRaw,
} from '../native.js';

// ------------------------------------------------------------------------------------------ values
/** Deepest nesting of arrays/objects accepted in call() arguments (TorchScript types are far shallower). */
const MAX_ARG_DEPTH = 64;
/** Longest array accepted in call() arguments (a sparse array may claim 2^32 - 1 elements). */
const MAX_LIST_LENGTH = 2 ** 24;

/** `ancestors`: the arrays/objects being converted above `v` (a repeat is a cycle). */
function toRawArgs(v: IValue, where: string, A: Addon, ancestors: object[] = []): unknown {
  if (v instanceof Tensor) return rawOfTensor(v, where);
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
  if (v instanceof (A.RawTensor as unknown as new () => RawTensor)) return tensorFromRaw(v as RawTensor);
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
    return tensorFromRaw(await nativeAsync(() => raw.getParameter(name)));
  }

  /**
   * Copies `value` into the parameter (or buffer) `name` in place (converted to the parameter's dtype and
   * device, without autograd). The shape must match exactly; unknown names reject with E_NOT_FOUND.
   * Serialized with the module's other calls.
   */
  async setParameter(name: string, value: Tensor): Promise<void> {
    const raw = this.#live('setParameter');
    const v = rawOfTensor(value, `setParameter('${name}', value): value`);
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
