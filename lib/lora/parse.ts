/**
 * LoRA support: parse LoRA safetensors files (kohya-ss / LoCon naming, diffusers/PEFT naming and the
 * older diffusers `lora.down`/`lora.up` naming), map them onto the parameters of the loaded
 * TorchScript UNet (and optionally the text encoder), and merge them into the weights:
 *
 *     W' = W + Σ_i s_i · (alpha_i / r_i) · reshape(up_i @ down_i, W.shape)
 *
 * evaluated in float64 and rounded once (`ops.lora_merge`, GATE_SPEC §6). The original weights of
 * every touched parameter are saved before merging, so un-merging or swapping LoRA sets restores
 * them exactly, without reloading the model.
 *
 * Parsing and mapping are pure TypeScript (no native addon at module load): {@link readLoraFile},
 * {@link parseLora}, {@link planLoraMerge}. {@link LoraManager} does the merging through the addon.
 *
 * @module
 */
import { stat } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import type { ScriptModule, Tensor, Device } from './native.js';
import { SafetensorsFile, type StDType } from './safetensors.js';
import { DiffusionFeaturesError, InvalidArgumentError, InvalidFileError } from './errors.js';

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

function readFactor(st: SafetensorsFile, name: string, file: string): LoraFactor {
  const info = st.info(name);
  if (!FLOAT_DTYPES.has(info.dtype)) throw new InvalidFileError(file, `LoRA tensor "${name}" has dtype ${info.dtype}; expected F16, BF16, F32 or F64`);
  if (info.shape.length !== 2 && info.shape.length !== 4) {
    throw new InvalidFileError(file, `LoRA tensor "${name}" must be 2-D or 4-D, got shape [${info.shape.join(', ')}]`);
  }
  if (info.shape.some((d) => d === 0)) throw new InvalidFileError(file, `LoRA tensor "${name}" is empty (shape [${info.shape.join(', ')}])`);
  return { data: st.float32(name), shape: info.shape };
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
      if (!Number.isFinite(alpha)) throw new InvalidFileError(file, `LoRA alpha "${s.alpha}" is not finite (${alpha})`);
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
    throw new DiffusionFeaturesError(
      'E_INCOMPATIBLE_MODEL',
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
        throw new DiffusionFeaturesError('E_INCOMPATIBLE_MODEL', `${lora.path}: LoRA key "${m.key}" is ambiguous (several ${m.target} modules flatten to "${m.name}")`);
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
      throw new DiffusionFeaturesError(
        'E_INCOMPATIBLE_MODEL',
        `${lora.path}: ${missing.length} LoRA key${missing.length > 1 ? 's match' : ' matches'} no parameter of the model: ${missing.slice(0, 5).map((k) => `"${k}"`).join(', ')}${missing.length > 5 ? ` and ${missing.length - 5} more` : ''}`,
      );
    }
  }
  return plan;
}

/**
 * Reference implementation of the merge rule in plain TypeScript (float64, rounded once to float32):
 * `W + Σ scale · reshape(up @ down)`. Used by tests and available as a CPU fallback; the
 * {@link LoraManager} merges with `ops.lora_merge` on the model's device.
 */
export function mergeLoraF64(w: Float32Array, wShape: readonly number[], terms: readonly LoraTerm[]): Float32Array {
  const out = wShape[0]!;
  const inner = w.length / out;
  const acc = Float64Array.from(w);
  for (const t of terms) {
    const r = t.down.shape[0]!;
    const up = t.up.data;
    const down = t.down.data;
    for (let o = 0; o < out; o++) {
      const row = o * inner;
      for (let k = 0; k < r; k++) {
        const u = t.scale * up[o * r + k]!;
        if (u === 0) continue;
        const d0 = k * inner;
        for (let j = 0; j < inner; j++) acc[row + j]! += u * down[d0 + j]!;
      }
    }
  }
  return Float32Array.from(acc);
}

/**
 * Exactly the float64 delta `Σ scale · up @ down` of one parameter (tests compare its Frobenius norm
 * with the reference's `delta_fro_by_parameter`).
 */
export function loraDeltaF64(wShape: readonly number[], terms: readonly LoraTerm[]): Float64Array {
  const out = wShape[0]!;
  const inner = wShape.slice(1).reduce((a, b) => a * b, 1);
  const acc = new Float64Array(out * inner);
  for (const t of terms) {
    const r = t.down.shape[0]!;
    for (let o = 0; o < out; o++) {
      for (let k = 0; k < r; k++) {
        const u = t.scale * t.up.data[o * r + k]!;
        for (let j = 0; j < inner; j++) acc[o * inner + j]! += u * t.down.data[k * inner + j]!;
      }
    }
  }
  return acc;
}

interface Saved {
  target: LoraTarget;
  param: string;
  original: Tensor;
}

interface Active {
  file: string;
  scale: number;
}

/**
 * Merges LoRA sets into a loaded UNet (and optionally text encoder) and swaps them without reloading:
 * the original weights of touched parameters are kept (on the CPU) and restored exactly.
 */
export class LoraManager {
  private readonly modules: Record<LoraTarget, ScriptModule | null | undefined>;
  private saved = new Map<string, Saved>();
  private activeSet: Active[] = [];
  private textApplied = false;
  private signature = '';
  private queue: Promise<unknown> = Promise.resolve();
  private readonly cache = new Map<string, { stamp: string; lora: LoraFile }>();
  /** Text-encoder modules not applied by the last {@link swap} (`file#key`). */
  skipped: string[] = [];

  /**
   * @param unet the UNet ScriptModule (diffusers parameter names)
   * @param text the CLIP text encoder ScriptModule (transformers names), if LoRA may touch it
   */
  constructor(unet: ScriptModule, text?: ScriptModule | null) {
    this.modules = { unet, text_encoder: text ?? null };
  }

  /** The LoRA files currently merged, with their scales. */
  get active(): readonly Readonly<Active>[] {
    return this.activeSet.map((a) => ({ ...a }));
  }

  /** Parameters currently differing from the base weights (`unet:<name>` / `text_encoder:<name>`). */
  touched(): string[] {
    return [...this.saved.keys()];
  }

  /** A short description of the merged set for metadata: `a.safetensors:1,b.safetensors:0.3` ('' when none). */
  describe(): string {
    if (!this.activeSet.length) return '';
    return this.activeSet.map((a) => `${basename(a.file)}:${a.scale}`).join(',') + (this.textApplied ? ' (+text encoder)' : '');
  }

  /**
   * Replaces the merged LoRA set by `loras` (an empty list restores the base weights). All files are
   * read and validated before any weight changes; on a failure while writing, the base weights are
   * restored. Text-encoder modules are skipped unless `opts.textEncoder` (GATE uses the base text
   * encoder); skipped modules are listed in {@link skipped}.
   */
  swap(loras: readonly LoraSpec[], opts: { textEncoder?: boolean } = {}): Promise<void> {
    const run = this.queue.then(() => this.swapNow(loras, opts));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Restores the base weights. */
  clear(): Promise<void> {
    return this.swap([]);
  }

  private async load(spec: LoraSpec): Promise<{ lora: LoraFile; scale: number; stamp: string }> {
    if (!spec || typeof spec.file !== 'string' || !spec.file) throw new InvalidArgumentError('LoRA spec needs a file');
    const scale = spec.scale ?? 1;
    if (typeof scale !== 'number' || !Number.isFinite(scale)) throw new InvalidArgumentError(`LoRA scale of ${spec.file} must be a finite number, got ${String(scale)}`);
    const path = resolve(spec.file);
    let stamp = '';
    try {
      const st = await stat(path);
      stamp = `${st.size}:${st.mtimeMs}`;
    } catch {
      // SafetensorsFile.open reports the missing file
    }
    const hit = this.cache.get(path);
    if (hit && hit.stamp === stamp) return { lora: hit.lora, scale, stamp };
    const lora = await readLoraFile(spec.file);
    this.cache.set(path, { stamp, lora });
    while (this.cache.size > 4) this.cache.delete(this.cache.keys().next().value!);
    return { lora, scale, stamp };
  }

  private async swapNow(loras: readonly LoraSpec[], opts: { textEncoder?: boolean }): Promise<void> {
    if (!Array.isArray(loras)) throw new InvalidArgumentError('swap: loras must be an array of { file, scale }');
    const loaded = [];
    for (const spec of loras) loaded.push(await this.load(spec));
    const useText = !!opts.textEncoder && !!this.modules.text_encoder;
    const signature = JSON.stringify([useText, loaded.map((l) => [resolve(l.lora.path), l.stamp, l.scale])]);
    if (signature === this.signature) return;

    const unet = this.modules.unet!;
    const text = this.modules.text_encoder;
    const plan = planLoraMerge(loaded, unet.parameters(), useText && text ? text.parameters() : null);
    const wanted = new Set<string>();
    for (const target of ['unet', 'text_encoder'] as const) for (const p of plan[target].keys()) wanted.add(`${target}:${p}`);

    const { Tensor: T } = await import('./native.js');
    const { loadOps } = await import('./ops.js');
    try {
      // 1. parameters no longer touched: restore and forget
      for (const [key, s] of [...this.saved]) {
        if (wanted.has(key)) continue;
        await this.restore(s);
        s.original.dispose();
        this.saved.delete(key);
      }
      // 2. merge the new set from the saved originals
      for (const target of ['unet', 'text_encoder'] as const) {
        const mod = this.modules[target];
        if (!mod || plan[target].size === 0) continue;
        const dev = mod.device as Device;
        const ops = await loadOps(dev);
        for (const [param, terms] of plan[target]) {
          const key = `${target}:${param}`;
          let s = this.saved.get(key);
          if (!s) {
            const cur = await mod.getParameter(param);
            let original = cur;
            if (cur.device !== 'cpu') {
              original = await cur.to('cpu');
              cur.dispose();
            }
            s = { target, param, original };
            this.saved.set(key, s);
          }
          const tmp: Tensor[] = [];
          try {
            const w = s.original.device === dev || dev === 'cpu' ? s.original : await s.original.to(dev);
            if (w !== s.original) tmp.push(w);
            const ups: Tensor[] = [];
            const downs: Tensor[] = [];
            for (const t of terms) {
              const r = t.down.shape[0]!;
              const out = t.up.shape[0]!;
              const upC = T.fromFloat32Array(t.up.data, [out, r]);
              const downC = T.fromFloat32Array(t.down.data, [r, t.down.data.length / r]);
              tmp.push(upC, downC);
              const upD = dev === 'cpu' ? upC : await upC.to(dev);
              const downD = dev === 'cpu' ? downC : await downC.to(dev);
              if (upD !== upC) tmp.push(upD);
              if (downD !== downC) tmp.push(downD);
              ups.push(upD);
              downs.push(downD);
            }
            const merged = await ops.call('lora_merge', w, ups, downs, terms.map((t) => t.scale));
            if (!(merged instanceof T)) throw new DiffusionFeaturesError('E_INVALID_FILE', 'ops.lora_merge did not return a tensor');
            tmp.push(merged);
            await mod.setParameter(param, merged);
          } finally {
            for (const t of tmp) if (!t.disposed) t.dispose();
          }
        }
      }
    } catch (err) {
      // leave the model at its base weights rather than half-merged
      for (const s of this.saved.values()) {
        try {
          await this.restore(s);
        } catch {
          // keep the original error
        }
        s.original.dispose();
      }
      this.saved.clear();
      this.activeSet = [];
      this.textApplied = false;
      this.signature = '';
      throw err;
    }
    this.activeSet = loaded.map((l) => ({ file: l.lora.path, scale: l.scale }));
    this.textApplied = useText && plan.text_encoder.size > 0;
    this.skipped = plan.skipped;
    this.signature = signature;
  }

  private async restore(s: Saved): Promise<void> {
    const mod = this.modules[s.target]!;
    const dev = mod.device;
    if (dev === 'cpu' || s.original.device === dev) {
      await mod.setParameter(s.param, s.original);
      return;
    }
    const d = await s.original.to(dev as Device);
    try {
      await mod.setParameter(s.param, d);
    } finally {
      if (d !== s.original) d.dispose();
    }
  }

  /** Forgets the saved originals (call after disposing the modules). */
  dispose(): void {
    for (const s of this.saved.values()) if (!s.original.disposed) s.original.dispose();
    this.saved.clear();
  }
}
