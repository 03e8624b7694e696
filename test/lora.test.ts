import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseLora, planLoraMerge, readLoraFile, ParameterIndex, type LoraFile, type ParamInfo } from '../lib/lora/index.js';
import { loraDeltaF64, mergeLoraF64 } from './oracles/lora.js';
import { SafetensorsFile, encodeSafetensors, type StTensorInput } from '../lib/io/safetensors.js';
import { DiffusionFeaturesError } from '../lib/errors.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const fx = (name: string): string => join(root, 'test', 'fixtures', 'lora', name);
const FILES = { a: fx('kohya_locon.safetensors'), b: fx('kohya_lora_attn_only.safetensors'), c: fx('diffusers_peft.safetensors') };

interface Case {
  name: string;
  loras: { file: string; scale: number }[];
  unet_params_changed: number;
  delta_fro_by_parameter: Record<string, number>;
  text_encoder?: { params_changed: number; delta_fro_by_parameter: Record<string, number> };
}
const cases = JSON.parse(readFileSync(fx('cases.json'), 'utf8')) as { cases: Case[]; representative_params: string[]; text_encoder: { representative_params: string[] } };

async function paramsOf(file: string): Promise<ParamInfo[]> {
  const st = await SafetensorsFile.open(join(root, 'models', 'micro-src', file));
  return st.names().map((name) => ({ name, shape: st.info(name).shape }));
}
const unetParams = paramsOf('unet/diffusion_pytorch_model.safetensors');
const textParams = paramsOf('text_encoder/model.safetensors');
const loraCache = new Map<string, Promise<LoraFile>>();
const lora = (path: string): Promise<LoraFile> => {
  if (!loraCache.has(path)) loraCache.set(path, readLoraFile(path));
  return loraCache.get(path)!;
};
const fileOf = (name: string): string => fx(name);
const goldens = SafetensorsFile.open(fx('lora_goldens.safetensors'));

function fro(x: Float64Array): number {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s);
}

test('parses the three reference LoRA files (kohya LoCon F16, kohya attn F32, PEFT BF16)', async (t) => {
  const a = await lora(FILES.a);
  t.is(a.format, 'kohya');
  t.is(a.modules.length, 277 + 12);
  t.is(a.modules.filter((m) => m.target === 'text_encoder').length, 12);
  t.true(a.modules.every((m) => m.rank === 4 && m.alpha === 2));
  t.true(a.modules.some((m) => m.down.shape.length === 4 && m.down.shape[2] === 3), 'has 3×3 LoCon convs');
  t.true(a.modules.some((m) => m.name.endsWith('time_emb_proj')));
  t.true(a.modules.some((m) => m.name.includes('upsamplers_0_conv')));
  const b = await lora(FILES.b);
  t.is(b.format, 'kohya');
  t.is(b.modules.length, 128);
  t.true(b.modules.every((m) => m.rank === 8 && m.alpha === 8));
  const c = await lora(FILES.c);
  t.is(c.format, 'peft');
  t.is(c.modules.length, 277);
  t.true(c.modules.every((m) => m.rank === 4 && m.alpha === null && m.dotted && m.target === 'unet'));
});

test('kohya names resolve through the model module paths, not string rewriting', (t) => {
  const idx = new ParameterIndex([
    { name: 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight', shape: [4, 4] },
    { name: 'down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight', shape: [8, 4] },
    { name: 'a.b_c.weight', shape: [1, 1] },
    { name: 'a_b.c.weight', shape: [1, 1] },
  ]);
  t.is(idx.resolve({ name: 'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0', dotted: false, target: 'unet' }),
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight');
  t.is(idx.resolve({ name: 'down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj', dotted: false, target: 'unet' }),
    'down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight');
  t.is(idx.resolve({ name: 'a_b_c', dotted: false, target: 'unet' }), null, 'ambiguous');
  t.is(idx.resolve({ name: 'nope', dotted: false, target: 'unet' }), undefined);
});

for (const c of cases.cases) {
  test(`${c.name}: every delta matches the reference (Frobenius norms of all changed parameters)`, async (t) => {
    const loaded = await Promise.all(c.loras.map(async (l) => ({ lora: await lora(fileOf(l.file)), scale: l.scale })));
    const plan = planLoraMerge(loaded, await unetParams, null);
    t.is(plan.unet.size, c.unet_params_changed);
    t.deepEqual([...plan.unet.keys()].sort(), Object.keys(c.delta_fro_by_parameter).sort());
    const shapes = new Map((await unetParams).map((p) => [p.name, p.shape]));
    for (const [param, terms] of plan.unet) {
      const got = fro(loraDeltaF64(shapes.get(param)!, terms));
      const want = c.delta_fro_by_parameter[param]!;
      if (Math.abs(got - want) > 1e-6 * want + 1e-9) t.fail(`${param}: |delta| ${got} vs ${want}`);
    }
    t.is(plan.text_encoder.size, 0);
    t.is(plan.skipped.length, c.loras.some((l) => l.file === 'kohya_locon.safetensors') ? 12 : 0);

    // merged values of the representative parameters (float64, rounded once) vs the goldens
    const g = await goldens;
    for (const param of cases.representative_params) {
      const base = g.float32(`base.param.${param}`);
      const terms = plan.unet.get(param) ?? [];
      const merged = mergeLoraF64(base, shapes.get(param)!, terms);
      const ref = g.float32(`${c.name}.merged.${param}`);
      let max = 0;
      for (let i = 0; i < ref.length; i++) max = Math.max(max, Math.abs(merged[i]! - ref[i]!));
      t.true(max <= 1e-6, `${param}: max |Δ| ${max}`);
    }
  });
}

test('text-encoder keys are applied only when asked, and match the reference', async (t) => {
  const c = cases.cases.find((x) => x.name === 'case1_a_s1')!;
  const plan = planLoraMerge([{ lora: await lora(FILES.a), scale: 1 }], await unetParams, await textParams);
  t.is(plan.skipped.length, 0);
  t.is(plan.text_encoder.size, 12);
  const shapes = new Map((await textParams).map((p) => [p.name, p.shape]));
  for (const [param, terms] of plan.text_encoder) {
    const got = fro(loraDeltaF64(shapes.get(param)!, terms));
    t.true(Math.abs(got - c.text_encoder!.delta_fro_by_parameter[param]!) < 1e-6 * got, param);
  }
  const g = await goldens;
  for (const param of cases.text_encoder.representative_params) {
    const merged = mergeLoraF64(g.float32(`te.base.param.${param}`), shapes.get(param)!, plan.text_encoder.get(param)!);
    const ref = g.float32(`case1_a_s1.te_merged.${param}`);
    t.true(ref.every((v, i) => Math.abs(v - merged[i]!) <= 1e-6), param);
  }
});

// ------------------------------------------------------------------------------------------------
// malformed files

function header(json: object): Uint8Array {
  const j = new TextEncoder().encode(JSON.stringify(json));
  const out = new Uint8Array(8 + j.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(j.length), true);
  out.set(j, 8);
  return out;
}

const f32 = (shape: number[], v = 0.5): StTensorInput => ({ dtype: 'F32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(v) });
const unetParam = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight';
const kohyaKey = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q';

test('malformed files give clear errors naming the file and the key', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'lora-'));
  try {
    const write = async (name: string, bytes: Uint8Array): Promise<string> => {
      const p = join(dir, name);
      await writeFile(p, bytes);
      return p;
    };
    // header length beyond the file
    const bad = new Uint8Array(16);
    new DataView(bad.buffer).setBigUint64(0, 1000n, true);
    const e1 = await t.throwsAsync(readLoraFile(await write('len.safetensors', bad)));
    t.is((e1 as DiffusionFeaturesError).code, 'E_INVALID_FILE');
    t.regex(e1!.message, /len\.safetensors.*header length/);
    // offsets outside the data section
    const h = header({ [`${kohyaKey}.lora_down.weight`]: { dtype: 'F32', shape: [2, 16], data_offsets: [0, 128] } });
    const e2 = await t.throwsAsync(readLoraFile(await write('offsets.safetensors', h)));
    t.is((e2 as DiffusionFeaturesError).code, 'E_INVALID_FILE');
    t.regex(e2!.message, /offsets\.safetensors/);
    // truncated file
    await t.throwsAsync(readLoraFile(await write('short.safetensors', new Uint8Array(5))), { message: /short\.safetensors/ });
    // integer factors
    const e3 = await t.throwsAsync(readLoraFile(await write('dtype.safetensors', encodeSafetensors({
      [`${kohyaKey}.lora_down.weight`]: { dtype: 'I32', shape: [2, 16], data: new Int32Array(32) },
      [`${kohyaKey}.lora_up.weight`]: f32([16, 2]),
    }))));
    t.regex(e3!.message, /dtype I32/);
    // not a LoRA key
    const e4 = await t.throwsAsync(readLoraFile(await write('keys.safetensors', encodeSafetensors({ 'model.diffusion_model.x.weight': f32([2, 2]) }))));
    t.regex(e4!.message, /not a LoRA key.*model\.diffusion_model\.x\.weight/);
    // missing up
    const e5 = await t.throwsAsync(readLoraFile(await write('half.safetensors', encodeSafetensors({ [`${kohyaKey}.lora_down.weight`]: f32([2, 16]) }))));
    t.regex(e5!.message, /lacks its up/);
    // LoHa
    const e6 = await t.throwsAsync(readLoraFile(await write('loha.safetensors', encodeSafetensors({ [`${kohyaKey}.hada_w1_a`]: f32([16, 2]) }))));
    t.regex(e6!.message, /LoHa/);
    // rank mismatch
    const e7 = await t.throwsAsync(readLoraFile(await write('rank.safetensors', encodeSafetensors({
      [`${kohyaKey}.lora_down.weight`]: f32([2, 16]), [`${kohyaKey}.lora_up.weight`]: f32([16, 3]),
    }))));
    t.regex(e7!.message, /rank 2/);
    // empty file
    await t.throwsAsync(readLoraFile(await write('none.safetensors', encodeSafetensors({}))), { message: /no LoRA tensors/ });
    await t.throwsAsync(readLoraFile(join(dir, 'missing.safetensors')), { message: /not found/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('keys matching no parameter, and shapes that do not fit, are errors naming them', async (t) => {
  const params = await unetParams;
  const l1 = parseLora(SafetensorsFile.fromBuffer(encodeSafetensors({
    [`${kohyaKey}.lora_down.weight`]: f32([2, 16]), [`${kohyaKey}.lora_up.weight`]: f32([16, 2]),
    'lora_unet_down_blocks_9_attn_to_q.lora_down.weight': f32([2, 16]), 'lora_unet_down_blocks_9_attn_to_q.lora_up.weight': f32([16, 2]),
  }), 'extra.safetensors'));
  const e = t.throws(() => planLoraMerge([{ lora: l1, scale: 1 }], params, null));
  t.is((e as DiffusionFeaturesError).code, 'E_INCOMPATIBLE_MODEL');
  t.regex(e!.message, /extra\.safetensors.*lora_unet_down_blocks_9_attn_to_q/);
  const l2 = parseLora(SafetensorsFile.fromBuffer(encodeSafetensors({
    [`unet.${unetParam.replace(/\.weight$/, '')}.lora_A.weight`]: f32([2, 32]),
    [`unet.${unetParam.replace(/\.weight$/, '')}.lora_B.weight`]: f32([16, 2]),
  }), 'shape.safetensors'));
  const e2 = t.throws(() => planLoraMerge([{ lora: l2, scale: 1 }], params, null));
  t.regex(e2!.message, /does not fit .*to_q\.weight \[16, 16\]/);
});

test('older diffusers naming (lora.down / lora.up, attention processors) maps to the same parameters', async (t) => {
  const params = await unetParams;
  const mod = unetParam.replace(/\.weight$/, '');
  const l = parseLora(SafetensorsFile.fromBuffer(encodeSafetensors({
    [`unet.${mod}.lora.down.weight`]: f32([2, 16], 0.25), [`unet.${mod}.lora.up.weight`]: f32([16, 2], 0.5),
    'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight': f32([2, 16]),
    'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight': f32([16, 2]),
  }), 'old.safetensors'));
  t.is(l.format, 'diffusers');
  const plan = planLoraMerge([{ lora: l, scale: 2 }], params, null);
  t.deepEqual([...plan.unet.keys()].sort(), [unetParam, 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight'].sort());
  t.is(plan.unet.get(unetParam)![0]!.scale, 2);
  const merged = mergeLoraF64(new Float32Array(256), [16, 16], plan.unet.get(unetParam)!);
  t.true(merged.every((v) => v === 2 * 2 * 0.25 * 0.5));
});

// ------------------------------------------------------------------------------------------------
// merging into a loaded model (needs the native addon, models/ops.pt and the micro export)

const microDir = process.env.DF_MICRO_DIR ?? join(root, 'models', 'micro');
const nativeReady = existsSync(join(root, 'lib', 'native.ts')) && existsSync(join(root, 'models', 'ops.pt')) && existsSync(join(microDir, 'unet.pt'));
const nativeTest = nativeReady ? test.serial : test.skip;

nativeTest('LoraManager merges into the UNet exactly as the reference, swaps and restores exactly', async (t) => {
  const { ScriptModule, Tensor } = await import('../lib/native.js');
  const { LoraManager } = await import('../lib/lora/index.js');
  const unet = await ScriptModule.load(join(microDir, 'unet.pt'), { device: 'cpu', dtype: 'float32' });
  const text = await ScriptModule.load(join(microDir, 'text_encoder.pt'), { device: 'cpu', dtype: 'float32' });
  const g = await goldens;
  const ids = ['unet-out', 'up-level0-upsampler-out', 'up-level1-upsampler-out', 'up-level2-upsampler-out', 'up-level3-repeat2-vit-out', 'up-level1-repeat1-vit-block0-cross-q', 'up-level3-repeat0-vit-block0-self-k'];
  const input = (n: string) => Tensor.fromFloat32Array(g.float32(n), g.info(n).shape);
  const sample = input('in.sample');
  const ehs = input('in.encoder_hidden_states');
  const ts = Tensor.fromInt64Array(g.int64('in.timestep'), g.info('in.timestep').shape);
  const run = async (): Promise<Record<string, Float32Array>> => {
    const out = (await unet.forward(sample, ts, ehs, ids.filter((i) => i !== 'unet-out'), null, null)) as Record<string, import('../lib/native.js').Tensor>;
    const r: Record<string, Float32Array> = {};
    for (const id of ids) r[id] = Float32Array.from(out[id === 'unet-out' ? 'out' : id]!.toFloat32Array());
    Object.values(out).forEach((x) => x.dispose());
    return r;
  };
  const close = (got: Float32Array, ref: Float32Array, tol: number): number => {
    let max = 0;
    for (let i = 0; i < ref.length; i++) max = Math.max(max, Math.abs(got[i]! - ref[i]!) - tol * Math.abs(ref[i]!));
    return max;
  };
  const mgr = new LoraManager(unet, text);
  const base = await run();
  for (const id of ids) t.true(close(base[id]!, g.float32(`base.out.${id}`), 1e-4) <= 1e-4, `base ${id}`);
  const original = Float32Array.from((await unet.getParameter(cases.representative_params[3]!)).toFloat32Array());

  for (const c of cases.cases) {
    await mgr.swap(c.loras.map((l) => ({ file: fileOf(l.file), scale: l.scale })));
    t.regex(mgr.describe(), /safetensors:/);
    for (const param of cases.representative_params) {
      const w = await unet.getParameter(param);
      const ref = g.float32(`${c.name}.merged.${param}`);
      t.true(close(w.toFloat32Array(), ref, 0) <= 1e-6, `${c.name} ${param}`);
      w.dispose();
    }
    if (g.has(`${c.name}.out.unet-out`)) {
      const out = await run();
      for (const id of ids) t.true(close(out[id]!, g.float32(`${c.name}.out.${id}`), 1e-4) <= 1e-4, `${c.name} ${id}`);
    }
  }
  await mgr.swap([]);
  t.is(mgr.describe(), '');
  t.deepEqual(mgr.touched(), []);
  const restored = (await unet.getParameter(cases.representative_params[3]!)).toFloat32Array();
  t.deepEqual(Float32Array.from(restored), original, 'restored exactly');
  const after = await run();
  for (const id of ids) t.deepEqual(after[id], base[id], `unmerged ${id} bit-identical`);

  // text encoder: skipped by default, applied on request
  await mgr.swap([{ file: FILES.a }]);
  t.is(mgr.skipped.length, 12);
  await mgr.swap([{ file: FILES.a }], { textEncoder: true });
  t.is(mgr.skipped.length, 0);
  const te = await text.getParameter(cases.text_encoder.representative_params[0]!);
  const ref = g.float32(`case1_a_s1.te_merged.${cases.text_encoder.representative_params[0]}`);
  t.true(close(te.toFloat32Array(), ref, 0) <= 1e-6);
  // a failing swap leaves the base weights
  await t.throwsAsync(mgr.swap([{ file: FILES.a }, { file: join(root, 'missing.safetensors') }]));
  await mgr.swap([]);
  mgr.dispose();
  unet.dispose();
  text.dispose();
});
