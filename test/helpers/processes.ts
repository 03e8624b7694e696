/** Child processes of the CLI for the scale-out tests (run from the TypeScript sources with tsx). */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';

export const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'lib', 'cli.ts');

/** A CLI child process with its output collected. */
export interface Cli {
  readonly proc: ChildProcess;
  /** stdout so far. */
  out(): string;
  /** stderr so far. */
  err(): string;
  /** Resolves with the exit code (or 128 + signal number style: `null` code and the signal). */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves once stderr matches `re` (rejects after `ms`). */
  waitFor(re: RegExp, ms?: number): Promise<void>;
}

/** Starts `diffusion-features <args>` (one torch thread, so several fit on two cores). */
export function cli(args: string[], env: Record<string, string> = {}): Cli {
  const proc = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, OMP_NUM_THREADS: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  const waiters: { re: RegExp; resolve: () => void }[] = [];
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    for (const w of waiters.splice(0)) {
      if (w.re.test(err)) w.resolve();
      else waiters.push(w);
    }
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  return {
    proc,
    out: () => out,
    err: () => err,
    exited,
    waitFor(re, ms = 60_000) {
      if (re.test(err)) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`timed out waiting for ${re} in:\n${err.slice(-2000)}`)), ms);
        const done = (): void => {
          clearTimeout(timer);
          resolve();
        };
        waiters.push({ re, resolve: done });
        void exited.then(() => {
          if (!re.test(err)) {
            clearTimeout(timer);
            reject(new Error(`process exited before ${re}:\n${err.slice(-2000)}`));
          }
        });
      });
    },
  };
}

/** Runs a CLI command to its end. */
export async function runCli(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; out: string; err: string }> {
  const c = cli(args, env);
  const { code } = await c.exited;
  return { code, out: c.out(), err: c.err() };
}
