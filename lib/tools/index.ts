/**
 * Analysis tools over extracted features:
 * - {@link visualize} / {@link visualizeFile}: PCA → RGB per feature (GATE_SPEC §9), attention token maps;
 * - {@link gateScore} / {@link gateScoreFiles}: GATE's Laplacian content-shift score (§7.4);
 * - {@link correspondence} / {@link correspondenceFiles}: nearest-neighbour semantic correspondence and
 *   PCK@α on SPair-71k-style pairs (§8.1).
 *
 * Tensor math runs in `models/ops.pt` (`pca_rgb`, `laplacian_map`, `correspondence`); bookkeeping (PCK
 * counting, point rescaling, resizing panels) is plain TypeScript. The native addon is loaded lazily.
 *
 * @module
 */
import { existsSync } from 'node:fs';
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { readFile } from 'node:fs/promises';
import sharp from 'sharp';
import type { Device, Tensor } from './native.js';
import { SafetensorsFile } from './safetensors.js';
import { readNpy } from './npy.js';
import { pilResize } from './image.js';
import { isMapId } from './layers.js';
import { DiffusionFeaturesError, FileNotFoundError, InvalidArgumentError, InvalidFileError, NotFoundError, WriteError } from './errors.js';

/** A float32 feature held in memory: C×H×W, row-major. */
export interface FeatureArray {
  data: Float32Array;
  shape: readonly number[];
}

/** A feature as a native tensor or a plain array. */
export type FeatureInput = Tensor | FeatureArray;

/** An (x, y) point in pixels. */
export type Point = readonly [number, number];

function isTensorLike(x: FeatureInput): x is Tensor {
  return typeof (x as Tensor).toFloat32Array === 'function' && typeof (x as Tensor).dispose === 'function';
}

function shapeOf(x: FeatureInput): number[] {
  return [...x.shape];
}

function check3d(x: FeatureInput, what: string): [number, number, number] {
  const s = shapeOf(x);
  if (s.length !== 3 || s.some((d) => !Number.isSafeInteger(d) || d < 1)) {
    throw new InvalidArgumentError(`${what}: expected a C×H×W feature, got shape [${s.join(', ')}]`);
  }
  return s as [number, number, number];
}

/** Runs `fn` with `x` as a tensor on the ops device; temporaries are disposed. */
async function withTensors<R>(device: Device, xs: FeatureInput[], fn: (ops: import('./native.js').ScriptModule, ts: Tensor[]) => Promise<R>): Promise<R> {
  const { Tensor: T } = await import('./native.js');
  const { loadOps } = await import('./ops.js');
  const ops = await loadOps(device);
  const owned: Tensor[] = [];
  try {
    const ts: Tensor[] = [];
    for (const x of xs) {
      let t: Tensor;
      if (isTensorLike(x)) {
        t = x;
      } else {
        t = T.fromFloat32Array(x.data, [...x.shape]);
        owned.push(t);
      }
      if (t.device !== ops.device || t.dtype !== 'float32') {
        const moved = await t.to(ops.device as Device, 'float32');
        if (moved !== t) owned.push(moved);
        t = moved;
      }
      ts.push(t);
    }
    return await fn(ops, ts);
  } finally {
    for (const t of owned) if (!t.disposed) t.dispose();
  }
}

async function opToArray(ops: import('./native.js').ScriptModule, method: string, ...args: import('./native.js').IValue[]): Promise<{ data: Float32Array; shape: number[] }> {
  const { opTensor } = await import('./ops.js');
  const r = await opTensor(ops, method, ...args);
  try {
    const cpu = await r.to('cpu', 'float32');
    try {
      return { data: Float32Array.from(cpu.toFloat32Array()), shape: [...cpu.shape] };
    } finally {
      if (cpu !== r) cpu.dispose();
    }
  } finally {
    r.dispose();
  }
}

// ------------------------------------------------------------------------------------------------
// image helpers (plain TS)

/** PIL `Image.resize(..., NEAREST)` of interleaved 8-bit pixels. */
export function resizeNearest(data: Uint8Array, w: number, h: number, channels: number, outW: number, outH: number): Uint8Array {
  const out = new Uint8Array(outW * outH * channels);
  const sx = w / outW;
  const sy = h / outH;
  for (let y = 0; y < outH; y++) {
    const yi = Math.min(h - 1, Math.floor((y + 0.5) * sy));
    for (let x = 0; x < outW; x++) {
      const xi = Math.min(w - 1, Math.floor((x + 0.5) * sx));
      const s = (yi * w + xi) * channels;
      const d = (y * outW + x) * channels;
      for (let c = 0; c < channels; c++) out[d + c] = data[s + c]!;
    }
  }
  return out;
}

/** Output size that makes the short side `short` (aspect kept, rounded). */
function shortSideSize(w: number, h: number, short: number): [number, number] {
  const s = short / Math.min(w, h);
  return [Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))];
}

/** `torch.nn.functional.interpolate(x[None], (outH, outW), mode='bilinear', align_corners=False)[0]`. */
export function resizeBilinear(x: FeatureArray, outH: number, outW: number): FeatureArray {
  const [C, H, W] = x.shape as [number, number, number];
  if (H === outH && W === outW) return { data: x.data, shape: [C, H, W] };
  const out = new Float32Array(C * outH * outW);
  const src = (o: number, scale: number, size: number): [number, number, number] => {
    let r = (o + 0.5) * scale - 0.5;
    if (r < 0) r = 0;
    const i0 = Math.floor(r);
    const i1 = i0 < size - 1 ? i0 + 1 : i0;
    return [i0, i1, r - i0];
  };
  const ys = Array.from({ length: outH }, (_, i) => src(i, H / outH, H));
  const xs = Array.from({ length: outW }, (_, i) => src(i, W / outW, W));
  for (let c = 0; c < C; c++) {
    const base = c * H * W;
    for (let y = 0; y < outH; y++) {
      const [y0, y1, ly] = ys[y]!;
      for (let xo = 0; xo < outW; xo++) {
        const [x0, x1, lx] = xs[xo]!;
        const a = x.data[base + y0 * W + x0]!;
        const b = x.data[base + y0 * W + x1]!;
        const cc = x.data[base + y1 * W + x0]!;
        const d = x.data[base + y1 * W + x1]!;
        out[(c * outH + y) * outW + xo] = (1 - ly) * ((1 - lx) * a + lx * b) + ly * ((1 - lx) * cc + lx * d);
      }
    }
  }
  return { data: out, shape: [C, outH, outW] };
}

// ------------------------------------------------------------------------------------------------
// feature files

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

function isSpatial(name: string, f: FeatureArray): boolean {
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

async function writePng(path: string, raw: Uint8Array | Buffer, width: number, height: number, channels: 1 | 3): Promise<void> {
  await mkdir(dirname(resolve(path)), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}-${Date.now()}.png`;
  try {
    const img = sharp(Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength), { raw: { width, height, channels } });
    await img.png().toFile(tmp);
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw new WriteError(path, `cannot write PNG (${(err as Error).message})`, { cause: err });
  }
}

// ------------------------------------------------------------------------------------------------
// visualisation (§9)

/** An RGB (3 channels) or grey (1 channel) image, row-major. */
export interface RawImage {
  data: Uint8Array;
  width: number;
  height: number;
  channels: 1 | 3;
}

/** Options of {@link visualize}. */
export interface VisualizeOptions {
  /** Short side of the nearest-resized panel (default 512, as the reference). 0 keeps the feature size. */
  shortSide?: number;
  /** Where `ops.pca_rgb` runs (default the CPU). */
  device?: Device;
}

/**
 * PCA of a C×H×W feature to RGB (GATE_SPEC §9): 3 components fitted on the image's own pixels,
 * per-component min–max to [0, 255] (truncated), nearest-resized so the short side is 512.
 */
export async function visualize(feature: FeatureInput, opts: VisualizeOptions = {}): Promise<RawImage> {
  const [, H, W] = check3d(feature, 'visualize');
  const rgb = await withTensors(opts.device ?? 'cpu', [feature], async (ops, [t]) => {
    const { opTensor } = await import('./ops.js');
    const r = await opTensor(ops, 'pca_rgb', t!);
    try {
      const cpu = await r.to('cpu', 'float32');
      try {
        const v = cpu.toFloat32Array();
        const out = new Uint8Array(v.length);
        for (let i = 0; i < v.length; i++) out[i] = v[i]!;
        return out;
      } finally {
        if (cpu !== r) cpu.dispose();
      }
    } finally {
      r.dispose();
    }
  });
  const short = opts.shortSide ?? 512;
  if (!short) return { data: rgb, width: W, height: H, channels: 3 };
  const [ow, oh] = shortSideSize(W, H, short);
  return { data: resizeNearest(rgb, W, H, 3, ow, oh), width: ow, height: oh, channels: 3 };
}

/**
 * The token maps of an attention feature (`attn`, k·T channels): channel c as a grey image
 * `255·a/max(a)` (truncated), resized to `size × size` with PIL's default (bicubic) filter, as the
 * reference's visualisation saves them.
 */
export function attentionTokenMaps(feature: FeatureArray, size = 256): RawImage[] {
  const [C, H, W] = check3d(feature, 'attentionTokenMaps');
  const out: RawImage[] = [];
  for (let c = 0; c < C; c++) {
    const a = feature.data.subarray(c * H * W, (c + 1) * H * W);
    let max = -Infinity;
    for (const v of a) if (v > max) max = v;
    const g = new Uint8Array(H * W);
    if (max > 0) {
      for (let i = 0; i < a.length; i++) {
        const v = Math.fround(Math.fround(255 * a[i]!) / max);
        g[i] = v <= 0 ? 0 : v >= 255 ? 255 : Math.floor(v);
      }
    }
    const data = size && (size !== W || size !== H) ? pilResize(g, W, H, 1, size, size) : g;
    out.push({ data, width: size || W, height: size || H, channels: 1 });
  }
  return out;
}

/** Options of {@link visualizeFile}. */
export interface VisualizeFileOptions extends VisualizeOptions {
  /** Tensors to draw (default: every C×H×W tensor; `packaged` only when it is the only one). */
  layers?: readonly string[];
  /** Token-map panels for attention tensors (`attn`; default true). */
  tokenMaps?: boolean;
  /** Tokens per resolution chunk of an attention tensor (default 77). */
  tokens?: number;
  /** Split a tensor's channels into blocks (e.g. [1280, 1280, 640, 320] for a packaged legacy feature). */
  blocks?: readonly number[];
  /** Also write each panel as its own PNG into this folder. */
  panelsDir?: string;
  /** Grid columns for the PCA panels (default min(4, n)). */
  columns?: number;
}

/** Result of {@link visualizeFile}. */
export interface VisualizeFileResult {
  /** Panel names in grid order (row-major): layer ids, `id[c0:c1]` blocks, `attn[c0:c1]#t` token maps. */
  panels: string[];
  width: number;
  height: number;
  /** Tensors not drawn (attention maps, non-spatial tensors). */
  skipped: string[];
}

interface Panel {
  name: string;
  img: RawImage;
}

function sliceChannels(f: FeatureArray, c0: number, c1: number): FeatureArray {
  const [, H, W] = f.shape as [number, number, number];
  return { data: f.data.subarray(c0 * H * W, c1 * H * W), shape: [c1 - c0, H, W] };
}

function grid(panels: Panel[], columns: number): { width: number; height: number; place: { p: Panel; left: number; top: number }[] } {
  if (!panels.length) return { width: 0, height: 0, place: [] };
  const cw = Math.max(...panels.map((p) => p.img.width));
  const ch = Math.max(...panels.map((p) => p.img.height));
  const cols = Math.max(1, Math.min(columns, panels.length));
  const rows = Math.ceil(panels.length / cols);
  return {
    width: cols * cw,
    height: rows * ch,
    place: panels.map((p, i) => ({ p, left: (i % cols) * cw, top: Math.floor(i / cols) * ch })),
  };
}

/**
 * Draws every feature of a features file (PCA → RGB, one panel per tensor or channel block; for
 * attention tensors also the per-token maps) into one PNG grid at `outPng`.
 */
export async function visualizeFile(file: string, outPng: string, opts: VisualizeFileOptions = {}): Promise<VisualizeFileResult> {
  const tensors = await readFeatureFile(file);
  const skipped: string[] = [];
  let names = opts.layers ? [...opts.layers] : [...tensors.keys()];
  for (const n of names) if (!tensors.has(n)) throw new NotFoundError(`${file}: no tensor '${n}' (has: ${[...tensors.keys()].join(', ')})`);
  if (!opts.layers && names.length > 1) names = names.filter((n) => n !== 'packaged');
  const tokens = opts.tokens ?? 77;
  const pca: Panel[] = [];
  const tokenSections: Panel[][] = [];
  for (const name of names) {
    const f = tensors.get(name)!;
    if (!isSpatial(name, f)) {
      skipped.push(name);
      continue;
    }
    const C = f.shape[0]!;
    const isAttn = name === 'attn' || name.endsWith('.attn');
    let blocks: [number, number][] = [[0, C]];
    if (isAttn && C % tokens === 0) {
      blocks = Array.from({ length: C / tokens }, (_, i) => [i * tokens, (i + 1) * tokens] as [number, number]);
    } else if (opts.blocks?.length) {
      blocks = [];
      let c0 = 0;
      for (const b of opts.blocks) {
        if (c0 >= C) break;
        blocks.push([c0, Math.min(C, c0 + b)]);
        c0 += b;
      }
      if (c0 < C) blocks.push([c0, C]);
    }
    for (const [c0, c1] of blocks) {
      const part = blocks.length === 1 ? f : sliceChannels(f, c0, c1);
      const label = blocks.length === 1 ? name : `${name}[${c0}:${c1}]`;
      pca.push({ name: label, img: await visualize(part, opts) });
      if (isAttn && opts.tokenMaps !== false) {
        tokenSections.push(attentionTokenMaps(part).map((img, i) => ({ name: `${label}#${i}`, img })));
      }
    }
  }
  if (!pca.length) throw new InvalidFileError(file, `holds no C×H×W feature to visualise (skipped: ${skipped.join(', ')})`);
  const sections = [grid(pca, opts.columns ?? 4), ...tokenSections.map((s) => grid(s, 11))];
  const width = Math.max(...sections.map((s) => s.width));
  const height = sections.reduce((a, s) => a + s.height, 0);
  // panels are copied into one RGB canvas (grey panels replicated), black background
  const canvas = new Uint8Array(width * height * 3);
  const panels: string[] = [];
  let top = 0;
  for (const s of sections) {
    for (const { p, left, top: t } of s.place) {
      panels.push(p.name);
      const { data, width: pw, height: ph, channels } = p.img;
      for (let y = 0; y < ph; y++) {
        let d = ((top + t + y) * width + left) * 3;
        let i = y * pw * channels;
        for (let x = 0; x < pw; x++, d += 3, i += channels) {
          canvas[d] = data[i]!;
          canvas[d + 1] = data[channels === 3 ? i + 1 : i]!;
          canvas[d + 2] = data[channels === 3 ? i + 2 : i]!;
        }
      }
    }
    top += s.height;
  }
  await writePng(outPng, canvas, width, height, 3);
  if (opts.panelsDir) {
    await mkdir(opts.panelsDir, { recursive: true });
    for (const p of [...pca, ...tokenSections.flat()]) {
      const safe = p.name.replace(/[^A-Za-z0-9._-]+/g, '_');
      await writePng(join(opts.panelsDir, `${safe}.png`), p.img.data, p.img.width, p.img.height, p.img.channels);
    }
  }
  return { panels, width, height, skipped };
}

// ------------------------------------------------------------------------------------------------
// GATE score (§7.4)

/** m(F) of GATE_SPEC §7.4: per-channel 4-neighbour Laplacian (replicate padding), L2 norm over channels → H×W. */
export async function laplacianMap(feature: FeatureInput, device: Device = 'cpu'): Promise<FeatureArray> {
  check3d(feature, 'laplacianMap');
  return withTensors(device, [feature], (ops, [t]) => opToArray(ops, 'laplacian_map', t!));
}

/** diff(F) = Σ_ij |m_ref[i,j] − m[i,j]| (float64). */
export function contentDiff(mRef: Float32Array, m: Float32Array): number {
  if (mRef.length !== m.length) throw new InvalidArgumentError(`contentDiff: maps of different sizes (${mRef.length} vs ${m.length})`);
  let s = 0;
  for (let i = 0; i < m.length; i++) s += Math.abs(mRef[i]! - m[i]!);
  return s;
}

/** Score(F) = (diff_anchor − diff(F)) / diff_anchor: 1 = contours of the t=0 reference, smaller = more content shift. */
export function gateScoreFromDiffs(diffAnchor: number, diff: number): number {
  return (diffAnchor - diff) / diffAnchor;
}

/** Result of {@link gateScore}. */
export interface GateScore {
  /** diff of the anchor. */
  anchorDiff: number;
  /** diff of each feature. */
  diffs: number[];
  /** Score of each feature. */
  scores: number[];
}

function sameShape(a: FeatureInput, b: FeatureInput, what: string): void {
  const sa = shapeOf(a);
  const sb = shapeOf(b);
  if (sa.length !== sb.length || sa.some((d, i) => d !== sb[i])) {
    throw new InvalidArgumentError(`${what}: shape [${sb.join(', ')}] differs from the reference's [${sa.join(', ')}]`);
  }
}

/**
 * GATE's content-shift score (GATE_SPEC §7.4) of `features` against the t=0 `reference` feature,
 * relative to `anchor` (e.g. the feature without the technique). All C×H×W of one shape.
 */
export async function gateScore(reference: FeatureInput, anchor: FeatureInput, features: readonly FeatureInput[], device: Device = 'cpu'): Promise<GateScore> {
  check3d(reference, 'gateScore reference');
  sameShape(reference, anchor, 'gateScore anchor');
  features.forEach((f, i) => sameShape(reference, f, `gateScore feature ${i}`));
  const mRef = (await laplacianMap(reference, device)).data;
  const anchorDiff = contentDiff(mRef, (await laplacianMap(anchor, device)).data);
  const diffs: number[] = [];
  for (const f of features) diffs.push(contentDiff(mRef, (await laplacianMap(f, device)).data));
  return { anchorDiff, diffs, scores: diffs.map((d) => gateScoreFromDiffs(anchorDiff, d)) };
}

/** One row of {@link gateScoreFiles}. */
export interface GateScoreRow {
  file: string;
  layer: string;
  diff: number;
  anchor_diff: number;
  /** (anchor_diff − diff) / anchor_diff; null when the anchor's diff is 0. */
  score: number | null;
}

/**
 * {@link gateScore} over feature files: for `layer`, or every C×H×W tensor the reference, the anchor
 * and all files share, one row per (file, layer).
 */
export async function gateScoreFiles(referenceFile: string, anchorFile: string, files: readonly string[], layer?: string, device: Device = 'cpu'): Promise<GateScoreRow[]> {
  if (!files.length) throw new InvalidArgumentError('gate-score: give at least one features file');
  const ref = await readFeatureFile(referenceFile);
  const anchor = await readFeatureFile(anchorFile);
  const others: Map<string, FeatureArray>[] = [];
  for (const f of files) others.push(await readFeatureFile(f));
  let layers: string[];
  if (layer) {
    for (const [name, m] of [[referenceFile, ref], [anchorFile, anchor], ...files.map((f, i) => [f, others[i]!] as const)] as const) {
      if (!m.has(layer)) throw new NotFoundError(`${name}: no tensor '${layer}' (has: ${[...m.keys()].join(', ')})`);
    }
    layers = [layer];
  } else {
    layers = [...ref.keys()].filter((n) => isSpatial(n, ref.get(n)!) && anchor.has(n) && others.every((o) => o.has(n)));
    if (!layers.length) throw new InvalidArgumentError(`gate-score: the files share no C×H×W tensor`);
  }
  const rows: GateScoreRow[] = [];
  for (const id of layers) {
    const g = await gateScore(ref.get(id)!, anchor.get(id)!, others.map((o) => o.get(id)!), device);
    files.forEach((file, i) => {
      rows.push({ file, layer: id, diff: g.diffs[i]!, anchor_diff: g.anchorDiff, score: g.anchorDiff === 0 ? null : g.scores[i]! });
    });
  }
  return rows;
}

// ------------------------------------------------------------------------------------------------
// correspondence (§8.1)

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
 * Nearest-neighbour correspondence (GATE_SPEC §8.1): source keypoints (x, y in source pixels) →
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
    opToArray(ops, 'correspondence', a!, b!, p!, S),
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

/** Result of {@link correspondenceFiles}: PCK over all keypoints of all pairs (§8.1 step 7). */
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
 * Nearest-neighbour correspondence and PCK@α over SPair-71k-style pair JSON files (GATE_SPEC §8.1),
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
  if (!pairs.length) throw new DiffusionFeaturesError('E_INVALID_ARGUMENT', 'correspondence: the pair files hold no pairs');
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
