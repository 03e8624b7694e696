/**
 * Visualisation (docs/method.md §Visualisation): PCA of a feature to RGB, attention token maps, and a
 * PNG grid of every feature of a file.
 *
 * @module
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Device } from '../native.js';
import { pilResize } from '../image.js';
import { InvalidFileError, NotFoundError } from '../errors.js';
import { writePng } from '../io/png.js';
import { check3d, withTensors, type FeatureArray, type FeatureInput } from './common.js';
import { resizeNearest, shortSideSize } from './resize.js';
import { isSpatial, readFeatureFile } from './feature-file.js';

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
 * PCA of a C×H×W feature to RGB (docs/method.md §Visualisation): 3 components fitted on the image's own pixels,
 * per-component min–max to [0, 255] (truncated), nearest-resized so the short side is 512.
 */
export async function visualize(feature: FeatureInput, opts: VisualizeOptions = {}): Promise<RawImage> {
  const [, H, W] = check3d(feature, 'visualize');
  const rgb = await withTensors(opts.device ?? 'cpu', [feature], async (ops, [t]) => {
    const r = await ops.pcaRgb(t!);
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
