/**
 * Layer ids, presets and layer configurations (docs/method.md §Layers), in generic-diffusion-feature's naming,
 * so existing layer-config JSON files work unchanged.
 *
 * An id names one tap of the UNet forward (`up-level1-repeat1-vit-block0-cross-q`, `unet-out`, …).
 * The canonical SD1.5 list ({@link LAYER_IDS}, 197 ids in forward order) is generated from the
 * grammar of docs/method.md §Layers; a layer spec is a preset name, a layer-config JSON file (`{"id": true, …}`), a
 * comma-separated id list or an array of ids. Pure TypeScript: nothing here loads the native addon.
 *
 * @module
 */
import { readFile, stat } from 'node:fs/promises';
import { UnknownLayerError } from './errors.js';

/** Attention-map categories of the aggregated attention feature (docs/method.md §Attention). GATE uses `up_cross`. */
export type AttentionCategory = 'down_cross' | 'mid_cross' | 'up_cross' | 'down_self' | 'mid_self' | 'up_self';

/** Every attention category, in the reference's order. */
export const ATTENTION_CATEGORIES: readonly AttentionCategory[] = Object.freeze([
  'down_cross', 'mid_cross', 'up_cross', 'down_self', 'mid_self', 'up_self',
]);

/** Names of the shipped presets (`config_15_<name>.json` of generic-diffusion-feature). */
export type PresetName = 'legacy' | 'practical' | 'amalgamation' | 'amalgamation_small' | 'full' | 'analysis';

/** A resolved layer specification. */
export interface LayerSpec {
  /** Requested tap ids, deduplicated, in forward order (cross-k/v dropped). May be empty. */
  ids: string[];
  /**
   * Whether the spec asks for the aggregated attention feature: a config key `attn: true`
   * (GATE's `config_attn.json`) or an `attn` entry in an id list.
   */
  attention: boolean;
  /** Where the spec came from: `preset:legacy`, `file:/path/config.json`, `ids`. */
  source: string;
}

/** The structure the id grammar is generated from (SD1.5 by default). */
export interface UNetLayout {
  /** Per down level: number of resnet repeats and whether it has attention / a downsampler. */
  down: readonly { repeats: number; attention: boolean; downsampler: boolean }[];
  /** Per up level: number of repeats and whether it has attention / an upsampler. */
  up: readonly { repeats: number; attention: boolean; upsampler: boolean }[];
  /** Whether the mid block has a transformer. */
  midAttention: boolean;
}

/** SD1.5's UNet layout (docs/method.md §Layers). */
export const SD15_LAYOUT: UNetLayout = Object.freeze({
  down: [
    { repeats: 2, attention: true, downsampler: true },
    { repeats: 2, attention: true, downsampler: true },
    { repeats: 2, attention: true, downsampler: true },
    { repeats: 2, attention: false, downsampler: false },
  ],
  up: [
    { repeats: 3, attention: false, upsampler: true },
    { repeats: 3, attention: true, upsampler: true },
    { repeats: 3, attention: true, upsampler: true },
    { repeats: 3, attention: true, upsampler: false },
  ],
  midAttention: true,
});

const RES_SUFFIXES = ['res-increment', 'res-out'] as const;
/** Suffixes of one transformer (vit) in forward order (cross-k/v are never recorded). */
const VIT_SUFFIXES = [
  'vit-block0-self-q', 'vit-block0-self-k', 'vit-block0-self-v', 'vit-block0-self-map',
  'vit-block0-cross-q', 'vit-block0-cross-map', 'vit-block0-ffn-inner', 'vit-block0-out', 'vit-out',
] as const;

/**
 * Every recordable id of a UNet with `layout`, in forward order (= the reference's dict order):
 * `unet-in`, `unet-after-conv-in`, down blocks (res, vit per repeat, then the downsampler), mid
 * (res 0, vit, res 1), up blocks (res, vit per repeat, then the upsampler), `unet-out`.
 */
export function generateLayerIds(layout: UNetLayout = SD15_LAYOUT): string[] {
  const ids = ['unet-in', 'unet-after-conv-in'];
  const block = (prefix: string, attention: boolean): void => {
    for (const s of RES_SUFFIXES) ids.push(`${prefix}-${s}`);
    if (attention) for (const s of VIT_SUFFIXES) ids.push(`${prefix}-${s}`);
  };
  layout.down.forEach((lv, L) => {
    for (let R = 0; R < lv.repeats; R++) block(`down-level${L}-repeat${R}`, lv.attention);
    if (lv.downsampler) ids.push(`down-level${L}-downsampler-out`);
  });
  for (const s of RES_SUFFIXES) ids.push(`mid-repeat0-${s}`);
  if (layout.midAttention) for (const s of VIT_SUFFIXES) ids.push(`mid-${s}`);
  for (const s of RES_SUFFIXES) ids.push(`mid-repeat1-${s}`);
  layout.up.forEach((lv, L) => {
    for (let R = 0; R < lv.repeats; R++) block(`up-level${L}-repeat${R}`, lv.attention);
    if (lv.upsampler) ids.push(`up-level${L}-upsampler-out`);
  });
  ids.push('unet-out');
  return ids;
}

/** The 197 SD1.5 tap ids (docs/method.md §Layers, `config_15_full.json`) in forward order. */
export const LAYER_IDS: readonly string[] = Object.freeze(generateLayerIds());

/** `vae-out`: legal in the reference (decoded one-step prediction), recorded after every UNet tap. */
export const VAE_OUT = 'vae-out';

const FORWARD_INDEX = new Map<string, number>(LAYER_IDS.map((id, i) => [id, i]));
FORWARD_INDEX.set(VAE_OUT, LAYER_IDS.length);

/** Is `id` a cross-attention key/value id (legal as a config key, always discarded by the reference)? */
export function isIgnoredLayerId(id: string): boolean {
  return /-vit-block0-cross-[kv]$/.test(id) && FORWARD_INDEX.has(id.replace(/-cross-[kv]$/, '-cross-q'));
}

/** Is `id` a recordable tap of the SD1.5 grammar (one of {@link LAYER_IDS}, or `vae-out`)? */
export function isLayerId(id: string): boolean {
  return FORWARD_INDEX.has(id);
}

/** Is `id` an attention-probability map (`…-self-map` / `…-cross-map`, heads×n_q×n_k, not spatial)? */
export function isMapId(id: string): boolean {
  return /-(self|cross)-map$/.test(id);
}

const LEGACY = ['up-level0-upsampler-out', 'up-level1-upsampler-out', 'up-level2-upsampler-out', 'up-level3-repeat2-vit-out'];
const PRACTICAL = [
  'up-level1-repeat1-vit-block0-cross-q', 'up-level1-repeat2-res-out', 'up-level2-repeat1-vit-block0-cross-q',
  'up-level3-repeat0-vit-block0-self-k',
];
const AMALGAMATION = [
  'up-level1-repeat1-vit-block0-cross-q', 'up-level2-repeat1-vit-block0-cross-q', 'up-level2-upsampler-out',
  'up-level3-repeat0-vit-block0-self-k',
];

/** The shipped presets (docs/method.md §Layers), each in forward order. */
export const PRESETS: Readonly<Record<PresetName, readonly string[]>> = Object.freeze({
  legacy: Object.freeze(LEGACY),
  practical: Object.freeze(PRACTICAL),
  amalgamation: Object.freeze(AMALGAMATION),
  amalgamation_small: Object.freeze(AMALGAMATION.slice(1)),
  full: LAYER_IDS,
  analysis: Object.freeze(LAYER_IDS.filter((id) => !isMapId(id))),
});

/** Is `name` a preset name? */
export function isPresetName(name: string): name is PresetName {
  return Object.prototype.hasOwnProperty.call(PRESETS, name);
}

/** `ids` deduplicated and sorted into forward order; unknown ids keep their relative order at the end. */
export function sortForwardOrder(ids: Iterable<string>): string[] {
  const uniq = [...new Set(ids)];
  const known = uniq.filter((id) => FORWARD_INDEX.has(id)).sort((a, b) => FORWARD_INDEX.get(a)! - FORWARD_INDEX.get(b)!);
  return [...known, ...uniq.filter((id) => !FORWARD_INDEX.has(id))];
}

/**
 * The per-layer map ids feeding an attention category, in forward order (before the reference's
 * resolution filter `(size/32)² ≤ n_q ≤ (size/16)²`, which the pipeline applies).
 */
export function attentionMapIds(category: AttentionCategory): string[] {
  const m = /^(down|mid|up)_(cross|self)$/.exec(category);
  if (!m) throw new UnknownLayerError(`unknown attention category '${String(category)}' (known: ${ATTENTION_CATEGORIES.join(', ')})`);
  const [, stage, kind] = m;
  return LAYER_IDS.filter((id) => id.startsWith(`${stage}-`) && id.endsWith(`-${kind}-map`));
}

/** Levenshtein distance (small strings). */
function editDistance(a: string, b: string): number {
  const prev = new Array<number>(b.length + 1);
  for (let j = 0; j <= b.length; j++) prev[j] = j;
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = prev[j]!;
      prev[j] = Math.min(prev[j]! + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = tmp;
    }
  }
  return prev[b.length]!;
}

/** The closest legal id (or preset name) to `id`, when one is reasonably close. */
export function suggestLayerId(id: string): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const cand of [...LAYER_IDS, VAE_OUT, ...Object.keys(PRESETS)]) {
    const d = editDistance(id.toLowerCase(), cand);
    if (d < bestD) {
      bestD = d;
      best = cand;
    }
  }
  return best !== undefined && bestD <= Math.max(3, Math.floor(id.length / 4)) ? best : undefined;
}

function unknownError(unknown: string[], where: string): UnknownLayerError {
  // bounded: at most 5 ids are named, each only if it looks like an id (≤ 64 plain characters)
  const shown = unknown.slice(0, 5).filter((id) => /^[\w.:-]{1,64}$/.test(id));
  const more = unknown.length - shown.length;
  const parts = shown.map((id) => {
    const s = suggestLayerId(id);
    return s ? `'${id}' (did you mean '${s}'?)` : `'${id}'`;
  });
  if (more > 0) parts.push(`${more} ${shown.length ? 'more' : 'unprintable or long'} id${more > 1 ? 's' : ''}`);
  return new UnknownLayerError(
    `unknown layer id${unknown.length > 1 ? 's' : ''} ${parts.join(', ')}${where}; legal ids: the ${LAYER_IDS.length} SD1.5 ids (see \`diffusion-features layers\`), presets: ${Object.keys(PRESETS).join(', ')}`,
    unknown.slice(0, 100),
  );
}

/** Validates a list of ids (and `attn`), dropping cross-k/v; throws on unknown ids. */
function checkIds(entries: readonly string[], where: string, source: string): LayerSpec {
  const ids: string[] = [];
  const unknown: string[] = [];
  let attention = false;
  for (const raw of entries) {
    if (typeof raw !== 'string') throw new UnknownLayerError(`layer ids must be strings, got ${JSON.stringify(raw)}${where}`);
    const id = raw.trim();
    if (!id) continue;
    if (id === 'attn') attention = true;
    else if (isPresetName(id)) ids.push(...PRESETS[id]);
    else if (isIgnoredLayerId(id)) continue;
    else if (isLayerId(id)) ids.push(id);
    else unknown.push(id);
  }
  if (unknown.length) throw unknownError(unknown, where);
  return { ids: sortForwardOrder(ids), attention, source };
}

/**
 * Parses a layer configuration object exactly as generic-diffusion-feature reads it: keys with value
 * `true` are recorded, `false` ones dropped; `cross-k`/`cross-v` keys are legal and ignored; the key
 * `attn` asks for the aggregated attention feature (`{"attn": true}` = attention only). An empty
 * object is the reference's "accept all" mode (every id). Unknown keys are an error naming them.
 */
export function parseLayerConfig(config: unknown, source = '<layer config>'): LayerSpec {
  const where = ` in ${source}`;
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new UnknownLayerError(`${source}: a layer config must be a JSON object of id → true/false`);
  }
  const entries = Object.entries(config as Record<string, unknown>);
  if (entries.length === 0) return { ids: [...LAYER_IDS], attention: false, source };
  const bad = entries.filter(([, v]) => typeof v !== 'boolean');
  if (bad.length) {
    // name the keys (short), never echo the values: a config file's content is not repeated back
    throw new UnknownLayerError(`${source}: layer config values must be true or false (${bad.length} are not${isLayerId(bad[0]![0]) ? `, e.g. ${bad[0]![0]}` : ''})`);
  }
  const unknown = entries.map(([k]) => k).filter((k) => k !== 'attn' && !isLayerId(k) && !isIgnoredLayerId(k));
  if (unknown.length) throw unknownError(unknown, where);
  return checkIds(entries.filter(([, v]) => v === true).map(([k]) => k), where, source);
}

/** Largest accepted layer-config file (the full 197-id config is ~10 KB). */
export const MAX_LAYER_CONFIG_BYTES = 1024 * 1024;

/** Options of {@link resolveLayerSpec}. */
export interface ResolveLayerOptions {
  /**
   * Whether a spec may name a layer-config JSON file (default true). Set it to false for specs that
   * come from a client (a service): then a spec is only ever a preset, ids, or an object.
   */
  allowFiles?: boolean;
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/**
 * Resolves a layer spec:
 * - a preset name (`legacy`, `practical`, `amalgamation`, `amalgamation_small`, `full`, `analysis`;
 *   `config_15_legacy.json`-style names of the shipped files are accepted too);
 * - a path to a layer-config JSON file (see {@link parseLayerConfig});
 * - a comma-separated list of ids and preset names (`attn` adds the aggregated attention feature),
 *   e.g. `legacy,attn`;
 * - an array of ids, or a config object.
 * Ids come back deduplicated, in forward order.
 * @throws UnknownLayerError (code `E_UNKNOWN_LAYER`) naming unknown ids, with a suggestion; for a
 * missing or malformed JSON file.
 */
export async function resolveLayerSpec(spec: string | readonly string[] | Record<string, boolean>, opts: ResolveLayerOptions = {}): Promise<LayerSpec> {
  const allowFiles = opts.allowFiles ?? true;
  if (Array.isArray(spec)) return checkIds(spec as readonly string[], '', 'ids');
  if (typeof spec === 'object' && spec !== null) return parseLayerConfig(spec, '<layer config object>');
  if (typeof spec !== 'string') throw new UnknownLayerError(`layers must be a preset name, a JSON file or ids, got ${typeof spec}`);
  const s = spec.trim();
  if (!s) throw new UnknownLayerError('layers: empty layer spec (give a preset name, a layer-config JSON file or ids)');
  if (isPresetName(s)) return { ids: [...PRESETS[s]], attention: false, source: `preset:${s}` };
  const shipped = /^config_15_([a-z_]+)\.json$/.exec(s);
  if (shipped && isPresetName(shipped[1]!) && (!allowFiles || !(await isFile(s)))) {
    return { ids: [...PRESETS[shipped[1]!]], attention: false, source: `preset:${shipped[1]}` };
  }
  const looksLikeFile = s.toLowerCase().endsWith('.json') || /[/\\]/.test(s);
  if (!allowFiles) {
    if (looksLikeFile) throw new UnknownLayerError('layers: a layer-config file cannot be named here; give a preset, ids, or a config object');
    return checkIds(s.split(','), '', 'ids');
  }
  if (looksLikeFile || (await isFile(s))) {
    let text: string;
    try {
      const st = await stat(s);
      if (!st.isFile()) throw Object.assign(new Error('not a regular file'), { code: 'ENOTREG' });
      if (st.size > MAX_LAYER_CONFIG_BYTES) throw Object.assign(new Error('too large'), { code: 'EFBIG' });
      text = await readFile(s, 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const why = code === 'ENOENT' ? 'file not found' : code === 'ENOTREG' ? 'not a regular file' : code === 'EFBIG' ? `larger than ${MAX_LAYER_CONFIG_BYTES} bytes` : `cannot read (${code ?? 'error'})`;
      throw new UnknownLayerError(`layer config ${s}: ${why}`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      // V8's message quotes the text; keep only the position
      const at = /position \d+/.exec((e as Error).message)?.[0];
      throw new UnknownLayerError(`layer config ${s}: invalid JSON${at ? ` (at ${at})` : ''}`);
    }
    return { ...parseLayerConfig(json, s), source: `file:${s}` };
  }
  return checkIds(s.split(','), '', 'ids');
}
