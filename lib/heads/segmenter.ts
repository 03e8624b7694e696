/**
 * GATE's label-scarce pixel classifier ensemble: {@link trainSegmenter} trains it natively on feature files
 * and label maps, {@link Segmenter} / {@link segmentFiles} turn features into label maps.
 * See docs/heads.md and docs/method.md §Amalgamation and heads.
 *
 * @module
 */
import { mkdir } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import type { RawTensor } from '../../binding/index.cjs';
import { resolveDevice, type Device } from '../native.js';
import { DisposedError, InvalidArgumentError, InvalidFileError } from '../errors.js';
import { writePng } from '../io/png.js';
import type { FeatureArray } from '../tools/common.js';
import { headAddon, nativeCall, templatePath, type RawHead } from './raw.js';
import {
  IGNORE, decodeLayout, encodeLayout, groupsOf, ignoreSmallClasses, listByName, readFeatures, readMask,
  type InputLayout, type LabelMap,
} from './data.js';
import { FEATURE_EXTS, MASK_EXTS, checkSignal, fit, packedBuckets, positiveInt, release, type TrainProgress } from './common.js';
import { colorize, meanIoU } from './metrics.js';

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
    if (!this.#head) throw new DisposedError('Segmenter has been disposed');
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
