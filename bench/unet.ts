/**
 * UNet forward, full SD1.5 size (random weights), float32 on the CPU (or the device of
 * DF_BENCH_DEVICE): the exported TorchScript through the addon against the same model run eagerly in
 * Python (our weights/ definitions, same weights, same inputs shape, same machine, same run).
 * Ratio = python seconds / addon seconds (> 1: the addon is faster). A second Python column runs the
 * eager model with unsliced attention (the full score matrix, as diffusers' AttnProcessor does on a
 * torch without SDPA): the reference-like baseline, showing what the CPU query slicing of
 * weights/blocks.py MathCore gains.
 *
 * Env: BENCH_SIZES (default 256,512), BENCH_BATCHES (1,4), BENCH_REPS (1). Each shape is warmed up once.
 */
import { ScriptModule, Tensor, setNumThreads, type Device } from '../lib/native.js';
import { fullSizeDir, py, table, fmt, list, threads } from './common.js';

export async function run(): Promise<string> {
  const sizes = list(process.env.BENCH_SIZES, [256, 512]);
  const batches = list(process.env.BENCH_BATCHES, [1, 4]);
  const reps = Number(process.env.BENCH_REPS ?? 1);
  const device = (process.env.DF_BENCH_DEVICE ?? 'cpu') as Device;
  const dtype = device === 'cpu' ? 'float32' : ((process.env.DF_BENCH_DTYPE ?? 'float16') as 'float16' | 'float32');
  setNumThreads(threads());
  const dir = await fullSizeDir();
  const unet = await ScriptModule.load(`${dir}/unet.pt`, { device, dtype });
  const addon: Record<string, number> = {};
  try {
    for (const s of sizes) {
      for (const b of batches) {
        const x = await Tensor.randn([b, 4, s / 8, s / 8], { seed: 0, device, dtype });
        const e = await Tensor.randn([b, 77, 768], { seed: 1, device, dtype });
        const t = await Tensor.fromInt64Array([51], [1]).to(device);
        const once = async () => {
          const out = (await unet.forward(x, t, e, ['up-level1-upsampler-out'], null, null)) as Record<string, Tensor>;
          Object.values(out).forEach((v) => v.dispose());
        };
        await once();
        const t0 = performance.now();
        for (let i = 0; i < reps; i++) await once();
        addon[`${b}x${s}`] = (performance.now() - t0) / 1000 / reps;
        [x, e, t].forEach((v) => v.dispose());
      }
    }
  } finally {
    unet.dispose();
  }
  let base: Record<string, number> = {};
  let unsliced: Record<string, number> = {};
  if (device === 'cpu') {
    const args = [dir, sizes.join(','), batches.join(','), String(reps)];
    base = JSON.parse(await py('unet_eager.py', args)) as Record<string, number>;
    unsliced = JSON.parse(await py('unet_eager.py', [...args, '--unsliced'])) as Record<string, number>;
  }
  const rows = Object.entries(addon).map(([k, v]) => {
    const p = base[k];
    const u = unsliced[k];
    return [k.replace('x', ' × ') + ' px', fmt(v), p ? fmt(p) : '-', p ? (p / v).toFixed(2) : '-', u ? fmt(u) : '-', u ? (u / v).toFixed(2) : '-'];
  });
  return [
    `UNet forward, SD1.5 full size, random weights, ${device} ${dtype}, ${threads()} threads, ${reps} rep(s) after 1 warm-up`,
    table(['batch × size', 'addon s', 'python eager s', 'ratio (python/addon)', 'python eager, unsliced attention s', 'ratio (unsliced/addon)'], rows),
  ].join('\n');
}
