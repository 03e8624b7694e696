/**
 * LoRA support: parse LoRA safetensors files (kohya-ss / LoCon naming, diffusers/PEFT naming and the
 * older diffusers `lora.down`/`lora.up` naming), map them onto the parameters of the loaded
 * TorchScript UNet (and optionally the text encoder), and merge them into the weights:
 *
 *     W' = W + Σ_i s_i · (alpha_i / r_i) · reshape(up_i @ down_i, W.shape)
 *
 * evaluated in float64 and rounded once (`ops.lora_merge`, docs/method.md §LoRA). The original weights of
 * every touched parameter are saved before merging, so un-merging or swapping LoRA sets restores
 * them exactly, without reloading the model.
 *
 * This module is the parsing and mapping half, pure TypeScript: {@link readLoraFile},
 * {@link parseLora}, {@link planLoraMerge}. `./manager.ts` ({@link LoraManager}) does the merging.
 *
 * @module
 */
import { basename } from 'node:path';
import { SafetensorsFile, type StDType } from '../io/safetensors.js';
import { IncompatibleModelError, InvalidFileError } from '../errors.js';

/** A LoRA file and the strength it is merged with (default 1). */
export interface LoraSpec {
  /** Path of a `.safetensors` LoRA file. */
  file: string;
  /** Multiplier `s` of the file's delta (default 1). */
  scale?: number;
}

/** Naming convention of a LoRA file. */
export type LoraFormat = 'kohya' | 'peft' | 'diffusers';

/** Which model a LoRA module targets. */
export type LoraTarget = 'unet' | 'text_encoder';

/** A float factor of a LoRA module, upcast exactly to float32. */
export interface LoraFactor {
  data: Float32Array;
  shape: number[];
}

/** One LoRA module (a pair of low-rank factors for one weight). */
export interface LoraModule {
  /** The module's key prefix in the file (e.g. `lora_unet_down_blocks_0_…_to_q`, `unet.down_blocks.0.….to_q`). */
  key: string;
  target: LoraTarget;
  /**
   * The module name inside the target model: a dotted module path (`down_blocks.0.….to_q`) for
   * diffusers/PEFT files, or the kohya flattened name (`down_blocks_0_…_to_q`) for kohya files.
   */
  name: string;
  /** Whether {@link name} is a dotted module path (else a kohya name with `.` → `_`). */
  dotted: boolean;
  /** `(out, r)` or `(out, r, 1, 1)`. */
  up: LoraFactor;
  /** `(r, in)` or `(r, in, kh, kw)`. */
  down: LoraFactor;
  /** The stored alpha, or `null` when the file has none (then alpha = rank, scale 1). */
  alpha: number | null;
  /** `down.shape[0]`. */
  rank: number;
}

/** A parsed LoRA file. */
export interface LoraFile {
  path: string;
  format: LoraFormat;
  modules: LoraModule[];
  metadata: Record<string, string>;
}

/** Name, shape and dtype of a model parameter (what `ScriptModule.parameters()` lists). */
export interface ParamInfo {
  name: string;
  shape: number[];
}

/** One scaled low-rank term of a merge: `scale · up @ down` (scale includes alpha/rank). */
export interface LoraTerm {
  up: LoraFactor;
  down: LoraFactor;
  scale: number;
  /** `file#key`, for messages. */
  source: string;
}

/** Everything a LoRA set changes, per target model: parameter name → terms. */
export interface LoraPlan {
  unet: Map<string, LoraTerm[]>;
  text_encoder: Map<string, LoraTerm[]>;
  /** Text-encoder module keys that were not applied (text encoder off, or no text encoder). */
  skipped: string[];
}

const FLOAT_DTYPES: ReadonlySet<StDType> = new Set(['F16', 'F32', 'BF16', 'F64']);

/** Old diffusers attention-processor names → module names. */
const ATTN_PROC_UNET: Record<string, string> = { to_q: 'to_q', to_k: 'to_k', to_v: 'to_v', to_out: 'to_out.0' };
const ATTN_PROC_TEXT: Record<string, string> = { to_q: 'q_proj', to_k: 'k_proj', to_v: 'v_proj', to_out: 'out_proj' };

interface Slot {
  key: string;
  target: LoraTarget;
  name: string;
  dotted: boolean;
  format: LoraFormat;
  up?: string;
  down?: string;
  alpha?: string;
}

/** Classifies one tensor name; `null` when it follows no known LoRA naming. */
function classifyKey(k: string): { module: string; target: LoraTarget; name: string; dotted: boolean; format: LoraFormat; part: 'up' | 'down' | 'alpha' } | { unsupported: string } | null {
  let m = /^(lora_(unet|te\d*)_(.+))\.(lora_down\.weight|lora_up\.weight|alpha)$/.exec(k);
  if (m) {
    const part = m[4] === 'alpha' ? 'alpha' : m[4]!.startsWith('lora_down') ? 'down' : 'up';
    return { module: m[1]!, target: m[2] === 'unet' ? 'unet' : 'text_encoder', name: m[3]!, dotted: false, format: 'kohya', part };
  }
  m = /^(lora_(?:unet|te\d*)_.+)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|dora_scale|diff|diff_b|oft_\w+)$/.exec(k);
  if (m) return { unsupported: `${m[2]} (LyCORIS LoHa/LoKr/DoRA/full-diff modules are not supported; only LoRA/LoCon)` };
  // diffusers / PEFT: [unet.|text_encoder.][base_model.model.]<module>.lora_A[.adapter].weight
  m = /^(?:(unet|text_encoder)\.)?(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$/.exec(k);
  if (m) {
    const target: LoraTarget = m[1] === 'text_encoder' || (!m[1] && m[2]!.startsWith('text_model.')) ? 'text_encoder' : 'unet';
    return { module: `${m[1] ? `${m[1]}.` : ''}${m[2]}`, target, name: m[2]!, dotted: true, format: 'peft', part: m[3] === 'A' ? 'down' : 'up' };
  }
  // older diffusers: <module>.lora.down.weight, or attention processors <attn>.processor.to_q_lora.down.weight
  m = /^(?:(unet|text_encoder)\.)?(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(k);
  if (m) {
    const target: LoraTarget = m[1] === 'text_encoder' ? 'text_encoder' : 'unet';
    const name = `${m[2]}.${(target === 'unet' ? ATTN_PROC_UNET : ATTN_PROC_TEXT)[m[3]!]}`;
    return { module: `${m[1] ? `${m[1]}.` : ''}${m[2]}.processor.${m[3]}_lora`, target, name, dotted: true, format: 'diffusers', part: m[4] as 'up' | 'down' };
  }
  m = /^(?:(unet|text_encoder)\.)?(.+)\.lora\.(down|up)\.weight$/.exec(k);
  if (m) {
    const target: LoraTarget = m[1] === 'text_encoder' || (!m[1] && m[2]!.startsWith('text_model.')) ? 'text_encoder' : 'unet';
    return { module: `${m[1] ? `${m[1]}.` : ''}${m[2]}`, target, name: m[2]!, dotted: true, format: 'diffusers', part: m[3] as 'up' | 'down' };
  }
  // alpha of a diffusers/PEFT-named module (files converted from kohya keep it)
  m = /^(?:(unet|text_encoder)\.)?(.+)\.alpha$/.exec(k);
  if (m) {
    const target: LoraTarget = m[1] === 'text_encoder' ? 'text_encoder' : 'unet';
    return { module: `${m[1] ? `${m[1]}.` : ''}${m[2]}`, target, name: m[2]!, dotted: true, format: 'peft', part: 'alpha' };
  }
  return null;
}

/** Largest accepted |value| of a LoRA factor (real ones are far below 10). */
export const MAX_LORA_FACTOR = 1e6;

function readFactor(st: SafetensorsFile, name: string, file: string): LoraFactor {
  const info = st.info(name);
  if (!FLOAT_DTYPES.has(info.dtype)) throw new InvalidFileError(file, `LoRA tensor "${name}" has dtype ${info.dtype}; expected F16, BF16, F32 or F64`);
  if (info.shape.length !== 2 && info.shape.length !== 4) {
    throw new InvalidFileError(file, `LoRA tensor "${name}" must be 2-D or 4-D, got shape [${info.shape.join(', ')}]`);
  }
  if (info.shape.some((d) => d === 0)) throw new InvalidFileError(file, `LoRA tensor "${name}" is empty (shape [${info.shape.join(', ')}])`);
  const data = st.float32(name);
  for (let i = 0; i < data.length; i++) {
    const v = data[i]!;
    // NaN, ±Inf, and values whose products overflow float32 (|v| > 1e6) would make every feature NaN
    if (!(Math.abs(v) <= MAX_LORA_FACTOR)) {
      throw new InvalidFileError(file, `LoRA tensor "${name}" holds ${Number.isNaN(v) ? 'NaN' : v} at index ${i}; factors must be finite with |x| ≤ ${MAX_LORA_FACTOR}`);
    }
  }
  return { data, shape: info.shape };
}

/**
 * Parses and validates a LoRA file already opened with {@link SafetensorsFile}. Every tensor must
 * belong to a LoRA module with both factors and consistent rank; anything else is an error naming it.
 * @throws InvalidFileError (code `E_INVALID_FILE`) for unknown keys, unsupported module types,
 * missing factors, non-float dtypes, inconsistent shapes.
 */
export function parseLora(st: SafetensorsFile, file: string = st.source): LoraFile {
  const slots = new Map<string, Slot>();
  const unknown: string[] = [];
  const formats = new Set<LoraFormat>();
  for (const k of st.names()) {
    const c = classifyKey(k);
    if (c === null) {
      unknown.push(k);
      continue;
    }
    if ('unsupported' in c) throw new InvalidFileError(file, `tensor "${k}": ${c.unsupported}`);
    let s = slots.get(c.module);
    if (!s) {
      s = { key: c.module, target: c.target, name: c.name, dotted: c.dotted, format: c.format };
      slots.set(c.module, s);
    }
    if (c.part !== 'alpha') formats.add(c.format);
    if (s[c.part] !== undefined) throw new InvalidFileError(file, `duplicate LoRA ${c.part} tensors for module "${c.module}" ("${s[c.part]}" and "${k}")`);
    s[c.part] = k;
  }
  if (unknown.length) {
    throw new InvalidFileError(file, `not a LoRA key (expected kohya lora_unet_*/lora_te_* .lora_down/.lora_up/.alpha, or diffusers/PEFT <module>.lora_A/lora_B.weight): ${unknown.slice(0, 5).map((k) => `"${k}"`).join(', ')}${unknown.length > 5 ? ` and ${unknown.length - 5} more` : ''}`);
  }
  if (slots.size === 0) throw new InvalidFileError(file, 'holds no LoRA tensors');
  const modules: LoraModule[] = [];
  for (const s of slots.values()) {
    if (!s.up || !s.down) {
      const have = [s.up && 'up', s.down && 'down', s.alpha && 'alpha'].filter(Boolean).join(', ');
      throw new InvalidFileError(file, `LoRA module "${s.key}" lacks its ${!s.up ? 'up (lora_up / lora_B)' : 'down (lora_down / lora_A)'} factor (has: ${have})`);
    }
    const up = readFactor(st, s.up, file);
    const down = readFactor(st, s.down, file);
    const rank = down.shape[0]!;
    const upRank = up.shape[1]!;
    if (upRank !== rank || (up.shape.length === 4 && (up.shape[2] !== 1 || up.shape[3] !== 1))) {
      throw new InvalidFileError(file, `LoRA module "${s.key}": up [${up.shape.join(', ')}] does not match down [${down.shape.join(', ')}] (rank ${rank}; up must be (out, r) or (out, r, 1, 1))`);
    }
    let alpha: number | null = null;
    if (s.alpha) {
      const info = st.info(s.alpha);
      const n = info.shape.reduce((a, b) => a * b, 1);
      if (n !== 1) throw new InvalidFileError(file, `LoRA alpha "${s.alpha}" must be a scalar, got shape [${info.shape.join(', ')}]`);
      if (info.dtype === 'BOOL') throw new InvalidFileError(file, `LoRA alpha "${s.alpha}" has dtype BOOL`);
      alpha = st.float64(s.alpha)[0]!;
      if (!Number.isFinite(alpha) || Math.abs(alpha) > MAX_LORA_FACTOR) throw new InvalidFileError(file, `LoRA alpha "${s.alpha}" must be finite with |alpha| ≤ ${MAX_LORA_FACTOR}, got ${alpha}`);
    }
    modules.push({ key: s.key, target: s.target, name: s.name, dotted: s.dotted, up, down, alpha, rank });
  }
  const format: LoraFormat = formats.has('kohya') ? 'kohya' : formats.has('peft') ? 'peft' : 'diffusers';
  return { path: file, format, modules, metadata: st.metadata };
}

/** Reads, validates and parses a LoRA safetensors file (F16/BF16/F32/F64 factors). */
export async function readLoraFile(path: string): Promise<LoraFile> {
  return parseLora(await SafetensorsFile.open(path), path);
}

/**
 * Resolves LoRA module names to parameter names of one model. Dotted names map to `<name>.weight`;
 * kohya names map through a lookup built from the model's own module paths with `.` → `_` (the
 * underscores of kohya names are ambiguous, so no string rewriting is attempted).
 */
export class ParameterIndex {
  private readonly shapes = new Map<string, number[]>();
  private readonly kohya = new Map<string, string | null>();

  constructor(params: readonly ParamInfo[]) {
    for (const p of params) {
      this.shapes.set(p.name, p.shape);
      if (!p.name.endsWith('.weight')) continue;
      const mod = p.name.slice(0, -'.weight'.length);
      const flat = mod.replace(/\./g, '_');
      this.kohya.set(flat, this.kohya.has(flat) && this.kohya.get(flat) !== p.name ? null : p.name);
    }
  }

  /** Shape of a parameter, or undefined. */
  shape(name: string): number[] | undefined {
    return this.shapes.get(name);
  }

  /** The weight parameter a module addresses; `null` if ambiguous, undefined if none. */
  resolve(m: Pick<LoraModule, 'name' | 'dotted' | 'target'>): string | null | undefined {
    if (m.dotted) {
      for (const cand of [`${m.name}.weight`, m.target === 'text_encoder' ? `text_model.${m.name}.weight` : '']) {
        if (cand && this.shapes.has(cand)) return cand;
      }
      return undefined;
    }
    return this.kohya.get(m.name);
  }
}

function checkShapes(m: LoraModule, w: number[], file: string, param: string): void {
  const out = m.up.shape[0]!;
  const inner = m.down.shape.slice(1).reduce((a, b) => a * b, 1);
  const wInner = w.slice(1).reduce((a, b) => a * b, 1);
  const conv3ToLinear = w.length === 2 && m.down.shape.length === 4 && (m.down.shape[2] !== 1 || m.down.shape[3] !== 1);
  if (w.length < 2 || out !== w[0] || inner !== wInner || conv3ToLinear) {
    throw new IncompatibleModelError(
      `${file}: LoRA module "${m.key}" (up [${m.up.shape.join(', ')}], down [${m.down.shape.join(', ')}]) does not fit ${param} [${w.join(', ')}] — a LoRA for a different model?`,
    );
  }
}

/**
 * Maps a LoRA set onto model parameters and validates it completely (nothing is touched).
 * @param loras parsed files with their scales
 * @param unet the UNet's parameters
 * @param text the text encoder's parameters, or `null` to skip text-encoder modules
 * @throws DiffusionFeaturesError `E_INCOMPATIBLE_MODEL` naming the first keys that match no
 * parameter (or whose shapes do not fit)
 */
export function planLoraMerge(
  loras: readonly { lora: LoraFile; scale: number }[],
  unet: readonly ParamInfo[],
  text: readonly ParamInfo[] | null,
): LoraPlan {
  const idx = { unet: new ParameterIndex(unet), text_encoder: text ? new ParameterIndex(text) : null };
  const plan: LoraPlan = { unet: new Map(), text_encoder: new Map(), skipped: [] };
  for (const { lora, scale } of loras) {
    const missing: string[] = [];
    for (const m of lora.modules) {
      const index = idx[m.target];
      if (!index) {
        plan.skipped.push(`${basename(lora.path)}#${m.key}`);
        continue;
      }
      const param = index.resolve(m);
      if (param === null) {
        throw new IncompatibleModelError(`${lora.path}: LoRA key "${m.key}" is ambiguous (several ${m.target} modules flatten to "${m.name}")`);
      }
      if (param === undefined) {
        missing.push(m.key);
        continue;
      }
      checkShapes(m, index.shape(param)!, lora.path, param);
      const terms = plan[m.target].get(param) ?? [];
      terms.push({ up: m.up, down: m.down, scale: scale * ((m.alpha ?? m.rank) / m.rank), source: `${basename(lora.path)}#${m.key}` });
      plan[m.target].set(param, terms);
    }
    if (missing.length) {
      throw new IncompatibleModelError(
        `${lora.path}: ${missing.length} LoRA key${missing.length > 1 ? 's match' : ' matches'} no parameter of the model: ${missing.slice(0, 5).map((k) => `"${k}"`).join(', ')}${missing.length > 5 ? ` and ${missing.length - 5} more` : ''}`,
      );
    }
  }
  return plan;
}
