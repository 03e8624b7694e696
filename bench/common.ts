/** Helpers shared by the benchmark suites. */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
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

/** A full-size SD1.5 export with random weights (made once, cached under bench/.out). */
export async function fullSizeDir(opts: { controlnet?: boolean } = {}): Promise<string> {
  const dir = process.env.DF_BENCH_SD15 ?? join(OUT, 'sd15-random');
  mkdirSync(dir, { recursive: true });
  if (!existsSync(join(dir, 'unet.pt')) || (opts.controlnet && !existsSync(join(dir, 'controlnet.pt')))) {
    await py('make_sd15_unet.py', [dir, ...(opts.controlnet ? ['--controlnet'] : [])]);
  }
  return dir;
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
