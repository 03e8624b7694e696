import test from 'ava';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import {
  attentionTokenMaps, contentDiff, gateScoreFromDiffs, parsePairAnnotation, pck, readFeatureFile, resizeBilinear, resizeNearest,
  roundHalfEven, selectFeature, type FeatureArray,
} from '../lib/tools/index.js';
import { encodeSafetensors } from '../lib/io/safetensors.js';
import { writeNpy } from '../lib/io/npy.js';

const root = fileURLToPath(new URL('..', import.meta.url));

test('resizeNearest replicates pixels like PIL NEAREST', (t) => {
  const src = Uint8Array.from([1, 2, 3, 4]); // 2×2 grey
  t.deepEqual([...resizeNearest(src, 2, 2, 1, 4, 4)], [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]);
  const rgb = Uint8Array.from([10, 20, 30, 40, 50, 60]); // 2×1 RGB
  t.deepEqual([...resizeNearest(rgb, 2, 1, 3, 4, 2)].slice(0, 12), [10, 20, 30, 10, 20, 30, 40, 50, 60, 40, 50, 60]);
});

test('resizeBilinear matches torch interpolate(bilinear, align_corners=False)', (t) => {
  const x: FeatureArray = { data: Float32Array.from([0, 1, 4, 2, 7, 3]), shape: [1, 2, 3] };
  const up = resizeBilinear(x, 3, 5);
  const ref = [0.0, 0.40000003576278687, 1.000000238418579, 2.8000001907348633, 4.0, 1.0, 2.200000047683716, 4.0, 3.700000047683716, 3.5, 2.0, 4.0, 6.999999523162842, 4.59999942779541, 3.0];
  t.deepEqual(up.shape, [1, 3, 5]);
  up.data.forEach((v, i) => t.true(Math.abs(v - ref[i]!) < 1e-5, `${i}: ${v} vs ${ref[i]}`));
  const down = resizeBilinear(x, 1, 2);
  t.deepEqual([...down.data], [1.75, 3.625]);
});

test('roundHalfEven is numpy round', (t) => {
  t.deepEqual([0.5, 1.5, 2.5, 3.5, 2.4, 2.6, 511, 0].map(roundHalfEven), [0, 2, 2, 4, 2, 3, 511, 0]);
});

test('pck counts d <= alpha·max(w, h)', (t) => {
  const r = pck([[0, 0], [10, 0], [0, 31]], [[0, 0], [0, 0], [0, 0]], 0.1, [300, 100]);
  t.deepEqual(r.correct, [true, true, false]);
  t.deepEqual(r.distances, [0, 10, 31]);
  t.throws(() => pck([[0, 0]], [], 0.1, [1, 1]), { message: /1 predictions for 0/ });
});

test('pair annotations: Diffusion-Hyperfeatures/GDF and raw SPair-71k formats', (t) => {
  const dhf = parsePairAnnotation({
    source_path: 'aeroplane/a.jpg', target_path: 'aeroplane/b.jpg', category: 'aeroplane',
    source_points: [[1, 2], [3, 4]], target_points: [[5, 6], [7, 8]], target_bounding_box: [0, 0, 100, 50],
  });
  t.is(dhf.source, 'aeroplane/a.jpg');
  t.deepEqual(dhf.targetPoints, [[5, 6], [7, 8]]);
  t.deepEqual(dhf.targetBox, [0, 0, 100, 50]);
  t.is(dhf.sourceSize, undefined);
  const spair = parsePairAnnotation({
    src_imname: '2008_1.jpg', trg_imname: '2008_2.jpg', category: 'cat', src_imsize: [500, 375, 3], trg_imsize: [400, 300, 3],
    src_kps: [[10, 20]], trg_kps: [[30, 40]], trg_bndbox: [1, 2, 3, 4],
  });
  t.is(spair.source, 'cat/2008_1.jpg');
  t.deepEqual(spair.sourceSize, [500, 375]);
  t.deepEqual(spair.targetSize, [400, 300]);
  t.throws(() => parsePairAnnotation({ source_path: 'a', target_path: 'b', source_points: [[1, 2]], target_points: [] }), { message: /1 source but 0 target/ });
  t.throws(() => parsePairAnnotation({ source_points: [], target_points: [] }), { message: /source_path/ });
});

test('selectFeature: a layer, packaged, or all layers resized and concatenated', (t) => {
  const a: FeatureArray = { data: new Float32Array(2 * 2 * 2).fill(1), shape: [2, 2, 2] };
  const b: FeatureArray = { data: new Float32Array(3 * 4 * 4).fill(2), shape: [3, 4, 4] };
  const map: FeatureArray = { data: new Float32Array(8), shape: [2, 2, 2] };
  const m = new Map([['x', a], ['y', b], ['mid-vit-block0-cross-map', map]]);
  const all = selectFeature(m, undefined, 'f');
  t.deepEqual(all.shape, [5, 4, 4]);
  t.true(all.data.subarray(0, 32).every((v) => v === 1));
  t.true(all.data.subarray(32).every((v) => v === 2));
  t.is(selectFeature(m, 'x', 'f'), a);
  t.throws(() => selectFeature(m, 'z', 'f'), { message: /no tensor 'z'/ });
  m.set('packaged', b);
  t.is(selectFeature(m, undefined, 'f'), b);
});

test('GATE diff/score arithmetic (§7.4)', (t) => {
  t.is(contentDiff(Float32Array.from([1, 2, 3]), Float32Array.from([1, 0, 4])), 3);
  t.is(gateScoreFromDiffs(4, 1), 0.75);
  t.is(gateScoreFromDiffs(4, 4), 0);
  t.is(gateScoreFromDiffs(4, 0), 1);
});

test('attention token maps: 255·a/max(a), resized to 256', (t) => {
  const f: FeatureArray = { data: Float32Array.from([0, 0.5, 0.25, 1, 0, 0, 0, 0]), shape: [2, 2, 2] };
  const maps = attentionTokenMaps(f, 0);
  t.deepEqual([...maps[0]!.data], [0, 127, 63, 255]);
  t.deepEqual([...maps[1]!.data], [0, 0, 0, 0]);
  const big = attentionTokenMaps(f);
  t.is(big[0]!.width, 256);
  t.is(big[0]!.data.length, 256 * 256);
});

test('readFeatureFile reads extract safetensors and GDF .npy files', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tools-'));
  try {
    const st = join(dir, 'img.safetensors');
    await writeFile(st, encodeSafetensors({ a: { dtype: 'F32', shape: [1, 2, 2], data: Float32Array.from([1, 2, 3, 4]) } }, { format: 'diffusion-features' }));
    const m = await readFeatureFile(st);
    t.deepEqual([...m.keys()], ['a']);
    t.deepEqual([...m.get('a')!.data], [1, 2, 3, 4]);
    const npy = join(dir, 'img2.npy');
    await writeNpy(npy, Float32Array.from([1, 2, 3, 4]), [1, 2, 2], 'float16');
    const n = await readFeatureFile(npy);
    t.deepEqual(n.get('img2')!.shape, [1, 2, 2]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// ------------------------------------------------------------------------------------------------
// native-backed (ops.pt through the addon)

const nativeReady = existsSync(join(root, 'lib', 'native.ts')) && existsSync(join(root, 'models', 'ops.pt'));
const nativeTest = nativeReady ? test.serial : test.skip;

function positional(C: number, H: number, W: number, seed = 1): Float32Array {
  // smooth, position-unique features: sines of different frequencies along y and x
  const d = new Float32Array(C * H * W);
  for (let c = 0; c < C; c++) {
    const fy = ((c % 4) + 1) * 0.37 * seed;
    const fx = (Math.floor(c / 4) + 1) * 0.29;
    for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) d[(c * H + y) * W + x] = Math.sin(fy * y + c) + Math.cos(fx * x + 2 * c);
  }
  return d;
}

nativeTest('visualizeFile: one PCA panel per tensor, attention token maps, short side 512', async (t) => {
  const { visualizeFile } = await import('../lib/tools/index.js');
  const dir = await mkdtemp(join(tmpdir(), 'viz-'));
  try {
    const file = join(dir, 'f.safetensors');
    const attn = new Float32Array(154 * 8 * 8).fill(1 / 77);
    await writeFile(file, encodeSafetensors({
      'up-level0-upsampler-out': { dtype: 'F32', shape: [8, 16, 16], data: positional(8, 16, 16) },
      'up-level2-upsampler-out': { dtype: 'F32', shape: [4, 32, 32], data: positional(4, 32, 32) },
      attn: { dtype: 'F32', shape: [154, 8, 8], data: attn },
      'mid-vit-block0-cross-map': { dtype: 'F32', shape: [8, 4, 77], data: new Float32Array(8 * 4 * 77) },
    }));
    const out = join(dir, 'viz.png');
    const r = await visualizeFile(file, out, { panelsDir: join(dir, 'panels') });
    t.deepEqual(r.panels.slice(0, 4), ['up-level0-upsampler-out', 'up-level2-upsampler-out', 'attn[0:77]', 'attn[77:154]']);
    t.is(r.panels.length, 4 + 154);
    t.deepEqual(r.skipped, ['mid-vit-block0-cross-map']);
    const meta = await sharp(out).metadata();
    t.is(meta.width, r.width);
    t.is(meta.height, r.height);
    t.is(meta.channels, 3);
    t.is(r.width, Math.max(4 * 512, 11 * 256));
    t.is(r.height, 512 + 2 * 7 * 256);
    const panel = await sharp(join(dir, 'panels', 'up-level0-upsampler-out.png')).raw().toBuffer({ resolveWithObject: true });
    t.is(panel.info.width, 512);
    // the grid's first cell is that panel
    const grid = await sharp(out).raw().toBuffer({ resolveWithObject: true });
    let same = true;
    for (let y = 0; y < 512 && same; y++) {
      const a = grid.data.subarray(y * r.width * 3, y * r.width * 3 + 512 * 3);
      const b = panel.data.subarray(y * 512 * 3, (y + 1) * 512 * 3);
      same = Buffer.compare(a, b) === 0;
    }
    t.true(same);
    // PCA min–max: every component reaches 0 and 255
    for (let c = 0; c < 3; c++) {
      let lo = 255;
      let hi = 0;
      for (let i = c; i < panel.data.length; i += 3) {
        lo = Math.min(lo, panel.data[i]!);
        hi = Math.max(hi, panel.data[i]!);
      }
      t.is(lo, 0);
      t.is(hi, 255);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

nativeTest('gateScoreFiles: the reference scores 1, the anchor 0', async (t) => {
  const { gateScoreFiles, laplacianMap } = await import('../lib/tools/index.js');
  const dir = await mkdtemp(join(tmpdir(), 'gate-'));
  try {
    const ref = positional(4, 8, 8);
    const anchor = ref.map((v, i) => v + Math.sin(i * 1.7));
    const half = ref.map((v, i) => v + 0.5 * Math.sin(i * 1.7));
    const wr = async (name: string, d: Float32Array): Promise<string> => {
      const p = join(dir, name);
      await writeFile(p, encodeSafetensors({ 'up-level1-upsampler-out': { dtype: 'F32', shape: [4, 8, 8], data: d } }));
      return p;
    };
    const rows = await gateScoreFiles(await wr('ref.safetensors', ref), await wr('anchor.safetensors', anchor), [
      await wr('ref2.safetensors', ref), await wr('anchor2.safetensors', anchor), await wr('half.safetensors', half),
    ]);
    t.is(rows.length, 3);
    t.is(rows[0]!.score, 1);
    t.is(rows[1]!.score, 0);
    t.true(rows[2]!.score! > 0 && rows[2]!.score! < 1);
    // m(F) of a linear ramp is zero inside and at replicate-padded borders only the edge terms remain
    const ramp = new Float32Array(16).map((_, i) => i % 4);
    const m = await laplacianMap({ data: ramp, shape: [1, 4, 4] });
    t.deepEqual([...m.data], [1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

nativeTest('correspondenceFiles: identical features give PCK 1; sizes from the JSON or the images', async (t) => {
  const { correspondenceFiles } = await import('../lib/tools/index.js');
  const dir = await mkdtemp(join(tmpdir(), 'corr-'));
  try {
    const feats = join(dir, 'features');
    const imgs = join(dir, 'images');
    const { mkdir } = await import('node:fs/promises');
    await mkdir(join(feats, 'cat'), { recursive: true });
    await mkdir(join(imgs, 'cat'), { recursive: true });
    const f = positional(16, 16, 16);
    for (const n of ['a', 'b']) {
      await writeFile(join(feats, 'cat', `${n}.safetensors`), encodeSafetensors({ packaged: { dtype: 'F32', shape: [16, 16, 16], data: f } }));
      await sharp({ create: { width: 400, height: 300, channels: 3, background: '#808080' } }).png().toFile(join(imgs, 'cat', `${n}.png`));
    }
    const kps = [[50, 40], [200, 150], [390, 290], [10, 250]];
    const pairs = join(dir, 'pairs.json');
    await writeFile(pairs, JSON.stringify([
      { source_path: 'cat/a.png', target_path: 'cat/b.png', category: 'cat', source_points: kps, target_points: kps, target_bounding_box: [0, 0, 100, 100] },
    ]));
    const r = await correspondenceFiles(feats, [pairs], { imagesDir: imgs });
    t.is(r.n_keypoints, 4);
    t.is(r.n_pairs, 1);
    t.is(r.pck_img, 1);
    t.true(r.pck_bbox! >= 0.5);
    const spair = join(dir, 'spair.json');
    await writeFile(spair, JSON.stringify({ src_imname: 'a.png', trg_imname: 'b.png', category: 'cat', src_imsize: [400, 300, 3], trg_imsize: [400, 300, 3], src_kps: kps, trg_kps: kps, trg_bndbox: [0, 0, 400, 300] }));
    const r2 = await correspondenceFiles(feats, [spair]);
    t.is(r2.pck_img, 1);
    t.is(r2.pck_bbox, 1);
    await t.throwsAsync(correspondenceFiles(join(dir, 'nope'), [pairs]), { message: /features folder not found/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

nativeTest('cannyImage matches OpenCV on a reference photo', async (t) => {
  const { cannyImage } = await import('../lib/control.js');
  const img = join(root, 'test', 'fixtures', 'images', 'astronaut.png');
  const r = await cannyImage(img, 128);
  t.is(r.width, 128);
  t.is(r.mask.length, 128 * 128);
  t.true(r.mask.every((v) => v === 0 || v === 255));
  t.true(r.mask.some((v) => v === 255));
});
