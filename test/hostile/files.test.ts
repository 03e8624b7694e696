/**
 * Hostile corpus, part 1: malformed safetensors and npy files, generated from one valid file of each
 * by truncation at many offsets and by header mutations. Every case must give `E_INVALID_FILE` (or
 * the stated code) with a bounded message, from memory and from disk, and never crash or hang.
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { chmod, symlink, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { SafetensorsFile, encodeSafetensors } from '../../lib/io/safetensors.js';
import { decodeNpy, encodeNpy, readNpy } from '../../lib/io/npy.js';
import { readLoraFile } from '../../lib/lora/parse.js';
import { rejectsTyped, scratch, MAX_MESSAGE } from './helpers.js';

const enc = new TextEncoder();

/** A safetensors file from a raw header object and a data section. */
function stFile(header: unknown, data: Uint8Array, lengthOverride?: bigint): Uint8Array {
  const h = enc.encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthOverride ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

const VALID = encodeSafetensors(
  {
    a: { dtype: 'F32', shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6]) },
    b: { dtype: 'F16', shape: [4], data: new Uint16Array([0x3c00, 0x4000, 0x4200, 0x4400]) },
  },
  { format: 'test' },
);
const DATA = new Uint8Array(32); // a: 24 bytes at [0,24), b: 8 bytes at [24,32)
const ok = (over: Record<string, unknown> = {}) => ({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 24] }, b: { dtype: 'F16', shape: [4], data_offsets: [24, 32] }, ...over });

/** Header mutations: [label, header, data?, length prefix override?]. */
const HEADERS: [string, unknown, Uint8Array?, bigint?][] = [
  ['not JSON', '{"a": ', DATA],
  ['JSON array', '[]', DATA],
  ['JSON null', 'null', DATA],
  ['JSON number', '12345', DATA],
  ['JSON string', '"hello"', DATA],
  ['tensor entry is a number', { a: 1 }, DATA],
  ['tensor entry is null', { a: null }, DATA],
  ['unknown dtype F128', ok({ a: { dtype: 'F128', shape: [2, 3], data_offsets: [0, 24] } }), DATA],
  ['lower-case dtype', ok({ a: { dtype: 'f32', shape: [2, 3], data_offsets: [0, 24] } }), DATA],
  ['dtype a number', ok({ a: { dtype: 7, shape: [2, 3], data_offsets: [0, 24] } }), DATA],
  ['dtype missing', ok({ a: { shape: [2, 3], data_offsets: [0, 24] } }), DATA],
  ['negative dim', ok({ a: { dtype: 'F32', shape: [-2, 3], data_offsets: [0, 24] } }), DATA],
  ['fractional dim', ok({ a: { dtype: 'F32', shape: [1.5, 4], data_offsets: [0, 24] } }), DATA],
  ['string dim', ok({ a: { dtype: 'F32', shape: ['2', 3], data_offsets: [0, 24] } }), DATA],
  ['shape null', ok({ a: { dtype: 'F32', shape: null, data_offsets: [0, 24] } }), DATA],
  ['shape object', ok({ a: { dtype: 'F32', shape: {}, data_offsets: [0, 24] } }), DATA],
  ['huge dims overflow', ok({ a: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 24] } }), DATA],
  ['dim 2^53', ok({ a: { dtype: 'F32', shape: [2 ** 53], data_offsets: [0, 24] } }), DATA],
  ['offsets one number', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0] } }), DATA],
  ['offsets three numbers', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 12, 24] } }), DATA],
  ['offsets reversed', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [24, 0] } }), DATA],
  ['negative offset', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [-4, 20] } }), DATA],
  ['offset past the end', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [8, 32] } }), DATA],
  ['offset 1e20', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 1e20] } }), DATA],
  ['string offsets', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: ['0', '24'] } }), DATA],
  ['fractional offsets', ok({ a: { dtype: 'F32', shape: [2, 3], data_offsets: [0.5, 24.5] } }), DATA],
  ['size does not match shape', ok({ a: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 24] } }), DATA],
  ['overlapping tensors', ok({ b: { dtype: 'F16', shape: [4], data_offsets: [16, 24] } }), DATA],
  ['same range twice', ok({ b: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 24] } }), DATA],
  ['data section too short', ok(), DATA.subarray(0, 30)],
  ['metadata an array', ok({ __metadata__: ['x'] }), DATA],
  ['metadata value a number', ok({ __metadata__: { format: 3 } }), DATA],
  ['metadata value an object', ok({ __metadata__: { format: { x: 1 } } }), DATA],
  ['metadata null', ok({ __metadata__: null }), DATA],
  ['length prefix 0', ok(), DATA, 0n],
  ['length prefix 1', ok(), DATA, 1n],
  ['length prefix past the file', ok(), DATA, 1_000_000n],
  ['length prefix 2^63', ok(), DATA, 2n ** 63n],
  ['length prefix 2^64-1', ok(), DATA, 2n ** 64n - 1n],
  ['header with a NUL byte', '{"a":\u0000}', DATA],
  ['invalid UTF-8 header', String.fromCharCode(0x7b, 0xff, 0xfe, 0x7d), DATA],
];

test('safetensors: header mutations are E_INVALID_FILE with a bounded message', async (t) => {
  t.is(SafetensorsFile.fromBuffer(VALID).names().length, 2, 'the base file is valid');
  t.is(SafetensorsFile.fromBuffer(stFile(ok({ __metadata__: { format: 'x' } }), DATA)).names().length, 2, 'the hand-built base is valid');
  for (const [label, header, data, len] of HEADERS) {
    const bytes = label === 'invalid UTF-8 header' ? (() => {
      const h = Uint8Array.from([0x7b, 0xff, 0xfe, 0x7d]);
      const b = new Uint8Array(8 + h.length + DATA.length);
      new DataView(b.buffer).setBigUint64(0, BigInt(h.length), true);
      b.set(h, 8);
      return b;
    })() : stFile(header, data ?? DATA, len);
    await rejectsTyped(t, () => SafetensorsFile.fromBuffer(bytes, label), 'E_INVALID_FILE', `header: ${label}`);
  }
});

test('safetensors: every truncation of a valid file is E_INVALID_FILE (memory and disk)', async (t) => {
  const dir = await scratch(t);
  const offsets = new Set<number>();
  for (let i = 0; i < 24; i++) offsets.add(i);
  for (let i = 24; i < VALID.length; i += Math.max(1, Math.floor(VALID.length / 40))) offsets.add(i);
  offsets.add(VALID.length - 1);
  for (const n of offsets) {
    const bytes = VALID.subarray(0, n);
    await rejectsTyped(t, () => SafetensorsFile.fromBuffer(bytes, `trunc ${n}`), 'E_INVALID_FILE', `truncated to ${n} bytes`);
    if (n % 5 === 0) {
      const f = join(dir, `t${n}.safetensors`);
      await writeFile(f, bytes);
      await rejectsTyped(t, SafetensorsFile.open(f), 'E_INVALID_FILE', `file truncated to ${n} bytes`);
    }
  }
  t.true(offsets.size >= 50);
});

test('safetensors: special files, permissions, huge headers', async (t) => {
  const dir = await scratch(t);
  const fifo = join(dir, 'fifo.safetensors');
  execFileSync('mkfifo', [fifo]);
  await rejectsTyped(t, SafetensorsFile.open(fifo), 'E_INVALID_FILE', 'FIFO (must not block)');
  await symlink('/dev/zero', join(dir, 'zero.safetensors'));
  await rejectsTyped(t, SafetensorsFile.open(join(dir, 'zero.safetensors')), 'E_INVALID_FILE', '/dev/zero');
  await mkdir(join(dir, 'dir.safetensors'));
  await rejectsTyped(t, SafetensorsFile.open(join(dir, 'dir.safetensors')), ['E_INVALID_FILE', 'E_FILE_ACCESS'], 'a folder');
  await rejectsTyped(t, SafetensorsFile.open(join(dir, 'missing.safetensors')), 'E_FILE_NOT_FOUND', 'missing');
  if (process.getuid?.() !== 0) {
    const locked = join(dir, 'locked.safetensors');
    await writeFile(locked, VALID);
    await chmod(locked, 0);
    await rejectsTyped(t, SafetensorsFile.open(locked), 'E_FILE_ACCESS', 'EACCES is not "not found"');
  }
  // 200,000 tensors whose last one is broken: the error stays short
  const many: Record<string, unknown> = {};
  for (let i = 0; i < 200_000; i++) many[`t${i}`] = { dtype: 'F32', shape: [1], data_offsets: [4 * i, 4 * i + 4] };
  many.t199999 = { dtype: 'F32', shape: [1], data_offsets: [0, 4] };
  const e = await rejectsTyped(t, () => SafetensorsFile.fromBuffer(stFile(many, new Uint8Array(800_000)), 'many'), 'E_INVALID_FILE', '200,000 tensors, one overlapping');
  t.true((e?.message.length ?? 0) < MAX_MESSAGE);
});

// ---- npy ----

const NPY = encodeNpy(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);

function npyWith(header: string, dataBytes = 24, version = 1): Uint8Array {
  const h = enc.encode(header);
  const pre = version === 1 ? 10 : 12;
  const out = new Uint8Array(pre + h.length + dataBytes);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, version, 0]);
  const dv = new DataView(out.buffer);
  if (version === 1) dv.setUint16(8, h.length, true);
  else dv.setUint32(8, h.length, true);
  out.set(h, pre);
  return out;
}

const NPY_HEADERS: [string, Uint8Array][] = [
  ['bad magic', Uint8Array.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x5a, 1, 0, 0, 0])],
  ['version 4', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, 4)],
  ['version 0', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, 0)],
  ['big-endian float', npyWith("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }")],
  ['int64', npyWith("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }")],
  ['object dtype', npyWith("{'descr': '|O', 'fortran_order': False, 'shape': (3,), }")],
  ['fortran order', npyWith("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }")],
  ['negative dim', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }")],
  ['fractional dim', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (1.5, 4), }")],
  ['huge shape', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }")],
  ['missing shape', npyWith("{'descr': '<f4', 'fortran_order': False, }")],
  ['missing descr', npyWith("{'fortran_order': False, 'shape': (2, 3), }")],
  ['not a dict', npyWith('hello world')],
  ['too little data', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20)],
  ['too much data', npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 28)],
  ['header past the end (v2)', (() => {
    const b = npyWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0, 2);
    new DataView(b.buffer).setUint32(8, 0xffffffff, true);
    return b;
  })()],
  ['long garbage header (v3)', npyWith('x'.repeat(200_000), 0, 3)],
];

test('npy: header mutations and truncations are E_INVALID_FILE with a bounded message', async (t) => {
  t.deepEqual(decodeNpy(NPY).shape, [2, 3]);
  for (const [label, bytes] of NPY_HEADERS) await rejectsTyped(t, () => decodeNpy(bytes, label), 'E_INVALID_FILE', `npy: ${label}`);
  for (let n = 0; n < NPY.length; n += n < 16 ? 1 : 7) await rejectsTyped(t, () => decodeNpy(NPY.subarray(0, n), `npy ${n}`), 'E_INVALID_FILE', `npy truncated to ${n}`);
  const dir = await scratch(t);
  await rejectsTyped(t, readNpy(join(dir, 'missing.npy')), 'E_FILE_NOT_FOUND', 'npy missing');
});

// ---- LoRA ----

function lora(tensors: Record<string, { shape: number[]; data: Float32Array }>, meta: Record<string, string> = {}): Uint8Array {
  const input: Parameters<typeof encodeSafetensors>[0] = {};
  for (const [k, v] of Object.entries(tensors)) input[k] = { dtype: 'F32', shape: v.shape, data: v.data };
  return encodeSafetensors(input, meta);
}
const KEY = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';
type Tensors = Record<string, { shape: number[]; data: Float32Array }>;
const good = (): Tensors => ({
  [`${KEY}.lora_down.weight`]: { shape: [2, 8], data: new Float32Array(16).fill(0.1) },
  [`${KEY}.lora_up.weight`]: { shape: [8, 2], data: new Float32Array(16).fill(0.1) },
  [`${KEY}.alpha`]: { shape: [], data: new Float32Array([2]) },
});

test('LoRA files: non-finite or absurd factors, bad alpha, bad shapes, truncations are E_INVALID_FILE', async (t) => {
  const dir = await scratch(t);
  const base = join(dir, 'good.safetensors');
  await writeFile(base, lora(good()));
  t.is((await readLoraFile(base)).modules.length, 1, 'the base LoRA parses');
  const cases: [string, Tensors][] = [];
  for (const [name, v] of [['NaN', NaN], ['+Inf', Infinity], ['-Inf', -Infinity], ['3e38', 3e38], ['-3e38', -3e38], ['1e7', 1e7]] as const) {
    for (const part of ['lora_down', 'lora_up'] as const) {
      const g = good();
      g[`${KEY}.${part}.weight`]!.data[3] = v;
      cases.push([`${part} holds ${name}`, g]);
    }
    const g = good();
    g[`${KEY}.alpha`]!.data[0] = v;
    cases.push([`alpha ${name}`, g]);
  }
  const shapes: [string, () => Tensors][] = [
    ['rank mismatch', () => ({ ...good(), [`${KEY}.lora_up.weight`]: { shape: [8, 3], data: new Float32Array(24) } })],
    ['3-D factor', () => ({ ...good(), [`${KEY}.lora_down.weight`]: { shape: [2, 2, 4], data: new Float32Array(16) } })],
    ['missing up', () => { const g = good(); delete (g as Record<string, unknown>)[`${KEY}.lora_up.weight`]; return g; }],
    ['alpha not scalar', () => ({ ...good(), [`${KEY}.alpha`]: { shape: [2], data: new Float32Array([1, 2]) } })],
    ['unknown key', () => ({ ...good(), 'model.diffusion_model.x': { shape: [1], data: new Float32Array(1) } })],
    ['empty file', () => ({})],
  ];
  for (const [label, f] of shapes) cases.push([label, f()]);
  for (const [i, [label, tensors]] of cases.entries()) {
    const f = join(dir, `c${i}.safetensors`);
    await writeFile(f, lora(tensors));
    await rejectsTyped(t, readLoraFile(f), 'E_INVALID_FILE', `LoRA: ${label}`);
  }
  const bytes = lora(good());
  for (const n of [0, 4, 8, 9, 20, 60, bytes.length >> 1, bytes.length - 1]) {
    const f = join(dir, `tr${n}.safetensors`);
    await writeFile(f, bytes.subarray(0, n));
    await rejectsTyped(t, readLoraFile(f), 'E_INVALID_FILE', `LoRA truncated to ${n}`);
  }
  const fifo = join(dir, 'fifo.safetensors');
  execFileSync('mkfifo', [fifo]);
  await rejectsTyped(t, readLoraFile(fifo), 'E_INVALID_FILE', 'LoRA FIFO');
});
