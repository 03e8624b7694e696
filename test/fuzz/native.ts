/**
 * Property-based fuzzing (fast-check) of the native addon's conversion code (src/convert.cc, src/tensor.cc):
 * hostile JS values passed as TorchScript arguments, tensor construction from typed arrays and shapes,
 * and tensor read-back. Property: every call resolves, or rejects/throws an Error with one of the addon's
 * codes and a clean message (no C++ backtrace) — never another exception, a crash or a hang. Each target
 * runs `DF_FUZZ_RUNS` inputs (default 100,000) and prints one JSON line.
 *
 * Run: `npm run fuzz` (with the other targets), or `node --import tsx test/fuzz/native.ts [target…]`.
 * Under AddressSanitizer/UBSan (docs/fuzzing.md): build with `-DDF_SANITIZE=ON` into build-asan and run
 * with `LD_PRELOAD=$(gcc -print-file-name=libasan.so) DIFFUSION_FEATURES_BINARY=build-asan/Release/…`.
 */
import fc from 'fast-check';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import type { RawAddon, RawModule, RawTensor } from '../../binding/index.cjs';
import { ensureNativeFixtures } from '../lifecycle/fixtures.js';

const require = createRequire(import.meta.url);
const RUNS = Number(process.env.DF_FUZZ_RUNS ?? 100_000);
const SEED = Number(process.env.DF_FUZZ_SEED ?? 20261202);
/** Replays one failing case: DF_FUZZ_PATH from a report (with the same seed). */
const REPLAY = process.env.DF_FUZZ_PATH ? { path: process.env.DF_FUZZ_PATH, endOnFailure: true } : {};
const A = require('../../binding/index.cjs').load() as RawAddon;
const dir = ensureNativeFixtures();
const CODES = new Set(['E_INVALID_ARGUMENT', 'E_DISPOSED', 'E_TORCH', 'E_OUT_OF_MEMORY', 'E_LIMIT_EXCEEDED', 'E_NOT_FOUND']);

/** 'ok' or the error's code; throws (a finding) for an error without a known code or with a backtrace. */
async function outcome(fn: () => unknown): Promise<string> {
  try {
    await fn();
    return 'ok';
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    const msg = String((e as Error)?.message);
    if (typeof code !== 'string' || !CODES.has(code)) throw new Error(`untyped error ${String(code)}: ${msg.slice(0, 300)}`);
    if (/Exception raised from|frame #\d/.test(msg)) throw new Error(`backtrace in message: ${msg.slice(0, 300)}`);
    if (msg.length > 20_000) throw new Error(`message of ${msg.length} characters`);
    return code;
  }
}

const live: RawTensor[] = [];
const disposed = A.RawTensor.fromTypedArray(new Float32Array([1]), [1], 'float32');
disposed.dispose();

/** Numbers that break naive int/float conversion. */
const nastyNumber = fc.oneof(
  fc.integer({ min: -5, max: 5 }),
  fc.constantFrom(1e300, -1e300, NaN, Infinity, -Infinity, 2 ** 31, 2 ** 53, 2 ** 53 - 1, -(2 ** 63), 2 ** 64, -0, 0.5, 3e38, Number.MIN_VALUE),
  fc.double(),
);
const nastyBigint = fc.oneof(fc.bigInt({ min: -(2n ** 70n), max: 2n ** 70n }), fc.constantFrom(2n ** 63n, -(2n ** 63n), 2n ** 63n - 1n));
const tensorValue = fc.constantFrom('f1', 'f23', 'i64', 'u8', 'disposed').map((k) => {
  if (k === 'disposed') return disposed;
  const t = k === 'f1' ? A.RawTensor.fromTypedArray(new Float32Array([1]), [1], 'float32')
    : k === 'f23' ? A.RawTensor.fromTypedArray(new Float32Array(6), [2, 3], 'float32')
      : k === 'i64' ? A.RawTensor.fromTypedArray(new BigInt64Array([1n, 2n]), [2], 'int64')
        : A.RawTensor.fromTypedArray(new Uint8Array(3), [3], 'uint8');
  live.push(t);
  return t;
});
const leaf = fc.oneof(nastyNumber, nastyBigint, fc.string({ maxLength: 6 }), fc.boolean(), fc.constantFrom(null, undefined), tensorValue,
  fc.constantFrom(new Float32Array(2), () => 1, Symbol('s')));
const { value: jsValue } = fc.letrec((tie) => ({
  value: fc.oneof({ depthSize: 'small', withCrossShrink: true }, leaf, tie('array'), tie('object')),
  array: fc.array(tie('value'), { maxLength: 4 }),
  object: fc.dictionary(fc.oneof(fc.string({ maxLength: 4 }), fc.constantFrom('__proto__', 'constructor', '0', '-1')), tie('value'), { maxKeys: 3 }),
}));

/** Splits "a: int, b: List[Tuple[int, str]] = []" at its top-level commas. */
function splitTop(s: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let cur = '';
  for (const ch of s) {
    if (ch === '[' || ch === '(') depth++;
    if (ch === ']' || ch === ')') depth--;
    if (ch === ',' && depth === 0) {
      out.push(cur.trim());
      cur = '';
    } else cur += ch;
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}

/** Values of TorchScript type `type`, mostly well-formed, sometimes replaced by an arbitrary hostile value. */
function ofType(type: string): fc.Arbitrary<unknown> {
  const m = /^(\w+)(?:\[(.*)\])?$/.exec(type.trim());
  const [, head, inner] = m ?? [];
  const params = inner ? splitTop(inner) : [];
  let good: fc.Arbitrary<unknown>;
  switch (head) {
    case 'Tensor': good = tensorValue; break;
    case 'int': good = fc.integer({ min: -3, max: 8 }); break;
    case 'float': good = fc.oneof(fc.double({ min: -10, max: 10, noNaN: true }), nastyNumber); break;
    case 'str': good = fc.string({ maxLength: 5 }); break;
    case 'bool': good = fc.boolean(); break;
    case 'Optional': good = fc.oneof(fc.constant(null), ofType(params[0]!)); break;
    case 'List': good = fc.array(ofType(params[0]!), { maxLength: 4 }); break;
    case 'Tuple': good = fc.tuple(...params.map(ofType)); break;
    case 'Dict': good = fc.dictionary(fc.string({ maxLength: 3 }), ofType(params[1]!), { maxKeys: 3 }); break;
    default: good = jsValue;
  }
  return fc.oneof({ weight: 6, arbitrary: good }, { weight: 1, arbitrary: jsValue });
}

/** Argument lists for a method from its signature "name(a: T, b: U = d) -> R": right, short, long or wrong. */
function argsFor(signature: string): fc.Arbitrary<unknown[]> {
  const inner = signature.slice(signature.indexOf('(') + 1, signature.lastIndexOf(') ->'));
  const types = splitTop(inner).map((a) => a.slice(a.indexOf(':') + 1).split(' = ')[0]!.trim());
  return fc.oneof({ weight: 8, arbitrary: fc.tuple(...types.map(ofType)) as fc.Arbitrary<unknown[]> },
    { weight: 1, arbitrary: fc.array(jsValue, { maxLength: 4 }) });
}

type Target = () => Promise<{ target: string; runs: number; seconds: number; outcomes: Record<string, number> }>;
const count = (o: Record<string, number>, k: string) => { o[k] = (o[k] ?? 0) + 1; };

const targets: Record<string, Target> = {
  /** Random values for every argument of every method of the fixture modules (schema-driven conversion). */
  async ivalue() {
    const mods: RawModule[] = await Promise.all(['values.pt', 'dicts.pt', 'conv.pt'].map((f) => A.loadModule(join(dir, f), 'cpu', null)));
    const methods = mods.flatMap((m) => m.methods().filter((n) => n !== 'slow').map((n) => [m, n, argsFor(m.schema(n))] as const));
    const outcomes: Record<string, number> = {};
    const call = fc.nat({ max: methods.length - 1 }).chain((i) => methods[i]![2].map((args) => [i, args] as const));
    await fc.assert(
      fc.asyncProperty(call, async ([i, args]) => {
        const [m, name] = methods[i]!;
        count(outcomes, await outcome(async () => {
          const r = await m.call(name, args);
          disposeAll(r);
        }));
        while (live.length) live.pop()!.dispose();
      }),
      { numRuns: RUNS, seed: SEED, ...REPLAY },
    );
    return { target: 'ivalue', runs: RUNS, seconds: 0, outcomes };
  },

  /** Tensor construction: typed arrays vs shapes and dtypes, seeded randn with hostile shapes, conversions. */
  async tensor() {
    const dtypes = ['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'uint8', 'bool', 'int8', 'complex64', ''];
    const arrays = [Float32Array, Float64Array, Int32Array, Uint8Array, Uint8ClampedArray, Int16Array, BigInt64Array] as const;
    const dim = fc.oneof(fc.integer({ min: 0, max: 4 }), fc.constantFrom(-1, 1.5, NaN, 2 ** 31, 2 ** 53, 1e300, 2 ** 28, 2 ** 40));
    const outcomes: Record<string, number> = {};
    await fc.assert(
      fc.asyncProperty(fc.nat({ max: arrays.length - 1 }), fc.nat({ max: 8 }), fc.array(dim, { maxLength: 4 }),
        fc.constantFrom(...dtypes), fc.constantFrom(...dtypes), async (ai, len, shape, dt, dt2) => {
          const Ctor = arrays[ai]!;
          count(outcomes, 'from:' + await outcome(() => {
            const t = A.RawTensor.fromTypedArray(new Ctor(len) as Float32Array, shape, dt as 'float32');
            t.toArray();
            t.toFloat32Array();
            t.dispose();
          }));
          // randn allocates: only shapes that are tiny, or so large that they are refused before allocating
          const numel = shape.reduce((a, b) => a * (Number.isFinite(b) ? Math.abs(b) : 1), 1);
          if (numel <= 4096 || numel >= 2 ** 56) {
            count(outcomes, 'randn:' + await outcome(async () => {
              const t = await A.RawTensor.randn(shape, 1n, 'cpu', (dt || null) as 'float32' | null);
              const u = await t.to('cpu', (dt2 || null) as 'float32' | null);
              u.toArray();
              t.dispose();
              u.dispose();
            }));
          }
        }),
      { numRuns: RUNS, seed: SEED, ...REPLAY },
    );
    return { target: 'tensor', runs: RUNS, seconds: 0, outcomes };
  },
};

function disposeAll(v: unknown): void {
  if (v instanceof (A.RawTensor as unknown as new () => RawTensor)) (v as RawTensor).dispose();
  else if (Array.isArray(v)) v.forEach(disposeAll);
  else if (v !== null && typeof v === 'object') Object.values(v).forEach(disposeAll);
}

const wanted = process.argv.slice(2);
let failed = false;
for (const [name, run] of Object.entries(targets)) {
  if (wanted.length && !wanted.includes(name)) continue;
  const t0 = performance.now();
  try {
    const r = await run();
    r.seconds = Math.round((performance.now() - t0) / 100) / 10;
    console.log(JSON.stringify(r));
  } catch (e) {
    failed = true;
    console.log(JSON.stringify({ target: `native:${name}`, runs: RUNS, seconds: Math.round((performance.now() - t0) / 100) / 10, failure: `${String((e as Error).message).slice(0, 2000)} | cause: ${String((e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).cause).slice(0, 1000)}` }));
  }
}
process.exitCode = failed ? 1 : 0;
