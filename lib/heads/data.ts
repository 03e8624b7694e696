/**
 * Training data of the heads: label maps (8-bit PNG or integer `.npy`), the bucket layout of feature
 * files, and the per-image packing of buckets.
 *
 * @internal
 * @module
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import sharp from 'sharp';
import { readFeatureFile } from '../tools/feature-file.js';
import type { FeatureArray } from '../tools/common.js';
import { isMapId } from '../layers.js';
import { FileNotFoundError, InvalidArgumentError, InvalidFileError } from '../errors.js';

/** Label value meaning "ignore this pixel" (GATE's 255). */
export const IGNORE = 255;

/** A label map: H×W class ids (255 = ignore). */
export interface LabelMap {
  data: Uint8Array;
  height: number;
  width: number;
}

const NPY_INT: Record<string, { bytes: number; read: (v: DataView, o: number) => number }> = {
  '|u1': { bytes: 1, read: (v, o) => v.getUint8(o) },
  '|i1': { bytes: 1, read: (v, o) => v.getInt8(o) },
  '|b1': { bytes: 1, read: (v, o) => v.getUint8(o) },
  '<u2': { bytes: 2, read: (v, o) => v.getUint16(o, true) },
  '<i2': { bytes: 2, read: (v, o) => v.getInt16(o, true) },
  '<u4': { bytes: 4, read: (v, o) => v.getUint32(o, true) },
  '<i4': { bytes: 4, read: (v, o) => v.getInt32(o, true) },
  '<i8': { bytes: 8, read: (v, o) => Number(v.getBigInt64(o, true)) },
  '<u8': { bytes: 8, read: (v, o) => Number(v.getBigUint64(o, true)) },
  '<f4': { bytes: 4, read: (v, o) => v.getFloat32(o, true) },
  '<f8': { bytes: 8, read: (v, o) => v.getFloat64(o, true) },
};

/** Decodes a 2-D integer (or integral float) `.npy` label map; values must be 0..255. */
export function decodeMaskNpy(buf: Uint8Array, file: string): LabelMap {
  const bad = (why: string) => new InvalidFileError(file, `not a usable .npy label map (${why})`);
  if (buf.length < 10 || buf[0] !== 0x93 || String.fromCharCode(...buf.subarray(1, 6)) !== 'NUMPY') throw bad('no NUMPY magic');
  const major = buf[6]!;
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const hlen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const hstart = major === 1 ? 10 : 12;
  if (hstart + hlen > buf.length) throw bad('truncated header');
  const header = new TextDecoder().decode(buf.subarray(hstart, hstart + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1]?.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  if (!descr || !shape) throw bad('unreadable header');
  const kind = NPY_INT[descr.replace('=', '<')];
  if (!kind) throw bad(`dtype ${descr} (expected an integer type)`);
  if (fortran) throw bad('Fortran order');
  const dims = shape.length === 3 && shape[0] === 1 ? shape.slice(1) : shape;
  if (dims.length !== 2 || dims.some((d) => !Number.isSafeInteger(d) || d < 1)) throw bad(`shape (${shape.join(', ')}) is not H×W`);
  const [height, width] = dims as [number, number];
  const n = height * width;
  const off = hstart + hlen;
  if (off + n * kind.bytes > buf.length) throw bad('truncated data');
  const data = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const v = kind.read(view, off + i * kind.bytes);
    if (!Number.isInteger(v) || v < 0 || v > 255) throw new InvalidFileError(file, `label ${v} at pixel ${i} is not a class id in 0..255`);
    data[i] = v;
  }
  return { data, height, width };
}

/** Reads a label map: an 8-bit single-channel PNG (class ids as grey values) or an integer `.npy`. */
export async function readMask(file: string): Promise<LabelMap> {
  let buf: Buffer;
  try {
    buf = await readFile(file);
  } catch (err) {
    throw new FileNotFoundError(file, `cannot read the label map (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
  }
  if (extname(file).toLowerCase() === '.npy') return decodeMaskNpy(new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength), file);
  try {
    const img = sharp(buf, { limitInputPixels: 1 << 26 });
    const meta = await img.metadata();
    if (meta.depth && meta.depth !== 'uchar') throw new InvalidFileError(file, `label maps must be 8-bit (this PNG is ${meta.depth})`);
    if ((meta.channels ?? 1) > 2 && meta.space !== 'b-w') {
      // a palette PNG decodes to RGB; class ids must be stored as grey values
      const { data, info } = await img.raw().toBuffer({ resolveWithObject: true });
      for (let i = 0; i < info.width * info.height; i++) {
        const p = i * info.channels;
        if (data[p] !== data[p + 1] || data[p] !== data[p + 2]) {
          throw new InvalidFileError(file, 'label maps must be single-channel 8-bit PNGs holding class ids (this one has colour)');
        }
      }
    }
    const { data, info } = await img.extractChannel(0).raw().toBuffer({ resolveWithObject: true });
    return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), height: info.height, width: info.width };
  } catch (err) {
    if (err instanceof InvalidFileError) throw err;
    throw new InvalidFileError(file, `cannot decode the label map (${(err as Error).message})`, { cause: err });
  }
}

/** GATE's rule: in each image, a class with 1–19 pixels is set to ignore. Returns a new map. */
export function ignoreSmallClasses(m: LabelMap, minPixels = 20): LabelMap {
  const counts = new Uint32Array(256);
  for (const v of m.data) counts[v]!++;
  const data = Uint8Array.from(m.data, (v) => (v !== IGNORE && counts[v]! > 0 && counts[v]! < minPixels ? IGNORE : v));
  return { ...m, data };
}

/** Files of `dir` with one of `exts`, by base name (a folder that is missing or empty is an error). */
export async function listByName(dir: string, exts: readonly string[], what: string): Promise<Map<string, string>> {
  let entries: string[];
  try {
    if (!(await stat(dir)).isDirectory()) throw new InvalidArgumentError(`${what} ${dir} is not a folder`);
    entries = await readdir(dir);
  } catch (err) {
    if (err instanceof InvalidArgumentError) throw err;
    throw new FileNotFoundError(dir, `${what} folder not found`, { cause: err });
  }
  const out = new Map<string, string>();
  for (const e of entries.sort()) {
    const ext = extname(e).toLowerCase();
    if (!exts.includes(ext) || e.startsWith('.')) continue;
    const name = basename(e, extname(e));
    if (out.has(name)) throw new InvalidArgumentError(`${what} folder ${dir} has two files named ${name} (${basename(out.get(name)!)} and ${e})`);
    out.set(name, join(dir, e));
  }
  if (!out.size) throw new InvalidArgumentError(`${what} folder ${dir} holds no ${exts.join(' / ')} files`);
  return out;
}

/** One bucket of a feature file: a name (the recipe variant, or `features`) and its tensors, in file order. */
export interface Bucket {
  name: string;
  tensors: string[];
  channels: number;
}

/**
 * The buckets of a feature file. A recipe file (`variant/layer` tensors) has one bucket per variant;
 * a plain `extract` file is one bucket of all its C×h×w layers (`packaged` alone when present).
 * Attention maps and the recipe's `amalgamated` concatenation are not used.
 */
export function bucketsOf(tensors: Map<string, FeatureArray>, file: string): Bucket[] {
  const spatial = [...tensors.entries()].filter(([n, f]) => f.shape.length === 3 && !isMapId(n.split('/').pop()!) && n !== 'amalgamated');
  if (!spatial.length) throw new InvalidFileError(file, 'holds no C×h×w feature tensor');
  const byVariant = new Map<string, Bucket>();
  const recipe = spatial.some(([n]) => n.includes('/'));
  for (const [n, f] of spatial) {
    if (recipe && !n.includes('/')) continue;
    if (!recipe && tensors.has('packaged') && n !== 'packaged') continue;
    const v = recipe ? n.slice(0, n.indexOf('/')) : 'features';
    const b = byVariant.get(v) ?? { name: v, tensors: [], channels: 0 };
    b.tensors.push(n);
    b.channels += f.shape[0]!;
    byVariant.set(v, b);
  }
  return [...byVariant.values()];
}

/** Groups of equal-width buckets, in order of first appearance: [{channels, buckets}]. */
export function groupsOf(buckets: readonly Bucket[]): { channels: number; buckets: Bucket[] }[] {
  const groups: { channels: number; buckets: Bucket[] }[] = [];
  for (const b of buckets) {
    const g = groups.find((x) => x.channels === b.channels);
    if (g) g.buckets.push(b);
    else groups.push({ channels: b.channels, buckets: [b] });
  }
  return groups;
}

/** torch nearest upsampling (`F.interpolate(mode='nearest')`) of a C×h×w feature to H×W. */
function nearest(f: FeatureArray, H: number, W: number): Float32Array {
  const [C, h, w] = f.shape as [number, number, number];
  if (h === H && w === W) return f.data;
  const out = new Float32Array(C * H * W);
  const ys = Array.from({ length: H }, (_, y) => Math.min(h - 1, Math.floor((y * h) / H)));
  const xs = Array.from({ length: W }, (_, x) => Math.min(w - 1, Math.floor((x * w) / W)));
  for (let c = 0; c < C; c++) {
    for (let y = 0; y < H; y++) {
      const src = c * h * w + ys[y]! * w;
      const dst = c * H * W + y * W;
      for (let x = 0; x < W; x++) out[dst + x] = f.data[src + xs[x]!]!;
    }
  }
  return out;
}

/** The feature size (largest h×w) of a file's buckets. */
export function gridOf(tensors: Map<string, FeatureArray>, buckets: readonly Bucket[]): [number, number] {
  let h = 0;
  let w = 0;
  for (const b of buckets) for (const n of b.tensors) {
    const s = tensors.get(n)!.shape;
    h = Math.max(h, s[1]!);
    w = Math.max(w, s[2]!);
  }
  return [h, w];
}

/** A bucket as one C×H×W array: its layers nearest-resized to the grid and concatenated (docs/method.md §Packaging). */
export function packBucket(tensors: Map<string, FeatureArray>, b: Bucket, H: number, W: number): Float32Array {
  if (b.tensors.length === 1) return nearest(tensors.get(b.tensors[0]!)!, H, W);
  const out = new Float32Array(b.channels * H * W);
  let off = 0;
  for (const n of b.tensors) {
    const part = nearest(tensors.get(n)!, H, W);
    out.set(part, off);
    off += part.length;
  }
  return out;
}

/** The input layout a head was trained with: bucket names with their tensors, in input order. */
export interface InputLayout {
  buckets: Bucket[];
  grid: [number, number];
}

/** Encodes / decodes a layout for the head's `feature_names` attribute. */
export function encodeLayout(l: InputLayout): string[] {
  return [JSON.stringify({ grid: l.grid }), ...l.buckets.map((b) => JSON.stringify(b))];
}
export function decodeLayout(names: readonly string[], file: string): InputLayout {
  try {
    const [g, ...rest] = names.map((n) => JSON.parse(n) as unknown);
    const grid = (g as { grid: [number, number] }).grid;
    const buckets = rest as Bucket[];
    if (!Array.isArray(grid) || !buckets.length || !buckets.every((b) => typeof b.name === 'string' && Array.isArray(b.tensors))) throw new Error('bad layout');
    return { grid, buckets };
  } catch {
    throw new InvalidFileError(file, 'is not a trained head (no input layout recorded)');
  }
}

/**
 * Reads one feature file and checks it against `layout` (or derives the layout when none is given):
 * every bucket tensor present with the same channel count, the same grid.
 */
export async function readFeatures(file: string, layout?: InputLayout): Promise<{ tensors: Map<string, FeatureArray>; layout: InputLayout }> {
  const tensors = await readFeatureFile(file);
  if (!layout) {
    const buckets = bucketsOf(tensors, file);
    return { tensors, layout: { buckets, grid: gridOf(tensors, buckets) } };
  }
  for (const b of layout.buckets) {
    let c = 0;
    for (const n of b.tensors) {
      const t = tensors.get(n);
      if (!t) throw new InvalidFileError(file, `has no tensor '${n}' (the head was trained on ${layout.buckets.map((x) => x.tensors.join('+')).join(', ')})`);
      if (t.shape.length !== 3) throw new InvalidFileError(file, `tensor '${n}' is not C×h×w`);
      c += t.shape[0]!;
    }
    if (c !== b.channels) throw new InvalidFileError(file, `bucket '${b.name}' has ${c} channels, the head expects ${b.channels}`);
  }
  const grid = gridOf(tensors, layout.buckets);
  if (grid[0] !== layout.grid[0] || grid[1] !== layout.grid[1]) {
    throw new InvalidFileError(file, `features are ${grid[0]}×${grid[1]}, the head was trained on ${layout.grid[0]}×${layout.grid[1]}`);
  }
  return { tensors, layout };
}
