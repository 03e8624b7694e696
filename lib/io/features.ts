/**
 * Extracted features ↔ files: the safetensors layout of one image's features (what `extract` writes
 * and the service returns), of a recipe result (what `recipe` writes),
 * and the `--noise` file.
 *
 * @module
 */
import { Tensor } from '../native.js';
import { InvalidFileError } from '../errors.js';
import type { ImageFeatures } from '../pipeline/types.js';
import type { RecipeResult } from '../recipes.js';
import { SafetensorsFile, encodeSafetensors, writeSafetensors, type StTensorInput } from './safetensors.js';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { atomicWrite } from './atomic.js';
import { writeNpy } from './npy.js';
import { NPY_SETTINGS_FILE, replaceOutputDir } from '../outputs.js';

/** The `format` metadata value of every features file this package writes. */
export const FEATURES_FORMAT = 'diffusion-features';

function f32(t: Tensor): StTensorInput {
  return { dtype: 'F32', shape: t.shape, data: t.toFloat32Array() };
}

/** The safetensors tensors of one image's features (float32, named by layer id, then `packaged`). */
export function featureTensors(f: ImageFeatures): Record<string, StTensorInput> {
  const out: Record<string, StTensorInput> = {};
  for (const [id, t] of Object.entries(f.features)) out[id] = f32(t);
  if (f.packaged) out.packaged = f32(f.packaged);
  return out;
}

/** The metadata of one image's features file: `format` and the settings that produced them. */
export function featureMetadata(f: ImageFeatures): Record<string, string> {
  return { format: FEATURES_FORMAT, ...f.settings };
}

/** Serialises one image's features as safetensors bytes (what the CLI writes and the service returns). */
export function encodeFeatures(f: ImageFeatures): Uint8Array {
  return encodeSafetensors(featureTensors(f), featureMetadata(f));
}

/** Writes one image's features to `path` atomically. */
export async function writeFeatures(path: string, f: ImageFeatures): Promise<void> {
  await writeSafetensors(path, featureTensors(f), featureMetadata(f));
}

/**
 * Writes one image's features as an npy folder's content into the (existing or new) folder `dir`:
 * `<id>.npy` per feature, `packaged.npy`, and {@link NPY_SETTINGS_FILE} with the same metadata a
 * safetensors output records.
 */
export async function writeFeaturesNpyContent(dir: string, f: ImageFeatures): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const [id, t] of Object.entries(f.features)) await writeNpy(join(dir, `${id}.npy`), t.toFloat32Array(), t.shape);
  if (f.packaged) await writeNpy(join(dir, 'packaged.npy'), f.packaged.toFloat32Array(), f.packaged.shape);
  await writeFile(join(dir, NPY_SETTINGS_FILE), JSON.stringify(featureMetadata(f)));
}

/**
 * Writes one image's features as the npy output folder `path`, atomically: built in a temporary
 * folder next to it, then moved into place; an existing folder is replaced only when it is an npy
 * output of this package (`replaceOutputDir`), never removed recursively otherwise.
 */
export async function writeFeaturesNpy(path: string, f: ImageFeatures): Promise<void> {
  await atomicWrite(path, (tmp) => writeFeaturesNpyContent(tmp, f), { kind: 'dir', commit: replaceOutputDir });
}

/**
 * The safetensors tensors and metadata of one image's recipe result: `<variant>/<id>` per feature,
 * `amalgamated` when computed; metadata names the recipe, its variants, and each variant's settings.
 */
export function recipeTensors(r: RecipeResult, recipe: string): { tensors: Record<string, StTensorInput>; metadata: Record<string, string> } {
  const tensors: Record<string, StTensorInput> = {};
  for (const [v, f] of Object.entries(r.variants)) {
    for (const [id, t] of Object.entries(f.features)) tensors[`${v}/${id}`] = f32(t);
  }
  if (r.amalgamated) tensors.amalgamated = f32(r.amalgamated);
  const metadata: Record<string, string> = { format: FEATURES_FORMAT, recipe, variants: Object.keys(r.variants).join(',') };
  for (const [v, f] of Object.entries(r.variants)) metadata[`${v}.settings`] = JSON.stringify(f.settings);
  return { tensors, metadata };
}

/** Writes one image's recipe result to `path` atomically (layout of {@link recipeTensors}). */
export async function writeRecipeResult(path: string, r: RecipeResult, recipe: string): Promise<void> {
  const { tensors, metadata } = recipeTensors(r, recipe);
  await writeSafetensors(path, tensors, metadata);
}

/** Reads a `--noise` safetensors file: `noise` (N×4×h×w) and optional `vae_noise`. */
export async function readNoiseFile(path: string): Promise<{ noise: Tensor; vaeNoise?: Tensor }> {
  const f = await SafetensorsFile.open(path);
  if (!f.has('noise')) throw new InvalidFileError(path, "no tensor named 'noise'");
  const mk = (name: string) => Tensor.fromFloat32Array(f.float32(name), f.info(name).shape);
  return { noise: mk('noise'), vaeNoise: f.has('vae_noise') ? mk('vae_noise') : undefined };
}
