/**
 * The options a service client may send (query string, or the `options` JSON field of a multipart
 * upload), as a JSON schema the service validates against, and their mapping to pipeline options.
 *
 * Nothing here can name a file: `layers` takes only preset names, layer ids and `attn` (letters,
 * digits, `_` and `-`, comma-separated; no `.`, `/` or `\`), and it reaches the pipeline as an id
 * array, which is never read as a layer-config path. LoRA and noise files are not service options.
 *
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
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
