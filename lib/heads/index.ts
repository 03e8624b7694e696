/**
 * GATE's trained heads, trained and run natively through libtorch (no Python):
 *
 * - {@link trainSegmenter}: the label-scarce pixel classifier ensemble of docs/method.md §Amalgamation and heads on feature files
 *   and label maps; {@link Segmenter} / {@link segmentFiles} turn features into label maps;
 * - {@link trainAmalgamation}: the correspondence amalgamation network of docs/method.md §Amalgamation and heads (per-channel softmax over
 *   feature buckets) trained with its symmetric CLIP-style loss; {@link Amalgamator} applies it.
 *
 * Heads are TorchScript files (`models/heads/*.pt` templates shaped at run time, trained by the native
 * fit loop of src/train.cc) that Python's `torch.jit.load` also reads. Training never upsamples whole
 * feature maps: pixels are sampled and their features bilinearly interpolated (align_corners=False) on
 * the fly, so memory is the features at their own size plus a mini-batch.
 *
 * @module
 */
import { mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import type { RawTensor } from '../../binding/index.cjs';
import { resolveDevice, type Device } from '../native.js';
import { AbortError, DiffusionFeaturesError, InvalidArgumentError, InvalidFileError } from '../errors.js';
import { writePng } from '../io/png.js';
import { correspondence, parsePairAnnotation, pck, type PairAnnotation } from '../tools/correspondence.js';
import type { FeatureArray } from '../tools/common.js';
import { headAddon, nativeCall, templatePath, type RawFitProgress, type RawHead, type RawHeadAddon } from './raw.js';
import {
  IGNORE, decodeLayout, encodeLayout, groupsOf, ignoreSmallClasses, listByName, packBucket, readFeatures, readMask,
  type InputLayout, type LabelMap,
} from './data.js';

export { IGNORE, readMask, decodeMaskNpy, ignoreSmallClasses, type LabelMap } from './data.js';

const FEATURE_EXTS = ['.safetensors', '.npy'] as const;
const MASK_EXTS = ['.png', '.npy'] as const;

/** Progress of a training run. */
export interface TrainProgress {
  /** Ensemble member being trained (0-based; always 0 for the amalgamation network). */
  member: number;
  /** Members in all. */
  members: number;
  epoch: number;
  /** Optimizer steps of this member so far. */
  step: number;
  /** Loss of the latest step and the best batch loss so far. */
  loss: number;
  bestLoss: number;
  seconds: number;
  /** 'load' while reading data, 'train', 'validate', 'save'. */
  stage: 'load' | 'train' | 'validate' | 'save';
}

/** Options of {@link trainSegmenter}. */
export interface TrainSegmenterOptions {
  /** Folder of `<name>.safetensors` feature files as `extract` / `recipe` write them. */
  features: string;
  /** Folder of `<name>.png` (8-bit class ids) or `<name>.npy` label maps; 255 = ignore. */
  masks: string;
  /** The trained head file to write (atomically). */
  out: string;
  /** Ensemble members (GATE: 10). */
  ensemble?: number;
  /** Seed of the initialisation, shuffles and dropout (member m uses seed + m). Default 0. */
  seed?: number;
  /** Number of classes (default: the largest label + 1). */
  classes?: number;
  /** Pixels per mini-batch (64), epochs at most (100), Adam learning rate (1e-3). */
  batchSize?: number;
  maxEpochs?: number;
  lr?: number;
  /** Early stopping (DatasetGAN): after epoch `earlyStopAfterEpoch` (3), stop once the batch loss has not beaten its best for more than `patience` (50) steps. */
  earlyStopAfterEpoch?: number;
  patience?: number;
  /** A validation split: label maps whose features are in `valFeatures` (default `features`); mIoU is reported. */
  valMasks?: string;
  valFeatures?: string;
  device?: Device;
  onProgress?: (p: TrainProgress) => void;
  signal?: AbortSignal;
}

/** What {@link trainSegmenter} did. */
export interface TrainSegmenterResult {
  out: string;
  classes: number;
  members: number;
  images: number;
  /** Training pixels (ignored ones removed). */
  pixels: number;
  /** Per member: steps, epochs, whether early stopping ended it, and the last loss. */
  runs: { steps: number; epochs: number; stoppedEarly: boolean; lastLoss: number; seconds: number }[];
  seconds: number;
  /** mIoU on the validation split (docs/method.md §Amalgamation and heads), with the per-class IoU. */
  validation?: { images: number; miou: number; iou: number[] };
}

function checkSignal(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new AbortError(`${what} aborted`, { cause: signal.reason });
}

function positiveInt(v: number | undefined, dflt: number, name: string, max = 1e9): number {
  if (v === undefined) return dflt;
  if (!Number.isSafeInteger(v) || v < 1 || v > max) throw new InvalidArgumentError(`${name} must be an integer in 1..${max}, got ${v}`);
  return v;
}

/** Runs one native fit, wiring progress and the abort signal. */
async function fit(head: RawHead, data: RawTensor[], opts: Parameters<RawHead['fit']>[1], onProgress: ((p: RawFitProgress) => void) | undefined, signal?: AbortSignal) {
  const run = await nativeCall(() => head.fit(data, opts, onProgress));
  const onAbort = () => run.abort();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return await nativeCall(() => run.promise);
  } catch (err) {
    if (signal?.aborted) throw new AbortError('training aborted', { cause: signal.reason });
    throw err;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

function tensorOf(A: RawHeadAddon, data: Float32Array, shape: number[]): RawTensor {
  return A.RawTensor.fromTypedArray(data, shape, 'float32');
}

/** Disposes raw tensors / heads, ignoring the already disposed. */
function release(...xs: ({ dispose(): void } | undefined)[]): void {
  for (const x of xs) x?.dispose();
}

/** The layout's buckets packed for one image, as raw tensors (caller disposes). */
function packedBuckets(A: RawHeadAddon, tensors: Map<string, FeatureArray>, layout: InputLayout): RawTensor[] {
  const [H, W] = layout.grid;
  return layout.buckets.map((b) => tensorOf(A, packBucket(tensors, b, H, W), [b.channels, H, W]));
}

function checkMaskSize(m: LabelMap, file: string, grid: [number, number], size: [number, number] | undefined): [number, number] {
  if (size && (m.height !== size[0] || m.width !== size[1])) {
    throw new InvalidFileError(file, `label map is ${m.width}×${m.height} but the others are ${size[1]}×${size[0]}`);
  }
  if (m.height * grid[1] !== m.width * grid[0]) {
    throw new InvalidFileError(file, `label map is ${m.width}×${m.height}, not the aspect of its ${grid[1]}×${grid[0]} features`);
  }
  return [m.height, m.width];
}

/**
 * Trains GATE's label-scarce pixel classifier ensemble (docs/method.md §Amalgamation and heads) on feature files and label maps
 * and writes it as one TorchScript file. Features of a recipe file give one bucket per variant (mixed by
 * the per-channel softmax of the assigner); a plain `extract` file is one bucket. Label maps may be any
 * size with the features' aspect (GATE: 256×256 for 64×64 features); features are interpolated to it.
 * @throws InvalidArgumentError / InvalidFileError / FileNotFoundError naming the file on bad input (nothing
 * is written); AbortError when `signal` aborts.
 */
export async function trainSegmenter(opts: TrainSegmenterOptions): Promise<TrainSegmenterResult> {
  const t0 = performance.now();
  const members = positiveInt(opts.ensemble, 10, 'ensemble', 1000);
  const seed = opts.seed ?? 0;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new InvalidArgumentError(`seed must be a non-negative integer, got ${seed}`);
  const device = resolveDevice(opts.device ?? 'cpu');
  const progress = (p: Partial<TrainProgress> & Pick<TrainProgress, 'stage'>) =>
    opts.onProgress?.({ member: 0, members, epoch: 0, step: 0, loss: NaN, bestLoss: NaN, seconds: (performance.now() - t0) / 1000, ...p });
  checkSignal(opts.signal, 'trainSegmenter');
  const masks = await listByName(opts.masks, MASK_EXTS, 'masks');
  const feats = await listByName(opts.features, FEATURE_EXTS, 'features');
  const names = [...masks.keys()];
  for (const n of names) if (!feats.has(n)) throw new InvalidFileError(masks.get(n)!, `has no feature file ${n}.safetensors in ${opts.features}`);
  progress({ stage: 'load' });

  // layout from the first image; buckets ordered by group (equal widths together)
  const first = await readFeatures(feats.get(names[0]!)!);
  const layout: InputLayout = { grid: first.layout.grid, buckets: groupsOf(first.layout.buckets).flatMap((g) => g.buckets) };
  const groups = groupsOf(layout.buckets);

  // label maps: same size, the features' aspect; small classes ignored; labels in range
  let size: [number, number] | undefined;
  const labelMaps: LabelMap[] = [];
  let maxLabel = -1;
  for (const n of names) {
    const file = masks.get(n)!;
    const m = ignoreSmallClasses(await readMask(file));
    size = checkMaskSize(m, file, layout.grid, size);
    for (const v of m.data) if (v !== IGNORE && v > maxLabel) maxLabel = v;
    labelMaps.push(m);
  }
  let count = 0;
  for (const m of labelMaps) for (const v of m.data) if (v !== IGNORE) count++;
  if (!count) throw new InvalidArgumentError(`${opts.masks}: every pixel is ignored (255, or in a class of 1–19 pixels)`);
  const classes = opts.classes ?? maxLabel + 1;
  if (!Number.isSafeInteger(classes) || classes < 2 || classes > 255) throw new InvalidArgumentError(`classes must be in 2..255 (the label maps give ${maxLabel + 1})`);
  names.forEach((n, i) => {
    const bad = labelMaps[i]!.data.find((v) => v !== IGNORE && v >= classes);
    if (bad !== undefined) throw new InvalidFileError(masks.get(n)!, `label ${bad} is out of range for ${classes} classes`);
  });
  const [H, W] = size!;
  const pixels = new BigInt64Array(count * 3);
  const labels = new BigInt64Array(count);
  let k = 0;
  labelMaps.forEach((m, i) => {
    for (let p = 0; p < m.data.length; p++) {
      const v = m.data[p]!;
      if (v === IGNORE) continue;
      pixels[3 * k] = BigInt(i);
      pixels[3 * k + 1] = BigInt(Math.floor(p / W));
      pixels[3 * k + 2] = BigInt(p % W);
      labels[k++] = BigInt(v);
    }
  });

  const A = headAddon();
  const cfg = {
    buckets: groups.map((g) => g.buckets.length), channels: groups.map((g) => g.channels),
    classes: [classes], members: [1], out_size: [H, W],
  };
  const heads: RawHead[] = [];
  const data: RawTensor[] = [];
  let ensemble: RawHead | undefined;
  try {
    const template = templatePath('pixel_classifier');
    const head0 = await nativeCall(() => A.loadHead(template, device));
    heads.push(head0);
    await nativeCall(() => head0.configure(cfg, seed));
    data.push(A.RawTensor.fromTypedArray(pixels, [count, 3], 'int64'), A.RawTensor.fromTypedArray(labels, [count], 'int64'));
    const store = (await nativeCall(() => head0.call('new_store', [names.length, layout.grid[0], layout.grid[1]]))) as RawTensor;
    data.push(store);
    for (let i = 0; i < names.length; i++) {
      checkSignal(opts.signal, 'trainSegmenter');
      const { tensors } = i === 0 ? first : await readFeatures(feats.get(names[i]!)!, layout);
      const parts = packedBuckets(A, tensors, layout);
      try {
        await nativeCall(() => head0.call('store_image', [store, i, parts]));
      } finally {
        release(...parts);
      }
      progress({ stage: 'load', step: i + 1 });
    }

    const runs: TrainSegmenterResult['runs'] = [];
    for (let m = 0; m < members; m++) {
      checkSignal(opts.signal, 'trainSegmenter');
      let head = heads[m];
      if (!head) {
        head = await nativeCall(() => A.loadHead(template, device));
        heads.push(head);
        await nativeCall(() => head!.configure(cfg, seed + m));
      }
      const r = await fit(head, data, {
        items: count, optimizer: 'adam', lr: opts.lr ?? 1e-3, batchSize: positiveInt(opts.batchSize, 64, 'batchSize', 1 << 20),
        maxEpochs: positiveInt(opts.maxEpochs, 100, 'maxEpochs'), earlyStopAfterEpoch: opts.earlyStopAfterEpoch ?? 3,
        patience: opts.patience ?? 50, minBatch: 2, progressEvery: 50, seed: BigInt(seed + m) + (1n << 32n),
      }, (p) => progress({ stage: 'train', member: m, epoch: p.epoch, step: p.step, loss: p.loss, bestLoss: p.bestLoss }), opts.signal);
      runs.push({ steps: r.steps, epochs: r.epochs, stoppedEarly: r.stoppedEarly, lastLoss: r.losses[r.losses.length - 1] ?? NaN, seconds: r.seconds });
    }
    release(...data.splice(0));
    ensemble = await nativeCall(() => A.stackHeads(heads));
    release(...heads.splice(0));
    await nativeCall(() => ensemble!.call('set_feature_names', [encodeLayout(layout)]));

    let validation: TrainSegmenterResult['validation'];
    if (opts.valMasks) {
      progress({ stage: 'validate' });
      const seg = new Segmenter(ensemble, layout, classes, [H, W], opts.out, members);
      validation = await validate(seg, opts.valMasks, opts.valFeatures ?? opts.features, opts.signal);
    }
    checkSignal(opts.signal, 'trainSegmenter');
    progress({ stage: 'save' });
    const meta = { kind: 'gate-pixel-classifier', classes, members, maskSize: [H, W], seed, images: names, pixels: count, runs, validation };
    await mkdir(dirname(resolve(opts.out)), { recursive: true });
    await nativeCall(() => ensemble!.save(opts.out, JSON.stringify(meta)));
    return { out: opts.out, classes, members, images: names.length, pixels: count, runs, seconds: (performance.now() - t0) / 1000, validation };
  } finally {
    release(...data, ...heads, ensemble);
  }
}

/** mIoU as docs/method.md §Amalgamation and heads: per class (incl. background) intersection and union summed over images, IoU = I/(U+1e-8), mean over classes; ignore (255) pixels of the truth are left out. */
export function meanIoU(preds: readonly LabelMap[], truths: readonly LabelMap[], classes: number): { miou: number; iou: number[] } {
  const inter = new Float64Array(classes);
  const union = new Float64Array(classes);
  preds.forEach((p, i) => {
    const t = truths[i]!;
    if (p.data.length !== t.data.length) throw new InvalidArgumentError(`meanIoU: image ${i}: prediction and truth differ in size`);
    for (let j = 0; j < t.data.length; j++) {
      const g = t.data[j]!;
      if (g === IGNORE) continue;
      const q = p.data[j]!;
      if (q === g) {
        if (g < classes) {
          inter[g]++;
          union[g]++;
        }
      } else {
        if (g < classes) union[g]++;
        if (q < classes) union[q]++;
      }
    }
  });
  const iou = Array.from(inter, (v, c) => v / (union[c]! + 1e-8));
  return { miou: iou.reduce((a, b) => a + b, 0) / classes, iou };
}

async function validate(seg: Segmenter, masksDir: string, featuresDir: string, signal?: AbortSignal) {
  const masks = await listByName(masksDir, MASK_EXTS, 'validation masks');
  const feats = await listByName(featuresDir, FEATURE_EXTS, 'validation features');
  const preds: LabelMap[] = [];
  const truths: LabelMap[] = [];
  for (const [n, file] of masks) {
    checkSignal(signal, 'validation');
    const f = feats.get(n);
    if (!f) throw new InvalidFileError(file, `has no feature file ${n}.safetensors in ${featuresDir}`);
    const t = await readMask(file);
    truths.push(t);
    preds.push(await seg.segmentFile(f, [t.height, t.width]));
  }
  return { images: preds.length, ...meanIoU(preds, truths, seg.classes) };
}

/** A trained pixel classifier ensemble (a file written by {@link trainSegmenter}). Dispose when done. */
export class Segmenter {
  #head: RawHead | null;
  /** Input layout (buckets of feature-file tensors) the head was trained on. */
  readonly layout: InputLayout;
  readonly classes: number;
  /** Label map size of the training masks [H, W] (the default output size). */
  readonly maskSize: [number, number];
  readonly file: string;
  /** Classifiers in the ensemble. */
  readonly members: number;

  /** @internal */
  constructor(head: RawHead, layout: InputLayout, classes: number, maskSize: [number, number], file: string, members: number) {
    this.#head = head;
    this.members = members;
    this.layout = layout;
    this.classes = classes;
    this.maskSize = maskSize;
    this.file = file;
  }

  /** Loads a trained segmenter file on `device` (default CPU). */
  static async load(file: string, opts: { device?: Device } = {}): Promise<Segmenter> {
    const head = await nativeCall(() => headAddon().loadHead(file, resolveDevice(opts.device ?? 'cpu')));
    try {
      const a = await nativeCall(() => head.attributes());
      if (a.kind !== 'gate-pixel-classifier') throw new InvalidFileError(file, `is not a trained segmenter (kind ${String(a.kind)})`);
      const layout = decodeLayout((a.feature_names as string[]) ?? [], file);
      return new Segmenter(head, layout, a.classes as number, a.out_size as [number, number], file, a.members as number);
    } catch (err) {
      head.dispose();
      throw err;
    }
  }

  #live(): RawHead {
    if (!this.#head) throw new DiffusionFeaturesError('E_DISPOSED', 'Segmenter has been disposed');
    return this.#head;
  }

  /** Label map of one image's features (the tensors of a feature file), at `size` [H, W] (default {@link maskSize}). */
  async segment(tensors: Map<string, FeatureArray>, size: [number, number] = this.maskSize, source = 'features'): Promise<LabelMap> {
    const head = this.#live();
    const A = headAddon();
    const [gh, gw] = this.layout.grid;
    const [H, W] = size;
    if (!Number.isSafeInteger(H) || !Number.isSafeInteger(W) || H < 1 || W < 1 || H * W > 1 << 26) {
      throw new InvalidArgumentError(`segment: bad output size ${W}×${H}`);
    }
    const parts = packedBuckets(A, tensors, this.layout);
    const D = this.layout.buckets.reduce((s, b) => s + b.channels, 0);
    let x: RawTensor | undefined;
    let y: RawTensor | undefined;
    try {
      x = (await nativeCall(() => head.call('pack', [parts]))) as RawTensor;
      // ~64 MiB of pixel vectors per member and chunk: the members' batched products stay bounded
      const chunk = Math.max(64, Math.min(65536, Math.floor((1 << 26) / (4 * D * this.members))));
      y = (await nativeCall(() => head.call('segment', [x, H, W, chunk]))) as RawTensor;
      const v = y.toArray();
      if (v.length !== H * W) throw new InvalidFileError(this.file, `segment() returned ${v.length} labels for ${W}×${H} (${source}, ${gw}×${gh} features)`);
      return { data: Uint8Array.from(v), height: H, width: W };
    } finally {
      release(...parts, x, y);
    }
  }

  /** Reads a feature file (checked against the layout) and segments it. */
  async segmentFile(file: string, size?: [number, number]): Promise<LabelMap> {
    const { tensors } = await readFeatures(file, this.layout);
    return this.segment(tensors, size, file);
  }

  dispose(): void {
    this.#head?.dispose();
    this.#head = null;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** A distinct colour per class (PASCAL VOC's palette): H×W×3 RGB preview of a label map; ignore is white. */
export function colorize(m: LabelMap): Uint8Array {
  const out = new Uint8Array(m.data.length * 3);
  m.data.forEach((v, i) => {
    let r = 0;
    let g = 0;
    let b = 0;
    if (v === IGNORE) r = g = b = 255;
    else {
      let c = v;
      for (let s = 7; s >= 0 && c; s--, c >>= 3) {
        r |= (c & 1) << s;
        g |= ((c >> 1) & 1) << s;
        b |= ((c >> 2) & 1) << s;
      }
    }
    out[3 * i] = r;
    out[3 * i + 1] = g;
    out[3 * i + 2] = b;
  });
  return out;
}

/** Options of {@link segmentFiles}. */
export interface SegmentFilesOptions {
  /** Output size [H, W] (default: the training masks' size). */
  size?: [number, number];
  /** Also write `<out>/preview/<name>.png` colour previews (default true). */
  preview?: boolean;
  device?: Device;
  onProgress?: (p: { done: number; total: number; name: string }) => void;
  signal?: AbortSignal;
}

/**
 * Segments every feature file of `featuresDir` (or the given files) with a trained segmenter and writes
 * `out/<name>.png` 8-bit label maps (atomically), plus colour previews in `out/preview/`.
 */
export async function segmentFiles(segmenterFile: string, features: string | readonly string[], out: string, opts: SegmentFilesOptions = {}): Promise<{ written: string[] }> {
  checkSignal(opts.signal, 'segment');
  const files = typeof features === 'string' ? [...(await listByName(features, FEATURE_EXTS, 'features')).values()] : [...features];
  if (!files.length) throw new InvalidArgumentError('segment: no feature files given');
  const seg = await Segmenter.load(segmenterFile, { device: opts.device });
  const written: string[] = [];
  try {
    await mkdir(out, { recursive: true });
    for (const [i, f] of files.entries()) {
      checkSignal(opts.signal, 'segment');
      const name = basename(f, extname(f));
      const m = await seg.segmentFile(f, opts.size);
      const png = join(out, `${name}.png`);
      await writePng(png, m.data, m.width, m.height, 1);
      if (opts.preview !== false) await writePng(join(out, 'preview', `${name}.png`), colorize(m), m.width, m.height, 3);
      written.push(png);
      opts.onProgress?.({ done: i + 1, total: files.length, name });
    }
  } finally {
    seg.dispose();
  }
  return { written };
}

// ------------------------------------------------------------------------------------ amalgamation

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
      seconds: r.seconds, buckets: main.buckets.length, channels: main.channels, extra,
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
    if (!head) throw new DiffusionFeaturesError('E_DISPOSED', 'Amalgamator has been disposed');
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

/** Removes a folder made by the CLI for temporary features (never anything else). @internal */
export async function removeTempDir(dir: string): Promise<void> {
  if (!basename(dir).startsWith('df-segment-')) return;
  const entries = await readdir(dir).catch(() => []);
  for (const e of entries) if (e.endsWith('.safetensors') || e.endsWith('.npy')) await rm(join(dir, e), { force: true });
  await rm(dir, { recursive: true, force: true });
}
