/**
 * GATE recipes (docs/method.md §Recipes): every variant computed with shared work must equal the same variant
 * extracted on its own; amalgamation layout; LoRA slots; the CLI.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { loadPipeline, type Pipeline } from '../lib/pipeline/index.js';
import { engineOf } from '../lib/pipeline/facade.js';
import { extractRecipe, getRecipe, RECIPES } from '../lib/recipes.js';
import { SafetensorsFile } from '../lib/io/safetensors.js';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');
const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const IMAGES = ['chelsea', 'rocket'].map((n) => join(ROOT, 'test', 'fixtures', 'images', `${n}.png`));
const LORA = join(ROOT, 'test', 'fixtures', 'lora');
const loras = { a1: join(LORA, 'kohya_locon.safetensors'), b1: { file: join(LORA, 'kohya_lora_attn_only.safetensors'), scale: 0.5 } };

function maxRel(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / (den || 1));
}

let pipe: Pipeline;
test.before(async () => {
  pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
});
test.after.always(() => pipe?.dispose());

test.serial('every GATE recipe is well formed', (t) => {
  for (const r of Object.values(RECIPES)) {
    t.true(r.variants.length >= 3, r.name);
    for (const v of r.variants) for (const s of v.lora ?? []) t.true(r.loraSlots.includes(s), `${r.name}/${v.name}: slot ${s}`);
    t.true(new Set(r.variants.map((v) => v.name)).size === r.variants.length);
  }
  t.throws(() => getRecipe('nope'), { message: /unknown recipe 'nope'/ });
});

test.serial('horse21: shared-work variants equal separate extractions; amalgamated layout', async (t) => {
  t.timeout(5 * 60_000);
  const results = await extractRecipe(pipe, 'horse21', IMAGES, { loras, seed: 5, amalgamate: true, batchSize: 2 });
  try {
    t.is(results.length, 2);
    const recipe = getRecipe('horse21');
    for (const [i, r] of results.entries()) {
      t.deepEqual(Object.keys(r.variants), recipe.variants.map((v) => v.name));
      let channels = 0;
      for (const v of recipe.variants) {
        const f = r.variants[v.name]!;
        t.deepEqual(Object.keys(f.features).at(-1), 'attn');
        channels += f.packaged!.shape[0]!;
        // the same variant on its own, with the LoRA of its slot merged
        await pipe.setLora((v.lora ?? []).map((s) => (typeof loras[s as 'a1'] === 'string' ? { file: loras[s as 'a1'] as string, scale: 1 } : (loras[s as 'b1'] as { file: string; scale: number }))));
        const [alone] = await pipe.extract([IMAGES[i]!], {
          layers: 'legacy', attention: true, prompt: v.prompt, control: v.control ?? null, denoiseFrom: v.denoiseFrom,
          seed: 5 + (v.seed ?? 0), seedOffset: i, packaged: true,
        });
        for (const id of Object.keys(alone!.features)) {
          const e = maxRel(f.features[id]!.toFloat32Array(), alone!.features[id]!.toFloat32Array());
          // batch 2 vs batch 1: the same math, BLAS blocking rounds differently (~1e-6)
          t.true(e < 1e-5, `${r.name} ${v.name} ${id}: ${e}`);
        }
        alone!.dispose();
      }
      await pipe.setLora([]);
      t.deepEqual(r.amalgamated!.shape, [channels, 16, 16]);
      // LoRA variants differ from the plain one (the merge really happened)
      const plain = r.variants.feature1!.features['up-level1-upsampler-out']!.toFloat32Array();
      const withLora = r.variants.feature3!.features['up-level1-upsampler-out']!.toFloat32Array();
      t.true(maxRel(withLora, plain) > 1e-3);
      t.regex(r.variants.feature3!.settings.lora!, /kohya_locon/);
    }
  } finally {
    results.forEach((r) => r.dispose());
  }
});

test.serial('correspondence: batchVariants runs same-schedule variants as one batch, equal to separate runs', async (t) => {
  t.timeout(5 * 60_000);
  const cl = { loraA: loras.a1, loraB: loras.b1 };
  const calls: string[][] = [];
  const engine = engineOf(pipe);
  const orig = engine.runVariants.bind(engine);
  engine.runVariants = async (ctx, items) => {
    calls.push(items.map((it) => it.plan.settings.variant!));
    return orig(ctx, items);
  };
  let batched, separate;
  try {
    batched = await extractRecipe(pipe, 'correspondence', IMAGES, { loras: cl, seed: 3, batchVariants: true, batchSize: 2 });
    t.deepEqual(calls.map((c) => c.join('+')).sort(), ['attn', 'feature1+feature2', 'feature3', 'feature4', 'feature5+feature6'].sort());
    calls.length = 0;
    separate = await extractRecipe(pipe, 'correspondence', IMAGES, { loras: cl, seed: 3, batchVariants: false, batchSize: 2 });
    t.is(calls.length, 7);
    t.true(calls.every((c) => c.length === 1));
  } finally {
    engine.runVariants = orig;
  }
  try {
    for (const [i, r] of batched.entries()) {
      const s = separate[i]!;
      t.deepEqual(Object.keys(r.variants), getRecipe('correspondence').variants.map((v) => v.name));
      for (const [name, f] of Object.entries(r.variants)) {
        t.deepEqual(Object.keys(f.features), Object.keys(s.variants[name]!.features));
        for (const id of Object.keys(f.features)) {
          const e = maxRel(f.features[id]!.toFloat32Array(), s.variants[name]!.features[id]!.toFloat32Array());
          t.true(e < 1e-5, `${name} ${id}: ${e}`);
        }
      }
      // the two noise draws of one batch stay different draws
      const a = r.variants.feature5!.features['up-level1-upsampler-out']!.toFloat32Array();
      const b = r.variants.feature6!.features['up-level1-upsampler-out']!.toFloat32Array();
      t.true(maxRel(a, b) > 1e-3);
    }
  } finally {
    batched.forEach((r) => r.dispose());
    separate.forEach((r) => r.dispose());
  }
  await t.throwsAsync(extractRecipe(pipe, 'correspondence', IMAGES, { loras: cl, batchVariants: 'yes' as never }), { message: /batchVariants must be/ });
});

test.serial('missing LoRA slots are an error unless skipped', async (t) => {
  await t.throwsAsync(extractRecipe(pipe, 'horse21', IMAGES.slice(0, 1), {}), { message: /slot\(s\) a1, b1/ });
  await t.throwsAsync(extractRecipe(pipe, 'horse21', IMAGES.slice(0, 1), { loras: { zz: 'x' } as never, skipMissingLora: true }), { message: /no LoRA slot/ });
  const r = await extractRecipe(pipe, 'horse21', IMAGES.slice(0, 1), { skipMissingLora: true });
  t.deepEqual(Object.keys(r[0]!.variants), ['feature1', 'feature2']);
  r.forEach((x) => x.dispose());
});

test.serial('CLI extract --recipe writes variants and the amalgamated tensor', async (t) => {
  t.timeout(5 * 60_000);
  const out = await mkdtemp(join(tmpdir(), 'df-recipe-'));
  try {
    await run(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'extract', '--recipe', 'bedroom28', '--weights', WEIGHTS, '--device', 'cpu',
      '--lora-slot', `lora=${loras.a1}`, '--batch-variants', 'on', '--out', out, IMAGES[0]!]);
    const f = await SafetensorsFile.open(join(out, 'chelsea.safetensors'));
    t.is(f.metadata.recipe, 'bedroom28');
    t.true(f.has('feature2/attn'));
    t.true(f.has('feature3/up-level3-repeat2-vit-out'));
    t.is(f.info('amalgamated').shape[0], 3 * (112 + 154));
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});
