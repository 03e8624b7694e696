/**
 * Tests of the native layer (src/ + binding/ + lib/native.ts) against small TorchScript modules built by
 * test/fixtures/native/make_modules.py (run with a Python that has torch, into test/.cache/native/).
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import {
  ScriptModule, Tensor, cpuCache, cudaAvailable, emptyCpuCache, setCpuCacheLimit, deviceCount, getNumThreads, libtorchVersion, maxThreads,
  resolveDevice, setNumThreads, type IValue,
} from '../lib/native.js';
import { ensureNativeFixtures, root } from './lifecycle/fixtures.js';

const require = createRequire(import.meta.url);
const cache = ensureNativeFixtures();
const ref = JSON.parse(readFileSync(join(cache, 'reference.json'), 'utf8')) as {
  conv_input: number[]; conv_output: number[]; conv_output_shape: number[]; randn_seed42: number[];
};
const path = (name: string) => join(cache, name);

let conv: ScriptModule;
let values: ScriptModule;
let dicts: ScriptModule;
test.before(async () => {
  [conv, values, dicts] = await Promise.all([ScriptModule.load(path('conv.pt')), ScriptModule.load(path('values.pt')),
    ScriptModule.load(path('dicts.pt'))]);
});

const f32 = (...xs: number[]) => Tensor.fromFloat32Array(new Float32Array(xs), [xs.length]);
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-5) =>
  a.length === b.length && Array.from(a).every((x, i) => Math.abs(x - b[i]!) <= tol * Math.max(1, Math.abs(b[i]!)));
async function rejects(t: import('ava').ExecutionContext, p: Promise<unknown> | (() => unknown), re: RegExp, code?: string) {
  const e = typeof p === 'function' ? t.throws(p as () => unknown) : await t.throwsAsync(p);
  t.regex(e?.message ?? '', re);
  if (code) t.is((e as { code?: string } | undefined)?.code, code);
  t.notRegex(e?.message ?? '', /Exception raised from|frame #/);
  return e;
}

// ------------------------------------------------------------------------------------------ devices
test.serial('setNumThreads reaches the worker threads', async (t) => {
  const raw = require('../binding/index.cjs').load() as import('../binding/index.cjs').RawAddon;
  const before = getNumThreads();
  setNumThreads(1);
  t.deepEqual(await Promise.all([1, 2, 3, 4, 5].map(() => raw.workerNumThreads())), [1, 1, 1, 1, 1]);
  setNumThreads(2);
  t.is(await raw.workerNumThreads(), 2);
  setNumThreads(before);
});

test('libtorch version, devices, threads', (t) => {
  t.regex(libtorchVersion(), /^\d+\.\d+\.\d+/);
  t.is(typeof cudaAvailable(), 'boolean');
  const n = deviceCount();
  t.is(resolveDevice('auto'), n > 0 ? 'cuda:0' : 'cpu');
  t.is(resolveDevice('cpu'), 'cpu');
  t.throws(() => resolveDevice(`cuda:${n + 2}` as 'cuda:0'), { message: /cuda:\d+.*(not available|only \d+ CUDA)/ });
  t.throws(() => resolveDevice('gpu' as 'cpu'), { message: /invalid device 'gpu'/ });
  if (n > 0) t.is(resolveDevice('cuda'), 'cuda:0');
  const before = getNumThreads();
  setNumThreads(1);
  t.is(getNumThreads(), 1);
  setNumThreads(before);
  t.throws(() => setNumThreads(0), { message: /integer from 1 to/ });
});

// ------------------------------------------------------------------------------------------ tensors
test('tensor factories and metadata', (t) => {
  const a = Tensor.fromFloat32Array(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
  t.deepEqual(a.shape, [2, 3]);
  t.is(a.dtype, 'float32');
  t.is(a.device, 'cpu');
  t.deepEqual(Array.from(a.toFloat32Array()), [1, 2, 3, 4, 5, 6]);
  const b = Tensor.fromInt64Array([1, -2, 2 ** 40], [3]);
  t.is(b.dtype, 'int64');
  t.deepEqual(b.toArray(), [1, -2, 2 ** 40]);
  t.deepEqual(Tensor.fromInt64Array(new BigInt64Array([5n, 6n]), [1, 2]).toArray(), [5, 6]);
  const c = Tensor.fromInt32Array(new Int32Array([7, -8]), [2]);
  t.is(c.dtype, 'int32');
  t.deepEqual(c.toArray(), [7, -8]);
  const d = Tensor.fromUint8Array(new Uint8Array([0, 255, 128]), [1, 3]);
  t.is(d.dtype, 'uint8');
  t.deepEqual(d.toArray(), [0, 255, 128]);
  t.deepEqual(Array.from(d.toFloat32Array()), [0, 255, 128]); // converted once
  const e = Tensor.fromFloat32Array(new Float32Array(0), [0, 4]);
  t.deepEqual(e.shape, [0, 4]);
  t.is(e.toFloat32Array().length, 0);
  t.throws(() => Tensor.fromFloat32Array(new Float32Array(5), [2, 3]), { message: /5 elements but shape \[2, 3\] needs 6/ });
  t.throws(() => Tensor.fromInt64Array([1.5], [1]), { message: /not a safe integer/ });
  t.throws(() => Tensor.fromFloat32Array([1, 2] as unknown as Float32Array, [2]), { message: /Float32Array/ });
  // fromFloat32Array copies: later writes to the source are not seen
  const src = new Float32Array([1, 2]);
  const g = Tensor.fromFloat32Array(src, [2]);
  src[0] = 99;
  t.is(g.toFloat32Array()[0], 1);
});

test('to(): dtype and device conversion', async (t) => {
  const a = f32(1.5, -2.25, 3);
  const h = await a.to('cpu', 'float16');
  t.is(h.dtype, 'float16');
  t.deepEqual(h.toArray(), [1.5, -2.25, 3]);
  t.deepEqual(Array.from(h.toFloat32Array()), [1.5, -2.25, 3]);
  const i = await a.to('cpu', 'int64');
  t.deepEqual(i.toArray(), [1, -2, 3]);
  const bf = await a.to('auto', 'bfloat16');
  t.is(bf.dtype, 'bfloat16');
  t.deepEqual((await bf.to('cpu', 'float32')).toArray(), [1.5, -2.25, 3]);
  await rejects(t, a.to('cpu', 'complex' as 'float32'), /unknown dtype 'complex'/);
});

test('randn: seeded CPU generator, same values as Python torch', async (t) => {
  const a = await Tensor.randn([2, 3], { seed: 42 });
  const b = await Tensor.randn([2, 3], { seed: 42n });
  const c = await Tensor.randn([2, 3], { seed: 43 });
  t.true(close(a.toFloat32Array(), ref.randn_seed42, 1e-6));
  t.deepEqual(Array.from(a.toFloat32Array()), Array.from(b.toFloat32Array()));
  t.false(close(a.toFloat32Array(), c.toFloat32Array()));
  const d = await Tensor.randn([2, 3], { seed: 42, dtype: 'float64', device: 'auto' });
  t.is(d.dtype, 'float64');
  t.true(close(d.toArray(), ref.randn_seed42, 1e-6));
  await rejects(t, Tensor.randn([2], { seed: -1 }), /seed must be a non-negative integer/);
});

test('zero-copy: two views of one tensor share memory', (t) => {
  const a = f32(1, 2, 3, 4);
  const v1 = a.toFloat32Array();
  const v2 = a.toFloat32Array();
  v1[2] = 42;
  t.is(v2[2], 42);
  t.is(a.toArray()[2], 42); // the tensor itself changed
  a.dispose();
  // the views keep the memory alive after dispose
  v2[0] = 7;
  t.is(v1[0], 7);
  t.throws(() => a.toFloat32Array(), { message: /disposed/ });
});

test('zero-copy: a forward returning its input aliases it', async (t) => {
  const x = f32(1, 2, 3);
  const y = (await values.forward(x)) as Tensor;
  t.not(y, x);
  t.true(y.sharesMemoryWith(x));
  const vx = x.toFloat32Array();
  const vy = y.toFloat32Array();
  vx[1] = -5;
  t.is(vy[1], -5);
  x.dispose();
  t.is(y.toArray()[1], -5); // y still holds the storage
});

test('non-contiguous and converted tensors are handed over once', async (t) => {
  const m = Tensor.fromFloat32Array(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
  const tr = (await values.call('first_tensor', [m])) as Tensor;
  t.true(tr.sharesMemoryWith(m));
  const d = await m.to('cpu', 'float64');
  const v = d.toFloat32Array();
  v[0] = 100; // a converted copy: the float64 tensor is unchanged
  t.is(d.toArray()[0], 1);
});

// ------------------------------------------------------------------------------------------ conversions
test('conv net matches Python torch', async (t) => {
  const x = Tensor.fromFloat32Array(new Float32Array(ref.conv_input), [1, 3, 5, 5]);
  const y = (await conv.forward(x)) as Tensor;
  t.deepEqual(y.shape, ref.conv_output_shape);
  t.true(close(y.toFloat32Array(), ref.conv_output, 1e-5));
});

test('ints vs floats follow the schema', async (t) => {
  t.is(await values.call('int_div', 7, 2), 3);
  t.is(await values.call('float_div', 7, 2), 3.5);
  t.deepEqual(await values.call('kinds', 3, 3), [6, 6]);
  t.is(await values.call('int_div', 7n as unknown as number, 2), 3);
  await rejects(t, values.call('int_div', 1.5, 2), /int_div\(\) argument 1 'a' expects int, got number 1\.5.*not an integer/, 'E_INVALID_ARGUMENT');
  t.is(await values.call('list_floats', [1, 2, 0.5]), 3.5);
});

test('scalars, strings, bools', async (t) => {
  t.is(await values.call('strings', 'héllo', 3), 'héllo:3:HéLLO');
  t.is(await values.call('bools', true), false);
  t.is(await values.call('bools', false), true);
  await rejects(t, values.call('bools', 1), /expects bool, got number 1/);
  await rejects(t, values.call('strings', 5, 3), /argument 1 's' expects str, got number/);
});

test('optional arguments and defaults', async (t) => {
  const x = f32(1, 2);
  t.deepEqual(((await values.call('optional', x)) as Tensor).toArray(), [2, 4]);
  t.deepEqual(((await values.call('optional', x, null)) as Tensor).toArray(), [2, 4]);
  t.deepEqual(((await values.call('optional', x, undefined, 3)) as Tensor).toArray(), [3, 6]);
  t.deepEqual(((await values.call('optional', x, f32(10, 20))) as Tensor).toArray(), [12, 24]);
  t.deepEqual(((await values.call('optional', x, f32(1, 1), 0.5)) as Tensor).toArray(), [1.5, 2]);
  t.is(await values.call('opt_int', null), -1);
  t.is(await values.call('opt_int', 4), 5);
  t.is(await values.call('returns_none'), null);
  t.is(values.signature('optional'), 'optional(x: Tensor, bias: Optional[Tensor] = None, scale: float = 2.) -> Tensor');
});

test('lists: first element kept, empty lists, tensors, strings, nesting', async (t) => {
  t.deepEqual(await values.call('list_ints', [5, 6, 7]), [5, 6, 7]);
  t.deepEqual(await values.call('list_ints', [9]), [9]);
  t.is(await values.call('first_int', [11, 12]), 11);
  t.deepEqual(await values.call('list_ints', []), []);
  t.deepEqual(await values.call('empty_list'), []);
  t.is(await values.call('count', []), 0);
  const outs = (await values.call('list_tensors', [f32(1), f32(2, 3)])) as Tensor[];
  t.is(outs.length, 2);
  t.deepEqual(outs.map((o) => o.toArray()), [[2], [3, 4]]);
  const a = f32(4, 5);
  t.true(((await values.call('first_tensor', [a, f32(0)])) as Tensor).sharesMemoryWith(a));
  t.is(await values.call('list_strs', ['a', 'b', 'c']), 'a,b,c');
  t.deepEqual(await values.call('nested_lists', [[1, 2], [], [3]]), [[10, 20], [], [30]]);
  await rejects(t, values.call('list_ints', [1, 'x']), /list_ints\(\) argument 1 'xs'\[1\] expects int, got string/);
  await rejects(t, values.call('list_ints', 3), /expects List\[int\], got number/);
});

test('dicts in and out: insertion order, nested list of dicts', async (t) => {
  const out = (await dicts.forward({ zeta: f32(1, 2), alpha: f32(3) }, 2)) as Record<string, Tensor>;
  t.deepEqual(Object.keys(out), ['zeta', 'alpha', 'total']);
  t.deepEqual(out.zeta!.toArray(), [2, 4]);
  t.deepEqual(out.alpha!.toArray(), [6]);
  t.deepEqual(out.total!.toArray(), [6]);
  t.deepEqual(await values.call('dict_order', { b: 1, a: 2, c: 3 }), { b: 1, a: 2, c: 3 });
  t.deepEqual(Object.keys((await values.call('dict_order', { b: 1, a: 2, c: 3 })) as object), ['b', 'a', 'c']);
  t.deepEqual(await values.call('dict_keys', { y: 1, x: 2.5 }), ['y', 'x']);
  t.deepEqual(await values.call('dict_order', {}), {});
  const nested = (await values.call('nested_dicts', [{ a: f32(1) }, {}, { b: f32(2), c: f32(3) }])) as Record<string, Tensor>[];
  t.is(nested.length, 3);
  t.deepEqual(nested.map((d) => Object.fromEntries(Object.entries(d).map(([k, v]) => [k, v.toArray()]))),
    [{ a: [2] }, {}, { b: [4], c: [6] }]);
  await rejects(t, dicts.forward({ a: 1 } as IValue, 2), /forward\(\) argument 1 'd'\['a'\] expects Tensor, got number 1/);
  await rejects(t, dicts.forward([f32(1)], 2), /expects Dict\[str, Tensor\], got array/);
});

test('tuples in and out, mixed results', async (t) => {
  t.is(await values.call('tuple_in', [3, 0.25, 'z']), '3|0.25|z');
  await rejects(t, values.call('tuple_in', [3, 0.25]), /expects Tuple\[int, float, str\].*array of 3/);
  const r = (await values.call('mixed', f32(1))) as IValue[];
  t.is(r.length, 8);
  t.deepEqual((r[0] as Tensor).toArray(), [2]);
  t.deepEqual(r.slice(1), [3, 0.5, true, 'ok', [1, 2, 3], { b: 2.5, a: 1 }, null]);
  t.deepEqual(Object.keys(r[6] as object), ['b', 'a']);
});

test('method other than forward; methods() and signature()', async (t) => {
  const ms = conv.methods();
  t.true(ms.includes('forward'));
  t.true(ms.includes('slow'));
  t.is(conv.signature(), 'forward(x: Tensor) -> Tensor');
  const x = await Tensor.randn([4, 4], { seed: 1 });
  t.deepEqual(((await conv.call('slow', x, 2)) as Tensor).shape, [4, 4]);
  await rejects(t, conv.call('nope'), /has no method 'nope' \(methods: .*forward/, 'E_INVALID_ARGUMENT');
});

// ------------------------------------------------------------------------------------------ errors
test('missing file and corrupt file', async (t) => {
  const missing = path('does-not-exist.pt');
  const e1 = await rejects(t, ScriptModule.load(missing), /file not found/, 'E_FILE_NOT_FOUND');
  t.true(e1!.message.includes(missing));
  const corrupt = path('corrupt.pt');
  writeFileSync(corrupt, randomBytes(4096));
  const e2 = await rejects(t, ScriptModule.load(corrupt), /not a loadable TorchScript file/, 'E_INVALID_FILE');
  t.true(e2!.message.includes(corrupt));
  await rejects(t, ScriptModule.load(path('conv.pt'), { device: 'tpu' as 'cpu' }), /invalid device 'tpu'/);
});

test('wrong shapes, wrong dtypes, wrong argument counts', async (t) => {
  const bad = await Tensor.randn([1, 4, 8, 8], { seed: 0 });
  const e = await rejects(t, conv.forward(bad), /channels/, 'E_TORCH');
  t.regex(e!.message, /\[1, 4, 8, 8\]/);
  const u8 = Tensor.fromUint8Array(new Uint8Array(3 * 25), [1, 3, 5, 5]);
  await rejects(t, conv.forward(u8), /(Byte|unsigned char|dtype|scalar type)/i, 'E_TORCH');
  await rejects(t, values.call('embed', f32(0, 1)), /(Long|Int|indices|scalar type)/i, 'E_TORCH');
  t.deepEqual(((await values.call('embed', Tensor.fromInt64Array([1], [1]))) as Tensor).toArray(), [3, 4, 5]);
  await rejects(t, conv.forward(), /forward\(\) takes 1 argument\(s\) but 0 were given; expected forward\(x: Tensor\) -> Tensor/);
  await rejects(t, conv.forward(bad, bad), /takes 1 argument\(s\) but 2 were given/);
  await rejects(t, values.call('optional'), /takes 1 to 3 argument\(s\) but 0 were given/);
  await rejects(t, conv.forward(3), /argument 1 'x' expects Tensor, got number 3/);
  await rejects(t, conv.forward(new Float32Array(3) as unknown as IValue), /typed array must be wrapped in a Tensor/);
});

test('use after dispose throws clearly', async (t) => {
  const m = await ScriptModule.load(path('values.pt'));
  const x = f32(1);
  x.dispose();
  x.dispose(); // idempotent
  t.true(x.disposed);
  t.throws(() => x.shape, { message: /disposed/ });
  t.throws(() => x.toArray(), { message: /disposed/ });
  await rejects(t, x.to('cpu'), /disposed/, 'E_DISPOSED');
  await rejects(t, m.forward(x), /argument 1.*disposed/, 'E_DISPOSED');
  await rejects(t, m.call('list_tensors', [f32(1), x]), /\[1\].*disposed/, 'E_DISPOSED');
  m.dispose();
  t.true(m.disposed);
  await rejects(t, m.forward(f32(1)), /ScriptModule.call: module has been disposed/, 'E_DISPOSED');
  t.throws(() => m.methods(), { message: /disposed/ });
});

test('a call in flight survives dispose of its module and inputs', async (t) => {
  const m = await ScriptModule.load(path('conv.pt'));
  const x = await Tensor.randn([200, 200], { seed: 2 });
  const p = m.call('slow', x, 5);
  m.dispose();
  x.dispose();
  t.deepEqual(((await p) as Tensor).shape, [200, 200]);
});

// ------------------------------------------------------------------------------------------ parameters
test('parameters, buffers, dtype casting of floating tensors only', async (t) => {
  const ps = conv.parameters();
  t.deepEqual(ps.map((p) => p.name), ['conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias']);
  t.deepEqual(ps[0], { name: 'conv1.weight', shape: [8, 3, 3, 3], dtype: 'float32' });
  t.deepEqual(conv.buffers(), [{ name: 'scale', shape: [1], dtype: 'float32' }, { name: 'steps', shape: [1], dtype: 'int64' }]);
  t.is(conv.device, 'cpu');
  t.is(conv.dtype, 'float32');
  const m64 = await ScriptModule.load(path('conv.pt'), { dtype: 'float64' });
  t.is(m64.dtype, 'float64');
  t.is(m64.parameters()[0]!.dtype, 'float64');
  t.deepEqual(m64.buffers().map((b) => b.dtype), ['float64', 'int64']);
  const x = Tensor.fromFloat32Array(new Float32Array(ref.conv_input), [1, 3, 5, 5]);
  const y = (await m64.forward(await x.to('cpu', 'float64'))) as Tensor;
  t.is(y.dtype, 'float64');
  t.true(close(y.toArray(), ref.conv_output, 1e-5));
  m64.dispose();
});

test('getParameter / setParameter roundtrip and errors', async (t) => {
  const m = await ScriptModule.load(path('conv.pt'));
  const b = await m.getParameter('conv2.bias');
  t.deepEqual(b.shape, [4]);
  const orig = b.toArray();
  b.toFloat32Array()[0] = 1000; // a copy: the module is unchanged
  t.deepEqual((await m.getParameter('conv2.bias')).toArray(), orig);
  const x = Tensor.fromFloat32Array(new Float32Array(ref.conv_input), [1, 3, 5, 5]);
  const y0 = ((await m.forward(x)) as Tensor).toArray();
  await m.setParameter('conv2.bias', Tensor.fromFloat32Array(new Float32Array([1, 2, 3, 4]), [4]));
  t.deepEqual((await m.getParameter('conv2.bias')).toArray(), [1, 2, 3, 4]);
  const y1 = ((await m.forward(x)) as Tensor).toArray();
  // output channel c moved by 2 * (new_bias - old_bias) (the module multiplies by scale = 2)
  t.true(close(y1.slice(0, 25).map((v, i) => v - y0[i]!), new Array(25).fill(2 * (1 - orig[0]!)), 1e-4));
  // dtype converted to the parameter's
  await m.setParameter('conv2.bias', await Tensor.fromFloat32Array(new Float32Array([5, 6, 7, 8]), [4]).to('cpu', 'float64'));
  const nb = await m.getParameter('conv2.bias');
  t.is(nb.dtype, 'float32');
  t.deepEqual(nb.toArray(), [5, 6, 7, 8]);
  await m.setParameter('scale', f32(3)); // buffers too
  t.deepEqual((await m.getParameter('scale')).toArray(), [3]);
  await rejects(t, m.setParameter('conv2.bias', f32(1, 2)), /setParameter\('conv2.bias'\): shape mismatch: parameter is \[4\], value is \[2\]/, 'E_INVALID_ARGUMENT');
  await rejects(t, m.setParameter('conv9.weight', f32(1)), /no parameter or buffer named 'conv9.weight'/, 'E_NOT_FOUND');
  await rejects(t, m.getParameter('nope'), /named 'nope'/, 'E_NOT_FOUND');
  await rejects(t, m.setParameter('conv2.bias', [1, 2, 3, 4] as unknown as Tensor), /value must be a Tensor/);
  m.dispose();
});

// ------------------------------------------------------------------------------------------ concurrency
test.serial('the event loop keeps ticking during a long forward', async (t) => {
  // One intra-op thread leaves the second core to the event loop on a 2-core machine.
  const threadsBefore = getNumThreads();
  setNumThreads(1);
  t.teardown(() => setNumThreads(threadsBefore));
  const x = await Tensor.randn([256, 256], { seed: 5 });
  // warm up the TorchScript profiling executor, then calibrate
  for (let i = 0; i < 3; i++) await conv.call('slow', x, 10);
  let n = 50;
  let start = performance.now();
  await conv.call('slow', x, n);
  const per = (performance.now() - start) / n;
  n = Math.max(10, Math.round(1200 / Math.max(per, 0.01)));
  let lags: number[] = [];
  let took = 0;
  // the machine may be shared: lengthen the call until it really takes a while
  for (let attempt = 0; attempt < 4 && took < 500; attempt++, n *= 2) {
    lags = [];
    let last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      lags.push(now - last - 10);
      last = now;
    }, 10);
    start = performance.now();
    await conv.call('slow', x, n);
    took = performance.now() - start;
    clearInterval(timer);
  }
  lags.sort((a, b) => a - b);
  const p95 = lags[Math.floor(lags.length * 0.95)] ?? Infinity;
  const max = lags[lags.length - 1] ?? Infinity;
  t.log(`forward ${took.toFixed(0)} ms, ${lags.length} ticks, p95 lag ${p95.toFixed(1)} ms, max lag ${max.toFixed(1)} ms`);
  t.true(took > 300, `forward too short to be meaningful (${took} ms)`);
  // A blocked loop would show no ticks and one lag as long as the call.
  t.true(lags.length > took / 10 / 3, `only ${lags.length} ticks in ${took} ms`);
  t.true(p95 < 100, `event loop p95 lag ${p95} ms`);
  t.true(max < took / 2, `event loop stalled for ${max} ms of a ${took} ms call`);
});

test.serial('concurrent forwards on one module all resolve correctly', async (t) => {
  const inputs = await Promise.all(Array.from({ length: 16 }, (_, i) => Tensor.randn([1, 3, 6, 6], { seed: i })));
  const sequential: Float32Array[] = [];
  for (const x of inputs) sequential.push(((await conv.forward(x)) as Tensor).toFloat32Array());
  const concurrent = (await Promise.all(inputs.map((x) => conv.forward(x)))) as Tensor[];
  concurrent.forEach((y, i) => t.deepEqual(Array.from(y.toFloat32Array()), Array.from(sequential[i]!)));
  // mixed methods and parameter updates interleaved on the same module stay consistent
  const m = await ScriptModule.load(path('conv.pt'));
  const ops = [m.forward(inputs[0]!), m.setParameter('scale', f32(4)), m.forward(inputs[0]!)];
  const [a, , b] = (await Promise.all(ops)) as Tensor[];
  t.true(close(b!.toArray(), a!.toArray().map((v) => v * 2), 1e-4));
  m.dispose();
});

test.serial('1,000 sequential forwards without RSS growth', async (t) => {
  const gc = (globalThis as { gc?: () => void }).gc;
  const x = await Tensor.randn([1, 3, 16, 16], { seed: 9 });
  const once = async () => {
    const y = (await conv.forward(x)) as Tensor;
    const v = y.toFloat32Array();
    if (!(v.length === 4 * 16 * 16)) throw new Error('bad length');
    y.dispose();
    const r = (await values.call('mixed', x)) as IValue[];
    (r[0] as Tensor).dispose();
  };
  for (let i = 0; i < 200; i++) await once();
  gc?.();
  const before = process.memoryUsage().rss;
  for (let i = 0; i < 1000; i++) await once();
  gc?.();
  await new Promise((r) => setTimeout(r, 50));
  const growth = (process.memoryUsage().rss - before) / 2 ** 20;
  t.log(`RSS growth over 1000 forwards: ${growth.toFixed(1)} MB`);
  t.true(growth < 50, `RSS grew ${growth} MB`);
});

// ------------------------------------------------------------------------------------------ CUDA (when present)
const cudaTest = cudaAvailable() ? test.serial : test.skip;

cudaTest('CUDA: tensors move both ways, randn matches the CPU, toFloat32Array through pinned memory', async (t) => {
  const a = f32(1, 2, 3, 4);
  const g = await a.to('cuda', 'float16');
  t.is(g.device, 'cuda:0');
  t.is(g.dtype, 'float16');
  t.deepEqual(Array.from(g.toFloat32Array()), [1, 2, 3, 4]);
  t.deepEqual(g.toArray(), [1, 2, 3, 4]);
  const back = await g.to('cpu', 'float32');
  t.is(back.device, 'cpu');
  t.deepEqual(back.toArray(), [1, 2, 3, 4]);
  const rc = await Tensor.randn([2, 3], { seed: 42, device: 'cuda' });
  t.is(rc.device, 'cuda:0');
  t.true(close(rc.toFloat32Array(), ref.randn_seed42, 1e-6));
  t.throws(() => resolveDevice(`cuda:${deviceCount()}` as 'cuda:0'), { message: /only \d+ CUDA device/ });
});

cudaTest('CUDA: module on the GPU, float16, parameters', async (t) => {
  const m = await ScriptModule.load(path('conv.pt'), { device: 'cuda', dtype: 'float16' });
  t.is(m.device, 'cuda:0');
  t.is(m.dtype, 'float16');
  t.deepEqual(m.buffers().map((b) => b.dtype), ['float16', 'int64']);
  const x = await Tensor.fromFloat32Array(new Float32Array(ref.conv_input), [1, 3, 5, 5]).to('cuda', 'float16');
  const y = (await m.forward(x)) as Tensor;
  t.is(y.device, 'cuda:0');
  t.true(close(y.toFloat32Array(), ref.conv_output, 2e-2));
  const p = await m.getParameter('conv2.bias');
  t.is(p.device, 'cuda:0');
  await m.setParameter('conv2.bias', Tensor.fromFloat32Array(new Float32Array([1, 2, 3, 4]), [4])); // CPU float32 → CUDA float16
  t.deepEqual((await m.getParameter('conv2.bias')).toArray(), [1, 2, 3, 4]);
  const outs = (await Promise.all(Array.from({ length: 8 }, () => m.forward(x)))) as Tensor[];
  const first = outs[0]!.toArray();
  for (const o of outs) t.deepEqual(o.toArray(), first);
  m.dispose();
});

// ------------------------------------------------------------------------------------------ loader
test('loader: a binary that cannot load is reported, naming the missing library, without crashing', (t) => {
  const binding = require('../binding/index.cjs') as typeof import('../binding/index.cjs');
  const dir = join(cache, 'loader');
  mkdirSync(dir, { recursive: true });
  // garbage bytes
  const junk = join(dir, 'junk.node');
  writeFileSync(junk, randomBytes(2048));
  const v1 = binding.testLoad(junk);
  t.false(v1.ok);
  t.regex((v1 as { reason: string }).reason, /junk\.node/);
  // a shared object that needs a library which is gone
  const cc = spawnSync('cc', ['--version']).status === 0 ? 'cc' : null;
  if (!cc) return t.log('no C compiler: missing-library case skipped');
  writeFileSync(join(dir, 'dep.c'), 'int df_dep(void) { return 1; }\n');
  writeFileSync(join(dir, 'addon.c'), 'int df_dep(void);\nint df_use(void) { return df_dep(); }\n');
  const dep = join(dir, 'libdfgone.so');
  t.is(spawnSync(cc, ['-shared', '-fPIC', '-o', dep, join(dir, 'dep.c')]).status, 0);
  const broken = join(dir, 'broken.node');
  t.is(spawnSync(cc, ['-shared', '-fPIC', '-o', broken, join(dir, 'addon.c'), `-L${dir}`, '-ldfgone', '-Wl,--no-as-needed']).status, 0);
  rmSync(dep);
  const v2 = binding.testLoad(broken);
  t.false(v2.ok);
  t.regex((v2 as { reason: string }).reason, /missing shared library libdfgone\.so \(needed by .*broken\.node\).*libtorch/);
  // the verdict is cached
  t.is(binding.testLoad(broken), v2);
});

test.serial('setJitOptimize toggles the graph executor and keeps results identical', async (t) => {
  const { setJitOptimize, getJitOptimize } = await import('../lib/native.js');
  t.false(getJitOptimize());
  t.throws(() => setJitOptimize('yes' as unknown as boolean), { message: /boolean/ });
  const { ScriptModule: SM, Tensor: T } = await import('../lib/native.js');
  const ops = await SM.load(join(import.meta.dirname, '..', 'models', 'ops.pt'));
  const x = await T.randn([2, 3, 8, 8], { seed: 3 });
  const run = async () => {
    const r = (await ops.call('package', [x, x])) as Awaited<ReturnType<typeof T.randn>>;
    const v = Array.from(r.toFloat32Array());
    r.dispose();
    return v;
  };
  const off = await run();
  setJitOptimize(true);
  try {
    t.true(getJitOptimize());
    t.deepEqual(await run(), off);
    t.deepEqual(await run(), off);
  } finally {
    setJitOptimize(false);
  }
  x.dispose();
  ops.dispose();
});

test.serial('the caching CPU allocator reuses large blocks, keeps values right, and can be emptied or limited', async (t) => {
  t.true(cpuCache().enabled);
  emptyCpuCache();
  const before = cpuCache();
  t.is(before.cachedBytes, 0);
  const shape = [1, 1024, 1024]; // 4 MiB of float32: above the 1 MiB threshold
  // (no toFloat32Array before a dispose here: a zero-copy view keeps the block alive until GC)
  const a = await Tensor.randn(shape, { seed: 7 });
  t.true(cpuCache().misses > before.misses);
  a.dispose();
  const afterFree = cpuCache();
  t.true(afterFree.cachedBytes >= 4 << 20, `cached ${afterFree.cachedBytes}`);
  // the freed block is handed out again, and the values written into it are the right ones
  const b = await Tensor.randn(shape, { seed: 7 });
  t.true(cpuCache().hits > afterFree.hits);
  const c = await Tensor.randn(shape, { seed: 7 }); // a second live block of the same class: fresh memory
  t.deepEqual(b.toFloat32Array(), c.toFloat32Array());
  t.true(cpuCache().inUseBytes >= 8 << 20);
  b.dispose();
  c.dispose();
  for (let i = 0; i < 3; i++) {
    (globalThis as { gc?: () => void }).gc?.();
    await new Promise((r) => setTimeout(r, 20));
  }
  t.true(emptyCpuCache() >= 8 << 20);
  t.is(cpuCache().cachedBytes, 0);
  // limit 0: freed blocks go straight back to the system
  const limit = cpuCache().limitBytes;
  setCpuCacheLimit(0);
  try {
    (await Tensor.randn(shape, { seed: 1 })).dispose();
    t.is(cpuCache().cachedBytes, 0);
  } finally {
    setCpuCacheLimit(limit);
  }
  t.is(cpuCache().limitBytes, limit);
  t.throws(() => setCpuCacheLimit(-1), { message: /non-negative integer/ });
  t.throws(() => setCpuCacheLimit(1.5), { message: /non-negative integer/ });
  // small tensors bypass the cache
  const s0 = cpuCache();
  (await Tensor.randn([16], { seed: 1 })).dispose();
  t.is(cpuCache().hits + cpuCache().misses, s0.hits + s0.misses);
  // DIFFUSION_FEATURES_CPU_CACHE_MB=0 turns it off (and sets the limit when a number)
  const probe = (mb: string): { enabled: boolean; limitBytes: number } => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e',
      `const n = await import(${JSON.stringify(join(root, 'lib', 'native.ts'))}); console.log(JSON.stringify(n.cpuCache()));`],
    { env: { ...process.env, DIFFUSION_FEATURES_CPU_CACHE_MB: mb }, encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { enabled: boolean; limitBytes: number };
  };
  t.false(probe('0').enabled);
  t.deepEqual(probe('64'), { ...probe('64'), enabled: true, limitBytes: 64 << 20 });
});

// ------------------------------------------------------------------------------------------ hostile input (issue 10)
const rawAddon = () => require('../binding/index.cjs').load() as import('../binding/index.cjs').RawAddon & {
  maxThreads(): number; workerStats(): { queued: number; running: number };
};
async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
    return 'ok';
  } catch (e) {
    return String((e as { code?: string }).code);
  }
}

test.serial('setNumThreads: bounded to 1..maxThreads(), never wraps, the raw addon checks too', async (t) => {
  const before = getNumThreads();
  const max = maxThreads();
  t.true(max >= 256, `maxThreads ${max}`);
  const raw = rawAddon();
  for (const bad of [0, -1, 1.5, NaN, Infinity, -Infinity, 2 ** 31, 2 ** 32 + 2, -(2 ** 31), max + 1, 1e300, '4', null]) {
    const e = t.throws(() => setNumThreads(bad as number));
    t.is((e as { code?: string }).code, 'E_INVALID_ARGUMENT', String(bad));
    t.regex(e!.message, new RegExp(`integer from 1 to ${max}`));
    // 2^31 and 2^32 + 2 used to wrap to negative / small counts in the addon itself
    const r = t.throws(() => raw.setNumThreads(bad as number));
    t.is((r as { code?: string }).code, 'E_INVALID_ARGUMENT', `raw ${String(bad)}`);
  }
  t.is(getNumThreads(), before);
  setNumThreads(1);
  t.is(await raw.workerNumThreads(), 1);
  setNumThreads(before);
  t.is(await raw.workerNumThreads(), before);
});

test('int arguments: 1e300, NaN, Infinity and unsafe integers are errors, not INT64_MIN', async (t) => {
  for (const bad of [1e300, -1e300, NaN, Infinity, -Infinity, 2 ** 53, -(2 ** 63), 2 ** 64]) {
    const e = await rejects(t, values.call('int_div', bad, 1), /int_div\(\) argument 1 'a' expects int, got number/, 'E_INVALID_ARGUMENT');
    t.regex(e!.message, /not an integer|not a safe integer/);
  }
  t.is(await values.call('int_div', 2 ** 53 - 1, 1), 2 ** 53 - 1);
  t.is(await values.call('int_div', -(2 ** 53 - 1), 1), -(2 ** 53 - 1));
  t.is(await values.call('int_div', 2n ** 62n as unknown as number, 2n ** 61n as unknown as number), 2);
  await rejects(t, values.call('int_div', 2n ** 64n as unknown as number, 1), /does not fit in int64/, 'E_INVALID_ARGUMENT');
  await rejects(t, values.call('list_ints', [1, 1e300]), /'xs'\[1\] expects int.*not a safe integer/, 'E_INVALID_ARGUMENT');
  await rejects(t, values.call('opt_int', NaN), /expects int, got number NaN/, 'E_INVALID_ARGUMENT');
});

test('float arguments: NaN and infinities are refused, large finite values pass', async (t) => {
  for (const bad of [NaN, Infinity, -Infinity]) {
    await rejects(t, values.call('float_div', bad, 2), /float_div\(\) argument 1 'a' expects float.*not a finite number/, 'E_INVALID_ARGUMENT');
    await rejects(t, values.call('list_floats', [1, bad]), /'xs'\[1\] expects float.*not a finite number/, 'E_INVALID_ARGUMENT');
  }
  t.is(await values.call('float_div', 3e38, 1), 3e38);
  await rejects(t, values.call('float_div', 2n ** 70n as unknown as number, 1), /does not fit in int64/, 'E_INVALID_ARGUMENT');
});

test('shapes: huge, fractional or overflowing sizes are clear errors; allocation failure is E_OUT_OF_MEMORY', async (t) => {
  const raw = rawAddon();
  for (const shape of [[1e300], [2 ** 53], [-1], [1.5], [NaN]]) {
    t.is(await codeOf(() => raw.RawTensor.randn(shape, 0n, 'cpu', null)), 'E_INVALID_ARGUMENT', JSON.stringify(shape));
  }
  // more elements than int64 can count: refused before any arithmetic overflows
  t.is(await codeOf(() => raw.RawTensor.randn([2 ** 40, 2 ** 40], 0n, 'cpu', null)), 'E_OUT_OF_MEMORY');
  // 2^58 bytes: the allocator refuses it (no size arithmetic may wrap into a small block)
  const e = await t.throwsAsync(Tensor.randn([2 ** 28, 2 ** 28], { seed: 0 }));
  t.is((e as { code?: string }).code, 'E_OUT_OF_MEMORY');
  t.regex(e!.message, /out of memory/);
  t.notRegex(e!.message, /Exception raised from|frame #/);
  // the process still works
  t.deepEqual((await Tensor.randn([2], { seed: 42 })).shape, [2]);
});

test('cyclic or absurdly deep call() arguments give a typed error, not a stack overflow', async (t) => {
  const cyc: IValue[] = [1];
  cyc.push(cyc);
  await rejects(t, values.call('nested_lists', cyc), /contains itself/, 'E_INVALID_ARGUMENT');
  const obj: { [k: string]: IValue } = { a: f32(1) };
  obj.self = obj;
  await rejects(t, dicts.forward(obj, 2), /\['self'\].*contains itself/, 'E_INVALID_ARGUMENT');
  let deep: IValue = [1];
  for (let i = 0; i < 100_000; i++) deep = [deep];
  await rejects(t, values.call('nested_lists', deep), /nested more than 64 levels/, 'E_INVALID_ARGUMENT');
  // a shared (non-cyclic) sub-array is fine
  const row = [1, 2];
  t.deepEqual(await values.call('nested_lists', [row, row]), [[10, 20], [10, 20]]);
  // the raw addon bounds a sparse array's claimed length
  const sparse: number[] = [];
  sparse.length = 2 ** 32 - 1;
  await rejects(t, values.call('list_ints', sparse), /longer than the \d+ accepted/, 'E_LIMIT_EXCEEDED');
  const rawValues = await rawAddon().loadModule(path('values.pt'), 'cpu', null);
  t.is(await codeOf(() => rawValues.call('list_ints', [sparse])), 'E_LIMIT_EXCEEDED');
  rawValues.dispose();
});

test.serial('a queued call whose signal aborts rejects at once and never runs', async (t) => {
  const threadsBefore = getNumThreads();
  setNumThreads(1);
  t.teardown(() => setNumThreads(threadsBefore));
  const m = await ScriptModule.load(path('conv.pt'));
  const x = await Tensor.randn([256, 256], { seed: 5 });
  await m.invoke('slow', [x, 2]);
  // calibrate a call of ~1 s
  let n = 20;
  let start = performance.now();
  await m.invoke('slow', [x, n]);
  n = Math.max(20, Math.round((n * 1000) / Math.max(1, performance.now() - start)));
  start = performance.now();
  const first = m.invoke('slow', [x, n]);
  const ac = new AbortController();
  const queued = m.invoke('slow', [x, n], { signal: ac.signal });
  setTimeout(() => ac.abort(new Error('user pressed stop')), 50);
  const e = await t.throwsAsync(queued);
  const rejectedAfter = performance.now() - start;
  t.is(e!.name, 'AbortError');
  t.is((e as { code?: string }).code, 'E_ABORTED');
  t.is((e as { cause?: Error }).cause?.message, 'user pressed stop');
  await first;
  const firstTook = performance.now() - start;
  t.true(rejectedAfter < firstTook / 2, `the aborted call rejected after ${rejectedAfter} ms, the running one took ${firstTook} ms`);
  // the aborted call was dropped from the module's queue: the next call does not wait for it
  const t0 = performance.now();
  await m.forward(await Tensor.randn([1, 3, 4, 4], { seed: 1 }));
  const nextTook = performance.now() - t0;
  t.log(`running call ${firstTook.toFixed(0)} ms, abort rejected after ${rejectedAfter.toFixed(0)} ms, next call ${nextTook.toFixed(0)} ms`);
  t.true(nextTook < firstTook / 2, `the next call took ${nextTook} ms: the aborted one ran`);
  t.is(rawAddon().workerStats().queued, 0);
  // an already-aborted signal rejects before anything is queued; a bad signal is a typed error
  await rejects(t, m.invoke('forward', [x], { signal: AbortSignal.abort() }), /aborted/, 'E_ABORTED');
  await rejects(t, m.invoke('forward', [x], { signal: {} as AbortSignal }), /signal must be an AbortSignal/, 'E_INVALID_ARGUMENT');
  await rejects(t, ScriptModule.load(path('conv.pt'), { signal: AbortSignal.abort() }), /aborted/, 'E_ABORTED');
  m.dispose();
});

test('disposed tensors and modules: E_DISPOSED from the raw addon too', async (t) => {
  const raw = rawAddon();
  const m = await raw.loadModule(path('values.pt'), 'cpu', null);
  const x = raw.RawTensor.fromTypedArray(new Float32Array([1]), [1], 'float32');
  x.dispose();
  t.is(await codeOf(() => m.call('forward', [x])), 'E_DISPOSED');
  t.is(await codeOf(() => m.call('list_tensors', [[x]])), 'E_DISPOSED');
  t.is(await codeOf(() => x.to('cpu', null)), 'E_DISPOSED');
  m.dispose();
  t.is(await codeOf(() => m.call('forward', [raw.RawTensor.fromTypedArray(new Float32Array([1]), [1], 'float32')])), 'E_DISPOSED');
  t.is(await codeOf(() => m.getParameter('x')), 'E_DISPOSED');
});

test('an allocation failure inside a TorchScript method is E_OUT_OF_MEMORY, and the process goes on', async (t) => {
  const ops = await ScriptModule.load(join(root, 'models', 'ops.pt'));
  const x = await Tensor.randn([1, 1024], { seed: 0 });
  // 2^40 copies of 4 KiB: the allocator is asked for 4 PiB inside the interpreter
  const e = await rejects(t, ops.call('repeat_batch', x, 2 ** 40), /out of memory/, 'E_OUT_OF_MEMORY');
  t.regex(e!.message, /repeat_batch\(\)/);
  t.deepEqual(((await ops.call('repeat_batch', x, 2)) as Tensor).shape, [2, 1024]);
  ops.dispose();
});

test("a result dict with the key '__proto__' stays a plain own property (found by the native fuzz target)", async (t) => {
  const out = (await dicts.forward(JSON.parse('{"__proto__": null}') as IValue, 2).catch(() => null));
  t.is(out, null); // a null value is not a Tensor: refused
  const d = Object.create(null) as Record<string, IValue>;
  d['__proto__'] = f32(1, 2);
  const r = (await dicts.forward(d, 3)) as Record<string, Tensor>;
  t.is(Object.getPrototypeOf(r), Object.prototype);
  t.deepEqual(Object.keys(r), ['__proto__', 'total']);
  t.true(Object.prototype.hasOwnProperty.call(r, '__proto__'));
  t.deepEqual(Object.getOwnPropertyDescriptor(r, '__proto__')!.value.toArray(), [3, 6]);
  const raw = rawAddon();
  const rm = await raw.loadModule(path('dicts.pt'), 'cpu', null);
  const arg = Object.fromEntries([['__proto__', raw.RawTensor.fromTypedArray(new Float32Array([1]), [1], 'float32')]]);
  const rr = (await rm.call('forward', [arg, 1])) as object;
  t.is(Object.getPrototypeOf(rr), Object.prototype);
  rm.dispose();
});
