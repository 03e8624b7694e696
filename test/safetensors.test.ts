import test from 'ava';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import {
  SafetensorsFile, encodeSafetensors, writeSafetensors, float32ToFloat16Bits, float32ToBfloat16Bits,
  float16BitsToFloat32, type StTensorInput,
} from '../lib/io/safetensors.js';
import { DiffusionFeaturesError, InvalidFileError } from '../lib/errors.js';

const FIX = join(import.meta.dirname, 'fixtures', 'safetensors');
// dtypes.safetensors / dtypes.json were written by torch (fixtures/safetensors/make_fixture.py).
const expected = JSON.parse(await readFile(join(FIX, 'dtypes.json'), 'utf8')) as Record<string, any>;
const num = (x: number | string) => (x === 'inf' ? Infinity : x === '-inf' ? -Infinity : (x as number));

test('reads every dtype of a torch-written file exactly', async (t) => {
  const f = await SafetensorsFile.open(join(FIX, 'dtypes.safetensors'));
  t.deepEqual(f.metadata, { format: 'pt', note: 'dtype fixture ✓' });
  t.deepEqual(f.names(), ['f32', 'f16', 'bf16', 'f64', 'i64', 'i32', 'i16', 'i8', 'u8', 'bool', 'scalar', 'empty']);
  for (const name of f.names()) {
    const e = expected[name];
    t.deepEqual(f.info(name).shape, e.shape, name);
    const f32 = f.float32(name);
    const f64 = f.float64(name);
    t.is(f32.length, e.float64.length, name);
    for (let i = 0; i < f32.length; i++) {
      t.is(f32[i], num(e.float32[i]), `${name}[${i}] float32`);
      t.is(f64[i], num(e.float64[i]), `${name}[${i}] float64`);
    }
  }
  t.deepEqual([...f.int64('i64')], [0n, 1n, -1n, 2n ** 40n, -(2n ** 50n), 123456789n]);
  t.deepEqual([...f.int64('i8')], [-128n, 127n, 0n, -1n]);
  t.throws(() => f.int64('f16'), { instanceOf: DiffusionFeaturesError, message: /F16, not an integer/ });
  t.throws(() => f.float32('nope'), { message: /dtypes\.safetensors: no tensor named "nope"/ });
  t.false(f.has('nope'));
  t.true(f.has('bf16'));
  t.deepEqual(f.info('f16'), { name: 'f16', dtype: 'F16', shape: [8, 8], begin: 256, end: 384 });
});

test('reads a real reference file (scheduler goldens)', async (t) => {
  const f = await SafetensorsFile.open(join(FIX, 'scheduler.safetensors'));
  t.deepEqual(f.metadata, { format: 'pt' });
  t.deepEqual([...f.int64('plms.timesteps')].map(Number), [61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50]);
  const x = f.float32('add_noise.t1');
  t.deepEqual(f.info('add_noise.t1').shape, [1, 4, 8, 8]);
  t.is(x[0], Math.fround(-0.8685248494148254));
  t.is(x[2], Math.fround(0.9850722551345825));
  const sum = f.float64('add_noise.t1').reduce((a, b) => a + b, 0);
  t.true(Math.abs(sum - -19.63341407943517) < 1e-9);
  // the same bytes through fromBuffer
  const g = SafetensorsFile.fromBuffer(await readFile(join(FIX, 'scheduler.safetensors')), 'sched');
  t.deepEqual(g.names(), f.names());
  t.deepEqual(g.float32('add_noise.t1'), x);
});

test('float32 → float16 / bfloat16 rounding matches torch bit for bit', (t) => {
  const e = expected._to_half;
  const input = (e.in as (number | string)[]).map(num);
  t.deepEqual([...float32ToFloat16Bits(input)], e.f16_bits);
  t.deepEqual([...float32ToBfloat16Bits(input)], e.bf16_bits);
  // every finite half round-trips through float32 and back
  const all = new Uint16Array(65536).map((_, i) => i);
  const back = float32ToFloat16Bits(float16BitsToFloat32(all));
  for (let i = 0; i < 65536; i++) {
    const isNaN = (i & 0x7c00) === 0x7c00 && (i & 0x3ff) !== 0;
    if (!isNaN && back[i] !== i) t.fail(`half ${i} did not round-trip (${back[i]})`);
  }
  t.pass();
});

test('encode → decode round trip, header padded with spaces to 8 bytes', (t) => {
  const tensors: Record<string, StTensorInput> = {
    'a.weight': { dtype: 'F32', shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6.5]) },
    b: { dtype: 'F16', shape: [3], data: float32ToFloat16Bits([0.5, -1, 1024]) },
    c: { dtype: 'I64', shape: [2], data: new BigInt64Array([5n, -9n]) },
    d: { dtype: 'U8', shape: [0], data: new Uint8Array(0) },
  };
  const bytes = encodeSafetensors(tensors, { k: 'v', unicode: 'é' });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  t.is(n % 8, 0);
  const headerText = new TextDecoder().decode(bytes.subarray(8, 8 + n));
  t.regex(headerText, /^\{.*\} *$/s);
  const f = SafetensorsFile.fromBuffer(bytes);
  t.deepEqual(f.metadata, { k: 'v', unicode: 'é' });
  t.deepEqual(f.names(), ['a.weight', 'b', 'c', 'd']);
  t.deepEqual([...f.float32('a.weight')], [1, 2, 3, 4, 5, 6.5]);
  t.deepEqual([...f.float32('b')], [0.5, -1, 1024]);
  t.deepEqual([...f.int64('c')], [5n, -9n]);
  t.is(f.raw('d').length, 0);
  // no metadata → no __metadata__ key
  const plain = encodeSafetensors({ x: tensors.b });
  t.false(new TextDecoder().decode(plain).includes('__metadata__'));
});

test('encode rejects bad input', (t) => {
  t.throws(() => encodeSafetensors({ x: { dtype: 'F32', shape: [3], data: new Float32Array(2) } }), {
    message: /tensor "x": 8 data bytes but shape \[3\] × F32 needs 12/,
  });
  t.throws(() => encodeSafetensors({ x: { dtype: 'F8' as never, shape: [1], data: new Uint8Array(1) } }), {
    message: /unsupported dtype "F8"/,
  });
  t.throws(() => encodeSafetensors({ x: { dtype: 'U8', shape: [-1], data: new Uint8Array(1) } }), { message: /invalid shape/ });
  t.throws(() => encodeSafetensors({}, { a: 3 as never }), { message: /metadata "a" must be a string/ });
});

/** Build a file from a raw header object (no validation) + data bytes. */
function craft(header: unknown, data = new Uint8Array(0), lenOverride?: bigint): Uint8Array {
  const json = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lenOverride ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

test('corrupt buffers give errors naming the source and the problem, never out-of-bounds reads', (t) => {
  const d16 = new Uint8Array(16);
  const cases: [string, Uint8Array, RegExp][] = [
    ['tiny', new Uint8Array(5), /only 5 bytes/],
    ['huge length', craft({}, d16, 1n << 62n), /header length \d+ exceeds the file size/],
    ['length past end', craft({}, d16, 100n), /header length 100 exceeds the file size \(26 bytes\)/],
    ['not json', craft('{not json', d16), /not valid UTF-8 JSON/],
    ['array', craft('[1,2]', d16), /header JSON is not an object/],
    ['null', craft('null', d16), /header JSON is not an object/],
    ['bad dtype', craft({ x: { dtype: 'F8', shape: [1], data_offsets: [0, 1] } }, d16), /tensor "x" has unsupported dtype "F8"/],
    ['bad shape', craft({ x: { dtype: 'U8', shape: [1.5], data_offsets: [0, 1] } }, d16), /invalid shape/],
    ['missing offsets', craft({ x: { dtype: 'U8', shape: [1] } }, d16), /invalid data_offsets/],
    ['negative offset', craft({ x: { dtype: 'U8', shape: [1], data_offsets: [-1, 0] } }, d16), /invalid data_offsets/],
    ['end < begin', craft({ x: { dtype: 'U8', shape: [0], data_offsets: [4, 2] } }, d16), /end < begin/],
    ['outside', craft({ x: { dtype: 'F32', shape: [8], data_offsets: [0, 32] } }, d16), /outside the data section \(16 bytes/],
    ['size mismatch', craft({ x: { dtype: 'F32', shape: [3], data_offsets: [0, 16] } }, d16), /16 bytes but shape \[3\] × F32 needs 12/],
    [
      'overlap',
      craft({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, y: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, d16),
      /"x" and "y" overlap/,
    ],
    ['metadata not object', craft({ __metadata__: [1] }, d16), /__metadata__ is not an object/],
    ['metadata value', craft({ __metadata__: { a: 1 } }, d16), /__metadata__ value for "a" is not a string/],
    ['entry not object', craft({ x: 3 }, d16), /entry "x" is not an object/],
  ];
  for (const [name, buf, re] of cases) {
    const err = t.throws(() => SafetensorsFile.fromBuffer(buf, `crafted-${name}`), { instanceOf: InvalidFileError }, name);
    t.regex(err?.message ?? '', new RegExp(`^crafted-${name}: `), name);
    t.regex(err?.message ?? '', re, name);
  }
  // non-UTF-8 header bytes
  const badUtf8 = craft('{"x":1}');
  badUtf8[9] = 0xff;
  t.throws(() => SafetensorsFile.fromBuffer(badUtf8, 'u'), { message: /u: .*not valid UTF-8 JSON/ });
});

test('open(): missing, truncated and valid files on disk', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'st-test-'));
  try {
    await t.throwsAsync(SafetensorsFile.open(join(dir, 'missing.safetensors')), {
      code: 'E_FILE_NOT_FOUND', message: /missing\.safetensors: file not found/,
    } as never);
    const good = encodeSafetensors({ x: { dtype: 'F32', shape: [4], data: new Float32Array([1, 2, 3, 4]) } });
    await writeFile(join(dir, 'trunc.safetensors'), good.subarray(0, good.length - 3));
    await t.throwsAsync(SafetensorsFile.open(join(dir, 'trunc.safetensors')), {
      message: /trunc\.safetensors: .*outside the data section/,
    });
    await writeFile(join(dir, 'empty.safetensors'), new Uint8Array(0));
    await t.throwsAsync(SafetensorsFile.open(join(dir, 'empty.safetensors')), { message: /empty\.safetensors: .*only 0 bytes/ });
    await writeFile(join(dir, 'headonly.safetensors'), good.subarray(0, 12));
    await t.throwsAsync(SafetensorsFile.open(join(dir, 'headonly.safetensors')), { message: /headonly\.safetensors: .*exceeds the file size/ });
    await t.throwsAsync(SafetensorsFile.open(dir), { message: /not a regular file/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('writeSafetensors is atomic: replaces the target, leaves no temp file, nothing on failure', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'st-write-'));
  try {
    const p = join(dir, 'out.safetensors');
    const data = new Float32Array(1000).map((_, i) => Math.sin(i));
    await writeSafetensors(p, { feat: { dtype: 'F32', shape: [10, 100], data } }, { preset: 'legacy' });
    await writeSafetensors(p, { feat: { dtype: 'F32', shape: [10, 100], data } }, { preset: 'legacy2' });
    t.deepEqual(await readdir(dir), ['out.safetensors']);
    const f = await SafetensorsFile.open(p);
    t.deepEqual(f.metadata, { preset: 'legacy2' });
    t.deepEqual(f.float32('feat'), data);
    // bad input: throws before writing anything
    await t.throwsAsync(writeSafetensors(join(dir, 'bad.safetensors'), { x: { dtype: 'F32', shape: [5], data } }));
    t.deepEqual(await readdir(dir), ['out.safetensors']);
    // unwritable directory: a write error, no temp file left behind
    await t.throwsAsync(writeSafetensors(join(dir, 'no', 'such', 'dir.safetensors'), {}), { code: 'E_WRITE_FAILED' } as never);
    t.deepEqual(await readdir(dir), ['out.safetensors']);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

const require = createRequire(import.meta.url);
const python: string | null = require('../scripts/python.cjs').findPython();

(python ? test : test.skip)('files we write are read identically by torch (independent reader)', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'st-py-'));
  try {
    const p = join(dir, 'x.safetensors');
    const vals = [0.1, -2, 3.5, 65504, 1e-7, -0];
    await writeSafetensors(p, {
      a: { dtype: 'F32', shape: [2, 3], data: new Float32Array(vals) },
      h: { dtype: 'F16', shape: [6], data: float32ToFloat16Bits(vals) },
      b: { dtype: 'BF16', shape: [6], data: float32ToBfloat16Bits(vals) },
    }, { m: 'x' });
    const script = `
import json, struct, sys, torch
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8+n])
assert n % 8 == 0
D = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16}
out = {'meta': h['__metadata__']}
for k, v in h.items():
    if k == '__metadata__': continue
    s, e = v['data_offsets']
    x = torch.frombuffer(bytearray(b[8+n+s:8+n+e]), dtype=D[v['dtype']]).reshape(v['shape'])
    ref = torch.tensor(${JSON.stringify(vals)}, dtype=torch.float32).to(D[v['dtype']]).reshape(v['shape'])
    out[k] = bool(torch.equal(x, ref))
print(json.dumps(out))`;
    const r = spawnSync(python!, ['-c', script, p], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    t.deepEqual(JSON.parse(r.stdout), { meta: { m: 'x' }, a: true, h: true, b: true });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
