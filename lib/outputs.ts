/**
 * Output names, output paths, resume checks and temporary files: the rules every writer of feature
 * outputs follows (`extract`, `recipe`, the scale-out worker), so they all write exactly the same
 * thing for the same input.
 *
 * Public functions (signatures are stable; the worker relies on them):
 * - `outputNameFor(input: string | Uint8Array, opts?: { name?: string; index?: number }): string`
 *   — the output base name (no extension) of an image input: the file's base name without its
 *   extension, sanitised ({@link sanitizeOutputName}). Never empty, never `.`/`..`, never holds a
 *   path separator, a control/format character or a leading dot; at most {@link MAX_NAME_BYTES} bytes.
 * - `outputPathFor(outDir: string, name: string, format: OutputFormat): string` — `DIR/<name>.safetensors`
 *   or `DIR/<name>` (an npy folder); throws `E_INVALID_ARGUMENT` unless the result lies directly in `outDir`.
 * - `checkExistingOutput(path: string, settings: Record<string, string>): Promise<ExistingOutput>` —
 *   `{ exists: false }` when nothing is at `path`; `{ exists: true, recorded }` when an output of this
 *   package is there and every key of `settings` has the same recorded value; otherwise throws
 *   {@link SettingsMismatchError} (`E_SETTINGS_MISMATCH`, naming the file and each difference) or
 *   `E_INVALID_FILE` (something is there that is not an output of this package).
 * - `tempPathFor(path: string): string` — a fresh temporary path next to `path`, named
 *   `.<base>.df-tmp-<host>-<pid>-<random>` so that {@link cleanStaleTemps} can recognise it.
 * - `cleanStaleTemps(dir: string, opts?: { maxAgeMs?: number }): Promise<string[]>` — removes the
 *   temporaries of dead processes of this host (or of any host once older than `maxAgeMs`, default
 *   30 min) in `dir`; returns them.
 * - `comparable(settings)` — the recorded settings an existing output must match (all but `device`).
 * - `replaceOutputDir(tmpDir: string, path: string): Promise<void>` — moves a finished npy output folder
 *   into place, removing an existing one only when it provably is an output of this package.
 * - `removeOwnTempsSync(dir: string): string[]` — synchronously removes this process's temporaries in
 *   `dir` (for a signal handler that is about to exit).
 * - `NPY_SETTINGS_FILE` — `settings.json`, written into every npy output folder (its recorded settings).
 *
 * @module
 */
import { randomBytes, createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { lstatSync, readdirSync, rmdirSync, unlinkSync } from 'node:fs';
import { lstat, open, readdir, readFile, rename, rm, rmdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, extname, join, relative, resolve, isAbsolute, sep } from 'node:path';
import { DiffusionFeaturesError, InvalidArgumentError, InvalidFileError } from './errors.js';

/** Output formats of `extract`. */
export type OutputFormat = 'safetensors' | 'npy';

/** Longest output base name in UTF-8 bytes (leaves room for extension and temp prefix within NAME_MAX 255). */
export const MAX_NAME_BYTES = 180;

/** File holding the recorded settings inside an npy output folder. */
export const NPY_SETTINGS_FILE = 'settings.json';

/** Marker inside every temporary name this package creates. */
export const TEMP_MARK = '.df-tmp-';

/** Default age after which a temporary of a still-running process counts as stale (ms). */
export const STALE_TEMP_AGE_MS = 30 * 60 * 1000;

/** The recorded settings of an existing output differ from this run's. */
export class SettingsMismatchError extends DiffusionFeaturesError {
  /** The existing output. */
  readonly file: string;
  /** Keys whose values differ: `[key, recorded, now]`. */
  readonly differences: [string, string | undefined, string][];

  /**
   * @param file the existing output
   * @param differences `[key, recorded value, this run's value]` per differing key
   */
  constructor(file: string, differences: [string, string | undefined, string][]) {
    const show = (v: string | undefined): string => (v === undefined ? '(not recorded)' : JSON.stringify(v.length > 80 ? `${v.slice(0, 77)}...` : v));
    const list = differences.slice(0, 6).map(([k, a, b]) => `${k}: ${show(a)} there, ${show(b)} now`).join('; ');
    const more = differences.length > 6 ? `; and ${differences.length - 6} more` : '';
    super('E_SETTINGS_MISMATCH', `${file} exists but was written with different settings (${list}${more}); use --overwrite to redo it, or another output folder`);
    this.file = file;
    this.differences = differences;
  }
}

// Control (Cc), format (Cf: bidi overrides, zero-width…), separators (Zl/Zp), surrogates and
// private-use/unassigned code points, plus path separators and characters Windows forbids.
const UNSAFE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}\p{Co}\p{Cn}/\\<>:"|?*]/gu;

function truncateUtf8(s: string, maxBytes: number): string {
  const enc = new TextEncoder();
  if (enc.encode(s).length <= maxBytes) return s;
  let out = '';
  let n = 0;
  for (const ch of s) {
    const b = enc.encode(ch).length;
    if (n + b > maxBytes) break;
    out += ch;
    n += b;
  }
  return out;
}

/**
 * Makes `raw` safe as an output base name: unsafe characters (path separators, control and format
 * characters, `<>:"|?*`) become `_`, leading dots and trailing dots/spaces become `_` (so no name is
 * `.`, `..` or hidden, and none collides with a temporary), an empty name becomes `image`, and names
 * over {@link MAX_NAME_BYTES} bytes are cut and given a short hash of the full name so they stay distinct.
 * Ordinary names (`photo_01`, `Straße`, `写真`) are unchanged.
 */
export function sanitizeOutputName(raw: string): string {
  let s = String(raw).normalize('NFC').replace(UNSAFE, '_');
  s = s.replace(/^\.+/, (m) => '_'.repeat(m.length)).replace(/[. ]+$/, (m) => '_'.repeat(m.length));
  if (!s) s = 'image';
  if (new TextEncoder().encode(s).length > MAX_NAME_BYTES) {
    const hash = createHash('sha256').update(String(raw)).digest('hex').slice(0, 12);
    s = `${truncateUtf8(s, MAX_NAME_BYTES - 13)}-${hash}`;
  }
  return s;
}

/**
 * The output base name of an image input: for a path, its base name without the extension; for bytes,
 * `opts.name` or `image<index>`; always passed through {@link sanitizeOutputName}.
 */
export function outputNameFor(input: string | Uint8Array, opts: { name?: string; index?: number } = {}): string {
  if (typeof input === 'string') {
    const base = basename(input);
    return sanitizeOutputName(basename(base, extname(base)));
  }
  return sanitizeOutputName(opts.name ?? `image${opts.index ?? 0}`);
}

/** Throws unless `path` lies directly inside `dir` (after resolving `.`/`..`). */
export function assertInside(dir: string, path: string): void {
  const rel = relative(resolve(dir), resolve(path));
  if (!rel || rel.startsWith('..') || isAbsolute(rel) || rel.includes(sep)) {
    throw new InvalidArgumentError(`output ${JSON.stringify(path)} would not lie inside the output folder ${dir}; refusing to write it`);
  }
}

/** `DIR/<name>.safetensors` or `DIR/<name>` (npy folder); `name` must already be sanitised. */
export function outputPathFor(outDir: string, name: string, format: OutputFormat): string {
  if (name !== sanitizeOutputName(name)) throw new InvalidArgumentError(`output name ${JSON.stringify(name)} is not a safe name (use outputNameFor)`);
  const path = format === 'safetensors' ? join(outDir, `${name}.safetensors`) : join(outDir, name);
  assertInside(outDir, path);
  return path;
}

/** Settings compared on resume: everything recorded except the device (CPU and CUDA outputs mix). */
export function comparable(settings: Record<string, string>): Record<string, string> {
  const { device: _device, ...rest } = settings;
  return rest;
}

/**
 * `raw` as a host tag of temporary names: letters, digits, `_` and inner `-` only, at most 24
 * characters; a host name that had to be changed or cut keeps a short hash of itself, so distinct
 * hosts keep distinct tags.
 */
export function hostTag(raw: string): string {
  const clean = raw.replace(/[^A-Za-z0-9-]/g, '_').replace(/^-+|-+$/g, '_');
  if (clean && clean === raw && clean.length <= 24) return clean;
  const hash = createHash('sha256').update(raw).digest('hex').slice(0, 6);
  return `${clean.slice(0, 17)}_${hash}`;
}

let thisHost: string | undefined;

/** The {@link hostTag} of this machine. */
export function localHostTag(): string {
  return (thisHost ??= hostTag(hostname()));
}

/**
 * A fresh temporary path next to `path`: `.<base>.df-tmp-<host>-<pid>-<random>` (recognised by
 * {@link cleanStaleTemps}; the host tag lets workers on a shared volume tell their own temporaries
 * from another host's).
 */
export function tempPathFor(path: string): string {
  const base = truncateUtf8(basename(path), 190);
  return join(dirname(path), `.${base}${TEMP_MARK}${localHostTag()}-${process.pid}-${randomBytes(6).toString('hex')}`);
}

/** Who created a temporary: its host tag and pid. `host` is undefined for names of earlier releases (`.df-tmp-<pid>-<random>`). */
export interface TempOwner {
  host?: string;
  pid: number;
}

/** The creator of a temporary named by {@link tempPathFor}, or undefined for any other name. */
export function tempOwner(name: string): TempOwner | undefined {
  const m = /^\..*\.df-tmp-(?:([A-Za-z0-9_-]{1,24})-)?(\d{1,10})-[0-9a-f]{12}$/su.exec(name);
  if (!m) return undefined;
  const pid = Number(m[2]);
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
  return m[1] === undefined ? { pid } : { host: m[1], pid };
}

/** The pid that created a temporary named by {@link tempPathFor}, or undefined for any other name. */
export function tempOwnerPid(name: string): number | undefined {
  return tempOwner(name)?.pid;
}

/** Whether a temporary was made on this host (names of earlier releases carry no host: taken as local). */
function isLocal(owner: TempOwner): boolean {
  return owner.host === undefined || owner.host === localHostTag();
}

function pidAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes the temporaries {@link tempPathFor} names in `dir` that were made on this host by a process
 * that is gone, and any temporary older than `maxAgeMs` (default 30 min; a pid can be reused). A
 * temporary of another host (a shared volume) is never judged by its pid, only by its age.
 * Only entries whose name matches the temporary pattern are touched; a temporary folder is removed
 * only when it holds nothing but plain files. Errors on single entries are ignored (another process may
 * clean the same folder). Returns the removed paths.
 */
export async function cleanStaleTemps(dir: string, opts: { maxAgeMs?: number } = {}): Promise<string[]> {
  const maxAge = opts.maxAgeMs ?? STALE_TEMP_AGE_MS;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  const now = Date.now();
  for (const name of names) {
    const owner = tempOwner(name);
    if (owner === undefined) continue;
    const path = join(dir, name);
    try {
      const st = await lstat(path);
      const old = now - st.mtimeMs > maxAge;
      if (!old && (!isLocal(owner) || pidAlive(owner.pid))) continue;
      if (st.isFile() || st.isSymbolicLink()) await unlink(path);
      else if (st.isDirectory()) await removeFlatDir(path);
      else continue;
      removed.push(path);
    } catch {
      // raced with another cleaner, or not ours to remove
    }
  }
  return removed;
}

/** Removes a folder that holds only plain files (never recursing into anything else). */
async function removeFlatDir(path: string): Promise<void> {
  for (const e of await readdir(path, { withFileTypes: true })) {
    if (!e.isFile() && !e.isSymbolicLink()) throw new InvalidFileError(path, `holds ${e.name}, which is not a plain file; not removing it`);
  }
  for (const e of await readdir(path)) await unlink(join(path, e));
  await rmdir(path);
}

/** Reads the `__metadata__` of a safetensors file (header only, bounded). */
async function safetensorsMetadata(path: string): Promise<{ meta: Record<string, string>; tensors: string[] } | undefined> {
  const fh = await open(path, 'r');
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size < 8) return undefined;
    const head = Buffer.alloc(8);
    await fh.read(head, 0, 8, 0);
    const n = head.readBigUInt64LE(0);
    if (n < 2n || n > 16n * 1024n * 1024n || Number(n) + 8 > st.size) return undefined;
    const buf = Buffer.alloc(Number(n));
    await fh.read(buf, 0, buf.length, 8);
    let json: unknown;
    try {
      json = JSON.parse(buf.toString('utf8'));
    } catch {
      return undefined;
    }
    if (!json || typeof json !== 'object' || Array.isArray(json)) return undefined;
    const { __metadata__: meta, ...rest } = json as Record<string, unknown>;
    if (!meta || typeof meta !== 'object' || Array.isArray(meta)) return undefined;
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(meta as Record<string, unknown>)) if (typeof v === 'string') out[k] = v;
    return { meta: out, tensors: Object.keys(rest) };
  } finally {
    await fh.close();
  }
}

/** What {@link checkExistingOutput} found. */
export type ExistingOutput = { exists: false } | { exists: true; recorded: Record<string, string> };

/** Reads the settings recorded in an output (safetensors metadata, or an npy folder's settings.json). */
export async function readRecordedSettings(path: string): Promise<Record<string, string> | undefined> {
  const st = await lstat(path);
  if (st.isFile()) {
    const r = await safetensorsMetadata(path);
    if (!r || r.meta.format !== 'diffusion-features') return undefined;
    return { ...r.meta, packaged: r.tensors.includes('packaged') ? 'true' : 'false' };
  }
  if (st.isDirectory()) {
    let json: unknown;
    try {
      const s = await stat(join(path, NPY_SETTINGS_FILE));
      if (!s.isFile() || s.size > 16 * 1024 * 1024) return undefined;
      json = JSON.parse(await readFile(join(path, NPY_SETTINGS_FILE), 'utf8'));
    } catch {
      return undefined;
    }
    if (!json || typeof json !== 'object' || Array.isArray(json)) return undefined;
    const rec = json as Record<string, unknown>;
    if (rec.format !== 'diffusion-features') return undefined;
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(rec)) if (typeof v === 'string') out[k] = v;
    out.packaged ??= (await readdir(path)).includes('packaged.npy') ? 'true' : 'false';
    return out;
  }
  return undefined;
}

/**
 * Checks what is at an output path before a run writes it (see the module doc).
 * @param path the output (`outputPathFor`)
 * @param settings this run's values of the settings that must match (keys absent here are not compared)
 * @throws SettingsMismatchError when recorded values differ; InvalidFileError when `path` holds
 *   something that is not an output of this package (it is never overwritten then)
 */
export async function checkExistingOutput(path: string, settings: Record<string, string>): Promise<ExistingOutput> {
  try {
    await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { exists: false };
    throw new InvalidFileError(path, `cannot inspect existing output (${(e as NodeJS.ErrnoException).code ?? String(e)})`, { cause: e });
  }
  let recorded: Record<string, string> | undefined;
  try {
    recorded = await readRecordedSettings(path);
  } catch (e) {
    throw new InvalidFileError(path, `cannot read existing output (${(e as NodeJS.ErrnoException).code ?? String(e)})`, { cause: e });
  }
  if (!recorded) throw new InvalidFileError(path, 'exists and is not an output of diffusion-features; not touching it (move it away or choose another output folder)');
  const diffs: [string, string | undefined, string][] = [];
  for (const [k, v] of Object.entries(settings)) if (recorded[k] !== v) diffs.push([k, recorded[k], v]);
  if (diffs.length) throw new SettingsMismatchError(path, diffs);
  return { exists: true, recorded };
}

/** Whether `path` is an npy output folder this package wrote (a real folder of *.npy + settings.json). */
async function isOwnNpyDir(path: string): Promise<boolean> {
  const st = await lstat(path);
  if (!st.isDirectory()) return false;
  const entries = await readdir(path, { withFileTypes: true });
  if (!entries.some((e) => e.name === NPY_SETTINGS_FILE)) return false;
  if (!entries.every((e) => e.isFile() && (e.name === NPY_SETTINGS_FILE || e.name.endsWith('.npy')))) return false;
  return (await readRecordedSettings(path)) !== undefined;
}

/**
 * Moves the finished npy folder `tmpDir` to `path`. An existing `path` is replaced only when it is an
 * npy output of this package ({@link NPY_SETTINGS_FILE} + `*.npy` plain files only): it is first renamed
 * aside, then its files are unlinked one by one; anything else makes this throw and leaves it alone.
 */
export async function replaceOutputDir(tmpDir: string, path: string): Promise<void> {
  let exists = true;
  try {
    await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    exists = false;
  }
  if (!exists) {
    await rename(tmpDir, path);
    return;
  }
  if (!(await isOwnNpyDir(path))) {
    throw new InvalidFileError(path, 'exists and is not an npy output of diffusion-features; not replacing it');
  }
  const aside = tempPathFor(path);
  await rename(path, aside);
  try {
    await rename(tmpDir, path);
  } catch (e) {
    await rename(aside, path).catch(() => undefined);
    throw e;
  }
  await removeFlatDir(aside).catch(() => undefined);
}

/** Removes a temporary this process created (file or flat folder); never throws. */
export async function removeTemp(path: string): Promise<void> {
  if (tempOwnerPid(basename(path)) === undefined) return;
  try {
    const st = await lstat(path);
    if (st.isDirectory()) await removeFlatDir(path);
    else await rm(path, { force: true });
  } catch {
    // already gone
  }
}

/**
 * Synchronously removes the temporaries of THIS process in `dir` (files, and folders holding only
 * plain files). For signal handlers about to exit; returns the removed paths.
 */
export function removeOwnTempsSync(dir: string): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    const owner = tempOwner(name);
    if (owner?.pid !== process.pid || !isLocal(owner)) continue;
    const path = join(dir, name);
    try {
      const st = lstatSync(path);
      if (st.isDirectory()) {
        const entries = readdirSync(path, { withFileTypes: true });
        if (!entries.every((e) => e.isFile() || e.isSymbolicLink())) continue;
        for (const e of entries) unlinkSync(join(path, e.name));
        rmdirSync(path);
      } else {
        unlinkSync(path);
      }
      removed.push(path);
    } catch {
      // gone already
    }
  }
  return removed;
}
