/**
 * Image loading: decode (sharp), EXIF orientation, resize to `size`×`size` and convert to RGB exactly
 * as the reference does (GATE_SPEC §1.2: PIL `img.resize((size, size))` with its default filter
 * *before* `.convert('RGB')`, no crop).
 *
 * Two resamplers:
 * - `'pil'` (default): a TypeScript port of Pillow 9.4's resampler — BICUBIC (a = −0.5, support
 *   scaled by the reduction factor, 22-bit fixed-point coefficients, horizontal pass then vertical pass,
 *   each rounded and clipped to 8 bits), images with alpha resized premultiplied (`RGBa`/`La`) and
 *   un-premultiplied afterwards, NEAREST for palette and 1-bit images. Bit-exact with Pillow on the
 *   reference goldens (see test/image.test.ts).
 * - `'sharp'`: libvips `fit: 'fill', kernel: 'cubic'` for reductions (no axis enlarged) — faster on
 *   huge inputs; on the 451×300 → 128 photo within ±1 of PIL (≈82% of values exact, mean |Δ| ≈ 0.18;
 *   measured in test/image.test.ts). With alpha, low-alpha pixels can differ more after
 *   un-premultiplying. Enlargements (either axis) fall back to the PIL port: libvips's upsampler is
 *   up to ~50 grey levels off PIL there and the inputs are small anyway.
 *
 * Deviations from the reference's PIL path, by design: EXIF orientation is applied (PIL's `open`
 * ignores it); 16-bit images are reduced to 8 bits by sharp (PIL clips 16-bit greyscale to 0–255
 * instead of scaling); embedded ICC profiles are ignored like PIL does, except for CMYK images, which
 * sharp converts to sRGB.
 *
 * @module
 */
import { readFile, stat } from 'node:fs/promises';
import { basename, extname } from 'node:path';
import sharp from 'sharp';
import { FileNotFoundError, ImageDecodeError, InvalidArgumentError } from './errors.js';

/** Resampling implementation used by {@link loadImage}. */
export type ResampleMode = 'pil' | 'sharp';

/** Options of {@link loadImage}. */
export interface LoadImageOptions {
  /** Resampler (default `'pil'`, bit-exact with the reference). */
  resample?: ResampleMode;
  /** Name to report for Buffer inputs (default `'buffer'`); file inputs use their base name. */
  name?: string;
}

/** A decoded, resized RGB image. */
export interface LoadedImage {
  /** `size × size × 3` bytes, RGB, row-major HWC. */
  data: Uint8Array;
  /** Width of the source image (after EXIF orientation). */
  width: number;
  /** Height of the source image (after EXIF orientation). */
  height: number;
  /** Output side length (`size`). */
  size: number;
  /** File base name without extension (or the `name` option for buffers). */
  name: string;
}

/** Largest accepted output side. */
export const MAX_IMAGE_SIZE = 16384;

/** An 8-bit interleaved pixel buffer with `channels` bands (1 = L, 2 = LA, 3 = RGB, 4 = RGBA). */
interface Pixels {
  data: Uint8Array;
  width: number;
  height: number;
  channels: number;
}

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 1 << PRECISION_BITS;
const HALF = 1 << (PRECISION_BITS - 1);

function bicubic(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bicubic filter (support 2). */
function coefficients(inSize: number, outSize: number): { ksize: number; bounds: Int32Array; kk: Int32Array } {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 2 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss: number): number {
  const v = Math.floor(ss / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** Pillow's two-pass 8-bit bicubic resample of all bands. */
function resampleBicubic(src: Pixels, outW: number, outH: number): Pixels {
  const { channels: c } = src;
  let cur = src;
  const vert = coefficients(src.height, outH);
  if (outW !== src.width) {
    const hor = coefficients(src.width, outW);
    // only the rows the vertical pass reads
    const y0 = vert.bounds[0];
    const y1 = outH !== src.height ? vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1] : src.height;
    const rows = outH !== src.height ? y1 - y0 : src.height;
    const first = outH !== src.height ? y0 : 0;
    const out = new Uint8Array(outW * rows * c);
    for (let y = 0; y < rows; y++) {
      const rowIn = (y + first) * src.width * c;
      const rowOut = y * outW * c;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = hor.bounds[xx * 2];
        const xmax = hor.bounds[xx * 2 + 1];
        const k0 = xx * hor.ksize;
        for (let b = 0; b < c; b++) {
          let ss = HALF;
          for (let x = 0; x < xmax; x++) ss += src.data[rowIn + (x + xmin) * c + b] * hor.kk[k0 + x];
          out[rowOut + xx * c + b] = clip8(ss);
        }
      }
    }
    if (outH !== src.height) for (let i = 0; i < outH; i++) vert.bounds[i * 2] -= first;
    cur = { data: out, width: outW, height: rows, channels: c };
  }
  if (outH !== src.height) {
    const out = new Uint8Array(cur.width * outH * c);
    const stride = cur.width * c;
    for (let yy = 0; yy < outH; yy++) {
      const ymin = vert.bounds[yy * 2];
      const ymax = vert.bounds[yy * 2 + 1];
      const k0 = yy * vert.ksize;
      for (let i = 0; i < stride; i++) {
        let ss = HALF;
        for (let y = 0; y < ymax; y++) ss += cur.data[(y + ymin) * stride + i] * vert.kk[k0 + y];
        out[yy * stride + i] = clip8(ss);
      }
    }
    cur = { data: out, width: cur.width, height: outH, channels: c };
  }
  return cur;
}

/** Pillow's NEAREST resize (`ImagingScaleAffine`: pixel-centre sampling, incremental coordinates). */
function resampleNearest(src: Pixels, outW: number, outH: number): Pixels {
  const c = src.channels;
  const tab = (inSize: number, outSize: number): Int32Array => {
    const t = new Int32Array(outSize);
    const a = inSize / outSize;
    let o = a * 0.5;
    for (let i = 0; i < outSize; i++) {
      t[i] = Math.min(o < 0 ? -1 : Math.trunc(o), inSize - 1);
      o += a;
    }
    return t;
  };
  const xt = tab(src.width, outW);
  const yt = tab(src.height, outH);
  const out = new Uint8Array(outW * outH * c);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const s = (yt[y] * src.width + xt[x]) * c;
      const d = (y * outW + x) * c;
      for (let b = 0; b < c; b++) out[d + b] = src.data[s + b];
    }
  }
  return { data: out, width: outW, height: outH, channels: c };
}

/** Premultiply colour bands by alpha (Pillow's `RGBA → RGBa`, `MULDIV255`). Alpha is the last band. */
function premultiply(p: Pixels): Pixels {
  const c = p.channels;
  const out = new Uint8Array(p.data);
  for (let i = 0; i < out.length; i += c) {
    const alpha = out[i + c - 1];
    for (let b = 0; b < c - 1; b++) {
      const tmp = out[i + b] * alpha + 128;
      out[i + b] = ((tmp >> 8) + tmp) >> 8;
    }
  }
  return { ...p, data: out };
}

/** Undo {@link premultiply} (Pillow's `RGBa → RGBA`: truncating division, clipped). */
function unpremultiply(p: Pixels): Pixels {
  const c = p.channels;
  const out = p.data;
  for (let i = 0; i < out.length; i += c) {
    const alpha = out[i + c - 1];
    if (alpha === 0 || alpha === 255) continue;
    for (let b = 0; b < c - 1; b++) out[i + b] = Math.min(255, Math.trunc((255 * out[i + b]) / alpha));
  }
  return p;
}

/**
 * Resize 8-bit interleaved pixels like Pillow 9.4's `Image.resize(size)` with its default filter:
 * NEAREST when `nearest` (palette / 1-bit images), else BICUBIC (premultiplied when there is alpha,
 * i.e. 2 or 4 channels). Same size returns a copy.
 */
export function pilResize(
  data: Uint8Array, width: number, height: number, channels: number, outW: number, outH: number, nearest = false,
): Uint8Array {
  if (data.length !== width * height * channels) {
    throw new InvalidArgumentError(`pilResize: ${data.length} bytes for ${width}×${height}×${channels}`);
  }
  const src: Pixels = { data, width, height, channels };
  if (width === outW && height === outH) return new Uint8Array(data);
  if (nearest) return resampleNearest(src, outW, outH).data;
  const alpha = channels === 2 || channels === 4;
  if (!alpha) return resampleBicubic(src, outW, outH).data;
  return unpremultiply(resampleBicubic(premultiply(src), outW, outH)).data;
}

/** PIL's `.convert('RGB')` of L / LA / RGB / RGBA pixels: grey replicated, alpha dropped (no compositing). */
export function toRGB(data: Uint8Array, channels: number): Uint8Array {
  if (channels === 3) return data;
  const n = data.length / channels;
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const s = i * channels;
    if (channels <= 2) {
      out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = data[s];
    } else {
      out[i * 3] = data[s];
      out[i * 3 + 1] = data[s + 1];
      out[i * 3 + 2] = data[s + 2];
    }
  }
  return out;
}

/**
 * The reference's pixel normalisation (diffusers `VaeImageProcessor.preprocess`): uint8 HWC RGB →
 * float32 CHW, `x / 255 * 2 − 1` evaluated in float32 exactly as NumPy/PyTorch do.
 * @param data `size × size × 3` RGB bytes
 * @param size side length
 * @param out optional destination of length `3 × size × size` (e.g. a slice of a batch buffer)
 */
export function preprocessImage(data: Uint8Array, size: number, out?: Float32Array): Float32Array {
  const hw = size * size;
  if (data.length !== hw * 3) throw new InvalidArgumentError(`preprocessImage: expected ${hw * 3} bytes, got ${data.length}`);
  const dst = out ?? new Float32Array(3 * hw);
  if (dst.length !== 3 * hw) throw new InvalidArgumentError(`preprocessImage: output must hold ${3 * hw} values`);
  const lut = new Float32Array(256);
  for (let v = 0; v < 256; v++) lut[v] = Math.fround(Math.fround(v / 255) * 2 - 1);
  for (let i = 0; i < hw; i++) {
    dst[i] = lut[data[i * 3]];
    dst[hw + i] = lut[data[i * 3 + 1]];
    dst[2 * hw + i] = lut[data[i * 3 + 2]];
  }
  return dst;
}

function displayName(input: string | Uint8Array, opts: LoadImageOptions): string {
  if (typeof input === 'string') return basename(input, extname(input));
  return opts.name ?? 'buffer';
}

/**
 * Load an image file (or encoded bytes) of any format sharp reads and return it as `size × size`
 * RGB bytes, resized as the reference does (see the module doc).
 * @param input a file path, or the encoded image bytes
 * @param size output side length in pixels (e.g. 512)
 * @throws FileNotFoundError for a missing file; ImageDecodeError (code `E_IMAGE_DECODE`) for an empty,
 * truncated, corrupt or non-image input; InvalidArgumentError for a bad `size`
 */
export async function loadImage(
  input: string | Uint8Array, size: number, opts: LoadImageOptions = {},
): Promise<LoadedImage> {
  if (!Number.isSafeInteger(size) || size < 1 || size > MAX_IMAGE_SIZE) {
    throw new InvalidArgumentError(`image size must be an integer in [1, ${MAX_IMAGE_SIZE}], got ${size}`);
  }
  const resample = opts.resample ?? 'pil';
  if (resample !== 'pil' && resample !== 'sharp') throw new InvalidArgumentError(`resample must be 'pil' or 'sharp', got ${JSON.stringify(resample)}`);
  const label = typeof input === 'string' ? input : opts.name ?? '<buffer>';
  let bytes: Uint8Array;
  if (typeof input === 'string') {
    try {
      const st = await stat(input);
      if (st.isDirectory()) throw new ImageDecodeError(input, 'is a directory, not an image');
      bytes = await readFile(input);
    } catch (e) {
      if (e instanceof ImageDecodeError) throw e;
      const code = (e as NodeJS.ErrnoException).code;
      throw new FileNotFoundError(input, code === 'ENOENT' ? 'image file not found' : `cannot read image (${code ?? String(e)})`, { cause: e });
    }
  } else if (input instanceof Uint8Array) {
    bytes = input;
  } else {
    throw new InvalidArgumentError('loadImage input must be a file path or a Buffer/Uint8Array');
  }
  if (bytes.length === 0) throw new ImageDecodeError(label, 'empty file (0 bytes)');

  const make = () => sharp(bytes, { failOn: 'error', autoOrient: true, ignoreIcc: true, limitInputPixels: 0x3fff * 0x3fff });
  let pixels: Pixels;
  let srcW: number;
  let srcH: number;
  let nearest: boolean;
  try {
    const meta = await make().metadata();
    srcW = meta.autoOrient?.width ?? meta.width;
    srcH = meta.autoOrient?.height ?? meta.height;
    nearest = meta.isPalette === true || (meta.bitsPerSample === 1 && meta.channels <= 2);
    // sharp mode resizes in libvips, except palette/1-bit images (NEAREST, done here), exact-size
    // inputs (pass through untouched as in PIL) and enlargements (libvips's upsampler is far from
    // PIL's: up to ~50 levels off on a 128 → 200 photo; the PIL port below does those)
    let pipeline = make();
    const reduce = srcW >= size && srcH >= size && (srcW !== size || srcH !== size);
    if (resample === 'sharp' && !nearest && reduce) pipeline = pipeline.resize(size, size, { fit: 'fill', kernel: 'cubic' });
    const { data, info } = await pipeline.raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    pixels = { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: info.width, height: info.height, channels: info.channels };
  } catch (e) {
    const msg = (e as Error).message.split('\n')[0];
    throw new ImageDecodeError(label, `cannot decode image (${msg})`, { cause: e });
  }
  const { width, height, channels } = pixels;
  if (channels < 1 || channels > 4) throw new ImageDecodeError(label, `unsupported channel count ${channels}`);
  const resized = pilResize(pixels.data, width, height, channels, size, size, nearest);
  return { data: toRGB(resized, channels), width: srcW, height: srcH, size, name: displayName(input, opts) };
}
