/**
 * The CPU-heavy part of image loading — decode with sharp, Pillow-exact resize, conversion to RGB —
 * written as ONE self-contained factory, {@link imageCore}, so that the same code runs on the main
 * thread (small images, `offThread: false`) and inside the image worker threads of lib/image.ts,
 * which evaluate `(${imageCore})(null, abortFlag)` and only resize (sharp stays on the main thread:
 * libvips in a worker thread of a process that has also loaded libtorch prints GLib criticals). Nothing in the factory may refer to
 * anything outside it (no imports, no module constants); errors are plain `Error`s with a `kind`
 * (`'decode' | 'limit' | 'channels' | 'aborted' | 'argument'`) that lib/image.ts maps to typed errors.
 *
 * The resampler is a port of Pillow 9.4's (see lib/image.ts for the description and its fidelity).
 *
 * @module
 */
import type sharpType from 'sharp';

/** Resampling implementation (see lib/image.ts). */
export type ResampleMode = 'pil' | 'sharp';

/** What {@link ImageCore.decodeResize} returns. */
export interface DecodedImage {
  /** `size × size × 3` RGB bytes. */
  data: Uint8Array;
  /** Source width after EXIF orientation. */
  width: number;
  /** Source height after EXIF orientation. */
  height: number;
}

/** The functions the factory returns. */
export interface ImageCore {
  pilResize(data: Uint8Array, width: number, height: number, channels: number, outW: number, outH: number, nearest?: boolean): Uint8Array;
  toRGB(data: Uint8Array, channels: number): Uint8Array;
  decodeRaw(bytes: Uint8Array, size: number, resample: ResampleMode, maxPixels: number): Promise<RawImage>;
  finish(raw: RawImage, size: number): DecodedImage;
  decodeResize(bytes: Uint8Array, size: number, resample: ResampleMode, maxPixels: number): Promise<DecodedImage>;
}

/** Decoded pixels before the reference's resize. */
export interface RawImage {
  /** Interleaved 8-bit pixels, `width × height × channels`. */
  pixels: Uint8Array;
  width: number;
  height: number;
  /** 1 = L, 2 = LA, 3 = RGB, 4 = RGBA. */
  channels: number;
  /** Source size after EXIF orientation. */
  srcW: number;
  srcH: number;
  /** Palette / 1-bit source: PIL resizes those with NEAREST. */
  nearest: boolean;
}

/**
 * Builds the image functions over a sharp module. `abort` (optional) is a shared flag: when its first
 * element becomes non-zero, a running resize stops with an error of kind `'aborted'`.
 */
export function imageCore(sharp: typeof sharpType | null, abort?: Int32Array): ImageCore {
  function tagged(kind: string, message: string, cause?: unknown): Error {
    const e = new Error(message, cause === undefined ? undefined : { cause }) as Error & { kind: string };
    e.kind = kind;
    return e;
  }

  function checkAbort(): void {
    if (abort && Atomics.load(abort, 0) !== 0) throw tagged('aborted', 'image loading aborted');
  }

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
        if ((y & 63) === 0) checkAbort();
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
        if ((yy & 63) === 0) checkAbort();
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
  function pilResize(
    data: Uint8Array, width: number, height: number, channels: number, outW: number, outH: number, nearest = false,
  ): Uint8Array {
    if (data.length !== width * height * channels) {
      throw tagged('argument', `pilResize: ${data.length} bytes for ${width}×${height}×${channels}`);
    }
    const src: Pixels = { data, width, height, channels };
    if (width === outW && height === outH) return new Uint8Array(data);
    if (nearest) return resampleNearest(src, outW, outH).data;
    const alpha = channels === 2 || channels === 4;
    if (!alpha) return resampleBicubic(src, outW, outH).data;
    return unpremultiply(resampleBicubic(premultiply(src), outW, outH)).data;
  }

  /** PIL's `.convert('RGB')` of L / LA / RGB / RGBA pixels: grey replicated, alpha dropped (no compositing). */
  function toRGB(data: Uint8Array, channels: number): Uint8Array {
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
   * Decode `bytes` (any format sharp reads, EXIF orientation applied, ICC ignored) to 8-bit pixels
   * (resized by libvips only in `'sharp'` mode for reductions). Refuses images with more than
   * `maxPixels` source pixels before decoding them. Needs the sharp module (main thread only).
   */
  async function decodeRaw(bytes: Uint8Array, size: number, resample: ResampleMode, maxPixels: number): Promise<RawImage> {
    if (!sharp) throw tagged('decode', 'internal: no sharp module in this thread');
    let meta: Awaited<ReturnType<ReturnType<typeof sharp>['metadata']>>;
    try {
      meta = await sharp(bytes, { limitInputPixels: false }).metadata();
    } catch (e) {
      throw tagged('decode', `cannot decode image (${String((e as Error).message).split('\n')[0]})`, e);
    }
    const srcW = meta.autoOrient?.width ?? meta.width;
    const srcH = meta.autoOrient?.height ?? meta.height;
    if (!(srcW > 0 && srcH > 0)) throw tagged('decode', 'cannot decode image (no dimensions)');
    if (maxPixels > 0 && srcW * srcH > maxPixels) {
      throw tagged('limit', `image is ${srcW}×${srcH} = ${srcW * srcH} pixels, over the limit of ${maxPixels}`);
    }
    checkAbort();
    const nearest = meta.isPalette === true || (meta.bitsPerSample === 1 && (meta.channels ?? 0) <= 2);
    try {
      // sharp mode resizes in libvips, except palette/1-bit images (NEAREST, done here), exact-size
      // inputs (pass through untouched as in PIL) and enlargements (libvips's upsampler is far from
      // PIL's: up to ~50 levels off on a 128 → 200 photo; the PIL port does those)
      let pipeline = sharp(bytes, { failOn: 'error', autoOrient: true, ignoreIcc: true, limitInputPixels: maxPixels > 0 ? maxPixels : false });
      const reduce = srcW >= size && srcH >= size && (srcW !== size || srcH !== size);
      if (resample === 'sharp' && !nearest && reduce) pipeline = pipeline.resize(size, size, { fit: 'fill', kernel: 'cubic' });
      const { data, info } = await pipeline.raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
      const pixels = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      if (info.channels < 1 || info.channels > 4) throw tagged('channels', `unsupported channel count ${info.channels}`);
      return { pixels, width: info.width, height: info.height, channels: info.channels, srcW, srcH, nearest };
    } catch (e) {
      if ((e as { kind?: string }).kind) throw e;
      throw tagged('decode', `cannot decode image (${String((e as Error).message).split('\n')[0]})`, e);
    }
  }

  /** The reference's resize of decoded pixels to `size`×`size` RGB (pure JS; runs in any thread). */
  function finish(raw: RawImage, size: number): DecodedImage {
    checkAbort();
    const resized = pilResize(raw.pixels, raw.width, raw.height, raw.channels, size, size, raw.nearest);
    return { data: toRGB(resized, raw.channels), width: raw.srcW, height: raw.srcH };
  }

  /** {@link decodeRaw} then {@link finish}, on this thread. */
  async function decodeResize(bytes: Uint8Array, size: number, resample: ResampleMode, maxPixels: number): Promise<DecodedImage> {
    return finish(await decodeRaw(bytes, size, resample, maxPixels), size);
  }

  return { pilResize, toRGB, decodeRaw, finish, decodeResize };
}
