/**
 * The weights folder written by `weights/export.py`: its `model.json` (read and validated here, the
 * only reader) and the files a pipeline needs.
 *
 * @module
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileNotFoundError, IncompatibleModelError, InvalidFileError } from '../errors.js';
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

/** Reads and validates `model.json` of a weights folder. */
export function readModelJson(dir: string): ModelJson {
  const path = join(dir, 'model.json');
  if (!existsSync(path)) {
    throw new FileNotFoundError(path, 'not a diffusion-features weights folder (model.json is missing); create one with `python3 weights/export.py --from <SD1.5 folder> --out <dir>`');
  }
  let json: ModelJson;
  try {
    json = JSON.parse(readFileSync(path, 'utf8')) as ModelJson;
  } catch (err) {
    throw new InvalidFileError(path, `not valid JSON (${(err as Error).message})`);
  }
  if (!SUPPORTED_FORMATS.includes(json.format_version)) {
    throw new IncompatibleModelError(
      `${path}: format_version ${String(json.format_version)} is not supported by this release (reads ${SUPPORTED_FORMATS.join(', ')}); re-export the weights with this version's weights/export.py`,
    );
  }
  if (typeof json.scaling_factor !== 'number' || !json.layers || typeof json.layers !== 'object') {
    throw new InvalidFileError(path, 'missing scaling_factor or layers');
  }
  return json;
}

/** Checks that a weights folder holds every {@link REQUIRED_FILES | required file}. */
export function checkWeightsFolder(dir: string): void {
  for (const f of REQUIRED_FILES) {
    if (!existsSync(join(dir, f))) throw new IncompatibleModelError(`${dir}: the weights folder is missing ${f} (re-run weights/export.py)`);
  }
}
