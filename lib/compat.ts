/**
 * Can the libtorch loaded in this process run a weights folder? TorchScript files are backward compatible
 * (an export made with torch 1.13 loads in libtorch 2.x) but not forward compatible: an export made with
 * torch 2.x (scaled_dot_product_attention, a newer file format) fails inside libtorch 1.13 with an
 * unreadable error, or worse, part-way through a run. {@link checkModelCompat} turns every such mismatch
 * into an `E_INCOMPATIBLE_MODEL` error that says what to do, before any module is loaded.
 *
 * @module
 */
import { IncompatibleModelError } from './errors.js';

/** `model.json` format versions this release reads (weights/export.py FORMAT_VERSION). */
export const SUPPORTED_MODEL_FORMATS: readonly number[] = [1];

/** Oldest libtorch the addon supports (Debian/Ubuntu's libtorch 1.13). */
export const MIN_LIBTORCH: readonly [number, number] = [1, 13];

/** `'2.11.0+cu130'` → `[2, 11]`; null when the text is not a version. */
export function parseTorchVersion(v: unknown): [number, number] | null {
  const m = typeof v === 'string' ? /^(\d+)\.(\d+)/.exec(v.trim()) : null;
  return m ? [Number(m[1]), Number(m[2])] : null;
}

function cmp(a: readonly [number, number], b: readonly [number, number]): number {
  return a[0] !== b[0] ? a[0] - b[0] : a[1] - b[1];
}

/** The parts of `model.json` this check reads. */
export interface ModelCompatInfo {
  format_version?: unknown;
  torch_version?: unknown;
  [k: string]: unknown;
}

/**
 * Throws `E_INCOMPATIBLE_MODEL` ({@link IncompatibleModelError}) when a weights folder whose `model.json` is
 * `model` cannot run on libtorch `libtorchVersion` (as `libtorchVersion()` reports it):
 * - `format_version` is not one this release reads (a newer or older exporter);
 * - the export was made with a newer torch *major* version than the libtorch (e.g. torch 2.x on 1.13:
 *   scaled_dot_product_attention and the newer TorchScript format do not exist there);
 * - the libtorch is older than {@link MIN_LIBTORCH}.
 * A newer *minor* version of the same major is allowed (the exporter sticks to operators that 2.0 has).
 * An unknown libtorch version or a model.json without `torch_version` (hand-made folders) is not an error.
 *
 * @param model parsed model.json
 * @param libtorchVersion version of the loaded libtorch, e.g. `'1.13.0'`
 * @param where the weights folder (named in the message)
 */
export function checkModelCompat(model: ModelCompatInfo, libtorchVersion: string, where = 'the weights folder'): void {
  const fmt = model.format_version;
  if (typeof fmt !== 'number' || !SUPPORTED_MODEL_FORMATS.includes(fmt)) {
    throw new IncompatibleModelError(
      `${where}: model.json format_version ${String(fmt)} is not one this release reads (${SUPPORTED_MODEL_FORMATS.join(', ')}); ` +
      're-export the weights with this release: `diffusion-features export --from <SD1.5 folder> --out <dir>`',
    );
  }
  const lib = parseTorchVersion(libtorchVersion);
  if (!lib) return;
  if (cmp(lib, MIN_LIBTORCH) < 0) {
    throw new IncompatibleModelError(
      `libtorch ${libtorchVersion} is older than ${MIN_LIBTORCH.join('.')}, the oldest this release supports; ` +
      'install a newer one (Debian/Ubuntu: apt-get install libtorch-dev; or LIBTORCH=/path/to/libtorch, or a Python with torch >= 1.13)',
    );
  }
  const exp = parseTorchVersion(model.torch_version);
  if (!exp) return;
  if (exp[0] > lib[0]) {
    throw new IncompatibleModelError(
      `${where} was exported with torch ${String(model.torch_version)}, which libtorch ${libtorchVersion} cannot run ` +
      `(TorchScript files are not forward compatible: torch ${exp[0]}.x writes operators and a file format ` +
      `libtorch ${lib[0]}.${lib[1]} lacks). Either re-export it with torch ${lib[0]}.x ` +
      '(`PYTHON=/path/to/python-with-that-torch diffusion-features export --from <SD1.5 folder> --out <dir>`; ' +
      `Debian/Ubuntu's python3-torch is ${MIN_LIBTORCH.join('.')}), or run with a libtorch >= ${exp[0]}.${exp[1]} ` +
      '(LIBTORCH=/path/to/libtorch, Torch_DIR, or a Python with that torch first on PATH) and a matching binary ' +
      '(a prebuilt one, or `npm rebuild diffusion-features`).',
    );
  }
}
