/**
 * End-to-end parity with the reference pipeline (diffusers + transformers, docs/method.md): image
 * files + the reference's noise + prompt → features, for the bundled micro model, through the API and
 * through the CLI. Fixtures: test/fixtures/micro/e2e (trimmed copies of reference/micro/e2e).
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { SafetensorsFile, writeSafetensors } from '../lib/io/safetensors.js';
import { loadPipeline, type ExtractOptions, type Pipeline } from '../lib/pipeline/index.js';
import { Tensor } from '../lib/native.js';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');
const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const E2E = join(ROOT, 'test', 'fixtures', 'micro', 'e2e');
const IMAGES = join(ROOT, 'test', 'fixtures', 'images');
const RESIZE = join(ROOT, 'test', 'fixtures', 'resize');
const CLI = join(ROOT, 'dist', 'cli.js');
const TOL = 1e-4;

interface CaseJson {
  case: string;
  batch: number;
  images: { name: string; file: string }[];
  prompt: string;
  preset: string;
  layer_ids: string[];
  attention: string[] | null;
  t_nominal: number;
  denoising_from: number | null;
  unet_timestep: number;
  control: string | null;
  posterior: string;
  timestep_mode: string;
  lora?: { file: string; scale: number }[];
}

function imagePath(file: string): string {
  const base = file.split('/').pop()!;
  return existsSync(join(IMAGES, base)) ? join(IMAGES, base) : join(RESIZE, base);
}

export function relErr(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Infinity;
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i]! - b[i]!;
    num += d * d;
    den += b[i]! * b[i]!;
  }
  return Math.sqrt(num) / (Math.sqrt(den) + 1e-30);
}

/** Row `i` (first dim) of a reference tensor. */
function row(f: SafetensorsFile, name: string, i: number): { data: Float32Array; shape: number[] } {
  const shape = f.info(name).shape;
  const all = f.float32(name);
  const n = all.length / shape[0]!;
  return { data: all.subarray(i * n, (i + 1) * n), shape: shape.slice(1) };
}

function loadCase(name: string): { json: CaseJson; ref: Promise<SafetensorsFile> } {
  const json = JSON.parse(readFileSync(join(E2E, `${name}.json`), 'utf8')) as CaseJson;
  return { json, ref: SafetensorsFile.open(join(E2E, `${name}.safetensors`)) };
}

function optionsFor(c: CaseJson, ref: SafetensorsFile): ExtractOptions {
  const mk = (n: string) => Tensor.fromFloat32Array(ref.float32(n), ref.info(n).shape);
  return {
    layers: c.preset,
    prompt: c.prompt,
    t: c.t_nominal,
    timestepMode: c.timestep_mode.startsWith('exact') ? 'exact' : 'reference',
    posterior: c.posterior.startsWith('mean') ? 'mean' : 'sample',
    attention: c.attention?.length ? true : false,
    control: c.control ? 'canny' : null,
    denoiseFrom: c.denoising_from ?? undefined,
    size: 128,
    batchSize: c.batch,
    packaged: true,
    noise: { noise: mk('input.noise'), vaeNoise: mk('input.vae_noise') },
  };
}

let pipe: Pipeline;
test.before(async () => {
  pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
});
test.after.always(() => pipe?.dispose());

const CASES = [
  'case1_legacy',
  'case2_practical_attn',
  'case3_controlnet_onestep',
  'case4_controlnet_multistep_attn',
  'case5_posterior_mean_exact_t50',
  'case6_long_prompt_attn',
];

for (const name of CASES) {
  test.serial(`API reproduces reference ${name} (rel. error ≤ ${TOL})`, async (t) => {
    const { json, ref: refP } = loadCase(name);
    const ref = await refP;
    const opts = optionsFor(json, ref);
    const stages = new Set<string>();
    const results = await pipe.extract(
      json.images.map((i) => imagePath(i.file)),
      { ...opts, onProgress: (p) => stages.add(p.stage) },
    );
    try {
      t.is(results.length, json.images.length);
      t.true(stages.has('unet'));
      for (const [i, r] of results.entries()) {
        t.deepEqual(Object.keys(r.features), [...json.layer_ids, ...(json.attention?.length ? ['attn'] : [])]);
        for (const id of json.layer_ids) {
          const exp = row(ref, id, i);
          const got = r.features[id]!;
          t.deepEqual(got.shape, exp.shape, id);
          const e = relErr(got.toFloat32Array(), exp.data);
          t.true(e <= TOL, `${name} image ${i} ${id}: rel. error ${e.toExponential(3)}`);
        }
        const pk = row(ref, 'packaged', i);
        t.deepEqual(r.packaged!.shape, pk.shape);
        const e = relErr(r.packaged!.toFloat32Array(), pk.data);
        t.true(e <= TOL, `${name} image ${i} packaged: rel. error ${e.toExponential(3)}`);
        if (json.attention?.length) {
          const attn = r.features.attn!;
          const c = attn.shape[0]!;
          const hw = pk.shape[1]! * pk.shape[2]!;
          const tail = pk.data.subarray(pk.data.length - c * hw);
          const ea = relErr(attn.toFloat32Array(), tail);
          t.true(ea <= TOL, `${name} image ${i} attn: rel. error ${ea.toExponential(3)}`);
        }
      }
    } finally {
      results.forEach((r) => r.dispose());
      opts.noise?.noise.dispose();
      opts.noise?.vaeNoise?.dispose();
    }
  });
}

test.serial('the same seed gives the same features; another seed other ones', async (t) => {
  const img = join(IMAGES, 'astronaut.png');
  const o: ExtractOptions = { layers: 'legacy', prompt: 'a photo', size: 128, seed: 7 };
  const [a] = await pipe.extract([img], o);
  const [b] = await pipe.extract([img], o);
  const [c] = await pipe.extract([img], { ...o, seed: 8 });
  const id = 'up-level1-upsampler-out';
  t.is(relErr(a!.features[id]!.toFloat32Array(), b!.features[id]!.toFloat32Array()), 0);
  t.true(relErr(c!.features[id]!.toFloat32Array(), a!.features[id]!.toFloat32Array()) > 1e-3);
  // batching does not change the noise an image gets
  const batched = await pipe.extract([join(IMAGES, 'rocket.png'), img], { ...o, batchSize: 2, seedOffset: 0 });
  const single = await pipe.extract([join(IMAGES, 'rocket.png'), img], { ...o, batchSize: 1 });
  t.true(relErr(batched[1]!.features[id]!.toFloat32Array(), single[1]!.features[id]!.toFloat32Array()) < 1e-5);
  [a, b, c, ...batched, ...single].forEach((r) => r!.dispose());
});

test.serial('bad input: unknown layer id, unreadable image, truncated image, bad options', async (t) => {
  const img = join(IMAGES, 'astronaut.png');
  await t.throwsAsync(pipe.extract([img], { layers: ['up-level9-upsampler-out'], size: 128 }), { message: /up-level9-upsampler-out/ });
  await t.throwsAsync(pipe.extract([join(IMAGES, 'nope.png')], { size: 128 }), { message: /nope\.png/ });
  const dir = await mkdtemp(join(tmpdir(), 'df-e2e-'));
  try {
    const zero = join(dir, 'zero.png');
    await writeFile(zero, Buffer.alloc(0));
    await t.throwsAsync(pipe.extract([zero], { size: 128 }), { message: /zero\.png/ });
    const trunc = join(dir, 'trunc.png');
    const full = readFileSync(img);
    await writeFile(trunc, full.subarray(0, full.length >> 1));
    await t.throwsAsync(pipe.extract([trunc], { size: 128 }), { message: /trunc\.png/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  await t.throwsAsync(pipe.extract([img], { size: 100 }), { message: /multiple of 64/ });
  await t.throwsAsync(pipe.extract([img], { size: 128, denoiseFrom: 60 }), { message: /control/ });
  await t.throwsAsync(pipe.extract([], {}), { message: /at least one image/ });
  // the pipeline still works after the errors
  const [r] = await pipe.extract([img], { size: 128 });
  t.deepEqual(r!.features['up-level3-repeat2-vit-out']!.shape, [16, 16, 16]);
  r!.dispose();
});

test.serial('concurrent calls are queued and all resolve', async (t) => {
  const img = join(IMAGES, 'coffee.png');
  const calls = [1, 2, 3].map((s) => pipe.extract([img], { layers: 'practical', size: 128, seed: s }));
  const all = await Promise.all(calls);
  t.is(all.length, 3);
  for (const [r] of all) {
    t.deepEqual(r!.features['up-level2-repeat1-vit-block0-cross-q']!.shape, [32, 8, 8]);
    r!.dispose();
  }
});

test.serial('an aborted call rejects and leaves the pipeline usable', async (t) => {
  const ac = new AbortController();
  ac.abort();
  await t.throwsAsync(pipe.extract([join(IMAGES, 'coffee.png')], { size: 128, signal: ac.signal }), { message: /abort/i });
  const [r] = await pipe.extract([join(IMAGES, 'coffee.png')], { size: 128 });
  t.truthy(r);
  r!.dispose();
});

test.serial('loading a weights folder that lacks a component or has a foreign model.json fails clearly', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'df-weights-'));
  try {
    await t.throwsAsync(loadPipeline(dir, { device: 'cpu' }), { message: /model\.json/ });
    const model = JSON.parse(readFileSync(join(WEIGHTS, 'model.json'), 'utf8')) as Record<string, unknown>;
    await writeFile(join(dir, 'model.json'), JSON.stringify(model));
    await t.throwsAsync(loadPipeline(dir, { device: 'cpu' }), { message: /unet\.pt/ });
    await writeFile(join(dir, 'model.json'), JSON.stringify({ ...model, format_version: 99 }));
    await t.throwsAsync(loadPipeline(dir, { device: 'cpu' }), { message: /format_version 99/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test.serial('CLI extract reproduces case 1, skips existing outputs, reports unreadable images', async (t) => {
  t.timeout(5 * 60_000);
  const { json, ref: refP } = loadCase('case1_legacy');
  const ref = await refP;
  const dir = await mkdtemp(join(tmpdir(), 'df-cli-'));
  try {
    const noise = join(dir, 'noise.safetensors');
    // one spare row (a copy of row 0) so that a third image can be given in the second run
    const withSpare = (name: string) => {
      const shape = ref.info(name).shape;
      const all = ref.float32(name);
      const per = all.length / shape[0]!;
      const data = new Float32Array(all.length + per);
      data.set(all);
      data.set(all.subarray(0, per), all.length);
      return { dtype: 'F32' as const, shape: [shape[0]! + 1, ...shape.slice(1)], data };
    };
    await writeSafetensors(noise, { noise: withSpare('input.noise'), vae_noise: withSpare('input.vae_noise') });
    const out = join(dir, 'out');
    const images = json.images.map((i) => imagePath(i.file));
    const args = [CLI, 'extract', '--weights', WEIGHTS, '--layers', 'legacy', '--prompt', json.prompt, '--t', '50',
      '--noise', noise, '--size', '128', '--batch-size', '2', '--device', 'cpu', '--aggregate', '--out', out, ...images];
    await run(process.execPath, args);
    for (const [i, img] of json.images.entries()) {
      const f = await SafetensorsFile.open(join(out, `${img.name}.safetensors`));
      t.is(f.metadata.prompt, json.prompt);
      t.is(f.metadata.unet_timestep, '51');
      for (const id of [...json.layer_ids, 'packaged']) {
        const exp = row(ref, id, i);
        t.deepEqual(f.info(id).shape, exp.shape);
        const e = relErr(f.float32(id), exp.data);
        t.true(e <= TOL, `CLI ${img.name} ${id}: ${e.toExponential(3)}`);
      }
    }
    // second run, same settings: outputs exist → skipped; a broken image is reported, the run goes on, exit 1
    const broken = join(dir, 'broken.png');
    await writeFile(broken, 'not an image');
    const settle = (p: Promise<unknown>) => p.then(() => ({ code: 0, stderr: '' }), (e: { code: number; stderr: string }) => e);
    const again = await settle(run(process.execPath, [...args, broken]));
    t.is(again.code, 1, again.stderr);
    t.regex(again.stderr, /broken\.png/);
    t.regex(again.stderr, /skip/i);
    const files = (await readdir(out)).sort();
    t.deepEqual(files, ['astronaut.safetensors', 'chelsea.safetensors']);
    // third run, other settings (no noise file, no prompt): the existing outputs are not silently kept
    const other = await settle(run(process.execPath, [CLI, 'extract', '--weights', WEIGHTS, '--size', '128', '--device', 'cpu', '--out', out, ...images]));
    t.is(other.code, 2, other.stderr);
    t.regex(other.stderr, /(astronaut|chelsea)\.safetensors exists but was written with different settings/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test.serial('CLI layers and tokenize', async (t) => {
  const { stdout } = await run(process.execPath, [CLI, 'layers', '--weights', WEIGHTS]);
  t.regex(stdout, /up-level1-upsampler-out/);
  t.is(stdout.trim().split('\n').filter((l) => /^(unet|down|mid|up)-/.test(l)).length, 197);
  const tok = await run(process.execPath, [CLI, 'tokenize', '--weights', WEIGHTS, 'a photo of a cat']);
  const ids = JSON.parse(tok.stdout) as number[][];
  t.is(ids.length, 1);
  t.is(ids[0]!.length, 77);
  t.deepEqual(ids[0]!.slice(0, 7), [49406, 320, 1125, 539, 320, 2368, 49407]);
});

for (const name of ['caseL1_legacy_kohya_locon', 'caseL2_legacy_locon0p7_attn0p3', 'caseL3_legacy_diffusers_peft']) {
  test.serial(`LoRA through the pipeline reproduces reference ${name}`, async (t) => {
    const dir = join(ROOT, 'test', 'fixtures', 'micro', 'e2e_lora');
    const json = JSON.parse(readFileSync(join(dir, `${name}.json`), 'utf8')) as CaseJson;
    const ref = await SafetensorsFile.open(join(dir, `${name}.safetensors`));
    await pipe.setLora(json.lora!.map((l) => ({ file: join(ROOT, 'test', 'fixtures', 'lora', l.file), scale: l.scale })));
    const opts = optionsFor(json, ref);
    const results = await pipe.extract(json.images.map((i) => imagePath(i.file)), { ...opts, packaged: false });
    try {
      for (const [i, r] of results.entries()) {
        t.regex(r.settings.lora!, new RegExp(json.lora![0]!.file.replace('.', '\\.')));
        for (const id of json.layer_ids) {
          const e = relErr(r.features[id]!.toFloat32Array(), row(ref, id, i).data);
          t.true(e <= TOL, `${name} image ${i} ${id}: rel. error ${e.toExponential(3)}`);
        }
      }
    } finally {
      results.forEach((r) => r.dispose());
      await pipe.setLora([]);
    }
    // after un-merging, the base model's features again (case 1)
    const base = loadCase('case1_legacy');
    const bref = await base.ref;
    const [r0] = await pipe.extract([imagePath(base.json.images[0]!.file)], { ...optionsFor(base.json, bref), batchSize: 1 });
    const e0 = relErr(r0!.features['up-level1-upsampler-out']!.toFloat32Array(), row(bref, 'up-level1-upsampler-out', 0).data);
    t.true(e0 <= TOL, `after un-merge: ${e0}`);
    r0!.dispose();
  });
}

test.serial('multi-step denoising: the DDIM option runs and differs from PLMS; control scale 0 equals no ControlNet', async (t) => {
  const img = join(IMAGES, 'chelsea.png');
  const o: ExtractOptions = { layers: 'legacy', prompt: 'a photo of a cat', seed: 3, control: 'canny', denoiseFrom: 60 };
  const [plms] = await pipe.extract([img], o);
  const [ddim] = await pipe.extract([img], { ...o, scheduler: 'ddim' });
  const [ddim2] = await pipe.extract([img], { ...o, scheduler: 'ddim' });
  const id = 'up-level2-upsampler-out';
  t.is(ddim!.settings.scheduler, 'ddim');
  t.is(relErr(ddim!.features[id]!.toFloat32Array(), ddim2!.features[id]!.toFloat32Array()), 0);
  const d = relErr(ddim!.features[id]!.toFloat32Array(), plms!.features[id]!.toFloat32Array());
  t.true(d > 1e-6 && d < 0.5, `ddim vs plms: ${d}`);
  const [zero] = await pipe.extract([img], { layers: 'legacy', seed: 3, prompt: 'a photo of a cat', control: 'canny', controlScale: 0 });
  const [none] = await pipe.extract([img], { layers: 'legacy', seed: 3, prompt: 'a photo of a cat' });
  t.true(relErr(zero!.features[id]!.toFloat32Array(), none!.features[id]!.toFloat32Array()) < 1e-6);
  [plms, ddim, ddim2, zero, none].forEach((r) => r!.dispose());
});
