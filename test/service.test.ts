/**
 * examples/service.ts: a real HTTP server on 127.0.0.1 with the bundled micro model, real requests.
 */
import test from 'ava';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startService, type Service } from '../examples/service.js';
import { SafetensorsFile } from '../lib/io/safetensors.js';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';

const ROOT = join(import.meta.dirname, '..');
const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const IMG = readFileSync(join(ROOT, 'test', 'fixtures', 'images', 'chelsea.png'));

let svc: Service;
test.before(async () => {
  svc = await startService({ weights: WEIGHTS, device: 'cpu', concurrency: 1, maxQueue: 16 });
});
test.after.always(async () => {
  await svc?.close();
});

async function parseBody(res: Response): Promise<SafetensorsFile> {
  const dir = await mkdtemp(join(tmpdir(), 'df-svc-'));
  try {
    const p = join(dir, 'r.safetensors');
    await writeFile(p, Buffer.from(await res.arrayBuffer()));
    return await SafetensorsFile.open(p);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test.serial('POST /extract returns the requested features as safetensors', async (t) => {
  const res = await fetch(`${svc.url}/extract?layers=legacy&prompt=a%20cat&seed=1&size=128`, { method: 'POST', body: IMG });
  t.is(res.status, 200);
  const f = await parseBody(res);
  t.deepEqual(f.names().sort(), ['up-level0-upsampler-out', 'up-level1-upsampler-out', 'up-level2-upsampler-out', 'up-level3-repeat2-vit-out'].sort());
  t.deepEqual(f.info('up-level1-upsampler-out').shape, [32, 8, 8]);
  t.is(f.metadata.prompt, 'a cat');
  t.true(f.float32('up-level1-upsampler-out').some((v) => v !== 0));
});

test.serial('a broken image is a 400 with a JSON error, and the service keeps serving', async (t) => {
  const bad = await fetch(`${svc.url}/extract?size=128`, { method: 'POST', body: Buffer.from('definitely not a png') });
  t.is(bad.status, 400);
  const j = (await bad.json()) as { error: string };
  t.regex(j.error, /decode|image/i);
  const unknown = await fetch(`${svc.url}/extract?size=128&layers=up-level7-res-out`, { method: 'POST', body: IMG });
  t.is(unknown.status, 400);
  t.regex(((await unknown.json()) as { error: string }).error, /up-level7-res-out/);
  const ok = await fetch(`${svc.url}/healthz`);
  t.is(ok.status, 200);
});

test.serial('a burst of parallel requests: every one answered, same seed same bytes', async (t) => {
  const reqs = Array.from({ length: 8 }, () =>
    fetch(`${svc.url}/extract?layers=practical&seed=3&size=128`, { method: 'POST', body: IMG }).then(async (r) => ({
      status: r.status,
      body: Buffer.from(await r.arrayBuffer()),
    })),
  );
  const all = await Promise.all(reqs);
  for (const r of all) t.is(r.status, 200);
  for (const r of all.slice(1)) t.true(r.body.equals(all[0]!.body));
});

test.serial('more requests than the queue holds get 503, not a crash', async (t) => {
  const small = await startService({ weights: WEIGHTS, device: 'cpu', concurrency: 1, maxQueue: 1 });
  try {
    const rs = await Promise.all(
      Array.from({ length: 6 }, () => fetch(`${small.url}/extract?size=128`, { method: 'POST', body: IMG }).then((r) => r.status)),
    );
    t.true(rs.includes(200));
    t.true(rs.includes(503));
    t.true(rs.every((s) => s === 200 || s === 503));
  } finally {
    await small.close();
  }
});
