import test from 'ava';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  LAYER_IDS, PRESETS, ATTENTION_CATEGORIES, attentionMapIds, generateLayerIds, isIgnoredLayerId, isLayerId, isMapId,
  parseLayerConfig, resolveLayerSpec, sortForwardOrder, suggestLayerId,
} from '../lib/layers.js';
import { DiffusionFeaturesError } from '../lib/errors.js';

const golden = JSON.parse(readFileSync(new URL('./fixtures/micro/goldens/layer_ids.json', import.meta.url), 'utf8')) as {
  count: number;
  presets: Record<string, string[]>;
  layers: { id: string }[];
};

test('canonical id list matches the reference (197 ids, forward order)', (t) => {
  t.is(LAYER_IDS.length, 197);
  t.is(golden.count, 197);
  t.deepEqual([...LAYER_IDS], golden.layers.map((l) => l.id));
  t.deepEqual(generateLayerIds(), [...LAYER_IDS]);
  t.is(new Set(LAYER_IDS).size, 197);
});

test('presets match the reference and docs/method.md §Layers', (t) => {
  t.deepEqual([...PRESETS.legacy], golden.presets.legacy);
  t.deepEqual([...PRESETS.practical], golden.presets.practical);
  t.deepEqual([...PRESETS.amalgamation], [
    'up-level1-repeat1-vit-block0-cross-q', 'up-level2-repeat1-vit-block0-cross-q', 'up-level2-upsampler-out',
    'up-level3-repeat0-vit-block0-self-k',
  ]);
  t.deepEqual([...PRESETS.amalgamation_small], PRESETS.amalgamation.slice(1));
  t.is(PRESETS.full.length, 197);
  t.is(PRESETS.analysis.length, 197 - 32);
  t.true(PRESETS.analysis.every((id) => !isMapId(id)));
  for (const [name, ids] of Object.entries(PRESETS)) t.deepEqual(sortForwardOrder(ids), [...ids], name);
});

test('resolveLayerSpec: presets, ids, comma lists', async (t) => {
  t.deepEqual((await resolveLayerSpec('legacy')).ids, golden.presets.legacy);
  t.deepEqual((await resolveLayerSpec('config_15_practical.json')).ids, golden.presets.practical);
  const r = await resolveLayerSpec(' up-level3-repeat2-vit-out , unet-in,unet-in,');
  t.deepEqual(r.ids, ['unet-in', 'up-level3-repeat2-vit-out']);
  t.false(r.attention);
  const a = await resolveLayerSpec('legacy,attn');
  t.deepEqual(a.ids, golden.presets.legacy);
  t.true(a.attention);
  t.deepEqual((await resolveLayerSpec([])).ids, []);
  t.deepEqual((await resolveLayerSpec(['unet-out', 'unet-in'])).ids, ['unet-in', 'unet-out']);
  // cross-k/v are legal and ignored
  t.deepEqual((await resolveLayerSpec('mid-vit-block0-cross-k,mid-vit-out')).ids, ['mid-vit-out']);
});

test('unknown ids: E_UNKNOWN_LAYER naming them, with a suggestion', async (t) => {
  const e = await t.throwsAsync(resolveLayerSpec('up-level1-upsampler-out,up-level1-upsamper-out,bogus'));
  t.true(e instanceof DiffusionFeaturesError);
  t.is((e as DiffusionFeaturesError).code, 'E_UNKNOWN_LAYER');
  t.regex(e!.message, /up-level1-upsamper-out/);
  t.regex(e!.message, /did you mean 'up-level1-upsampler-out'/);
  t.regex(e!.message, /bogus/);
  t.deepEqual((e as unknown as { ids: string[] }).ids, ['up-level1-upsamper-out', 'bogus']);
  t.is(suggestLayerId('legcy'), 'legacy');
  await t.throwsAsync(resolveLayerSpec(''), { message: /empty/ });
  await t.throwsAsync(resolveLayerSpec(['up-level4-upsampler-out']), { message: /up-level4-upsampler-out/ });
});

test('layer-config JSON files as generic-diffusion-feature writes them', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'layers-'));
  try {
    const analysisLike: Record<string, boolean> = {};
    for (const id of LAYER_IDS) {
      if (isMapId(id)) continue;
      analysisLike[id] = true;
      if (id.endsWith('-cross-q')) {
        analysisLike[id.replace(/-q$/, '-k')] = false;
        analysisLike[id.replace(/-q$/, '-v')] = false;
      }
    }
    const f1 = join(dir, 'analysis.json');
    await writeFile(f1, JSON.stringify(analysisLike, null, 4));
    const r1 = await resolveLayerSpec(f1);
    t.deepEqual(r1.ids, [...PRESETS.analysis]);
    t.is(r1.source, `file:${f1}`);

    // values false are dropped; the JSON key order does not matter (dict order = forward order)
    const f2 = join(dir, 'legacy.json');
    await writeFile(f2, JSON.stringify({
      'up-level3-repeat2-vit-out': true, 'up-level2-upsampler-out': true, 'up-level1-upsampler-out': true,
      'up-level0-upsampler-out': true, 'mid-vit-out': false, 'down-level0-repeat0-vit-block0-cross-v': true,
    }));
    t.deepEqual((await resolveLayerSpec(f2)).ids, golden.presets.legacy);

    const f3 = join(dir, 'config_attn.json');
    await writeFile(f3, '{"attn": true}');
    const r3 = await resolveLayerSpec(f3);
    t.deepEqual(r3.ids, []);
    t.true(r3.attention);

    const f4 = join(dir, 'bad.json');
    await writeFile(f4, '{"up-level1-upsampler-out": true, "up-level9-upsampler-out": true}');
    const e4 = await t.throwsAsync(resolveLayerSpec(f4));
    t.is((e4 as DiffusionFeaturesError).code, 'E_UNKNOWN_LAYER');
    t.regex(e4!.message, /up-level9-upsampler-out/);
    t.regex(e4!.message, /bad\.json/);

    const f5 = join(dir, 'broken.json');
    await writeFile(f5, '{"unet-in": tru');
    await t.throwsAsync(resolveLayerSpec(f5), { message: /invalid JSON/ });
    await t.throwsAsync(resolveLayerSpec(join(dir, 'missing.json')), { message: /not found/ });
    const f6 = join(dir, 'values.json');
    await writeFile(f6, '{"unet-in": "yes"}');
    await t.throwsAsync(resolveLayerSpec(f6), { message: /true or false/ });
    t.throws(() => parseLayerConfig([]), { message: /JSON object/ });
    t.is(parseLayerConfig({}).ids.length, 197); // the reference's "accept all" mode
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('attention map ids per category', (t) => {
  t.deepEqual(ATTENTION_CATEGORIES.length, 6);
  const up = attentionMapIds('up_cross');
  t.is(up.length, 9);
  t.true(up.every((id) => id.startsWith('up-level') && id.endsWith('-cross-map')));
  t.deepEqual(up.slice(0, 3), ['up-level1-repeat0-vit-block0-cross-map', 'up-level1-repeat1-vit-block0-cross-map', 'up-level1-repeat2-vit-block0-cross-map']);
  t.deepEqual(attentionMapIds('mid_self'), ['mid-vit-block0-self-map']);
  t.is(attentionMapIds('down_cross').length, 6);
  t.throws(() => attentionMapIds('sideways' as never), { message: /unknown attention category/ });
});

test('id predicates and ordering helpers', (t) => {
  t.true(isLayerId('unet-out'));
  t.true(isLayerId('vae-out'));
  t.false(isLayerId('mid-vit-block0-cross-k'));
  t.true(isIgnoredLayerId('mid-vit-block0-cross-k'));
  t.true(isIgnoredLayerId('up-level3-repeat2-vit-block0-cross-v'));
  t.false(isIgnoredLayerId('up-level0-repeat0-vit-block0-cross-v')); // up-level0 has no attention
  t.deepEqual(sortForwardOrder(['vae-out', 'unet-out', 'x', 'unet-in']), ['unet-in', 'unet-out', 'vae-out', 'x']);
});
