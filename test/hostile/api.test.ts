/**
 * Hostile corpus, part 2: the library API on the bundled micro model — bad options, bad images, bad
 * noise, bad LoRA scales and files, bad recipe names, broken weights folders, disposed pipelines,
 * aborted queued calls. Every case is a typed error with a bounded message; at the end the same
 * pipeline still extracts finite features (the process still serves).
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdir, readFile, symlink, writeFile, copyFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import sharp from 'sharp';
import { loadPipeline, type ExtractOptions, type Pipeline } from '../../lib/pipeline/index.js';
import { extractRecipe } from '../../lib/recipes.js';
import { Tensor } from '../../lib/native.js';
import { AbortError, type ErrorCode } from '../../lib/errors.js';
import { IMAGES, WEIGHTS, rejectsTyped, scratch } from './helpers.js';

const SIZE = 64;
const IMG = join(IMAGES, 'chelsea.png');
let pipe: Pipeline;

test.before(async () => {
  pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
});
test.after.always(() => pipe?.dispose());

const base: ExtractOptions = { size: SIZE, layers: 'legacy' };
const noiseOf = (v: number, where: 'noise' | 'vaeNoise') => {
  const a = new Float32Array(4 * (SIZE / 8) ** 2);
  a[5] = v;
  const t = Tensor.fromFloat32Array(a, [1, 4, SIZE / 8, SIZE / 8]);
  const z = Tensor.fromFloat32Array(new Float32Array(a.length), [1, 4, SIZE / 8, SIZE / 8]);
  return where === 'noise' ? { noise: t, vaeNoise: z } : { noise: z, vaeNoise: t };
};

/** [label, options, expected code]: bad options of `extract`. */
const OPTION_CASES: [string, Record<string, unknown>, ErrorCode][] = [
  ['t empty string', { t: '' }, 'E_INVALID_ARGUMENT'],
  ['t "0x10"', { t: '0x10' }, 'E_INVALID_ARGUMENT'],
  ['t 1e300', { t: 1e300 }, 'E_INVALID_ARGUMENT'],
  ['t NaN', { t: NaN }, 'E_INVALID_ARGUMENT'],
  ['t -1', { t: -1 }, 'E_INVALID_ARGUMENT'],
  ['t 1000', { t: 1000 }, 'E_INVALID_ARGUMENT'],
  ['t 1.5', { t: 1.5 }, 'E_INVALID_ARGUMENT'],
  ['size 0', { size: 0 }, 'E_INVALID_ARGUMENT'],
  ['size 100 (not a multiple of 64)', { size: 100 }, 'E_INVALID_ARGUMENT'],
  ['size 8192', { size: 8192 }, 'E_INVALID_ARGUMENT'],
  ['size "64"', { size: '64' }, 'E_INVALID_ARGUMENT'],
  ['batchSize 0', { batchSize: 0 }, 'E_INVALID_ARGUMENT'],
  ['batchSize -1', { batchSize: -1 }, 'E_INVALID_ARGUMENT'],
  ['batchSize 1e9', { batchSize: 1e9 }, 'E_INVALID_ARGUMENT'],
  ['featureResize 0', { featureResize: 0 }, 'E_INVALID_ARGUMENT'],
  ['featureResize larger than a map', { featureResize: 64 }, 'E_INVALID_ARGUMENT'],
  ['featureResize 9 > 8×8 maps at 64 px', { featureResize: 9, layers: 'up-level3-repeat2-vit-out' }, 'E_INVALID_ARGUMENT'],
  ['seed -1', { seed: -1 }, 'E_INVALID_ARGUMENT'],
  ['seed 2^60', { seed: 2 ** 60 }, 'E_INVALID_ARGUMENT'],
  ['seed "0"', { seed: '0' }, 'E_INVALID_ARGUMENT'],
  ['seedOffset -5', { seedOffset: -5 }, 'E_INVALID_ARGUMENT'],
  ['controlScale 1e308', { controlScale: 1e308, control: 'canny' }, 'E_INVALID_ARGUMENT'],
  ['controlScale -1e308', { controlScale: -1e308, control: 'canny' }, 'E_INVALID_ARGUMENT'],
  ['controlScale Infinity', { controlScale: Infinity }, 'E_INVALID_ARGUMENT'],
  ['controlScale NaN', { controlScale: NaN }, 'E_INVALID_ARGUMENT'],
  ['controlScale "1"', { controlScale: '1' }, 'E_INVALID_ARGUMENT'],
  ['posterior "median"', { posterior: 'median' }, 'E_INVALID_ARGUMENT'],
  ['timestepMode 1', { timestepMode: 1 }, 'E_INVALID_ARGUMENT'],
  ['scheduler "euler"', { scheduler: 'euler' }, 'E_INVALID_ARGUMENT'],
  ['control "depth"', { control: 'depth' }, 'E_INVALID_ARGUMENT'],
  ['denoiseFrom without control', { denoiseFrom: 60 }, 'E_INVALID_ARGUMENT'],
  ['denoiseFrom below t', { denoiseFrom: 10, control: 'canny' }, 'E_INVALID_ARGUMENT'],
  ['denoiseFrom 51 steps', { denoiseFrom: 101, control: 'canny' }, 'E_INVALID_ARGUMENT'],
  ['layers []', { layers: [] }, 'E_UNKNOWN_LAYER'],
  ['layers ","', { layers: ',' }, 'E_UNKNOWN_LAYER'],
  ['layers " , , "', { layers: ' , , ' }, 'E_UNKNOWN_LAYER'],
  ['layers ""', { layers: '' }, 'E_UNKNOWN_LAYER'],
  ['layers true', { layers: true }, 'E_UNKNOWN_LAYER'],
  ['layers 42', { layers: 42 }, 'E_UNKNOWN_LAYER'],
  ['layers [null]', { layers: [null] }, 'E_UNKNOWN_LAYER'],
  ['layers unknown id', { layers: 'up-level9-upsampler-out' }, 'E_UNKNOWN_LAYER'],
  ['layers "__proto__"', { layers: '__proto__' }, 'E_UNKNOWN_LAYER'],
  ['layers "constructor"', { layers: 'constructor' }, 'E_UNKNOWN_LAYER'],
  ['layers missing JSON file', { layers: '/nonexistent/config.json' }, 'E_UNKNOWN_LAYER'],
  ['layers /dev/zero', { layers: '/dev/zero' }, 'E_UNKNOWN_LAYER'],
  ['layers a folder', { layers: '/tmp/' }, 'E_UNKNOWN_LAYER'],
  ['layers 10,000 unknown ids', { layers: Array.from({ length: 10_000 }, (_, i) => `x${i}`).join(',') }, 'E_UNKNOWN_LAYER'],
  ['prompt 42', { prompt: 42 }, 'E_INVALID_ARGUMENT'],
  ['prompt null', { prompt: null }, 'E_INVALID_ARGUMENT'],
  ['prompt {}', { prompt: {} }, 'E_INVALID_ARGUMENT'],
  ['prompt over the length limit', { prompt: 'a'.repeat(10_001) }, 'E_LIMIT_EXCEEDED'],
  ['onProgress 5', { onProgress: 5 }, 'E_INVALID_ARGUMENT'],
  ['onProgress "f"', { onProgress: 'f' }, 'E_INVALID_ARGUMENT'],
  ['signal {}', { signal: {} }, 'E_INVALID_ARGUMENT'],
  ['attention "yes"', { attention: 'yes' }, 'E_INVALID_ARGUMENT'],
  ['attention ["sideways"]', { attention: ['sideways'] }, 'E_INVALID_ARGUMENT'],
  ['packaged "yes"', { packaged: 'yes' }, 'E_INVALID_ARGUMENT'],
  ['noise {}', { noise: {} }, 'E_INVALID_ARGUMENT'],
  ['noise wrong shape', { noise: { noise: Tensor.fromFloat32Array(new Float32Array(8), [2, 4]) } }, 'E_INVALID_ARGUMENT'],
  ['maxPixels 0', { maxPixels: 0 }, 'E_INVALID_ARGUMENT'],
  ['maxPixels below the image', { maxPixels: 1000 }, 'E_LIMIT_EXCEEDED'],
  ['maxImageBytes below the file', { maxImageBytes: 1000 }, 'E_LIMIT_EXCEEDED'],
];

test.serial('extract: bad options are typed errors', async (t) => {
  for (const [label, opts, code] of OPTION_CASES) {
    await rejectsTyped(t, pipe.extract([IMG], { ...base, ...(opts as ExtractOptions) }), code, `option ${label}`);
  }
  await rejectsTyped(t, pipe.extract([IMG], null as never), 'E_INVALID_ARGUMENT', 'options null');
  t.true(OPTION_CASES.length >= 60);
});

test.serial('extract: NaN/Inf/huge values in noise and vae noise are errors', async (t) => {
  for (const v of [NaN, Infinity, -Infinity, 3e38, -3e38, 1e4]) {
    for (const where of ['noise', 'vaeNoise'] as const) {
      const n = noiseOf(v, where);
      await rejectsTyped(t, pipe.extract([IMG], { ...base, noise: n }), 'E_INVALID_ARGUMENT', `${where} holding ${v}`);
      n.noise.dispose();
      n.vaeNoise.dispose();
    }
  }
  const fine = noiseOf(0.5, 'noise');
  const [f] = await pipe.extract([IMG], { ...base, noise: fine });
  t.is(f!.settings.seed, 'noise supplied');
  f!.dispose();
});

test.serial('extract: bad image inputs are typed errors naming the input', async (t) => {
  const dir = await scratch(t);
  const png = await readFile(IMG);
  const jpg = await sharp(png).jpeg().toBuffer();
  const cases: [string, unknown, ErrorCode | ErrorCode[]][] = [
    ['null', null, 'E_INVALID_ARGUMENT'],
    ['undefined', undefined, 'E_INVALID_ARGUMENT'],
    ['number', 42, 'E_INVALID_ARGUMENT'],
    ['object without data', { name: 'x' }, 'E_INVALID_ARGUMENT'],
    ['name not a string', { name: 1, data: png }, 'E_INVALID_ARGUMENT'],
    ['array', [IMG], 'E_INVALID_ARGUMENT'],
    ['empty path', '', 'E_INVALID_ARGUMENT'],
    ['path with NUL', 'a\0b.png', 'E_INVALID_ARGUMENT'],
    ['missing file', join(dir, 'nope.png'), 'E_FILE_NOT_FOUND'],
    ['a folder', dir, 'E_FILE_ACCESS'],
    ['/dev/zero', '/dev/zero', 'E_FILE_ACCESS'],
    ['/dev/null', '/dev/null', 'E_FILE_ACCESS'],
    ['empty buffer', new Uint8Array(0), 'E_IMAGE_DECODE'],
    ['text bytes', new TextEncoder().encode('GIF89a but not really'), 'E_IMAGE_DECODE'],
  ];
  for (const n of [1, 8, 16, 33, 64, 100, 500, 2000, png.length >> 1, png.length - 20]) cases.push([`PNG cut at ${n}`, png.subarray(0, n), 'E_IMAGE_DECODE']);
  for (const n of [2, 10, 100, 600, jpg.length >> 2, jpg.length >> 1]) cases.push([`JPEG cut at ${n}`, jpg.subarray(0, n), 'E_IMAGE_DECODE']);
  const flipped = Buffer.from(png);
  flipped[20] ^= 0xff; // IHDR CRC now wrong
  cases.push(['PNG with a corrupt IHDR', flipped, 'E_IMAGE_DECODE']);
  const fifo = join(dir, 'fifo.png');
  execFileSync('mkfifo', [fifo]);
  cases.push(['FIFO', fifo, 'E_FILE_ACCESS']);
  await symlink('/dev/zero', join(dir, 'zero.png'));
  cases.push(['link to /dev/zero', join(dir, 'zero.png'), 'E_FILE_ACCESS']);
  await symlink(join(dir, 'loop2.png'), join(dir, 'loop1.png'));
  await symlink(join(dir, 'loop1.png'), join(dir, 'loop2.png'));
  cases.push(['symlink loop', join(dir, 'loop1.png'), 'E_FILE_ACCESS']);
  for (const [label, input, code] of cases) {
    const e = await rejectsTyped(t, pipe.extract([input as never], base), code, `image: ${label}`);
    if (e && input instanceof Uint8Array) t.regex(e.message, /images\[0\]/, `${label}: a Buffer input is named (${e.message})`);
  }
  // one bad image among good ones fails the call, names its index
  const e = await rejectsTyped(t, pipe.extract([IMG, png.subarray(0, 50)], base), 'E_IMAGE_DECODE', 'second image broken');
  t.regex(e!.message, /images\[1\]/);
});

test.serial('LoRA scales and files, recipe names', async (t) => {
  const dir = await scratch(t);
  const notLora = join(dir, 'weights.safetensors');
  await writeFile(notLora, (await import('../../lib/io/safetensors.js')).encodeSafetensors({ w: { dtype: 'F32', shape: [1], data: new Float32Array(1) } }));
  const lora = join(import.meta.dirname, '..', 'fixtures', 'lora', 'kohya_lora_attn_only.safetensors');
  for (const scale of [1e308, -1e308, NaN, Infinity, 1001, '1', {}]) {
    await rejectsTyped(t, pipe.setLora([{ file: lora, scale: scale as number }]), 'E_INVALID_ARGUMENT', `LoRA scale ${String(scale)}`);
  }
  await rejectsTyped(t, pipe.setLora([{ file: join(dir, 'missing.safetensors'), scale: 1 }]), 'E_FILE_NOT_FOUND', 'LoRA missing');
  await rejectsTyped(t, pipe.setLora([{ file: notLora, scale: 1 }]), 'E_INVALID_FILE', 'not a LoRA');
  await rejectsTyped(t, pipe.setLora('x' as never), 'E_INVALID_ARGUMENT', 'loras not an array');
  await rejectsTyped(t, pipe.setLora([null as never]), 'E_INVALID_ARGUMENT', 'loras [null]');
  t.is(pipe.lora.describe(), '', 'nothing merged after the failures');
  for (const name of ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'nope', '']) {
    await rejectsTyped(t, extractRecipe(pipe, name, [IMG], { size: SIZE }), 'E_INVALID_ARGUMENT', `recipe ${JSON.stringify(name)}`);
  }
});

test.serial('a queued call whose signal aborts rejects at once; abort errors are AbortError with a cause', async (t) => {
  const slow = pipe.extract([IMG, IMG, IMG], { ...base, size: 128 });
  const ac = new AbortController();
  const queued = pipe.extract([IMG], { ...base, signal: ac.signal });
  const t0 = performance.now();
  ac.abort(new Error('client went away'));
  const e = await t.throwsAsync(queued, { instanceOf: AbortError });
  const waited = performance.now() - t0;
  t.is(e!.name, 'AbortError');
  t.is(e!.code, 'E_ABORTED');
  t.is((e!.cause as Error).message, 'client went away');
  const done = await slow;
  t.is(done.length, 3, 'the running call was not disturbed');
  done.forEach((f) => f.dispose());
  t.log(`queued call rejected ${waited.toFixed(0)} ms after abort`);
  t.true(waited < 1000, `rejected after ${waited} ms, not when its turn came`);
  await rejectsTyped(t, pipe.extract([IMG], { ...base, signal: AbortSignal.abort() }), 'E_ABORTED', 'already aborted');
});

test.serial('LoRA swap waits for a running extraction (goes through the queue)', async (t) => {
  const lora = join(import.meta.dirname, '..', 'fixtures', 'lora', 'kohya_lora_attn_only.safetensors');
  const order: string[] = [];
  const run = pipe.extract([IMG, IMG], { ...base, onProgress: (p) => p.stage === 'done' && order.push('extract-step') }).then((r) => {
    order.push('extract-done');
    return r;
  });
  const swap = pipe.lora.swap([{ file: lora, scale: 1 }]).then(() => order.push('swap-done'));
  const [r] = await Promise.all([run, swap]);
  r.forEach((f) => f.dispose());
  t.is(order.indexOf('swap-done'), order.length - 1, order.join(' '));
  t.true(r.every((f) => f.settings.lora === ''), 'the running extract saw no LoRA');
  await pipe.lora.swap([]);
});

/** A weights folder: micro's files linked, model.json replaced (or removed with null). */
async function weightsWith(dir: string, name: string, modelJson: string | null, extra?: (d: string) => Promise<void>): Promise<string> {
  const d = join(dir, name);
  await mkdir(d);
  for (const f of await readdir(WEIGHTS)) if (f !== 'model.json') await symlink(join(WEIGHTS, f), join(d, f));
  if (modelJson !== null) await writeFile(join(d, 'model.json'), modelJson);
  await extra?.(d);
  return d;
}

test.serial('broken weights folders are typed errors', async (t) => {
  const dir = await scratch(t);
  const good = JSON.parse(await readFile(join(WEIGHTS, 'model.json'), 'utf8')) as Record<string, unknown>;
  const mj = (over: Record<string, unknown>) => JSON.stringify({ ...good, ...over });
  const cases: [string, string | null, ErrorCode | ErrorCode[], ((d: string) => Promise<void>)?][] = [
    ['model.json missing', null, 'E_FILE_NOT_FOUND'],
    ['model.json null', 'null', 'E_INVALID_FILE'],
    ['model.json []', '[]', 'E_INVALID_FILE'],
    ['model.json "x"', '"x"', 'E_INVALID_FILE'],
    ['model.json truncated', mj({}).slice(0, 100), 'E_INVALID_FILE'],
    ['model.json empty', '', 'E_INVALID_FILE'],
    ['scaling_factor 1e308', mj({ scaling_factor: 1e308 }), 'E_INVALID_FILE'],
    ['scaling_factor 0', mj({ scaling_factor: 0 }), 'E_INVALID_FILE'],
    ['scaling_factor -1', mj({ scaling_factor: -1 }), 'E_INVALID_FILE'],
    ['scaling_factor "0.18"', mj({ scaling_factor: '0.18' }), 'E_INVALID_FILE'],
    ['format_version 99', mj({ format_version: 99 }), 'E_INCOMPATIBLE_MODEL'],
    ['layers null', mj({ layers: null }), 'E_INVALID_FILE'],
    ['layers with a bad shape', mj({ layers: { 'unet-out': [-4, 'x'] } }), 'E_INVALID_FILE'],
    ['default_size 7', mj({ default_size: 7 }), 'E_INVALID_FILE'],
    ['default_size 1e9', mj({ default_size: 1e9 }), 'E_INVALID_FILE'],
    ['model.json a folder', null, ['E_FILE_ACCESS', 'E_INVALID_FILE'], (d) => mkdir(join(d, 'model.json'))],
    ['model.json a FIFO', null, ['E_FILE_ACCESS', 'E_INVALID_FILE'], async (d) => void execFileSync('mkfifo', [join(d, 'model.json')])],
  ];
  for (const [i, [label, json, code, extra]] of cases.entries()) {
    const d = await weightsWith(dir, `w${i}`, json, extra);
    await rejectsTyped(t, loadPipeline(d, { device: 'cpu' }), code, `weights: ${label}`);
  }
  // a corrupt unet.pt: a clean load error
  const d = await weightsWith(dir, 'corrupt-unet', mj({}), async (w) => {
    await (await import('node:fs/promises')).unlink(join(w, 'unet.pt'));
    await writeFile(join(w, 'unet.pt'), 'PK\u0003\u0004 not a torch archive');
  });
  await rejectsTyped(t, loadPipeline(d, { device: 'cpu' }), ['E_TORCH', 'E_INVALID_FILE', 'E_INCOMPATIBLE_MODEL'], 'corrupt unet.pt');
  const d2 = await weightsWith(dir, 'no-unet', mj({}), async (w) => (await import('node:fs/promises')).unlink(join(w, 'unet.pt')));
  await rejectsTyped(t, loadPipeline(d2, { device: 'cpu' }), ['E_FILE_NOT_FOUND', 'E_INCOMPATIBLE_MODEL'], 'unet.pt missing');
  await copyFile(join(WEIGHTS, 'model.json'), join(dir, 'copy.json')); // (the good one still parses)
});

test.serial('a disposed pipeline raises E_DISPOSED; the process still serves afterwards', async (t) => {
  const p2 = await loadPipeline(WEIGHTS, { device: 'cpu' });
  p2.dispose();
  await rejectsTyped(t, p2.extract([IMG], base), 'E_DISPOSED', 'extract after dispose');
  await rejectsTyped(t, p2.setLora([]), 'E_DISPOSED', 'setLora after dispose');
  await rejectsTyped(t, p2.encodePrompt('a'), 'E_DISPOSED', 'encodePrompt after dispose');
  // after every case above, the shared pipeline still gives finite features
  const [f] = await pipe.extract([IMG], { ...base, layers: 'practical' });
  for (const [id, ten] of Object.entries(f!.features)) t.true(ten.toFloat32Array().every(Number.isFinite), `${id} finite`);
  t.is(f!.settings.seed, '0');
  f!.dispose();
});
