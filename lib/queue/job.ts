/**
 * Scale-out jobs: what one queued job holds, its canonical settings, and the job id derived from the
 * image bytes and those settings (docs/scale-out.md, "What a job is").
 *
 * A job never carries feature bytes or file contents, only paths as the workers see them plus the
 * SHA-256 of every file it names (image, LoRA files, noise file): a worker refuses a file whose bytes
 * changed since the job was enqueued, so a job id always means the same work.
 *
 * Canonical settings fill every default and resolve layer presets / layer-config files to the sorted
 * id list on the enqueuing side, so `legacy` and the same ids written out give the same job; a JSON
 * key order or a default spelled out never changes an id.
 *
 * @module
 */
import { createHash } from 'node:crypto';
import { open, lstat } from 'node:fs/promises';
import { constants } from 'node:fs';
import { resolve } from 'node:path';
import { DiffusionFeaturesError, InvalidArgumentError, FileAccessError, LimitExceededError, fileError } from '../errors.js';
import { resolveLayerSpec, sortForwardOrder, isLayerId } from '../layers.js';
import { outputNameFor, sanitizeOutputName } from '../outputs.js';
import { RECIPES } from '../recipes.js';

/** Version of the job data layout; a worker rejects other versions with a clear reason. */
export const JOB_VERSION = 1;

/** Default BullMQ queue name. */
export const DEFAULT_QUEUE = 'diffusion-features';

/** A file a job names, with the SHA-256 of its bytes at enqueue time. */
export interface FileRef {
  /** Absolute path, as the workers see it. */
  file: string;
  /** Hex SHA-256 of the file's bytes. */
  sha256: string;
}

/** A LoRA file of a job, with its scale. */
export interface LoraRef extends FileRef {
  scale: number;
}

/** Canonical settings of an `extract` job: every `extract` option except the worker's own (weights, device, dtype, batch size, output folder). */
export interface ExtractJobSettings {
  kind: 'extract';
  /** Layer ids in forward order (presets and layer-config files are resolved when enqueuing). */
  layers: string[];
  /** The aggregated up-cross attention feature `attn`. */
  attention: boolean;
  prompt: string;
  t: number;
  seed: number;
  /** `--noise` file: a job uses its first row (what `extract` does on that image alone). */
  noise: FileRef | null;
  posterior: 'sample' | 'mean';
  timestepMode: 'reference' | 'exact';
  control: 'canny' | null;
  controlScale: number;
  denoiseFrom: number | null;
  /** `'plms'` unless multi-step denoising asks for `'ddim'`. */
  scheduler: 'plms' | 'ddim';
  lora: LoraRef[];
  loraTextEncoder: boolean;
  /** `null`: the model's default size. */
  size: number | null;
  featureResize: number;
  /** Also store `packaged` (`extract --aggregate`). */
  aggregate: boolean;
  format: 'safetensors' | 'npy';
  overwrite: boolean;
}

/** Canonical settings of a `recipe` job. */
export interface RecipeJobSettings {
  kind: 'recipe';
  recipe: string;
  /** LoRA file per recipe slot. */
  loraSlots: Record<string, LoraRef>;
  skipMissingLora: boolean;
  seed: number;
  size: number | null;
  batchVariants: 'auto' | 'on' | 'off';
  overwrite: boolean;
}

/** Canonical settings of a job. */
export type JobSettings = ExtractJobSettings | RecipeJobSettings;

/** The data of one queued job (what Redis holds). */
export interface JobData {
  v: number;
  /** Absolute image path as the workers see it. */
  image: string;
  /** The output base name (`outputNameFor(image)`): the worker writes `OUT/<name>.safetensors`. */
  name: string;
  /** Hex SHA-256 of the image bytes at enqueue time. */
  sha256: string;
  settings: JobSettings;
}

/** Progress a worker reports on a job. */
export interface JobProgress {
  stage: string;
  /** Images of the job's batch finished so far. */
  done: number;
  /** Images in the job's batch. */
  total: number;
  step?: number;
  steps?: number;
}

/** What a completed job returns. */
export interface JobResult {
  /** The output path the worker wrote (or found). */
  output: string;
  /** `false` when an output with the same settings was already there (nothing was written). */
  written: boolean;
  /** Images in the batch this job ran in. */
  batch: number;
  /** Seconds the batch took in the pipeline. */
  seconds: number;
}

/** The options of an `extract` job as a caller gives them (API and CLI), before canonicalisation. */
export interface ExtractJobOptions {
  /** Preset, ids, or a layer-config JSON file read now, on the enqueuing side. */
  layers?: string | readonly string[];
  prompt?: string;
  t?: number;
  seed?: number;
  /** A `--noise` safetensors file (path as the workers see it). */
  noise?: string;
  posterior?: 'sample' | 'mean';
  timestepMode?: 'reference' | 'exact';
  attention?: boolean;
  control?: 'canny' | null;
  controlScale?: number;
  denoiseFrom?: number;
  scheduler?: 'plms' | 'ddim';
  lora?: readonly { file: string; scale?: number }[];
  loraTextEncoder?: boolean;
  size?: number;
  featureResize?: number;
  aggregate?: boolean;
  format?: 'safetensors' | 'npy';
  overwrite?: boolean;
}

/** The options of a `recipe` job as a caller gives them. */
export interface RecipeJobOptions {
  recipe: string;
  loraSlots?: Record<string, { file: string; scale?: number }>;
  skipMissingLora?: boolean;
  seed?: number;
  size?: number;
  batchVariants?: 'auto' | 'on' | 'off';
  overwrite?: boolean;
}

/** Whether anything (file, folder, link) is at `path`. */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** Largest file a job may name (images, LoRA and noise files are hashed and read whole). */
export const MAX_JOB_FILE_BYTES = 4 * 2 ** 30;

/**
 * Reads a regular file (never a FIFO, device or folder) of at most `maxBytes`, opening it without
 * blocking, and returns its bytes or only their SHA-256. Errors are library errors naming the file.
 */
export async function readJobFile(path: string, opts: { maxBytes?: number; hashOnly: true }): Promise<{ sha256: string; size: number }>;
export async function readJobFile(path: string, opts?: { maxBytes?: number; hashOnly?: false }): Promise<{ sha256: string; size: number; data: Buffer }>;
export async function readJobFile(path: string, opts: { maxBytes?: number; hashOnly?: boolean } = {}): Promise<{ sha256: string; size: number; data?: Buffer }> {
  const max = opts.maxBytes ?? MAX_JOB_FILE_BYTES;
  let fh;
  try {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below, as are devices).
    fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (e) {
    throw fileError(path, e);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new FileAccessError(path, 'not a regular file (a FIFO, device, socket or folder)');
    if (st.size > max) throw new LimitExceededError(`${path}: ${st.size} bytes, more than the limit of ${max}`);
    const hash = createHash('sha256');
    const chunks: Buffer[] = [];
    const buf = Buffer.allocUnsafe(Math.min(1 << 20, Math.max(1, st.size)));
    let total = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      total += bytesRead;
      if (total > max) throw new LimitExceededError(`${path}: more than the limit of ${max} bytes`);
      const piece = buf.subarray(0, bytesRead);
      hash.update(piece);
      if (!opts.hashOnly) chunks.push(Buffer.from(piece));
    }
    return { sha256: hash.digest('hex'), size: total, data: opts.hashOnly ? undefined : Buffer.concat(chunks, total) };
  } finally {
    await fh.close();
  }
}

function int(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new InvalidArgumentError(`${name} must be an integer in [${min}, ${max}], got ${String(v)}`);
  return v;
}

function num(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw new InvalidArgumentError(`${name} must be a number in [${min}, ${max}], got ${String(v)}`);
  return v;
}

function oneOf<T extends string>(name: string, v: unknown, values: readonly T[]): T {
  if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) throw new InvalidArgumentError(`${name} must be one of ${values.join(', ')}, got ${JSON.stringify(v)}`);
  return v as T;
}

function bool(name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw new InvalidArgumentError(`${name} must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function str(name: string, v: unknown, maxLen: number): string {
  if (typeof v !== 'string' || v.length > maxLen) throw new InvalidArgumentError(`${name} must be a string of at most ${maxLen} characters`);
  return v;
}

const SHA256 = /^[0-9a-f]{64}$/;
/** Longest prompt a job may carry (characters). */
export const MAX_PROMPT_CHARS = 4096;

function fileRef(name: string, v: unknown): FileRef {
  if (!v || typeof v !== 'object') throw new InvalidArgumentError(`${name} must be {file, sha256}`);
  const r = v as Record<string, unknown>;
  const file = str(`${name}.file`, r.file, 4096);
  if (!file.startsWith('/')) throw new InvalidArgumentError(`${name}.file must be an absolute path`);
  if (typeof r.sha256 !== 'string' || !SHA256.test(r.sha256)) throw new InvalidArgumentError(`${name}.sha256 must be a hex SHA-256`);
  return { file, sha256: r.sha256 };
}

function loraRef(name: string, v: unknown): LoraRef {
  return { ...fileRef(name, v), scale: num(`${name}.scale`, (v as Record<string, unknown>).scale, -100, 100) };
}

const own = (o: object, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k);

/**
 * Validates canonical settings (as a worker reads them from Redis, or a caller hands them over) and
 * returns a fresh object with exactly the known keys, in a fixed order. Throws `E_INVALID_ARGUMENT`.
 */
export function checkJobSettings(v: unknown): JobSettings {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new InvalidArgumentError('job settings must be an object');
  const s = v as Record<string, unknown>;
  if (s.kind === 'recipe') {
    const recipe = str('recipe', s.recipe, 64);
    if (!own(RECIPES, recipe)) throw new InvalidArgumentError(`unknown recipe '${recipe}' (known: ${Object.keys(RECIPES).join(', ')})`);
    const slots = s.loraSlots;
    if (!slots || typeof slots !== 'object' || Array.isArray(slots)) throw new InvalidArgumentError('loraSlots must be an object');
    const known = RECIPES[recipe]!.loraSlots;
    const loraSlots: Record<string, LoraRef> = {};
    for (const k of Object.keys(slots).sort()) {
      if (!known.includes(k)) throw new InvalidArgumentError(`recipe ${recipe} has no LoRA slot '${k}' (slots: ${known.join(', ')})`);
      loraSlots[k] = loraRef(`loraSlots.${k}`, (slots as Record<string, unknown>)[k]);
    }
    return {
      kind: 'recipe',
      recipe,
      loraSlots,
      skipMissingLora: bool('skipMissingLora', s.skipMissingLora),
      seed: int('seed', s.seed, 0, Number.MAX_SAFE_INTEGER),
      size: s.size === null ? null : int('size', s.size, 64, 4096),
      batchVariants: oneOf('batchVariants', s.batchVariants, ['auto', 'on', 'off'] as const),
      overwrite: bool('overwrite', s.overwrite),
    };
  }
  if (s.kind !== 'extract') throw new InvalidArgumentError(`job kind must be 'extract' or 'recipe', got ${JSON.stringify(s.kind)}`);
  if (!Array.isArray(s.layers) || s.layers.length > 1024) throw new InvalidArgumentError('layers must be a list of layer ids');
  const layers = s.layers.map((id, i) => {
    if (typeof id !== 'string' || !isLayerId(id)) throw new InvalidArgumentError(`layers[${i}]: not a layer id: ${JSON.stringify(id)?.slice(0, 80)}`);
    return id;
  });
  const attention = bool('attention', s.attention);
  if (!layers.length && !attention) throw new InvalidArgumentError('no layers and no attention feature: nothing to extract');
  const t = int('t', s.t, 0, 999);
  const size = s.size === null ? null : int('size', s.size, 64, 4096);
  if (size !== null && size % 64 !== 0) throw new InvalidArgumentError(`size must be a multiple of 64, got ${size}`);
  const denoiseFrom = s.denoiseFrom === null ? null : int('denoiseFrom', s.denoiseFrom, t + 1, 999);
  const control = s.control === null ? null : oneOf('control', s.control, ['canny'] as const);
  if (denoiseFrom !== null && control === null) throw new InvalidArgumentError('denoiseFrom needs control canny');
  if (!Array.isArray(s.lora) || s.lora.length > 64) throw new InvalidArgumentError('lora must be a list of {file, sha256, scale}');
  return {
    kind: 'extract',
    layers: sortForwardOrder(layers),
    attention,
    prompt: str('prompt', s.prompt, MAX_PROMPT_CHARS),
    t,
    seed: int('seed', s.seed, 0, Number.MAX_SAFE_INTEGER),
    noise: s.noise === null ? null : fileRef('noise', s.noise),
    posterior: oneOf('posterior', s.posterior, ['sample', 'mean'] as const),
    timestepMode: oneOf('timestepMode', s.timestepMode, ['reference', 'exact'] as const),
    control,
    controlScale: num('controlScale', s.controlScale, -100, 100),
    denoiseFrom,
    scheduler: denoiseFrom === null ? 'plms' : oneOf('scheduler', s.scheduler, ['plms', 'ddim'] as const),
    lora: s.lora.map((l, i) => loraRef(`lora[${i}]`, l)),
    loraTextEncoder: bool('loraTextEncoder', s.loraTextEncoder),
    size,
    featureResize: int('featureResize', s.featureResize, 1, 64),
    aggregate: bool('aggregate', s.aggregate),
    format: oneOf('format', s.format, ['safetensors', 'npy'] as const),
    overwrite: bool('overwrite', s.overwrite),
  };
}

/** Validates job data read from Redis. Throws `E_INVALID_ARGUMENT` naming the problem. */
export function checkJobData(v: unknown): JobData {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new InvalidArgumentError('job data must be an object');
  const d = v as Record<string, unknown>;
  if (d.v !== JOB_VERSION) throw new InvalidArgumentError(`job data version ${String(d.v)} is not ${JOB_VERSION} (enqueued by another release?)`);
  const image = str('image', d.image, 4096);
  if (!image.startsWith('/')) throw new InvalidArgumentError('image must be an absolute path');
  const name = str('name', d.name, 1024);
  if (name !== sanitizeOutputName(name)) throw new InvalidArgumentError(`output name ${JSON.stringify(name).slice(0, 80)} is not a safe name`);
  if (typeof d.sha256 !== 'string' || !SHA256.test(d.sha256)) throw new InvalidArgumentError('sha256 must be a hex SHA-256');
  return { v: JOB_VERSION, image, name, sha256: d.sha256, settings: checkJobSettings(d.settings) };
}

async function hashRef(file: string, what: string): Promise<FileRef> {
  const abs = resolve(file);
  try {
    const { sha256 } = await readJobFile(abs, { hashOnly: true });
    return { file: abs, sha256 };
  } catch (e) {
    if (e instanceof DiffusionFeaturesError) {
      // keep the typed error (class, code, file); say which reference it is
      e.message = `${what}: ${e.message}`;
      throw e;
    }
    throw e;
  }
}

/**
 * Canonical settings of `extract` options (defaults filled, layers resolved, files hashed). Layer
 * specs are resolved here, on the enqueuing side: a layer-config file named in `layers` is read by the
 * caller's process (never by a worker or a service).
 */
export async function extractJobSettings(o: ExtractJobOptions): Promise<ExtractJobSettings> {
  const spec = await resolveLayerSpec(typeof o.layers === 'string' ? o.layers : o.layers ? [...o.layers] : 'legacy');
  const lora: LoraRef[] = [];
  for (const l of o.lora ?? []) lora.push({ ...(await hashRef(l.file, '--lora')), scale: l.scale ?? 1 });
  const raw = {
    kind: 'extract',
    layers: spec.ids,
    attention: !!o.attention || spec.attention,
    prompt: o.prompt ?? '',
    t: o.t ?? 50,
    seed: o.seed ?? 0,
    noise: o.noise ? await hashRef(o.noise, '--noise') : null,
    posterior: o.posterior ?? 'sample',
    timestepMode: o.timestepMode ?? 'reference',
    control: o.control ?? null,
    controlScale: o.controlScale ?? 1,
    denoiseFrom: o.denoiseFrom ?? null,
    scheduler: o.scheduler ?? 'plms',
    lora,
    loraTextEncoder: !!o.loraTextEncoder,
    size: o.size ?? null,
    featureResize: o.featureResize ?? 1,
    aggregate: !!o.aggregate,
    format: o.format ?? 'safetensors',
    overwrite: !!o.overwrite,
  };
  return checkJobSettings(raw) as ExtractJobSettings;
}

/** Canonical settings of `recipe` options (LoRA files hashed). */
export async function recipeJobSettings(o: RecipeJobOptions): Promise<RecipeJobSettings> {
  const loraSlots: Record<string, LoraRef> = {};
  for (const [slot, l] of Object.entries(o.loraSlots ?? {})) loraSlots[slot] = { ...(await hashRef(l.file, `--lora-slot ${slot}`)), scale: l.scale ?? 1 };
  return checkJobSettings({
    kind: 'recipe',
    recipe: o.recipe,
    loraSlots,
    skipMissingLora: !!o.skipMissingLora,
    seed: o.seed ?? 0,
    size: o.size ?? null,
    batchVariants: o.batchVariants ?? 'auto',
    overwrite: !!o.overwrite,
  }) as RecipeJobSettings;
}

/** JSON with object keys sorted at every level: the same value always gives the same text. */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) : x,
  );
}

/** The settings part of a job's identity (also the batching key: jobs with the same key can share a batch). */
export function settingsKey(s: JobSettings): string {
  return createHash('sha256').update(canonicalJson(s)).digest('hex');
}

/**
 * The job id of `data`: a hash of the image bytes, the output name and the canonical settings, so
 * the same work enqueued twice (from any host, in any order) is one job. (The path itself is not part
 * of it: the same bytes under the same name on another mount are the same work.)
 */
export function jobIdFor(data: Pick<JobData, 'sha256' | 'name' | 'settings'>): string {
  const h = createHash('sha256').update(canonicalJson({ v: JOB_VERSION, image: data.sha256, name: data.name, settings: data.settings })).digest('hex');
  return `df-${h.slice(0, 48)}`;
}

/** Builds the job of one image: reads and hashes it (regular files only). */
export async function jobFor(image: string, settings: JobSettings): Promise<{ id: string; data: JobData }> {
  const abs = resolve(image);
  const { sha256 } = await readJobFile(abs, { hashOnly: true });
  const data: JobData = { v: JOB_VERSION, image: abs, name: outputNameFor(abs), sha256, settings };
  return { id: jobIdFor(data), data };
}
