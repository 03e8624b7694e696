/**
 * Heads suite: GATE's pixel-classifier training (docs/method.md §Amalgamation and heads) natively (src/train.cc: pixels sampled
 * and features interpolated on the fly) vs the reference way in eager PyTorch (bench/py/heads_eager.py:
 * every feature map upsampled to the mask size, pixel vectors gathered, nn modules + torch.optim.Adam),
 * the same synthetic data and the same number of mini-batches of 64. Each side runs in its own process
 * so peak RSS is its own. Also the segmentation latency of one image with an M-member ensemble.
 *
 * Size (env): BENCH_HEADS_IMAGES (4), BENCH_HEADS_BUCKETS (4), BENCH_HEADS_CHANNELS (1024 per bucket;
 * Horse-21 has 3674), BENCH_HEADS_GRID (32: features G×G), BENCH_HEADS_MASK (128), BENCH_HEADS_STEPS (300),
 * BENCH_HEADS_MEMBERS (10).
 */
import { execFile } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { OUT, ROOT, fmt, py, table, threads } from './common.js';

const execFileAsync = promisify(execFile);
const env = (k: string, d: number) => Number(process.env[k] ?? d);
const I = env('BENCH_HEADS_IMAGES', 4);
const K = env('BENCH_HEADS_BUCKETS', 4);
const C = env('BENCH_HEADS_CHANNELS', 1024);
const G = env('BENCH_HEADS_GRID', 32);
const MASK = env('BENCH_HEADS_MASK', 128);
const STEPS = env('BENCH_HEADS_STEPS', 300);
const MEMBERS = env('BENCH_HEADS_MEMBERS', 10);

interface Side { prepare_s: number; train_s: number; steps: number; pixels_per_s: number; segment_s: number; train_rss_mb: number; peak_rss_mb: number }

/** The native side, in a child process: load data, train STEPS steps, stack MEMBERS, segment one image. */
async function child(data: string): Promise<void> {
  const { headAddon, templatePath } = await import('../lib/heads/raw.js');
  const { SafetensorsFile } = await import('../lib/io/safetensors.js');
  const A = headAddon();
  const t0 = performance.now();
  const st = await SafetensorsFile.open(data);
  const feats = st.float32('features');
  const pixels = st.int64('pixels') as BigInt64Array;
  const labels = st.int64('labels') as BigInt64Array;
  const classes = Number(labels.reduce((a, b) => (b > a ? b : a), 0n)) + 1;
  const head = await A.loadHead(templatePath('pixel_classifier'), 'cpu');
  await head.configure({ buckets: [K], channels: [C], classes: [classes], members: [1], out_size: [MASK, MASK] }, 0);
  const D = K * C;
  const store = (await head.call('new_store', [I, G, G])) as import('../binding/index.cjs').RawTensor;
  for (let i = 0; i < I; i++) {
    const x = A.RawTensor.fromTypedArray(feats.subarray(i * D * G * G, (i + 1) * D * G * G), [D, G, G], 'float32');
    await head.call('store_image', [store, i, [x]]);
    x.dispose();
  }
  const data3 = [A.RawTensor.fromTypedArray(pixels, [labels.length, 3], 'int64'), A.RawTensor.fromTypedArray(labels, [labels.length], 'int64'), store];
  const prepare = (performance.now() - t0) / 1000;
  const r = await head.fit(data3, { items: labels.length, batchSize: 64, maxEpochs: 1e6, maxSteps: STEPS, seed: 1 }).promise;
  const trainRss = process.resourceUsage().maxRSS / 1024;
  const ens = await A.stackHeads(Array.from({ length: MEMBERS }, () => head));
  const x = A.RawTensor.fromTypedArray(feats.subarray(0, D * G * G), [D, G, G], 'float32');
  const packed = (await ens.call('pack', [[x]])) as import('../binding/index.cjs').RawTensor;
  const t1 = performance.now();
  await ens.call('segment', [packed, MASK, MASK, Math.max(64, Math.floor((1 << 26) / (4 * D * MEMBERS)))]);
  const segment = (performance.now() - t1) / 1000;
  const out: Side = { prepare_s: prepare, train_s: r.seconds, steps: r.steps, pixels_per_s: (r.steps * 64) / r.seconds, segment_s: segment, train_rss_mb: trainRss, peak_rss_mb: process.resourceUsage().maxRSS / 1024 };
  console.log(JSON.stringify(out));
}

async function makeData(file: string): Promise<void> {
  const { writeSafetensors } = await import('../lib/io/safetensors.js');
  let s = 12345;
  const rnd = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const D = K * C;
  const feats = new Float32Array(I * D * G * G);
  for (let i = 0; i < feats.length; i++) feats[i] = rnd() * 2 - 1;
  const N = I * MASK * MASK;
  const pixels = new BigInt64Array(N * 3);
  const labels = new BigInt64Array(N);
  for (let k = 0; k < N; k++) {
    const i = Math.floor(k / (MASK * MASK));
    const p = k % (MASK * MASK);
    pixels[3 * k] = BigInt(i);
    pixels[3 * k + 1] = BigInt(Math.floor(p / MASK));
    pixels[3 * k + 2] = BigInt(p % MASK);
    labels[k] = BigInt(Math.floor(p / MASK) < MASK / 2 ? 0 : 1 + (p % 3));
  }
  await writeSafetensors(file, {
    features: { dtype: 'F32', shape: [I, D, G, G], data: feats },
    pixels: { dtype: 'I64', shape: [N, 3], data: pixels },
    labels: { dtype: 'I64', shape: [N], data: labels },
  });
}

export async function run(): Promise<string> {
  const dir = join(OUT, 'heads');
  mkdirSync(dir, { recursive: true });
  const data = join(dir, 'data.safetensors');
  await makeData(data);
  try {
    const nodeArgs = ['--import', 'tsx', join(ROOT, 'bench', 'heads.ts'), '--heads-child', data];
    const envs = { ...process.env, OMP_NUM_THREADS: String(threads()) };
    const ours = JSON.parse((await execFileAsync(process.execPath, nodeArgs, { cwd: ROOT, env: envs, maxBuffer: 1 << 20 })).stdout.trim().split('\n').pop()!) as Side;
    // the same OpenMP wait policy the addon's loader sets for itself (binding/): spinning OpenMP threads
    // starve OpenBLAS on a small machine (a first run without it measured the baseline ~10x slower)
    process.env.OMP_WAIT_POLICY ??= 'PASSIVE';
    const base = JSON.parse((await py('heads_eager.py', [data, String(STEPS), String(MEMBERS), String(K), String(C), String(MASK)])).trim().split('\n').pop()!) as Side;
    const rows = [
      ['training throughput (pixels/s)', fmt(ours.pixels_per_s), fmt(base.pixels_per_s), fmt(ours.pixels_per_s / base.pixels_per_s)],
      [`training time, ${STEPS} steps of 64 (s)`, fmt(ours.train_s), fmt(base.train_s), fmt(ours.train_s / base.train_s)],
      ['data preparation (s)', fmt(ours.prepare_s), fmt(base.prepare_s), fmt(ours.prepare_s / base.prepare_s)],
      ['peak RSS after loading + training (MiB)', fmt(ours.train_rss_mb), fmt(base.train_rss_mb), fmt(ours.train_rss_mb / base.train_rss_mb)],
      ['peak RSS of the process, with segmentation (MiB)', fmt(ours.peak_rss_mb), fmt(base.peak_rss_mb), fmt(ours.peak_rss_mb / base.peak_rss_mb)],
      [`segment 1 image, ${MEMBERS} members, ${MASK}² (s)`, fmt(ours.segment_s), fmt(base.segment_s), fmt(ours.segment_s / base.segment_s)],
    ];
    return [
      `${I} images, ${K} buckets × ${C} channels at ${G}×${G}, masks ${MASK}×${MASK} (${I * MASK * MASK} training pixels), ${threads()} threads, OMP_WAIT_POLICY=${process.env.OMP_WAIT_POLICY} for both.`,
      'ours: native fit loop (src/train.cc), features kept at their size, pixels interpolated on the fly;',
      'baseline: GATE\'s way in eager PyTorch (bench/py/heads_eager.py): all maps upsampled to the mask size first.',
      '',
      table(['measure', 'ours', 'eager PyTorch', 'ours / eager'], rows),
    ].join('\n');
  } finally {
    rmSync(data, { force: true });
  }
}

if (process.argv.includes('--heads-child')) await child(process.argv[process.argv.indexOf('--heads-child') + 1]!);
