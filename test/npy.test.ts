import test from 'ava';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { decodeNpy, encodeNpy, readNpy, writeNpy } from '../lib/io/npy.js';

const require = createRequire(import.meta.url);
const python: string | null = require('../scripts/python.cjs').findPython();

test('header is v1.0, 64-byte aligned, and round-trips', (t) => {
  for (const shape of [[], [5], [2, 3], [3, 1, 4], [0, 7]]) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n).map((_, i) => i * 0.25 - 1);
    for (const dtype of ['float32', 'float16'] as const) {
      const bytes = encodeNpy(data, shape, dtype);
      t.deepEqual([...bytes.subarray(0, 8)], [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
      const hlen = bytes[8] | (bytes[9] << 8);
      t.is((10 + hlen) % 64, 0);
      t.is(bytes[10 + hlen - 1], 0x0a);
      const back = decodeNpy(bytes);
      t.deepEqual(back.shape, shape);
      t.is(back.dtype, dtype);
      t.deepEqual(back.data, data); // these values are exact in float16
    }
  }
});

test('bad input and corrupt files give clear errors', async (t) => {
  t.throws(() => encodeNpy(new Float32Array(5), [2, 3]), { message: /shape \[2,3\] needs 6 values, got 5/ });
  t.throws(() => encodeNpy(new Float32Array(1), [1], 'int8' as never), { message: /unsupported dtype/ });
  t.throws(() => decodeNpy(new Uint8Array([1, 2, 3]), 'x.npy'), { message: /^x\.npy: invalid \.npy file: missing/ });
  const good = encodeNpy(new Float32Array(6), [2, 3]);
  t.throws(() => decodeNpy(good.subarray(0, good.length - 1), 'y.npy'), { message: /y\.npy: .*data is 23 bytes/ });
  await t.throwsAsync(readNpy('/nonexistent/z.npy'), { message: /z\.npy: cannot read \(ENOENT\)/ });
});

test('writeNpy is atomic and leaves only the target', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'npy-'));
  try {
    const p = join(dir, 'a.npy');
    await writeFile(p, 'old');
    await writeNpy(p, new Float32Array([1, 2]), [2], 'float16');
    t.deepEqual(await readdir(dir), ['a.npy']);
    t.deepEqual([...(await readNpy(p)).data], [1, 2]);
    await t.throwsAsync(writeNpy(join(dir, 'b.npy'), new Float32Array(3), [2]));
    await t.throwsAsync(writeNpy(join(dir, 'missing', 'c.npy'), new Float32Array(2), [2]), { code: 'E_WRITE_FAILED' } as never);
    t.deepEqual(await readdir(dir), ['a.npy']);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

(python ? test : test.skip)('numpy reads what we write (float32 and float16 rounding) and we read numpy files', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'npy-py-'));
  try {
    const vals = new Float32Array(24).map((_, i) => Math.sin(i * 1.7) * 10 ** ((i % 9) - 4));
    await writeNpy(join(dir, 'f32.npy'), vals, [2, 3, 4]);
    await writeNpy(join(dir, 'f16.npy'), vals, [2, 3, 4], 'float16');
    const script = `
import numpy as np, sys, json
d = sys.argv[1]
a = np.load(d + '/f32.npy'); h = np.load(d + '/f16.npy')
ref = np.array(${JSON.stringify([...vals])}, dtype=np.float32).reshape(2, 3, 4)
np.save(d + '/np16.npy', ref.astype(np.float16))
print(json.dumps([a.dtype.str, list(a.shape), bool((a == ref).all()), h.dtype.str, bool((h == ref.astype(np.float16)).all()), a.flags['C_CONTIGUOUS']]))`;
    const r = spawnSync(python!, ['-c', script, dir], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    t.deepEqual(JSON.parse(r.stdout), ['<f4', [2, 3, 4], true, '<f2', true, true]);
    // numpy's own float16 file decodes to the same values as ours
    const ours = await readNpy(join(dir, 'f16.npy'));
    const theirs = decodeNpy(await readFile(join(dir, 'np16.npy')));
    t.deepEqual(theirs.shape, [2, 3, 4]);
    t.deepEqual(theirs.data, ours.data);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
