/**
 * Native-layer benchmarks (`npm run bench -- --only native`):
 *  1. Hand-off of CPU float32 tensors to JS: Tensor.toFloat32Array() (zero-copy external ArrayBuffer) vs a
 *     copying baseline (`new Float32Array(view)`), at 1M, 10M and 100M elements. Zero-copy should be flat.
 *  2. Forward-call overhead: the same TorchScript MLP with the same input run N times through the addon
 *     vs from Python (`torch.jit.load`, inference_mode, same thread count) in the same run; the ratio is
 *     python_time / addon_time (>= 0.95 means the addon adds no meaningful overhead).
 * Sizes can be overridden: DF_BENCH_HANDOFF=1e6,1e7 DF_BENCH_FORWARD_N=500. Runs in well under 2 minutes on 2 cores.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { ROOT, fmt, python, table, threads } from './common.js';
import { ScriptModule, Tensor, libtorchVersion, setNumThreads } from '../lib/native.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function fixtures(): string {
  const dir = join(ROOT, 'test', '.cache', 'native');
  if (!existsSync(join(dir, 'mlp.pt'))) {
    mkdirSync(dir, { recursive: true });
    execFileSync(python(), [join(ROOT, 'test', 'fixtures', 'native', 'make_modules.py'), dir], { stdio: 'ignore' });
  }
  return dir;
}

async function handoff(): Promise<string> {
  const sizes = (process.env.DF_BENCH_HANDOFF ?? '1e6,1e7,1e8').split(',').map(Number);
  const rows: (string | number)[][] = [];
  for (const n of sizes) {
    const t = await Tensor.randn([n], { seed: 1 });
    const reps = n >= 1e8 ? 3 : 7;
    const zc: number[] = [];
    const cp: number[] = [];
    let check = 0;
    gc();
    const views: Float32Array[] = [];
    for (let i = 0; i < reps; i++) {
      const s = performance.now();
      views.push(t.toFloat32Array());
      zc.push(performance.now() - s);
    }
    for (let i = 0; i < reps; i++) {
      const s = performance.now();
      const copy = new Float32Array(views[i]!);
      cp.push(performance.now() - s);
      check += copy[n - 1]! - views[i]![n - 1]!;
    }
    views.length = 0;
    gc();
    if (check !== 0) throw new Error('hand-off mismatch');
    t.dispose();
    const z = median(zc);
    const c = median(cp);
    rows.push([n.toExponential(0).replace('e+', 'e'), (n * 4 / 2 ** 20).toFixed(0), fmt(z * 1000), fmt(c * 1000), `${fmt(c / z)}x`]);
  }
  return table(['elements', 'MiB', 'toFloat32Array (µs)', 'copy baseline (µs)', 'speed-up'], rows) +
    '\n(no bytes are copied by toFloat32Array; what grows with size is V8 counting the external bytes toward GC pressure,' +
    ' which can start a GC step on large hand-offs)';
}

const PY_TIMER = `
import json, sys, time, torch
path, batch, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
m = torch.jit.load(path).eval()
x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    for _ in range(max(20, n // 10)):
        m(x)
    t0 = time.perf_counter()
    for _ in range(n):
        y = m(x)
    dt = time.perf_counter() - t0
print(json.dumps({"ms_per_call": dt * 1000 / n, "checksum": float(y.sum())}))
`;

async function forwardOverhead(): Promise<string> {
  const mlp = join(fixtures(), 'mlp.pt');
  const m = await ScriptModule.load(mlp);
  const rows: (string | number)[][] = [];
  const counts = [...new Set([1, threads()])];
  for (const [nThreads, batch] of counts.flatMap((c) => [[c, 16], [c, 256]] as const)) {
    setNumThreads(nThreads);
    const n = Number(process.env.DF_BENCH_FORWARD_N ?? (batch === 16 ? 2000 : 200));
    const x = await Tensor.randn([batch, 256], { seed: 0 });
    for (let i = 0; i < Math.max(20, n / 10); i++) ((await m.forward(x)) as Tensor).dispose();
    let y: Tensor | undefined;
    const t0 = performance.now();
    for (let i = 0; i < n; i++) {
      y?.dispose();
      y = (await m.forward(x)) as Tensor;
    }
    const addonMs = (performance.now() - t0) / n;
    const sum = y!.toFloat32Array().reduce((a, b) => a + b, 0);
    y!.dispose();
    x.dispose();
    const out = execFileSync(python(), ['-c', PY_TIMER, mlp, String(batch), String(n), String(nThreads)], {
      encoding: 'utf8',
      env: { ...process.env, OMP_NUM_THREADS: String(nThreads) },
    });
    const py = JSON.parse(out.trim().split('\n').pop()!) as { ms_per_call: number; checksum: number };
    if (Math.abs(py.checksum - sum) > 1e-2 * Math.max(1, Math.abs(sum))) throw new Error(`results differ: python ${py.checksum} vs addon ${sum}`);
    rows.push([`MLP 256→512→256, batch ${batch}`, nThreads, n, fmt(addonMs * 1000), fmt(py.ms_per_call * 1000), fmt(py.ms_per_call / addonMs)]);
  }
  m.dispose();
  setNumThreads(threads());
  return table(['module (same input)', 'threads', 'calls', 'addon (µs/call)', 'python torch.jit (µs/call)', 'python/addon'], rows);
}

/** Runs both native benchmarks and returns their report. */
export async function run(): Promise<string> {
  const head = `libtorch ${libtorchVersion()}, ${threads()} threads`;
  const h = await handoff();
  const f = await forwardOverhead();
  return [head, '', '### hand-off of CPU float32 tensors to JS', h, '', '### forward-call overhead (addon vs Python)', f].join('\n');
}
