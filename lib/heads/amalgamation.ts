/**
 * GATE's correspondence amalgamation network (per-channel softmax over feature buckets, or the paper's
 * one weight per bucket; symmetric CLIP-style loss): {@link trainAmalgamation} trains it natively on keypoint pairs, {@link Amalgamator}
 * applies it. See docs/heads.md and docs/method.md §Amalgamation and heads.
 *
 * @module
 */
import { mkdir, readFile, stat } from 'node:fs/promises';
import { basename, dirname, extname, resolve } from 'node:path';
import type { RawTensor } from '../../binding/index.cjs';
import { resolveDevice, type Device } from '../native.js';
import { AbortError, DisposedError, InvalidArgumentError, InvalidFileError } from '../errors.js';
import { correspondence, parsePairAnnotation, pck, type PairAnnotation } from '../tools/correspondence.js';
import type { FeatureArray } from '../tools/common.js';
import { headAddon, nativeCall, templatePath, type RawHead } from './raw.js';
import { decodeLayout, encodeLayout, groupsOf, listByName, readFeatures, type InputLayout } from './data.js';
import { FEATURE_EXTS, checkSignal, fit, packedBuckets, positiveInt, release, type TrainProgress } from './common.js';

/** Options of {@link trainAmalgamation}. */
export interface TrainAmalgamationOptions {
  /** Folder of `<image name>.safetensors` feature files (recipe files: one bucket per variant). */
  features: string;
  /** SPair-71k-style pair JSON files, or a folder of them (keypoints in original pixels; image sizes needed). */
  pairs: string | readonly string[];
  /** The trained head file to write (atomically). */
  out: string;
  /** Validation pairs: PCK@0.1 (image and, when boxes are given, bbox) of the trained network is reported. */
  valPairs?: string | readonly string[];
  /** Epochs over the training pairs (GATE: 2), AdamW learning rate 5e-4 and weight decay 0.01. */
  epochs?: number;
  lr?: number;
  weightDecay?: number;
  /** Stop after this many steps (default: no limit). */
  maxSteps?: number;
  /** GATE's `conv` setting: an output Conv3×3 after the mix (default false: the `nn` setting). */
  outputConv?: boolean;
  /**
   * How the buckets are weighted: `'channel'` (default, GATE's code: a softmax over the buckets per image and
   * channel) or `'scalar'` (the paper's Eq. 3–4: one weight per image and bucket). docs/method.md.
   */
  weighting?: 'channel' | 'scalar';
  seed?: number;
  device?: Device;
  onProgress?: (p: TrainProgress) => void;
  signal?: AbortSignal;
}

/** What {@link trainAmalgamation} did. */
export interface TrainAmalgamationResult {
  out: string;
  pairs: number;
  images: number;
  steps: number;
  epochs: number;
  lastLoss: number;
  /** Mean loss of the first and of the last epoch. */
  firstEpochLoss: number;
  lastEpochLoss: number;
  seconds: number;
  /** Buckets mixed, their width, and the pass-through channels (e.g. 6 × 3520 + 154). */
  buckets: number;
  channels: number;
  extra: number;
  /** How the buckets were weighted (see {@link TrainAmalgamationOptions.weighting}). */
  weighting: 'channel' | 'scalar';
  validation?: { pairs: number; keypoints: number; pckImg: number; pckBbox?: number };
}

async function pairFiles(p: string | readonly string[]): Promise<string[]> {
  if (typeof p !== 'string') return [...p];
  if ((await stat(p).catch(() => null))?.isDirectory()) return [...(await listByName(p, ['.json'], 'pairs')).values()];
  return [p];
}

async function readPairs(p: string | readonly string[]): Promise<{ file: string; pair: PairAnnotation }[]> {
  const files = await pairFiles(p);
  if (!files.length) throw new InvalidArgumentError('no pair files given');
  const out: { file: string; pair: PairAnnotation }[] = [];
  for (const file of files) {
    let json: unknown;
    try {
      json = JSON.parse(await readFile(file, 'utf8'));
    } catch (err) {
      throw new InvalidFileError(file, `not a readable pair JSON (${(err as Error).message})`, { cause: err });
    }
    let pair: PairAnnotation;
    try {
      pair = parsePairAnnotation(json as Record<string, unknown>, file);
    } catch (err) {
      throw new InvalidFileError(file, (err as Error).message, { cause: err });
    }
    if (!pair.sourceSize || !pair.targetSize) throw new InvalidFileError(file, 'needs the image sizes (source_size/target_size or src_imsize/trg_imsize)');
    out.push({ file, pair });
  }
  return out;
}

const imageKey = (path: string) => basename(path, extname(path));

/** Trains GATE's amalgamation network (docs/method.md §Amalgamation and heads) on feature files and keypoint pairs and writes it. */
export async function trainAmalgamation(opts: TrainAmalgamationOptions): Promise<TrainAmalgamationResult> {
  const t0 = performance.now();
  const device = resolveDevice(opts.device ?? 'cpu');
  const seed = opts.seed ?? 0;
  const epochs = positiveInt(opts.epochs, 2, 'epochs');
  const weighting = opts.weighting ?? 'channel';
  if (weighting !== 'channel' && weighting !== 'scalar') {
    throw new InvalidArgumentError(`weighting must be 'channel' or 'scalar', got ${JSON.stringify(String(weighting)).slice(0, 40)}`);
  }
  const progress = (p: Partial<TrainProgress> & Pick<TrainProgress, 'stage'>) =>
    opts.onProgress?.({ member: 0, members: 1, epoch: 0, step: 0, loss: NaN, bestLoss: NaN, seconds: (performance.now() - t0) / 1000, ...p });
  checkSignal(opts.signal, 'trainAmalgamation');
  const pairs = await readPairs(opts.pairs);
  const feats = await listByName(opts.features, FEATURE_EXTS, 'features');
  const images: string[] = [];
  const index = new Map<string, number>();
  for (const { file, pair } of pairs) {
    for (const img of [pair.source, pair.target]) {
      const k = imageKey(img);
      if (!feats.has(k)) throw new InvalidFileError(file, `image ${img} has no feature file ${k}.safetensors in ${opts.features}`);
      if (!index.has(k)) {
        index.set(k, images.length);
        images.push(k);
      }
    }
  }
  progress({ stage: 'load' });
  const first = await readFeatures(feats.get(images[0]!)!);
  const groups = groupsOf(first.layout.buckets);
  const main = groups.reduce((a, g) => (g.buckets.length > a.buckets.length ? g : a), groups[0]!);
  const extras = groups.filter((g) => g !== main).flatMap((g) => g.buckets);
  const layout: InputLayout = { grid: first.layout.grid, buckets: [...main.buckets, ...extras] };
  const [gh, gw] = layout.grid;
  const extra = extras.reduce((s, b) => s + b.channels, 0);

  const kmax = Math.max(1, ...pairs.map((p) => p.pair.sourcePoints.length));
  const pairT = new BigInt64Array(pairs.length * 2);
  const kps = new BigInt64Array(pairs.length * kmax * 2);
  const counts = new BigInt64Array(pairs.length);
  const cell = (x: number, y: number, size: [number, number]) => {
    const gy = Math.min(gh - 1, Math.max(0, Math.round((y * gh) / size[1])));
    const gx = Math.min(gw - 1, Math.max(0, Math.round((x * gw) / size[0])));
    return BigInt(gy * gw + gx);
  };
  pairs.forEach(({ file, pair }, p) => {
    if (!pair.sourcePoints.length) throw new InvalidFileError(file, 'has no keypoints');
    pairT[2 * p] = BigInt(index.get(imageKey(pair.source))!);
    pairT[2 * p + 1] = BigInt(index.get(imageKey(pair.target))!);
    counts[p] = BigInt(pair.sourcePoints.length);
    pair.sourcePoints.forEach(([x, y], j) => {
      const [tx, ty] = pair.targetPoints[j]!;
      kps[(p * kmax + j) * 2] = cell(x, y, pair.sourceSize!);
      kps[(p * kmax + j) * 2 + 1] = cell(tx, ty, pair.targetSize!);
    });
  });

  const A = headAddon();
  const data: RawTensor[] = [];
  let head: RawHead | undefined;
  try {
    head = await nativeCall(() => A.loadHead(templatePath('amalgamation'), device));
    await nativeCall(() => head!.configure({
      buckets: [main.buckets.length], channels: [main.channels], extra: [extra], grid: [gh, gw], output_conv: [opts.outputConv ? 1 : 0],
      scalar_weights: [weighting === 'scalar' ? 1 : 0],
    }, seed));
    data.push(A.RawTensor.fromTypedArray(pairT, [pairs.length, 2], 'int64'), A.RawTensor.fromTypedArray(kps, [pairs.length, kmax, 2], 'int64'),
      A.RawTensor.fromTypedArray(counts, [pairs.length], 'int64'));
    for (const [i, k] of images.entries()) {
      checkSignal(opts.signal, 'trainAmalgamation');
      const { tensors } = i === 0 ? first : await readFeatures(feats.get(k)!, layout);
      const parts = packedBuckets(A, tensors, layout);
      try {
        data.push((await nativeCall(() => head!.call('pack', [parts]))) as RawTensor);
      } finally {
        release(...parts);
      }
      progress({ stage: 'load', step: i + 1 });
    }
    const r = await fit(head, data, {
      items: pairs.length, optimizer: 'adamw', lr: opts.lr ?? 5e-4, weightDecay: opts.weightDecay ?? 0.01, batchSize: 1,
      maxEpochs: epochs, maxSteps: opts.maxSteps ?? 0, progressEvery: 10, seed: BigInt(seed) + (1n << 32n),
    }, (p) => progress({ stage: 'train', epoch: p.epoch, step: p.step, loss: p.loss, bestLoss: p.bestLoss }), opts.signal);
    release(...data.splice(0));
    await nativeCall(() => head!.call('set_feature_names', [encodeLayout(layout)]));
    let validation: TrainAmalgamationResult['validation'];
    if (opts.valPairs) {
      progress({ stage: 'validate' });
      const am = new Amalgamator(head, layout, opts.out);
      validation = await pckOf(am, await readPairs(opts.valPairs), opts.features, opts.signal);
    }
    checkSignal(opts.signal, 'trainAmalgamation');
    progress({ stage: 'save' });
    const mean = (a: Float32Array) => a.reduce((x, y) => x + y, 0) / Math.max(1, a.length);
    const summary = {
      pairs: pairs.length, images: images.length, steps: r.steps, epochs: r.epochs, lastLoss: r.losses[r.losses.length - 1] ?? NaN,
      firstEpochLoss: mean(r.losses.subarray(0, pairs.length)), lastEpochLoss: mean(r.losses.subarray(Math.max(0, r.losses.length - pairs.length))),
      seconds: r.seconds, buckets: main.buckets.length, channels: main.channels, extra, weighting,
    };
    await mkdir(dirname(resolve(opts.out)), { recursive: true });
    await nativeCall(() => head!.save(opts.out, JSON.stringify({ kind: 'gate-amalgamation', seed, ...summary, validation })));
    return { out: opts.out, ...summary, seconds: (performance.now() - t0) / 1000, validation };
  } finally {
    release(...data, head);
  }
}

async function pckOf(am: Amalgamator, pairs: { file: string; pair: PairAnnotation }[], featuresDir: string, signal?: AbortSignal) {
  const feats = await listByName(featuresDir, FEATURE_EXTS, 'validation features');
  const cache = new Map<string, FeatureArray>();
  const fused = async (img: string, file: string) => {
    const k = imageKey(img);
    const f = feats.get(k);
    if (!f) throw new InvalidFileError(file, `image ${img} has no feature file in ${featuresDir}`);
    if (!cache.has(k)) cache.set(k, await am.amalgamateFile(f));
    return cache.get(k)!;
  };
  let n = 0;
  let okImg = 0;
  let okBox = 0;
  let nBox = 0;
  for (const { file, pair } of pairs) {
    if (signal?.aborted) throw new AbortError('validation aborted', { cause: signal.reason });
    const pred = await correspondence(await fused(pair.source, file), await fused(pair.target, file), pair.sourcePoints, {
      srcSize: pair.sourceSize!, trgSize: pair.targetSize!,
    });
    okImg += pck(pred, pair.targetPoints, 0.1, pair.targetSize!).correct.filter(Boolean).length;
    n += pred.length;
    if (pair.targetBox) {
      const [x1, y1, x2, y2] = pair.targetBox;
      okBox += pck(pred, pair.targetPoints, 0.1, [x2 - x1, y2 - y1]).correct.filter(Boolean).length;
      nBox += pred.length;
    }
  }
  return { pairs: pairs.length, keypoints: n, pckImg: n ? okImg / n : 0, ...(nBox ? { pckBbox: okBox / nBox } : {}) };
}

/** A trained amalgamation network (a file written by {@link trainAmalgamation}). Dispose when done. */
export class Amalgamator {
  #head: RawHead | null;
  readonly layout: InputLayout;
  readonly file: string;

  /** @internal */
  constructor(head: RawHead, layout: InputLayout, file: string) {
    this.#head = head;
    this.layout = layout;
    this.file = file;
  }

  static async load(file: string, opts: { device?: Device } = {}): Promise<Amalgamator> {
    const head = await nativeCall(() => headAddon().loadHead(file, resolveDevice(opts.device ?? 'cpu')));
    try {
      const a = await nativeCall(() => head.attributes());
      if (a.kind !== 'gate-amalgamation') throw new InvalidFileError(file, `is not a trained amalgamation network (kind ${String(a.kind)})`);
      return new Amalgamator(head, decodeLayout((a.feature_names as string[]) ?? [], file), file);
    } catch (err) {
      head.dispose();
      throw err;
    }
  }

  /** The amalgamated C×h×w feature of one image's feature-file tensors (eval mode). */
  async amalgamate(tensors: Map<string, FeatureArray>): Promise<FeatureArray> {
    const head = this.#head;
    if (!head) throw new DisposedError('Amalgamator has been disposed');
    const A = headAddon();
    const parts = packedBuckets(A, tensors, this.layout);
    let x: RawTensor | undefined;
    let y: RawTensor | undefined;
    try {
      x = (await nativeCall(() => head.call('pack', [parts]))) as RawTensor;
      y = (await nativeCall(() => head.call('amalgamate', [x]))) as RawTensor;
      const s = y.shape();
      return { data: Float32Array.from(y.toFloat32Array()), shape: [s[0]!, s[1]!, s[2]!] };
    } finally {
      release(...parts, x, y);
    }
  }

  async amalgamateFile(file: string): Promise<FeatureArray> {
    return this.amalgamate((await readFeatures(file, this.layout)).tensors);
  }

  dispose(): void {
    this.#head?.dispose();
    this.#head = null;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
