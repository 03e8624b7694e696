/**
 * Shared helpers of the hostile-input corpus (test/hostile/*.test.ts): scratch folders, a CLI runner
 * (a real child process of lib/cli.ts), and the checks every case makes — the error is one of the
 * library's typed errors with the expected code, its message is bounded, and no temporary or partial
 * file is left behind.
 */
import { spawn } from 'node:child_process';
import { deflateSync } from 'node:zlib';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ExecutionContext } from 'ava';
import { DiffusionFeaturesError, type ErrorCode } from '../../lib/errors.js';
import { tempOwnerPid } from '../../lib/outputs.js';

export const ROOT = join(import.meta.dirname, '..', '..');
export const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
export const IMAGES = join(ROOT, 'test', 'fixtures', 'images');

/** A fresh scratch folder removed after the test. */
export async function scratch(t: ExecutionContext, prefix = 'df-hostile-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Longest message a bad input may produce (a 200,000-entry file must not give a megabyte). */
export const MAX_MESSAGE = 4000;

/**
 * Asserts that `p` rejects with a DiffusionFeaturesError of one of `codes` and a bounded message;
 * returns the error.
 */
export async function rejectsTyped(t: ExecutionContext, p: Promise<unknown> | (() => unknown), codes: ErrorCode | ErrorCode[], label: string): Promise<DiffusionFeaturesError | undefined> {
  const want = Array.isArray(codes) ? codes : [codes];
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  if (!(err instanceof DiffusionFeaturesError)) {
    t.fail(`${label}: expected a DiffusionFeaturesError (${want.join('|')}), got ${err === undefined ? 'success' : `${(err as Error)?.name}: ${(err as Error)?.message}`}`);
    return undefined;
  }
  t.true(want.includes(err.code), `${label}: code ${err.code}, expected ${want.join('|')} (${err.message.slice(0, 300)})`);
  t.true(err.message.length <= MAX_MESSAGE, `${label}: message of ${err.message.length} characters`);
  return err;
}

/** Entries of `dir` (recursively) that look like leftovers: our temporaries or `*.tmp*` names. */
export async function leftovers(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    let entries;
    try {
      entries = await readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (tempOwnerPid(e.name) !== undefined || /\.tmp/.test(e.name)) out.push(join(d, e.name));
      if (e.isDirectory()) await walk(join(d, e.name));
    }
  };
  await walk(dir);
  return out;
}

/** Result of a CLI run. */
export interface CliRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Lines GLib prints when sharp's libvips shares a process with libtorch (noise, not our output). */
const NOISE = /^\(process:\d+\): GLib-GObject-CRITICAL.*$|^\s*$/;

/**
 * Runs the CLI (lib/cli.ts through tsx) as a real child process. `onSpawn` gets the child (to send
 * signals). stderr is returned without GLib's noise lines.
 */
export function runCli(args: string[], opts: { cwd?: string; timeoutMs?: number; onStderr?: (text: string, child: import('node:child_process').ChildProcess) => void; onSpawn?: (child: import('node:child_process').ChildProcess) => void } = {}): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], {
      cwd: opts.cwd ?? ROOT,
      env: { ...process.env, FORCE_COLOR: '0' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    opts.onSpawn?.(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => {
      stderr += d;
      opts.onStderr?.(stderr, child);
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr: stderr.split('\n').filter((l) => !NOISE.test(l)).join('\n') });
    });
  });
}

const CRC_TABLE = Int32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});
function crc32(b: Uint8Array): number {
  let c = -1;
  for (const x of b) c = CRC_TABLE[(c ^ x) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}
/** A PNG signature + a valid IHDR chunk declaring width×height RGB (no pixel data): a header-only "bomb". */
export function pngWithHeader(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const body = Buffer.concat([Buffer.from('IHDR'), ihdr]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(13);
  const chunk = (type: string, data: Buffer): Buffer => {
    const b = Buffer.concat([Buffer.from(type), data]);
    const l = Buffer.alloc(4);
    l.writeUInt32BE(data.length);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(crc32(b));
    return Buffer.concat([l, b, c]);
  };
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), len, body, crc, chunk('IDAT', deflateSync(Buffer.alloc(64))), chunk('IEND', Buffer.alloc(0))]);
}

