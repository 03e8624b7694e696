/**
 * Reading feature files for the tools: `.safetensors` as `extract` writes them, or a C×H×W `.npy`,
 * and choosing the feature of an image to match or score.
 *
 * @module
 */
import { basename, extname } from 'node:path';
import { SafetensorsFile } from '../io/safetensors.js';
import { readNpy } from '../io/npy.js';
import { isMapId } from '../layers.js';
import { InvalidFileError, NotFoundError } from '../errors.js';
import type { FeatureArray } from './common.js';
import { resizeBilinear } from './resize.js';


/** The tensors of a feature file (`.safetensors` written by `extract`, or a C×H×W `.npy`), in file order. */
export async function readFeatureFile(path: string): Promise<Map<string, FeatureArray>> {
  const out = new Map<string, FeatureArray>();
  if (extname(path).toLowerCase() === '.npy') {
    const a = await readNpy(path);
    out.set(basename(path, extname(path)), { data: a.data, shape: a.shape });
    return out;
  }
  const st = await SafetensorsFile.open(path);
  for (const name of st.names()) {
    const info = st.info(name);
    if (info.dtype === 'BOOL' || info.dtype.startsWith('I') || info.dtype === 'U8') continue;
    out.set(name, { data: st.float32(name), shape: info.shape });
  }
  return out;
}

export function isSpatial(name: string, f: FeatureArray): boolean {
  return f.shape.length === 3 && !isMapId(name);
}

/**
 * The feature of one image used for matching/scoring: `layer` if given; else `packaged` when present;
 * else every spatial tensor bilinearly resized to the largest size and concatenated (file order).
 */
export function selectFeature(tensors: Map<string, FeatureArray>, layer: string | undefined, source: string): FeatureArray {
  if (layer) {
    const f = tensors.get(layer);
    if (!f) throw new NotFoundError(`${source}: no tensor '${layer}' (has: ${[...tensors.keys()].join(', ')})`);
    if (f.shape.length !== 3) throw new InvalidFileError(source, `tensor '${layer}' is not C×H×W (shape [${f.shape.join(', ')}])`);
    return f;
  }
  const packaged = tensors.get('packaged');
  if (packaged && packaged.shape.length === 3) return packaged;
  const parts = [...tensors.entries()].filter(([n, f]) => isSpatial(n, f)).map(([, f]) => f);
  if (!parts.length) throw new InvalidFileError(source, 'holds no C×H×W feature');
  if (parts.length === 1) return parts[0]!;
  const H = Math.max(...parts.map((p) => p.shape[1]!));
  const W = Math.max(...parts.map((p) => p.shape[2]!));
  const resized = parts.map((p) => resizeBilinear(p, H, W));
  const C = resized.reduce((a, p) => a + p.shape[0]!, 0);
  const data = new Float32Array(C * H * W);
  let off = 0;
  for (const p of resized) {
    data.set(p.data, off);
    off += p.data.length;
  }
  return { data, shape: [C, H, W] };
}
