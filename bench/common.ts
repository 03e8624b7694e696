/** Helpers shared by the benchmark suites. */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createRequire } from 'node:module';

export const ROOT = join(import.meta.dirname, '..');
export const OUT = join(ROOT, 'bench', '.out');
const run = promisify(execFile);
const require = createRequire(import.meta.url);

/** The Python that has torch ($PYTHON, /usr/bin/python3, python3). */
export function python(): string {
  const { findPython } = require('../scripts/python.cjs') as { findPython: () => string | null };
  const exe = findPython();
  if (!exe) throw new Error('benchmarks need a Python with torch for the baseline (apt-get install python3-torch)');
  return exe;
}

/** Runs a Python script of bench/py and returns its stdout. */
export async function py(script: string, args: string[], timeoutMs = 30 * 60_000): Promise<string> {
  const { stdout } = await run(python(), [join(ROOT, 'bench', 'py', script), ...args], {
    cwd: ROOT,
    maxBuffer: 64 << 20,
    timeout: timeoutMs,
    env: { ...process.env, OMP_NUM_THREADS: process.env.OMP_NUM_THREADS ?? String(threads()) },
  });
  return stdout;
}

export function threads(): number {
  return Number(process.env.OMP_NUM_THREADS) || (require('node:os') as typeof import('node:os')).availableParallelism();
}

/** Files of the full-size export the suites use. */
const FULL_FILES = ['model.json', 'unet.pt', 'vae_encoder.pt', 'text_encoder.pt', 'controlnet.pt', 'vocab.json', 'merges.txt'];

/**
 * A full-size SD1.5 export with random weights, all components (UNet, VAE, text encoder, ControlNet):
 * `$DF_BENCH_SD15`, default bench/.out/sd15-random, built once with `bench/py/export_sd15_random.py --out DIR`
 * (float32, ≈ 5.7 GB, several minutes) when a file is missing.
 */
export async function fullSizeDir(): Promise<string> {
  const dir = process.env.DF_BENCH_SD15 ?? join(OUT, 'sd15-random');
  if (FULL_FILES.some((f) => !existsSync(join(dir, f)))) {
    mkdirSync(OUT, { recursive: true });
    await run(python(), [join(ROOT, 'bench', 'py', 'export_sd15_random.py'), '--out', dir, '--src', join(OUT, 'sd15-src')], {
      cwd: ROOT,
      maxBuffer: 64 << 20,
      timeout: 60 * 60_000,
    });
  }
  return dir;
}

/** `configs[component]` of DIR/model.json. */
export function modelConfig(dir: string, component: string): Record<string, unknown> {
  const m = JSON.parse(readFileSync(join(dir, 'model.json'), 'utf8')) as { configs: Record<string, Record<string, unknown>> };
  const c = m.configs[component];
  if (!c) throw new Error(`${dir}/model.json has no configs.${component}`);
  return c;
}

/** Seconds since `t0` (a performance.now() value). */
export function since(t0: number): number {
  return (performance.now() - t0) / 1000;
}

export function fmt(x: number, digits = 3): string {
  return x >= 100 ? x.toFixed(0) : x.toPrecision(digits);
}

export function table(head: string[], rows: (string | number)[][]): string {
  const cells = [head, ...rows.map((r) => r.map(String))];
  const w = head.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)));
  const line = (r: string[]) => '| ' + r.map((c, i) => c.padEnd(w[i]!)).join(' | ') + ' |';
  return [line(head), '|' + w.map((n) => '-'.repeat(n + 2)).join('|') + '|', ...cells.slice(1).map(line)].join('\n');
}

export function list(env: string | undefined, dflt: number[]): number[] {
  return env ? env.split(',').map(Number) : dflt;
}
