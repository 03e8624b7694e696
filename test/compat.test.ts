/**
 * lib/compat.ts: a weights folder that the loaded libtorch cannot run is E_INCOMPATIBLE_MODEL, before any
 * module is loaded; everything that can work passes.
 */
import test from 'ava';
import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkModelCompat, parseTorchVersion } from '../lib/compat.js';
import { DiffusionFeaturesError, IncompatibleModelError } from '../lib/errors.js';

const model = (torch_version: unknown, format_version: unknown = 1) => ({ format_version, torch_version });

test('parseTorchVersion reads major.minor of torch and libtorch version strings', (t) => {
  t.deepEqual(parseTorchVersion('1.13.0a0'), [1, 13]);
  t.deepEqual(parseTorchVersion('2.11.0+cu130'), [2, 11]);
  t.deepEqual(parseTorchVersion(' 2.1'), [2, 1]);
  t.is(parseTorchVersion('unknown'), null);
  t.is(parseTorchVersion(undefined), null);
});

test('an export made with torch 2.x on libtorch 1.13 is E_INCOMPATIBLE_MODEL saying what to do', (t) => {
  const err = t.throws(() => checkModelCompat(model('2.11.0+cu130'), '1.13.0', '/w/sd15'), { instanceOf: IncompatibleModelError });
  t.true(err instanceof DiffusionFeaturesError);
  t.is((err as DiffusionFeaturesError).code, 'E_INCOMPATIBLE_MODEL');
  t.regex(err!.message, /\/w\/sd15 was exported with torch 2\.11\.0\+cu130, which libtorch 1\.13\.0 cannot run/);
  t.regex(err!.message, /re-export it with torch 1\.x/);
  t.regex(err!.message, /diffusion-features export/);
  t.regex(err!.message, /libtorch >= 2\.11/);
});

test('older or same-major exports load: backward compatible TorchScript', (t) => {
  t.notThrows(() => checkModelCompat(model('1.13.0a0'), '1.13.0'));
  t.notThrows(() => checkModelCompat(model('1.13.0a0'), '2.11.0+cu130'));
  t.notThrows(() => checkModelCompat(model('2.1.0'), '2.11.0'));
  t.notThrows(() => checkModelCompat(model('2.11.0'), '2.5.1')); // same major: allowed (the exporter uses 2.0 operators)
  t.notThrows(() => checkModelCompat(model(undefined), '1.13.0')); // hand-made folder without torch_version
  t.notThrows(() => checkModelCompat(model('2.11.0'), 'unknown')); // libtorch version unknown: no claim
});

test('an unknown model.json format or a too-old libtorch is E_INCOMPATIBLE_MODEL', (t) => {
  t.throws(() => checkModelCompat(model('1.13.0', 2), '1.13.0'), { instanceOf: IncompatibleModelError, message: /format_version 2/ });
  t.throws(() => checkModelCompat({ torch_version: '1.13.0' }, '1.13.0'), { instanceOf: IncompatibleModelError, message: /format_version undefined/ });
  t.throws(() => checkModelCompat(model('1.12.0'), '1.12.1'), { instanceOf: IncompatibleModelError, message: /older than 1\.13/ });
});

test('loadPipeline refuses a weights folder exported by a newer torch major than the loaded libtorch, before loading a module', async (t) => {
  const { libtorchVersion } = await import('../lib/native.js');
  const { loadPipeline } = await import('../lib/pipeline/index.js');
  const major = parseTorchVersion(libtorchVersion())![0];
  const micro = join(import.meta.dirname, '..', 'models', 'micro');
  const dir = mkdtempSync(join(tmpdir(), 'df-compat-'));
  try {
    for (const f of readdirSync(micro)) if (f !== 'model.json') symlinkSync(join(micro, f), join(dir, f));
    const json = JSON.parse(readFileSync(join(micro, 'model.json'), 'utf8'));
    writeFileSync(join(dir, 'model.json'), JSON.stringify({ ...json, torch_version: `${major + 1}.0.0+cu130` }));
    const err = await t.throwsAsync(loadPipeline(dir, { device: 'cpu' }), { instanceOf: IncompatibleModelError });
    t.is((err as DiffusionFeaturesError).code, 'E_INCOMPATIBLE_MODEL');
    t.regex(err!.message, new RegExp(`exported with torch ${major + 1}\\.0\\.0\\+cu130, which libtorch .* cannot run`));
    // the same folder with the torch version it really has loads
    writeFileSync(join(dir, 'model.json'), JSON.stringify(json));
    const pipe = await loadPipeline(dir, { device: 'cpu' });
    pipe.dispose();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
