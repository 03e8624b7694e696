/**
 * The service over real HTTP (createServer on 127.0.0.1 with the bundled micro model, and the `serve`
 * CLI as a process for SIGTERM): features, limits, 413 (an answer, not a reset), 503 + Retry-After,
 * disconnects cancel, Prometheus text, and no option that names a file.
 */
import test from 'ava';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import http from 'node:http';
import { createServer, type FeatureServer } from '../lib/serve/index.js';
import { loadPipeline } from '../lib/pipeline/index.js';
import { encodeFeatures } from '../lib/io/features.js';
import { cli, ROOT } from './helpers/processes.js';

const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const IMG = readFileSync(join(ROOT, 'test', 'fixtures', 'images', 'chelsea.png'));
const SECRET = 'TOP-SECRET-CONTENT-7f3a';

let svc: FeatureServer;
let url: string;
let dir: string;
const bodies: string[] = [];

async function post(path: string, body: NonNullable<RequestInit['body']>, init: RequestInit = {}): Promise<{ status: number; headers: Headers; bytes: Buffer }> {
  const r = await fetch(`${url}${path}`, { method: 'POST', body, ...init });
  const bytes = Buffer.from(await r.arrayBuffer());
  bodies.push(bytes.toString('latin1'));
  return { status: r.status, headers: r.headers, bytes };
}

async function metric(name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  let sum = 0;
  for (const line of text.split('\n')) if (line.startsWith(name)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  return sum;
}

test.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'df-serve-'));
  svc = await createServer({ weights: WEIGHTS, device: 'cpu', maxBodyBytes: 256 * 1024, maxQueue: 1, maxSize: 512, maxPixels: 1_000_000 });
  url = await svc.listen({ port: 0 });
});

test.after.always(async () => {
  await svc?.close();
  await rm(dir, { recursive: true, force: true });
});

test.serial('POST /v1/extract (raw body and multipart) returns exactly what extract computes', async (t) => {
  const raw = await post('/v1/extract?layers=legacy&prompt=a%20cat&seed=1&size=128', IMG);
  t.is(raw.status, 200);
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  try {
    const [f] = await pipe.extract([{ name: 'upload', data: IMG }], { layers: ['legacy'], prompt: 'a cat', seed: 1, size: 128 });
    t.true(raw.bytes.equals(Buffer.from(encodeFeatures(f!))), 'bit-identical to an in-process extract');
    f!.dispose();
  } finally {
    pipe.dispose();
  }
  const form = new FormData();
  form.append('options', JSON.stringify({ layers: 'legacy', prompt: 'a cat', seed: 1, size: 128 }));
  form.append('image', new Blob([IMG]), 'chelsea.png');
  const mp = await post('/v1/extract', form);
  t.is(mp.status, 200);
  t.true(mp.bytes.equals(raw.bytes));
});

test.serial('bad input is a 400 with a JSON error, and the service keeps serving', async (t) => {
  const bad = await post('/v1/extract?size=128', Buffer.from('definitely not a png'));
  t.is(bad.status, 400);
  t.regex(JSON.parse(bad.bytes.toString()).code, /E_IMAGE_DECODE/);
  const unknown = await post('/v1/extract?size=128&layers=up-level7-res-out', IMG);
  t.is(unknown.status, 400);
  t.regex(JSON.parse(unknown.bytes.toString()).error, /up-level7-res-out/);
  for (const q of ['size=2048', 'size=100', 't=-1', 'seed=abc', 'controlScale=1e308', 'posterior=x', 'lora=/tmp/x.safetensors', 'noise=/tmp/n.safetensors']) {
    t.is((await post(`/v1/extract?${q}`, IMG)).status, 400, q);
  }
  t.is((await fetch(`${url}/healthz`)).status, 200);
  t.is((await fetch(`${url}/readyz`)).status, 200);
});

test.serial('no option names a file: path-like or .json layers are refused without reading, and no body echoes file contents', async (t) => {
  const cfg = join(dir, 'config.json');
  await writeFile(cfg, JSON.stringify({ 'up-level1-upsampler-out': true, [SECRET]: true }));
  const bare = join(dir, 'myconfig');
  await writeFile(bare, JSON.stringify({ 'up-level1-upsampler-out': true }));
  const cwd = process.cwd();
  process.chdir(dir); // a bare word that is also a file here must still not be read
  try {
    for (const layers of ['/etc/passwd', '/etc/shadow', cfg, 'config.json', '../config.json', 'a/b', 'x.json', 'legacy,/etc/passwd', 'C:\\x']) {
      const r = await post(`/v1/extract?size=128&layers=${encodeURIComponent(layers)}`, IMG);
      t.is(r.status, 400, layers);
    }
    const word = await post('/v1/extract?size=128&layers=myconfig', IMG);
    t.is(word.status, 400, 'read as an (unknown) id, not as the file of that name');
    t.regex(JSON.parse(word.bytes.toString()).code, /E_UNKNOWN_LAYER/);
    const form = new FormData();
    form.append('options', JSON.stringify({ layers: cfg, size: 128 }));
    form.append('image', new Blob([IMG]), 'x.png');
    t.is((await post('/v1/extract', form)).status, 400);
    const extra = new FormData();
    extra.append('options', JSON.stringify({ size: 128, lora: cfg }));
    extra.append('image', new Blob([IMG]), 'x.png');
    t.is((await post('/v1/extract', extra)).status, 400);
    t.is((await post('/v1/extract?size=128', '{"a": "' + 'x'.repeat(50) + '"', { headers: { 'content-type': 'application/json' } })).status, 400);
  } finally {
    process.chdir(cwd);
  }
  const passwd = readFileSync('/etc/passwd', 'utf8').split('\n')[0]!;
  for (const b of bodies) {
    t.false(b.includes(SECRET));
    t.false(passwd.length > 5 && b.includes(passwd));
  }
});

test.serial('body limits: 413 before reading (declared length) and while reading (chunked), answered not reset', async (t) => {
  const big = await post('/v1/extract?size=128', Buffer.alloc(4 * 1024 * 1024));
  t.is(big.status, 413);
  t.is(JSON.parse(big.bytes.toString()).code, 'E_LIMIT_EXCEEDED');
  const stream = new ReadableStream({
    start(c) {
      for (let i = 0; i < 40; i++) c.enqueue(new Uint8Array(64 * 1024));
      c.close();
    },
  });
  const chunked = await post('/v1/extract?size=128', stream, { duplex: 'half' } as RequestInit);
  t.is(chunked.status, 413);
  // decoded pixels bounded (header check): a 1200×1000 image is over the 1 M pixel limit
  const sharp = (await import('sharp')).default;
  const large = await sharp({ create: { width: 1200, height: 1000, channels: 3, background: '#345' } }).png().toBuffer();
  t.is((await post('/v1/extract?size=128', large)).status, 413);
  t.is((await fetch(`${url}/healthz`)).status, 200);
});

test.serial('more requests than the queue holds get 503 with Retry-After; the admitted ones are answered', async (t) => {
  const rs = await Promise.all(Array.from({ length: 6 }, () => post('/v1/extract?size=128&seed=3', IMG)));
  const codes = rs.map((r) => r.status);
  t.true(codes.includes(200));
  t.true(codes.includes(503));
  t.true(codes.every((s) => s === 200 || s === 503));
  for (const r of rs.filter((x) => x.status === 503)) t.is(r.headers.get('retry-after'), '5');
  const ok = rs.filter((r) => r.status === 200);
  for (const r of ok.slice(1)) t.true(r.bytes.equals(ok[0]!.bytes), 'same request, same bytes');
});

test.serial('a client that disconnects cancels its extraction', async (t) => {
  const before = await metric('df_errors_total{code="E_ABORTED"}');
  const started = performance.now();
  await new Promise<void>((resolve) => {
    const req = http.request(`${url}/v1/extract?size=512`, { method: 'POST', headers: { 'content-length': IMG.length } });
    req.on('error', () => resolve());
    req.end(IMG);
    setTimeout(() => {
      req.destroy();
      resolve();
    }, 400);
  });
  // the gate frees as soon as the pipeline sees the abort (between model calls), well before a 512 px extraction ends
  let after = before;
  for (let k = 0; k < 200 && after === before; k++) {
    await new Promise((r) => setTimeout(r, 50));
    after = await metric('df_errors_total{code="E_ABORTED"}');
  }
  t.is(after, before + 1, 'the extraction was aborted');
  const next = await post('/v1/extract?size=128', IMG);
  t.is(next.status, 200);
  t.log(`disconnect to next answer: ${((performance.now() - started) / 1000).toFixed(2)} s`);
});

test.serial('/metrics is Prometheus text with queue depth, images, stage seconds and errors by code', async (t) => {
  const r = await fetch(`${url}/metrics`);
  t.regex(r.headers.get('content-type') ?? '', /text\/plain/);
  const text = await r.text();
  const sample = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? -?([0-9.e+-]+|NaN|\+Inf|-Inf)( \d+)?$/;
  for (const line of text.split('\n')) {
    if (!line) continue;
    if (line.startsWith('#')) t.regex(line, /^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* /);
    else t.regex(line, sample);
  }
  for (const name of ['df_queue_depth', 'df_images_total', 'df_images_per_second', 'df_stage_seconds_bucket', 'df_errors_total']) t.true(text.includes(`\n${name}`), name);
  t.true((await metric('df_images_total')) >= 3);
  t.true((await metric('df_stage_seconds_count{stage="unet"}')) >= 3);
});

test.serial('serve as a process: SIGTERM lets the running request finish, then exits 0', async (t) => {
  const p = cli(['serve', '--weights', WEIGHTS, '--device', 'cpu', '--port', '0']);
  try {
    await p.waitFor(/serving on (http:\/\/[^ ]+)/);
    const base = /serving on (http:\/\/[^ ]+)/.exec(p.err())![1]!;
    const inflight = fetch(`${base}/v1/extract?size=256`, { method: 'POST', body: IMG });
    await new Promise((r) => setTimeout(r, 300));
    p.proc.kill('SIGTERM');
    const r = await inflight;
    t.is(r.status, 200);
    t.true((await r.arrayBuffer()).byteLength > 1000);
    t.is((await p.exited).code, 0);
  } finally {
    if (p.proc.exitCode === null) p.proc.kill('SIGKILL');
  }
});

test.serial('examples/service.ts (embedding the library in your own server) answers the same bytes', async (t) => {
  const { startExample } = await import('../examples/service.js');
  const ex = await startExample(WEIGHTS, 0, 'cpu');
  try {
    const r = await fetch(`${ex.url}/features?prompt=a%20cat`, { method: 'POST', body: IMG });
    t.is(r.status, 200);
    const viaServe = await post('/v1/extract?layers=legacy&prompt=a%20cat', IMG);
    t.true(Buffer.from(await r.arrayBuffer()).equals(viaServe.bytes));
    t.is((await fetch(`${ex.url}/features`, { method: 'POST', body: 'nope' })).status, 400);
  } finally {
    await ex.close();
  }
});

test.serial('POST /v1/jobs + GET /v1/jobs/:id through Redis and a worker; the result is what /v1/extract answers; a full queue is 503', async (t) => {
  const { startRedis } = await import('./helpers/redis.js');
  const { runWorker } = await import('../lib/queue/worker.js');
  const redis = await startRedis();
  const spool = join(dir, 'spool');
  const out = join(dir, 'jobs-out');
  const q = await createServer({ pipeline: svc.pipeline, redis: redis.url, spool, out, maxQueueJobs: 1 });
  const base = await q.listen({ port: 0 });
  try {
    const submit = (query: string): Promise<Response> => fetch(`${base}/v1/jobs?${query}`, { method: 'POST', body: IMG });
    const first = await submit('size=128&seed=4');
    t.is(first.status, 202);
    const { id, duplicate } = (await first.json()) as { id: string; duplicate: boolean };
    t.false(duplicate);
    t.is(((await (await submit('size=128&seed=4')).json()) as { duplicate: boolean }).duplicate, true, 'the same upload and options are one job');
    const full = await submit('size=128&seed=5');
    t.is(full.status, 503, 'one job waits: the queue is full');
    t.is(full.headers.get('retry-after'), '5');
    t.is((await fetch(`${base}/v1/jobs/df-${'0'.repeat(48)}`)).status, 404);
    t.is((await fetch(`${base}/v1/jobs/..%2F..%2Fetc%2Fpasswd`)).status, 400);
    const w = await runWorker({ redis: redis.url, weights: WEIGHTS, out, devices: ['cpu'] });
    try {
      let state = '';
      for (let k = 0; k < 600 && state !== 'completed' && state !== 'failed'; k++) {
        state = ((await (await fetch(`${base}/v1/jobs/${id}`)).json()) as { state: string }).state;
        if (state !== 'completed') await new Promise((r) => setTimeout(r, 100));
      }
      t.is(state, 'completed');
      const result = Buffer.from(await (await fetch(`${base}/v1/jobs/${id}/result`)).arrayBuffer());
      const direct = await post('/v1/extract?size=128&seed=4', IMG);
      t.true(result.equals(direct.bytes), 'the worker wrote what /v1/extract answers');
    } finally {
      await w.close();
    }
    t.is((await fetch(`${base}/readyz`)).status, 200);
  } finally {
    await q.close();
    await redis.stop();
  }
});
