/**
 * Scale-out with real parts: a real Redis (started here), real worker processes of the CLI, one of
 * them killed with SIGKILL while it holds a job, Redis killed and restarted mid-run, SIGTERM drains.
 * Outputs are compared bit for bit with an in-process extract of each image alone.
 */
import test from 'ava';
import { mkdtemp, mkdir, rm, writeFile, readdir, readFile, utimes } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { startRedis, type TestRedis } from './helpers/redis.js';
import { cli, runCli, ROOT, type Cli } from './helpers/processes.js';
import { loadPipeline, type Pipeline } from '../lib/pipeline/index.js';
import { encodeFeatures } from '../lib/io/features.js';
import { extractJobSettings, jobFor, canonicalJson, checkJobData } from '../lib/queue/job.js';
import { enqueue } from '../lib/queue/enqueue.js';
import { cleanStaleTemps, hostTag, localHostTag, removeOwnTempsSync, tempOwner, tempPathFor } from '../lib/outputs.js';

const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const FIXTURES = join(ROOT, 'test', 'fixtures', 'images');
const SIZE = 64;
const SEED = 11;
// fast takeover for the tests: a dead worker's job is free after ≤ 2 s + 1 s
const STALL = ['--lock-duration', '2000', '--stalled-interval', '1000'];

let dir: string;
let images: string[];
let broken: string[];
let pipe: Pipeline;
const reference = new Map<string, Buffer>();

/** Bytes `extract` writes for this image alone (in-process pipeline, same settings). */
async function expected(image: string): Promise<Buffer> {
  const hit = reference.get(image);
  if (hit) return hit;
  const [f] = await pipe.extract([image], { layers: 'legacy', size: SIZE, seed: SEED });
  try {
    const b = Buffer.from(encodeFeatures(f!));
    reference.set(image, b);
    return b;
  } finally {
    f!.dispose();
  }
}

test.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'df-queue-'));
  // 35 small PNG variants of the fixtures (flips, crops, tints), plus two broken images
  const src = ['astronaut', 'chelsea', 'coffee', 'rocket', 'motorcycle_left'].map((n) => join(FIXTURES, `${n}.png`));
  images = [];
  for (const [i, s] of src.entries()) {
    for (let v = 0; v < 7; v++) {
      let img = sharp(s).resize(48 + 8 * v, 40 + 4 * i, { fit: 'fill' });
      if (v % 2) img = img.flop();
      if (v % 3 === 1) img = img.tint({ r: 200, g: 120, b: 60 });
      const p = join(dir, `img-${i}-${v}.png`);
      await img.png().toFile(p);
      images.push(p);
    }
  }
  broken = [join(dir, 'broken-text.png'), join(dir, 'broken-truncated.png')];
  await writeFile(broken[0]!, 'this is not an image');
  const full = readFileSync(images[0]!);
  await writeFile(broken[1]!, full.subarray(0, full.length >> 1));
  // The workers run with OMP_NUM_THREADS=1 (helpers/processes.ts), and CPU reductions depend on the
  // threads libtorch/OpenBLAS start with: the reference does the same (the addon loads lazily, below).
  process.env.OMP_NUM_THREADS = '1';
  pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
});

test.after.always(async () => {
  pipe?.dispose();
  await rm(dir, { recursive: true, force: true });
});

function worker(redis: TestRedis, out: string, extra: string[] = []): Cli {
  return cli(['worker', '--redis', redis.url, '--weights', WEIGHTS, '--out', out, '--device', 'cpu', ...STALL, ...extra]);
}

async function stopAll(ws: Cli[]): Promise<void> {
  for (const w of ws) if (w.proc.exitCode === null && w.proc.signalCode === null) w.proc.kill('SIGKILL');
  await Promise.all(ws.map((w) => w.exited));
}

/** Outputs are exactly one file per good image, each bit-identical to extract alone; no temporaries. */
async function checkOutputs(t: import('ava').ExecutionContext, out: string, good: readonly string[]): Promise<void> {
  const names = (await readdir(out)).sort();
  t.deepEqual(names, good.map((p) => p.slice(p.lastIndexOf('/') + 1).replace(/\.png$/, '.safetensors')).sort(), 'one output per good image, nothing else (no temporaries)');
  for (const img of good) {
    const got = await readFile(join(out, img.slice(img.lastIndexOf('/') + 1).replace(/\.png$/, '.safetensors')));
    t.true(got.equals(await expected(img)), `${img}: bit-identical to extract on the image alone`);
  }
}

/** Images whose output a worker wrote (its log says so), with how often. */
function writes(logs: string[]): Map<string, number> {
  const m = new Map<string, number>();
  for (const line of logs.join('\n').split('\n')) {
    const r = /done \S+ (\S+) -> \S+$/.exec(line);
    if (r) m.set(r[1]!, (m.get(r[1]!) ?? 0) + 1);
  }
  return m;
}

test.serial('job ids: the same bytes and settings are one job; layer spellings, key order and defaults do not matter', async (t) => {
  const a = await extractJobSettings({ layers: 'legacy', seed: 3 });
  const b = await extractJobSettings({ layers: ['up-level3-repeat2-vit-out', 'up-level0-upsampler-out', 'up-level2-upsampler-out', 'up-level1-upsampler-out'], seed: 3, t: 50, posterior: 'sample' });
  t.is(canonicalJson(a), canonicalJson(b));
  const j1 = await jobFor(images[0]!, a);
  const j2 = await jobFor(images[0]!, b);
  t.is(j1.id, j2.id);
  t.not(j1.id, (await jobFor(images[0]!, await extractJobSettings({ layers: 'legacy', seed: 4 }))).id);
  t.not(j1.id, (await jobFor(images[1]!, a)).id);
  // job data from Redis is validated: paths must be absolute, names safe, layers real ids
  t.throws(() => checkJobData({ ...j1.data, name: '../x' }), { message: /safe name/ });
  t.throws(() => checkJobData({ ...j1.data, settings: { ...j1.data.settings, layers: ['/etc/passwd'] } }), { message: /not a layer id/ });
  t.throws(() => checkJobData({ ...j1.data, image: 'relative.png' }), { message: /absolute/ });
});

test('stale temporaries on a shared volume: pid decides on this host only; another host\'s only by age', async (t) => {
  const out = join(dir, 'temps');
  await mkdir(out, { recursive: true });
  const other = hostTag(localHostTag() === 'otherhost' ? 'otherhost2' : 'otherhost');
  const name = (host: string | undefined, pid: number, n: number) => `.img${n}.safetensors.df-tmp-${host === undefined ? '' : `${host}-`}${pid}-${'0123456789a'}${n}`;
  const localDead = name(localHostTag(), 999999, 1);
  const localAlive = name(localHostTag(), process.pid, 2);
  const otherRecent = name(other, 999999, 3); // dead pid here, but it may be alive over there
  const otherOld = name(other, 999999, 4);
  const legacyDead = name(undefined, 999999, 5); // earlier releases: no host, judged as local
  const notOurs = '.img6.safetensors.df-tmp-nothex';
  for (const f of [localDead, localAlive, otherRecent, otherOld, legacyDead, notOurs]) await writeFile(join(out, f), 'partial');
  await utimes(join(out, otherOld), new Date(0), new Date(0));
  const removed = (await cleanStaleTemps(out)).map((p) => p.slice(out.length + 1)).sort();
  t.deepEqual(removed, [localDead, otherOld, legacyDead].sort());
  t.deepEqual((await readdir(out)).sort(), [localAlive, otherRecent, notOurs].sort());
  // only this process's temporaries of this host go in the synchronous exit cleanup
  await writeFile(join(out, name(other, process.pid, 7)), 'partial');
  t.deepEqual(removeOwnTempsSync(out).map((p) => p.slice(out.length + 1)), [localAlive]);
  // names: recognisable, host tag sanitised and short, distinct hosts stay distinct
  const tmp = tempPathFor(join(out, 'x.safetensors'));
  t.deepEqual(tempOwner(tmp.slice(out.length + 1)), { host: localHostTag(), pid: process.pid });
  t.regex(hostTag('gpu-07.cluster.example.org'), /^[A-Za-z0-9_-]{1,24}$/);
  t.not(hostTag('a.b'), hostTag('a_b'));
  t.is(hostTag('node-3'), 'node-3');
  t.is(tempOwner(`.x.df-tmp-node-12-345-0123456789ab`)?.pid, 345);
  t.is(tempOwner(`.x.df-tmp-node-12-345-0123456789ab`)?.host, 'node-12');
  await rm(out, { recursive: true, force: true });
});

test.serial('3 workers, 37 jobs, one worker SIGKILLed while it holds a job: every output once, bit-identical; broken images fail with reasons; duplicates run once', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-kill');
  const ws: Cli[] = [];
  try {
    // a stale temporary of a dead writer: removed when a worker starts
    await rm(out, { recursive: true, force: true });
    await (await import('node:fs/promises')).mkdir(out, { recursive: true });
    await writeFile(join(out, `.img-0-0.safetensors.df-tmp-${localHostTag()}-999999-0123456789ab`), 'half a file');

    ws.push(worker(redis, out), worker(redis, out), worker(redis, out));
    await Promise.all(ws.map((w) => w.waitFor(/ready:/, 180_000)));
    const all = [...images, ...broken];
    const first = await runCli(['enqueue', '--redis', redis.url, '--layers', 'legacy', '--size', String(SIZE), '--seed', String(SEED), ...all, images[3]!]);
    t.is(first.code, 0, first.err);
    t.deepEqual(JSON.parse(first.out.trim().split('\n').pop()!), { added: all.length, duplicates: 1 });

    // kill the first worker seen holding a job
    const conn = new Redis(redis.url, { maxRetriesPerRequest: null });
    const q = new Queue('diffusion-features', { connection: conn });
    let victim: Cli | undefined;
    let victimJob: string | undefined;
    for (let k = 0; k < 2000 && !victim; k++) {
      for (const j of await q.getActive()) {
        const w = ws.find((x) => j.processedBy?.endsWith(`:${x.proc.pid}`));
        if (w) {
          victim = w;
          victimJob = j.id;
          break;
        }
      }
      if (!victim) await new Promise((r) => setTimeout(r, 5));
    }
    t.truthy(victim, 'a worker was seen holding a job');
    victim!.proc.kill('SIGKILL');
    t.is((await victim!.exited).signal, 'SIGKILL');
    // a supervisor restarts it
    const replacement = worker(redis, out);
    ws.push(replacement);

    // the same work again: all duplicates
    const again = await runCli(['enqueue', '--redis', redis.url, '--size', String(SIZE), '--seed', String(SEED), '--wait', ...all]);
    t.deepEqual(JSON.parse(again.out.trim().split('\n').pop()!), { added: 0, duplicates: all.length });
    t.is(again.code, 1, 'enqueue --wait exits non-zero when jobs failed');
    t.regex(again.err, /broken-text\.png/);

    const status = JSON.parse((await runCli(['queue-status', '--redis', redis.url])).out) as {
      counts: Record<string, number>;
      failed: { image: string; reason: string; attempts: number }[];
    };
    t.is(status.counts.completed, images.length);
    t.is(status.counts.failed, 2);
    t.deepEqual(status.failed.map((f) => f.image.slice(f.image.lastIndexOf('/') + 1)).sort(), ['broken-text.png', 'broken-truncated.png']);
    for (const f of status.failed) {
      t.regex(f.reason, /E_IMAGE_DECODE/, 'the reason names the problem');
      t.is(f.attempts, 1, 'a broken image fails once, without retries');
    }
    const victimData = (await q.getJob(victimJob!))!;
    t.is(await victimData.getState(), 'completed', 'the killed worker’s job was taken over');
    await q.close();
    conn.disconnect();

    for (const w of ws.filter((x) => x !== victim)) w.proc.kill('SIGTERM');
    for (const w of ws.filter((x) => x !== victim)) t.is((await w.exited).code, 0);
    await checkOutputs(t, out, images);
    const counts = writes(ws.map((w) => w.err()));
    t.true([...counts.values()].every((n) => n === 1), 'no image was written twice');
    t.regex(replacement.err() + ws.map((w) => w.err()).join(''), /removed 1 stale temporary/);
  } finally {
    await stopAll(ws);
    await redis.stop();
  }
});

test.serial('Redis killed and restarted (empty) mid-run: enqueue --wait re-adds what was lost, the run completes, nothing lost or written twice', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-restart');
  const ws: Cli[] = [];
  const some = images.slice(0, 10);
  try {
    ws.push(worker(redis, out));
    await Promise.all(ws.map((w) => w.waitFor(/ready:/, 180_000)));
    const waiting = cli(['enqueue', '--redis', redis.url, '--size', String(SIZE), '--seed', String(SEED), '--wait', ...some]);
    // once a few outputs exist, Redis goes away and comes back empty
    for (let k = 0; k < 3000; k++) {
      const n = (await readdir(out).catch(() => [] as string[])).filter((f) => f.endsWith('.safetensors')).length;
      if (n >= 3) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    await redis.kill();
    await new Promise((r) => setTimeout(r, 700));
    await redis.start();
    const { code } = await waiting.exited;
    t.is(code, 0, waiting.err());
    t.deepEqual(JSON.parse(waiting.out().trim().split('\n').pop()!), { added: some.length, duplicates: 0 });
    for (const w of ws) w.proc.kill('SIGTERM');
    for (const w of ws) t.is((await w.exited).code, 0);
    await checkOutputs(t, out, some);
    const counts = writes(ws.map((w) => w.err()));
    t.true([...counts.values()].every((n) => n === 1), `no image written twice: ${JSON.stringify([...counts])}`);
  } finally {
    await stopAll(ws);
    await redis.stop();
  }
});

test.serial('SIGTERM drains: the worker finishes the job it holds, leaves the rest queued, exits 0', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-drain');
  const ws: Cli[] = [];
  try {
    const w = worker(redis, out);
    ws.push(w);
    await w.waitFor(/ready:/, 180_000);
    const r = await enqueue({ redis: redis.url, images: images.slice(0, 6), extract: { size: 256, seed: SEED } });
    t.is(r.added, 6);
    const conn = new Redis(redis.url, { maxRetriesPerRequest: null });
    const q = new Queue('diffusion-features', { connection: conn });
    for (let k = 0; k < 3000 && (await q.getActiveCount()) === 0; k++) await new Promise((res) => setTimeout(res, 5));
    const held = (await q.getActive()).map((j) => j.id);
    t.true(held.length >= 1);
    w.proc.kill('SIGTERM');
    const { code } = await w.exited;
    t.is(code, 0);
    const counts = await q.getJobCounts('completed', 'waiting', 'active', 'failed');
    t.is(counts.active, 0, 'nothing left half-done');
    t.is(counts.failed, 0);
    t.true(counts.completed! >= held.length, 'the held job(s) finished');
    t.true(counts.waiting! > 0, 'the rest stays queued for other workers');
    for (const id of held) t.is(await (await q.getJob(id!))!.getState(), 'completed');
    t.is((await readdir(out)).filter((f) => f.endsWith('.safetensors')).length, counts.completed);
    await q.close();
    conn.disconnect();
  } finally {
    await stopAll(ws);
    await redis.stop();
  }
});

test.serial('in-process worker with --batch-size 4: batched jobs get the noise of the image alone (equal to float rounding)', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-batch');
  const { runWorker } = await import('../lib/queue/worker.js');
  const { waitForJobs } = await import('../lib/queue/enqueue.js');
  const w = await runWorker({ redis: redis.url, weights: WEIGHTS, out, devices: ['cpu'], batchSize: 4, batchWaitMs: 200 });
  try {
    const batches: number[] = [];
    let progress = 0;
    w.on('completed', (_id, r) => batches.push(r.batch));
    w.on('progress', () => progress++);
    const some = images.slice(0, 8);
    const r = await enqueue({ redis: redis.url, images: some, extract: { layers: 'legacy', size: SIZE, seed: SEED } });
    const done = await waitForJobs({ redis: redis.url, jobs: r.jobs });
    t.is(done.completed, 8);
    t.true(batches.some((b) => b > 1), `jobs ran in batches: ${batches.join(',')}`);
    t.true(progress > 0, 'progress reached the jobs');
    const { SafetensorsFile } = await import('../lib/io/safetensors.js');
    for (const img of some) {
      const path = join(out, img.slice(img.lastIndexOf('/') + 1).replace(/\.png$/, '.safetensors'));
      const got = await SafetensorsFile.open(path);
      const refPath = join(dir, 'ref.safetensors');
      await writeFile(refPath, await expected(img));
      const ref = await SafetensorsFile.open(refPath);
      t.deepEqual(got.metadata, ref.metadata, 'same settings recorded (seed, not "noise supplied")');
      for (const name of ref.names()) {
        const a = got.float32(name);
        const b = ref.float32(name);
        let num = 0;
        let den = 0;
        for (let i = 0; i < a.length; i++) {
          num += (a[i]! - b[i]!) ** 2;
          den += b[i]! ** 2;
        }
        t.true(Math.sqrt(num / den) < 1e-4, `${img} ${name}: rel err ${Math.sqrt(num / den)}`);
      }
    }
  } finally {
    await w.close();
    await redis.stop();
  }
});

test.serial('recipe jobs write what recipe writes for that image alone', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-recipe');
  const { runWorker } = await import('../lib/queue/worker.js');
  const { waitForJobs } = await import('../lib/queue/enqueue.js');
  const { extractRecipe } = await import('../lib/recipes.js');
  const { writeRecipeResult } = await import('../lib/io/features.js');
  const w = await runWorker({ redis: redis.url, weights: WEIGHTS, out, devices: ['cpu'] });
  try {
    const img = images[5]!;
    const r = await enqueue({ redis: redis.url, images: [img], recipe: { recipe: 'horse21', skipMissingLora: true, size: SIZE, seed: SEED } });
    const done = await waitForJobs({ redis: redis.url, jobs: r.jobs });
    t.is(done.completed, 1, JSON.stringify(done.failed));
    const [ref] = await extractRecipe(pipe, 'horse21', [img], { skipMissingLora: true, size: SIZE, seed: SEED, amalgamate: true });
    const refPath = join(dir, 'ref-recipe.safetensors');
    await writeRecipeResult(refPath, ref!, 'horse21');
    ref!.dispose();
    t.true((await readFile(join(out, 'img-0-5.safetensors'))).equals(await readFile(refPath)));
  } finally {
    await w.close();
    await redis.stop();
  }
});

test.serial('--noise and --format npy jobs: npy folders identical to extract of the image alone with that noise', async (t) => {
  const redis = await startRedis();
  const out = join(dir, 'out-npy');
  const { runWorker } = await import('../lib/queue/worker.js');
  const { waitForJobs } = await import('../lib/queue/enqueue.js');
  const { writeSafetensors } = await import('../lib/io/safetensors.js');
  const { readNoiseFile, writeFeaturesNpy } = await import('../lib/io/features.js');
  const noisePath = join(dir, 'noise.safetensors');
  const rnd = (n: number): Float32Array => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898) * 1.7);
  await writeSafetensors(noisePath, { noise: { dtype: 'F32', shape: [1, 4, 8, 8], data: rnd(256) }, vae_noise: { dtype: 'F32', shape: [1, 4, 8, 8], data: rnd(256).reverse() } });
  const w = await runWorker({ redis: redis.url, weights: WEIGHTS, out, devices: ['cpu'] });
  try {
    const some = images.slice(10, 12);
    const r = await enqueue({ redis: redis.url, images: some, extract: { size: SIZE, noise: noisePath, format: 'npy' } });
    const done = await waitForJobs({ redis: redis.url, jobs: r.jobs });
    t.is(done.completed, 2, JSON.stringify(done.failed));
    for (const img of some) {
      const noise = await readNoiseFile(noisePath);
      const [f] = await pipe.extract([img], { layers: 'legacy', size: SIZE, noise });
      const ref = join(dir, 'ref-npy');
      await rm(ref, { recursive: true, force: true });
      await writeFeaturesNpy(ref, f!);
      f!.dispose();
      noise.noise.dispose();
      noise.vaeNoise?.dispose();
      const name = img.slice(img.lastIndexOf('/') + 1).replace(/\.png$/, '');
      const files = (await readdir(ref)).sort();
      t.deepEqual((await readdir(join(out, name))).sort(), files);
      for (const file of files) t.true((await readFile(join(out, name, file))).equals(await readFile(join(ref, file))), `${name}/${file}`);
    }
  } finally {
    await w.close();
    await redis.stop();
  }
});
