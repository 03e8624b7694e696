/**
 * The weights folder written by `weights/export.py`: its `model.json` (read and validated here, the
 * only reader) and the files a pipeline needs.
 *
 * @module
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { FileAccessError, FileNotFoundError, IncompatibleModelError, InvalidFileError, fileError } from '../errors.js';
import { packageRoot } from '../ops.js';

/** Versions of model.json this release reads. */
const SUPPORTED_FORMATS = [1];

/**
 * Image size used when model.json has no `default_size` (exports of this release always write it,
 * `sample_size × 8`): SD1.5's 512.
 */
export const FALLBACK_DEFAULT_SIZE = 512;

/** Files every weights folder must hold (`controlnet.pt` is optional, loaded when first needed). */
export const REQUIRED_FILES = ['unet.pt', 'vae_encoder.pt', 'text_encoder.pt', 'vocab.json', 'merges.txt'] as const;

/** What `weights/export.py` writes into `model.json` (the fields the pipeline reads). */
export interface ModelJson {
  format_version: number;
  scaling_factor: number;
  /** Side length images are resized to by default (`sample_size × 8`; 512 for SD1.5). */
  default_size?: number;
  sample_size?: number;
  configs: Record<string, Record<string, unknown>>;
  scheduler?: Record<string, unknown>;
  torch_version?: string;
  components?: string[];
  /** Every legal layer id with its per-image shape at `default_size`, in forward order. */
  layers: Record<string, number[]>;
  [k: string]: unknown;
}

/** The bundled tiny SD1.5-shaped model (random weights) used by `demo` and the tests. */
export function bundledModelDir(): string {
  return join(packageRoot(), 'models', 'micro');
}

/** The image size a model uses when none is given: its `default_size`, else {@link FALLBACK_DEFAULT_SIZE}. */
export function defaultSize(model: Pick<ModelJson, 'default_size'>): number {
  const d = model.default_size;
  return typeof d === 'number' ? d : FALLBACK_DEFAULT_SIZE;
}

/** Largest accepted model.json (the full SD1.5 export's is ~60 KB). */
export const MAX_MODEL_JSON_BYTES = 16 * 1024 * 1024;

/** Reads and validates `model.json` of a weights folder. */
export function readModelJson(dir: string): ModelJson {
  const path = join(dir, 'model.json');
  if (!existsSync(path)) {
    throw new FileNotFoundError(path, 'not a diffusion-features weights folder (model.json is missing); create one with `python3 weights/export.py --from <SD1.5 folder> --out <dir>`');
  }
  let json: ModelJson;
  let text: string;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new FileAccessError(path, 'is not a regular file');
    if (st.size > MAX_MODEL_JSON_BYTES) throw new InvalidFileError(path, `is ${st.size} bytes; a model.json is at most ${MAX_MODEL_JSON_BYTES}`);
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw fileError(path, err, 'model.json');
  }
  try {
    json = JSON.parse(text) as ModelJson;
  } catch (err) {
    // V8's message quotes the text: keep only the position
    const at = /position \d+/.exec((err as Error).message)?.[0];
    throw new InvalidFileError(path, `not valid JSON${at ? ` (at ${at})` : ''}`);
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new InvalidFileError(path, 'must hold a JSON object');
  if (!SUPPORTED_FORMATS.includes(json.format_version)) {
    throw new IncompatibleModelError(
      `${path}: format_version ${String(json.format_version)} is not supported by this release (reads ${SUPPORTED_FORMATS.join(', ')}); re-export the weights with this version's weights/export.py`,
    );
  }
  if (typeof json.scaling_factor !== 'number' || !json.layers || typeof json.layers !== 'object' || Array.isArray(json.layers)) {
    throw new InvalidFileError(path, 'missing scaling_factor or layers');
  }
  // SD1.5's is 0.18215; anything non-finite, non-positive or huge would silently give NaN features
  if (!Number.isFinite(json.scaling_factor) || json.scaling_factor <= 0 || json.scaling_factor > 100) {
    throw new InvalidFileError(path, `scaling_factor must be a finite number in (0, 100], got ${json.scaling_factor}`);
  }
  if (json.default_size !== undefined && (!Number.isSafeInteger(json.default_size) || (json.default_size as number) < 64 || (json.default_size as number) > 4096)) {
    throw new InvalidFileError(path, `default_size must be an integer in [64, 4096], got ${String(json.default_size)}`);
  }
  for (const [id, shape] of Object.entries(json.layers)) {
    if (!Array.isArray(shape) || shape.length < 1 || shape.length > 4 || !shape.every((d) => Number.isSafeInteger(d) && d > 0 && d < 1 << 24)) {
      throw new InvalidFileError(path, `layers: the shape of ${JSON.stringify(id.slice(0, 80))} must be a list of 1-4 positive integers`);
    }
  }
  return json;
}

/** Checks that a weights folder holds every {@link REQUIRED_FILES | required file}. */
export function checkWeightsFolder(dir: string): void {
  for (const f of REQUIRED_FILES) {
    if (!existsSync(join(dir, f))) throw new IncompatibleModelError(`${dir}: the weights folder is missing ${f} (re-run weights/export.py)`);
  }
}
