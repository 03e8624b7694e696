// lib/serve/body.ts: the raw-body reader of `serve` (sized bodies copied chunk by chunk into shared
// memory, chunked bodies joined; fastify's own limit and length errors).
import test from 'ava';
import { Readable } from 'node:stream';
import { readBody } from '../lib/serve/body.js';

const chunks = (n: number, size: number) => Array.from({ length: n }, (_, i) => Buffer.alloc(size, i + 1));

test('a body with a declared length lands in shared memory, byte for byte', async (t) => {
  const parts = chunks(5, 1000);
  const b = await readBody(Readable.from(parts), 5000, 10_000);
  t.true(b.buffer instanceof SharedArrayBuffer);
  t.true(b.equals(Buffer.concat(parts)));
});

test('a chunked body (no length) is joined', async (t) => {
  const parts = chunks(3, 700);
  const b = await readBody(Readable.from(parts), NaN, 10_000);
  t.true(b.equals(Buffer.concat(parts)));
});

test('limits and lengths: 413 before reading, 413 while reading, 400 for a short or long body', async (t) => {
  await t.throwsAsync(readBody(Readable.from(chunks(1, 10)), 20_000, 10_000), { any: true, code: 'FST_ERR_CTP_BODY_TOO_LARGE' });
  await t.throwsAsync(readBody(Readable.from(chunks(20, 1000)), NaN, 10_000), { any: true, code: 'FST_ERR_CTP_BODY_TOO_LARGE' });
  await t.throwsAsync(readBody(Readable.from(chunks(2, 1000)), 3000, 10_000), { any: true, code: 'FST_ERR_CTP_INVALID_CONTENT_LENGTH' });
  await t.throwsAsync(readBody(Readable.from(chunks(4, 1000)), 3000, 10_000), { any: true, code: 'FST_ERR_CTP_INVALID_CONTENT_LENGTH' });
  const err = await t.throwsAsync(readBody(new Readable({ read() { this.destroy(new Error('socket hang up')); } }), 100, 10_000));
  t.is((err as Error & { statusCode?: number }).statusCode, 400);
});
