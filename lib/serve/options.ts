/**
 * The options a service client may send (query string, or the `options` JSON field of a multipart
 * upload), as a JSON schema the service validates against, and their mapping to pipeline options.
 *
 * Nothing here can name a file: `layers` takes only preset names, layer ids and `attn` (letters,
 * digits, `_` and `-`, comma-separated; no `.`, `/` or `\`), and it reaches the pipeline as an id
 * array, which is never read as a layer-config path. LoRA and noise files are not service options.
 *
 * Numbers are strict: {@link typedOptions} turns query strings into numbers with the CLI's decimal
 * parsers (lib/cli/args.ts: no `0x40`, `1e3` for integers, `''` or whitespace), within the schema's
 * range; the schema is then checked without type coercion.
 *
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
import { floatArg, intArg } from '../cli/args.js';
import type { ExtractOptions } from '../pipeline/index.js';
import { MAX_PROMPT_CHARS, type ExtractJobOptions } from '../queue/job.js';

/** The validated options of one request. */
export interface ServiceOptions {
  layers?: string;
  prompt?: string;
  t?: number;
  seed?: number;
  size?: number;
  posterior?: 'sample' | 'mean';
  timestepMode?: 'reference' | 'exact';
  attention?: boolean;
  control?: 'canny';
  controlScale?: number;
  denoiseFrom?: number;
  scheduler?: 'plms' | 'ddim';
  featureResize?: number;
  aggregate?: boolean;
}

/** `layers`: presets, ids and `attn`, comma-separated; never a path or a file name. */
export const LAYERS_PATTERN = '^[A-Za-z0-9_-]{1,64}(,[A-Za-z0-9_-]{1,64}){0,255}$';

/** The JSON schema of {@link ServiceOptions} (`maxSize` bounds `size`). */
export function optionsSchema(maxSize: number): Record<string, unknown> {
  return {
    type: 'object',
    additionalProperties: false,
    properties: {
      layers: { type: 'string', pattern: LAYERS_PATTERN, maxLength: 8192 },
      prompt: { type: 'string', maxLength: MAX_PROMPT_CHARS },
      t: { type: 'integer', minimum: 0, maximum: 999 },
      seed: { type: 'integer', minimum: 0, maximum: Number.MAX_SAFE_INTEGER },
      size: { type: 'integer', minimum: 64, maximum: maxSize, multipleOf: 64 },
      posterior: { type: 'string', enum: ['sample', 'mean'] },
      timestepMode: { type: 'string', enum: ['reference', 'exact'] },
      attention: { type: 'boolean' },
      control: { type: 'string', enum: ['canny'] },
      controlScale: { type: 'number', minimum: -10, maximum: 10 },
      denoiseFrom: { type: 'integer', minimum: 1, maximum: 999 },
      scheduler: { type: 'string', enum: ['plms', 'ddim'] },
      featureResize: { type: 'integer', minimum: 1, maximum: 64 },
      aggregate: { type: 'boolean' },
    },
  };
}

interface PropSchema {
  type?: string;
  minimum?: number;
  maximum?: number;
}

/**
 * The options of a request as typed values, for the schema of {@link optionsSchema}: a string for an
 * integer or number option must be a plain decimal within the option's range (else
 * `E_INVALID_ARGUMENT` naming the option), `true`/`false` become booleans, an option given twice is
 * refused; everything else is left as it is for the schema to judge. Returns a new object.
 */
export function typedOptions(raw: unknown, schema: Record<string, unknown>): unknown {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return raw;
  const props = (schema.properties ?? {}) as Record<string, PropSchema>;
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(raw as Record<string, unknown>)) {
    const prop = Object.hasOwn(props, key) ? props[key] : undefined;
    if (Array.isArray(v)) throw new InvalidArgumentError(`${key}: give it once`);
    if (typeof v !== 'string' || !prop) {
      out[key] = v;
      continue;
    }
    const min = prop.minimum ?? -Number.MAX_SAFE_INTEGER;
    const max = prop.maximum ?? Number.MAX_SAFE_INTEGER;
    try {
      if (prop.type === 'integer') out[key] = intArg(key, min, max)(v);
      else if (prop.type === 'number') out[key] = floatArg(key, min, max)(v);
      else if (prop.type === 'boolean') out[key] = v === 'true' ? true : v === 'false' ? false : v;
      else out[key] = v;
    } catch (e) {
      throw new InvalidArgumentError((e as Error).message, { cause: e });
    }
  }
  return out;
}

/** The layer spec as an id array (presets expand later); a string spec would be tried as a file. */
function layerList(layers: string | undefined): string[] {
  const s = layers ?? 'legacy';
  if (!new RegExp(LAYERS_PATTERN).test(s)) throw new InvalidArgumentError('layers: give preset names, layer ids or attn, comma-separated');
  return s.split(',');
}

/** Pipeline options of a request (defaults as `extract`). */
export function extractOptionsOf(o: ServiceOptions): ExtractOptions {
  return {
    layers: layerList(o.layers),
    prompt: o.prompt ?? '',
    t: o.t,
    seed: o.seed,
    size: o.size,
    posterior: o.posterior,
    timestepMode: o.timestepMode,
    attention: o.attention,
    control: o.control ?? null,
    controlScale: o.controlScale,
    denoiseFrom: o.denoiseFrom,
    scheduler: o.scheduler,
    featureResize: o.featureResize,
    packaged: o.aggregate,
  };
}

/** Job options of a request (`POST /v1/jobs`): the same options, with `aggregate` for `packaged`. */
export function jobOptionsOf(o: ServiceOptions): ExtractJobOptions {
  const { packaged, attention, noise: _n, signal: _s, onProgress: _p, ...rest } = extractOptionsOf(o);
  return { ...rest, attention: attention === true, aggregate: packaged };
}
