/**
 * Strict command-line value parsers shared by the commands: integers are plain decimal (no `''`,
 * `0x10`, `1e3`, `1.0`, whitespace tricks), numbers are finite decimal literals, both within a stated
 * range; errors name the flag. Also the API-option → flag mapping used to phrase library errors in
 * CLI terms.
 *
 * @module
 */
import { InvalidArgumentError as CliArgError } from 'commander';

const INT = /^[+-]?\d{1,16}$/;
const FLOAT = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/** A decimal integer in [min, max] (commander argument parser). */
export function intArg(flag: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!INT.test(v) || !Number.isSafeInteger(n)) throw new CliArgError(`${flag} must be a decimal integer, got '${v}'`);
    if (n < min || n > max) throw new CliArgError(`${flag} must be in [${min}, ${max}], got ${n}`);
    return n;
  };
}

/** A finite decimal number in [min, max] (commander argument parser). */
export function floatArg(flag: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!FLOAT.test(v) || !Number.isFinite(n)) throw new CliArgError(`${flag} must be a decimal number, got '${v}'`);
    if (n < min || n > max) throw new CliArgError(`${flag} must be in [${min}, ${max}], got ${n}`);
    return n;
  };
}

/** Largest accepted LoRA scale magnitude (`--lora FILE:SCALE`, `--lora-slot`). */
export const MAX_LORA_SCALE = 1000;

/** A LoRA file with its scale. */
export interface LoraArg {
  file: string;
  scale: number;
}

/** `FILE[:SCALE]` → {file, scale}; SCALE a finite decimal in ±{@link MAX_LORA_SCALE} (flag named in errors). */
export function parseLoraSpec(v: string, flag = '--lora'): LoraArg {
  const m = /^(.*?)(?::([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))?$/s.exec(v);
  const file = m?.[1] ?? v;
  const scale = m?.[2] !== undefined ? Number(m[2]) : 1;
  if (!file) throw new CliArgError(`${flag} expects FILE[:SCALE], got '${v}'`);
  if (!Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE) throw new CliArgError(`${flag}: scale must be a number in [-${MAX_LORA_SCALE}, ${MAX_LORA_SCALE}], got '${m?.[2]}'`);
  return { file, scale };
}

/** `--lora FILE[:SCALE]` (repeatable). */
export function parseLoraArg(v: string, prev: LoraArg[] = []): LoraArg[] {
  return [...prev, parseLoraSpec(v)];
}

/** `--lora-slot SLOT=FILE[:SCALE]` (repeatable); slot names are plain identifiers. */
export function loraSlotArg(v: string, prev: Record<string, LoraArg> = {}): Record<string, LoraArg> {
  const eq = v.indexOf('=');
  if (eq <= 0) throw new CliArgError(`--lora-slot expects SLOT=FILE[:SCALE], got '${v}'`);
  const slot = v.slice(0, eq);
  if (!/^[A-Za-z][A-Za-z0-9_-]{0,63}$/.test(slot)) throw new CliArgError(`--lora-slot: slot name must be letters, digits, '_' or '-', got '${slot}'`);
  const out: Record<string, LoraArg> = Object.assign(Object.create(null) as Record<string, LoraArg>, prev);
  out[slot] = parseLoraSpec(v.slice(eq + 1), '--lora-slot');
  return out;
}

/** API option names of {@link ExtractOptions} and the image loader → the CLI flag that sets them. */
const FLAG_OF: Record<string, string> = {
  controlScale: '--control-scale',
  featureResize: '--feature-resize',
  batchSize: '--batch-size',
  denoiseFrom: '--denoise-from',
  timestepMode: '--timestep-mode',
  maxPixels: '--max-pixels',
  maxBytes: '--max-image-bytes',
  seedOffset: '--seed',
  seed: '--seed',
  size: '--size',
  t: '--t',
  layers: '--layers',
  prompt: '--prompt',
  posterior: '--posterior',
  scheduler: '--scheduler',
  control: '--control',
  noise: '--noise',
  vaeNoise: '--noise (vae_noise)',
};

/** Rewrites a library message so that it names CLI flags instead of API option names. */
export function cliMessage(message: string): string {
  // camelCase option names are unambiguous anywhere; short ones (size, t, …) only where a message
  // starts with them ("size must be…", "layers: …"), so ordinary words are left alone
  return message
    .replace(/(^|[\s(])(controlScale|featureResize|batchSize|denoiseFrom|timestepMode|maxPixels|maxBytes|seedOffset|vaeNoise)\b/g, (_, pre: string, name: string) => `${pre}${FLAG_OF[name]}`)
    .replace(/^(size|t|seed|layers|prompt|posterior|scheduler|control|noise)(?= must|:)/, (name: string) => FLAG_OF[name]!);
}
