/**
 * Images per second of the legacy preset (4 upsampler/ViT taps, t = 50, posterior sample), full-size
 * SD1.5 architecture with random weights, on the CPU (float32): `loadPipeline` + `extract` against the
 * same steps done eagerly in Python with our weights/ model definitions (bench/py/pipeline_eager.py, the
 * state_dicts of the same .pt files), same images, same machine, same run.
 * Ratio = node images/s ÷ python images/s (≥ 1: the Node path is not slower).
 *
 * Per-stage seconds come from the pipeline's onProgress stage events on the Node side (a stage lasts
 * until the next event) and from timers around the same steps in Python:
 *   decode  — read + decode + resize to size×size (Node: sharp decode + the PIL-exact resampler; Python: PIL)
 *   vae     — uint8 → [-1,1], VAE encoder, posterior sample × scaling, add_noise (incl. noise generation)
 *   text    — prompt encoding (once per configuration on both sides: Node caches embeddings by text)
 *   unet    — the hooked UNet forward
 *   handoff — per-image CPU float32 contiguous tensors of the requested taps
 * Both sides run BENCH_WARMUP (default 2) untimed warm-up calls of each batch size first (another prompt):
 * TorchScript's profiling executor runs the first two calls of a shape unoptimised (measured ≈ 1.7× slower
 * for the UNet at 256 px), eager PyTorch has no such cost. BENCH_WARMUP=0 measures the cold path.
 *
 * Env: BENCH_SIZE (512), BENCH_BATCHES (1,4), BENCH_IMAGES (4), BENCH_WARMUP (2), BENCH_PROMPT, DF_BENCH_SD15 (export dir),
 * OMP_NUM_THREADS (threads on both sides; default: all cores).
 */
import { readdirSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import os from 'node:os';
import { setNumThreads } from '../lib/native.js';
import { loadPipeline, type Progress } from '../lib/pipeline/index.js';
import { ROOT, OUT, fullSizeDir, py, table, fmt, list, threads, since } from './common.js';

const STAGES = ['decode', 'vae', 'text', 'unet', 'handoff'] as const;
type Stages = Record<(typeof STAGES)[number], number>;
/** One side's measurement of one batch configuration. */
interface Side {
  seconds: number;
  stages: Stages;
  /** CPU seconds of the whole process (all threads) during the run: less sensitive to other load on the machine. */
  cpu_s: number;
  /** 1-minute load average when the run started (other work on the machine shows up here). */
  load1: number;
}
const zero = (): Stages => ({ decode: 0, vae: 0, text: 0, unet: 0, handoff: 0 });

export function benchImages(n: number): string[] {
  const dir = join(ROOT, 'test', 'fixtures', 'images');
  const files = readdirSync(dir).filter((f) => f.endsWith('.png')).sort().map((f) => join(dir, f));
  return Array.from({ length: n }, (_, i) => files[i % files.length]!);
}

export async function run(): Promise<string> {
  const size = Number(process.env.BENCH_SIZE ?? 512);
  const batches = list(process.env.BENCH_BATCHES, [1, 4]);
  const nImages = Number(process.env.BENCH_IMAGES ?? 4);
  const warmup = Number(process.env.BENCH_WARMUP ?? 2);
  const basePrompt = process.env.BENCH_PROMPT ?? 'a photo of a horse, high quality';
  const prompt = (b: number) => `${basePrompt} (batch ${b})`;
  setNumThreads(threads());
  const dir = await fullSizeDir();
  const images = benchImages(nImages);

  // --- Node ---
  let t0 = performance.now();
  const p = await loadPipeline(dir, { device: 'cpu', dtype: 'float32' });
  const nodeLoad = since(t0);
  const node: Record<number, Side> = {};
  let capture: string[] = [];
  let unetT = 0;
  let noiseT = 0;
  const tokens = Object.fromEntries(batches.map((b) => [b, p.tokenize(prompt(b))]));
  const warmTokens = p.tokenize('warm-up');
  const scaling = p.model.scaling_factor;
  try {
    for (const b of batches) {
      // TorchScript's profiling executor runs the first calls of a shape unoptimised (≈ 1.7× slower).
      for (let w = 0; w < warmup; w++) {
        const warm = await p.extract(images.slice(0, b), { size, layers: 'legacy', prompt: 'warm-up', batchSize: b });
        capture = Object.keys(warm[0]!.features);
        unetT = Number(warm[0]!.settings.unet_timestep);
        noiseT = Number(warm[0]!.settings.noise_timestep);
        warm.forEach((f) => f.dispose());
      }
      const stages = zero();
      let cur: string | null = null;
      let last = 0;
      const onProgress = (ev: Progress): void => {
        const now = performance.now();
        if (cur && cur in stages) stages[cur as keyof Stages] += (now - last) / 1000;
        cur = ev.stage;
        last = now;
      };
      const load1 = os.loadavg()[0]!;
      const cpu0 = process.cpuUsage();
      t0 = performance.now();
      const res = await p.extract(images, { size, layers: 'legacy', prompt: prompt(b), batchSize: b, onProgress });
      const cpu = process.cpuUsage(cpu0);
      node[b] = { seconds: since(t0), stages, cpu_s: (cpu.user + cpu.system) / 1e6, load1 };
      if (res.length !== images.length) throw new Error(`expected ${images.length} results, got ${res.length}`);
      capture = Object.keys(res[0]!.features);
      unetT = Number(res[0]!.settings.unet_timestep);
      noiseT = Number(res[0]!.settings.noise_timestep);
      res.forEach((f) => f.dispose());
    }
  } finally {
    p.dispose();
  }

  // --- Python eager ---
  mkdirSync(OUT, { recursive: true });
  const jobPath = join(OUT, 'pipeline-job.json');
  writeFileSync(
    jobPath,
    JSON.stringify({
      size, images, capture, warmup, unet_t: unetT, noise_t: noiseT, scaling, seed: 0, warmup_tokens: warmTokens,
      configs: batches.map((b) => ({ batch: b, tokens: tokens[b] })),
    }),
  );
  const pyRes = JSON.parse(await py('pipeline_eager.py', [dir, jobPath])) as { load_s: number; configs: Record<string, Side> };

  const rows = batches.map((b) => {
    const a = node[b]!;
    const c = pyRes.configs[String(b)]!;
    const n = nImages / a.seconds;
    const q = nImages / c.seconds;
    return [b, nImages, fmt(a.seconds), fmt(n), fmt(c.seconds), fmt(q), (n / q).toFixed(2), `${fmt(a.cpu_s / nImages)} / ${fmt(c.cpu_s / nImages)}`, `${a.load1.toFixed(1)} / ${c.load1.toFixed(1)}`];
  });
  const stageRows: (string | number)[][] = [];
  for (const b of batches) {
    for (const [side, st, total] of [['node', node[b]!.stages, node[b]!.seconds], ['python', pyRes.configs[String(b)]!.stages, pyRes.configs[String(b)]!.seconds]] as const) {
      const sum = STAGES.reduce((a, s) => a + st[s], 0);
      stageRows.push([b, side, ...STAGES.map((s) => `${fmt(st[s] / nImages)} (${((100 * st[s]) / total).toFixed(0)}%)`), fmt((total - sum) / nImages)]);
    }
  }
  return [
    `Legacy preset, ${size} px, SD1.5 full size (random weights), cpu float32, ${threads()} threads, ${nImages} images (test/fixtures/images), ${warmup} warm-up call(s) per batch size, model load: node ${fmt(nodeLoad)} s, python ${fmt(pyRes.load_s)} s (not counted)`,
    '',
    table(['batch', 'images', 'node s', 'node img/s', 'python eager s', 'python img/s', 'ratio (node/python img/s)', 'CPU s per image node / python', 'load avg at start node / python'], rows),
    '',
    `Wall-clock ratio is only meaningful when the load average at the start is about the same on both sides (this machine is shared); CPU seconds per image (all threads of the process) are less sensitive to other load.`,
    '',
    'Seconds per image by stage (share of the total):',
    '',
    table(['batch', 'side', ...STAGES, 'other'], stageRows),
  ].join('\n');
}
