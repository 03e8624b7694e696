/**
 * Nearest-neighbour semantic correspondence and PCK@α on SPair-71k-style pairs (docs/method.md
 * §Correspondence).
 *
 * @module
 */
import { existsSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import sharp from 'sharp';
import type { Device } from '../native.js';
import { FileNotFoundError, InvalidArgumentError, InvalidFileError } from '../errors.js';
import { check3d, toFeatureArray, withTensors, type FeatureArray, type FeatureInput, type Point } from './common.js';
import { readFeatureFile, selectFeature } from './feature-file.js';

/** numpy's `round` (half to even). */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Options of {@link correspondence}. */
export interface CorrespondenceOptions {
  /** Source image size [width, height] in pixels (the keypoints' space). */
  srcSize: readonly [number, number];
  /** Target image size [width, height]. */
  trgSize: readonly [number, number];
  /** The square "load size" both feature maps are upsampled to (default 512). */
  loadSize?: number;
  device?: Device;
}

/**
 * Nearest-neighbour correspondence (docs/method.md §Correspondence): source keypoints (x, y in source pixels) →
 * predicted target points (x, y in target pixels). Features are bilinearly upsampled to the load size,
 * compared by cosine similarity against every target pixel, hard argmax.
 */
export async function correspondence(f1: FeatureInput, f2: FeatureInput, srcPoints: readonly Point[], opts: CorrespondenceOptions): Promise<[number, number][]> {
  const [c1] = check3d(f1, 'correspondence source feature');
  const [c2] = check3d(f2, 'correspondence target feature');
  if (c1 !== c2) throw new InvalidArgumentError(`correspondence: source and target features have ${c1} and ${c2} channels`);
  const S = opts.loadSize ?? 512;
  const [sw, sh] = opts.srcSize;
  const [tw, th] = opts.trgSize;
  if (![sw, sh, tw, th].every((v) => Number.isFinite(v) && v > 0)) throw new InvalidArgumentError('correspondence: image sizes must be positive');
  if (!srcPoints.length) return [];
  // (x, y) → (y, x), scaled to the load size, then the reference's index rounding (clip, half-to-even)
  const yx = new Float32Array(srcPoints.length * 2);
  srcPoints.forEach(([x, y], i) => {
    const ys = y * (S / sh);
    const xs = x * (S / sw);
    yx[2 * i] = roundHalfEven(Math.min(Math.max(ys, 0), S - 1));
    yx[2 * i + 1] = roundHalfEven(Math.min(Math.max(xs, 0), S - 1));
  });
  const pred = await withTensors(opts.device ?? 'cpu', [f1, f2, { data: yx, shape: [srcPoints.length, 2] }], (ops, [a, b, p]) =>
    toFeatureArray(ops.correspondence(a!, b!, p!, S)),
  );
  const out: [number, number][] = [];
  for (let i = 0; i < srcPoints.length; i++) {
    const py = pred.data[2 * i]!;
    const px = pred.data[2 * i + 1]!;
    out.push([px * (tw / S), py * (th / S)]);
  }
  return out;
}

/** Euclidean distances and PCK decisions (`d ≤ alpha · max(w, h)`) of predicted vs ground-truth points. */
export function pck(pred: readonly Point[], gt: readonly Point[], alpha: number, size: readonly [number, number]): { distances: number[]; correct: boolean[] } {
  if (pred.length !== gt.length) throw new InvalidArgumentError(`pck: ${pred.length} predictions for ${gt.length} keypoints`);
  const thr = alpha * Math.max(size[0], size[1]);
  const distances = pred.map(([x, y], i) => Math.hypot(x - gt[i]![0], y - gt[i]![1]));
  return { distances, correct: distances.map((d) => d <= thr) };
}

/** One image pair of an SPair-71k-style JSON file, normalised. */
export interface PairAnnotation {
  source: string;
  target: string;
  category?: string;
  /** [x, y] in source pixels. */
  sourcePoints: Point[];
  /** [x, y] in target pixels. */
  targetPoints: Point[];
  /** [x1, y1, x2, y2] in target pixels. */
  targetBox?: readonly [number, number, number, number];
  sourceSize?: [number, number];
  targetSize?: [number, number];
}

function asPoints(v: unknown, what: string): Point[] {
  if (!Array.isArray(v)) throw new InvalidArgumentError(`${what} must be an array of [x, y]`);
  // SPair's raw files may store 2×N (rows x, y) — accept both layouts
  if (v.length === 2 && Array.isArray(v[0]) && Array.isArray(v[1]) && (v[0] as unknown[]).length !== 2) {
    const [xs, ys] = v as number[][];
    return xs!.map((x, i) => [x, ys![i]!] as const);
  }
  return v.map((p, i) => {
    if (!Array.isArray(p) || p.length < 2 || !p.slice(0, 2).every((n) => typeof n === 'number' && Number.isFinite(n))) {
      throw new InvalidArgumentError(`${what}[${i}] must be [x, y], got ${JSON.stringify(p)}`);
    }
    return [p[0] as number, p[1] as number] as const;
  });
}

function asSize(v: unknown): [number, number] | undefined {
  if (Array.isArray(v) && v.length >= 2 && typeof v[0] === 'number' && typeof v[1] === 'number' && v[0] > 0 && v[1] > 0) return [v[0], v[1]];
  return undefined;
}

/**
 * Normalises one pair annotation. Accepted keys: Diffusion-Hyperfeatures / GDF (`source_path`,
 * `target_path`, `source_points`, `target_points`, `target_bounding_box`, optional
 * `source_size`/`target_size` [w, h]) and raw SPair-71k (`src_imname`, `trg_imname`, `category`,
 * `src_kps`, `trg_kps`, `trg_bndbox`, `src_imsize`/`trg_imsize` [w, h, c]).
 */
export function parsePairAnnotation(a: Record<string, unknown>, where = 'pair'): PairAnnotation {
  const category = typeof a.category === 'string' ? a.category : undefined;
  const src = (a.source_path ?? (a.src_imname !== undefined && category ? `${category}/${a.src_imname}` : a.src_imname)) as unknown;
  const trg = (a.target_path ?? (a.trg_imname !== undefined && category ? `${category}/${a.trg_imname}` : a.trg_imname)) as unknown;
  if (typeof src !== 'string' || typeof trg !== 'string') throw new InvalidArgumentError(`${where}: needs source_path/target_path or src_imname/trg_imname`);
  const sourcePoints = asPoints(a.source_points ?? a.src_kps, `${where}: source points`);
  const targetPoints = asPoints(a.target_points ?? a.trg_kps, `${where}: target points`);
  if (sourcePoints.length !== targetPoints.length) throw new InvalidArgumentError(`${where}: ${sourcePoints.length} source but ${targetPoints.length} target keypoints`);
  const box = (a.target_bounding_box ?? a.trg_bndbox) as unknown;
  let targetBox: PairAnnotation['targetBox'];
  if (box !== undefined) {
    if (!Array.isArray(box) || box.length !== 4 || !box.every((n) => typeof n === 'number')) throw new InvalidArgumentError(`${where}: bounding box must be [x1, y1, x2, y2]`);
    targetBox = box as unknown as [number, number, number, number];
  }
  return {
    source: src, target: trg, category, sourcePoints, targetPoints, targetBox,
    sourceSize: asSize(a.source_size ?? a.src_imsize), targetSize: asSize(a.target_size ?? a.trg_imsize),
  };
}

/** Options of {@link correspondenceFiles}. */
export interface CorrespondenceFilesOptions {
  /** Tensor to match (default `packaged`, else all layers bilinearly resized and concatenated). */
  layer?: string;
  /** PCK threshold (default 0.1). */
  alpha?: number;
  /** Folder holding the images (only needed for sizes missing from the JSON). */
  imagesDir?: string;
  loadSize?: number;
  device?: Device;
}

/** Per-pair result. */
export interface PairResult {
  source: string;
  target: string;
  category?: string;
  n_keypoints: number;
  correct_img: number;
  correct_bbox: number | null;
  pck_img: number;
  pck_bbox: number | null;
}

/** Result of {@link correspondenceFiles}: PCK over all keypoints of all pairs (docs/method.md §Correspondence). */
export interface CorrespondenceResult {
  pck_img: number;
  pck_bbox: number | null;
  n_keypoints: number;
  n_pairs: number;
  alpha: number;
  layer: string;
  pairs: PairResult[];
}

async function loadPairs(file: string): Promise<PairAnnotation[]> {
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new FileNotFoundError(file, 'pair file not found');
    throw new InvalidFileError(file, `invalid JSON (${(e as Error).message})`);
  }
  const list = Array.isArray(json) ? json : json && typeof json === 'object' && Array.isArray((json as { pairs?: unknown }).pairs) ? (json as { pairs: unknown[] }).pairs : [json];
  return list.map((a, i) => {
    if (!a || typeof a !== 'object') throw new InvalidFileError(file, `pair ${i} is not an object`);
    try {
      return parsePairAnnotation(a as Record<string, unknown>, `${file} pair ${i}`);
    } catch (e) {
      throw new InvalidFileError(file, (e as Error).message);
    }
  });
}

function featureCandidates(dir: string, image: string): string[] {
  const stem = image.slice(0, image.length - extname(image).length);
  const base = basename(stem);
  const out: string[] = [];
  for (const s of [stem, base]) for (const ext of ['.safetensors', '.npy']) out.push(join(dir, s + ext));
  return out;
}

async function imageSize(image: string, dirs: string[]): Promise<[number, number]> {
  for (const d of dirs) {
    const p = join(d, image);
    if (existsSync(p)) {
      const m = await sharp(p).metadata();
      if (m.width && m.height) return [m.width, m.height];
    }
  }
  throw new FileNotFoundError(image, `image size not in the pair JSON and the image is not found under ${dirs.join(', ')} (pass imagesDir)`);
}

/**
 * Nearest-neighbour correspondence and PCK@α over SPair-71k-style pair JSON files (docs/method.md §Correspondence),
 * with features read from `featuresDir/<image>.safetensors` (as `extract` writes them; `.npy` too).
 */
export async function correspondenceFiles(featuresDir: string, pairJsonFiles: readonly string[], opts: CorrespondenceFilesOptions = {}): Promise<CorrespondenceResult> {
  const alpha = opts.alpha ?? 0.1;
  if (!Number.isFinite(alpha) || alpha <= 0) throw new InvalidArgumentError(`alpha must be a positive number, got ${alpha}`);
  if (!pairJsonFiles.length) throw new InvalidArgumentError('correspondence: give at least one pair JSON file');
  const st = await stat(featuresDir).catch(() => null);
  if (!st?.isDirectory()) throw new FileNotFoundError(featuresDir, 'features folder not found');
  const cache = new Map<string, FeatureArray>();
  const feature = async (image: string): Promise<FeatureArray> => {
    const hit = cache.get(image);
    if (hit) return hit;
    const path = featureCandidates(featuresDir, image).find((p) => existsSync(p));
    if (!path) throw new FileNotFoundError(join(featuresDir, image), `no features for image '${image}' (looked for ${featureCandidates(featuresDir, image).map((p) => basename(p)).join(', ')})`);
    const f = selectFeature(await readFeatureFile(path), opts.layer, path);
    cache.set(image, f);
    while (cache.size > 4) cache.delete(cache.keys().next().value!);
    return f;
  };
  const pairs: PairResult[] = [];
  let nk = 0;
  let okImg = 0;
  let okBox = 0;
  let boxKeypoints = 0;
  for (const file of pairJsonFiles) {
    const dirs = [...(opts.imagesDir ? [opts.imagesDir] : []), dirname(file), join(dirname(file), 'JPEGImages'), resolve(dirname(file), '..', '..', 'JPEGImages')];
    for (const ann of await loadPairs(file)) {
      const srcSize = ann.sourceSize ?? (await imageSize(ann.source, dirs));
      const trgSize = ann.targetSize ?? (await imageSize(ann.target, dirs));
      const S = opts.loadSize ?? 512;
      const pred = await correspondence(await feature(ann.source), await feature(ann.target), ann.sourcePoints, { srcSize, trgSize, loadSize: S, device: opts.device });
      // the reference scales the target points to the load size and back
      const gt: Point[] = ann.targetPoints.map(([x, y]) => [x * (S / trgSize[0]) * (trgSize[0] / S), y * (S / trgSize[1]) * (trgSize[1] / S)]);
      const img = pck(pred, gt, alpha, trgSize);
      const cImg = img.correct.filter(Boolean).length;
      let cBox: number | null = null;
      if (ann.targetBox) {
        const [x1, y1, x2, y2] = ann.targetBox;
        const thr = alpha * Math.max(x2 - x1, y2 - y1);
        cBox = img.distances.filter((d) => d <= thr).length;
        okBox += cBox;
        boxKeypoints += gt.length;
      }
      const n = gt.length;
      nk += n;
      okImg += cImg;
      pairs.push({
        source: ann.source, target: ann.target, category: ann.category, n_keypoints: n,
        correct_img: cImg, correct_bbox: cBox, pck_img: n ? cImg / n : 0, pck_bbox: cBox === null ? null : n ? cBox / n : 0,
      });
    }
  }
  if (!pairs.length) throw new InvalidArgumentError('correspondence: the pair files hold no pairs');
  return {
    pck_img: nk ? okImg / nk : 0,
    pck_bbox: boxKeypoints ? okBox / boxKeypoints : null,
    n_keypoints: nk,
    n_pairs: pairs.length,
    alpha,
    layer: opts.layer ?? 'packaged|all',
    pairs,
  };
}
