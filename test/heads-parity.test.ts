// Parity of the native trainer with an eager PyTorch reference (weights/heads/reference.py): the same
// initial weights and the same draws give the same per-step losses and final weights within 1e-5.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { headAddon, templatePath, type RawHead } from '../lib/heads/raw.js';
import { writeSafetensors, SafetensorsFile } from '../lib/io/safetensors.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const { findPython } = createRequire(import.meta.url)('../scripts/python.cjs') as { findPython(): string | null };

/** A deterministic pseudo-random stream (no Math.random: the test is reproducible). */
function lcg(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test('native pixel-classifier training matches the eager PyTorch reference (losses and weights within 1e-5)', async (t) => {
  const python = findPython();
  if (!python) {
    t.log('no Python with torch: parity not checked');
    t.pass();
    return;
  }
  const dir = await mkdtemp(join(tmpdir(), 'df-heads-parity-'));
  const A = headAddon();
  let head: RawHead | undefined;
  try {
    // 3 images, buckets: 2 × 6 channels + 1 × 4 channels, 4×4 features, 16×16 masks, 3 classes
    const I = 3, h = 4, w = 4, D = 16, H = 16, W = 16, C = 3;
    const rnd = lcg(7);
    const feats = Float32Array.from({ length: I * D * h * w }, () => rnd() * 2 - 1); // [I, D, h, w]
    const channelsLast = new Float32Array(I * h * w * D);
    for (let i = 0; i < I; i++) for (let d = 0; d < D; d++) for (let p = 0; p < h * w; p++) channelsLast[(i * h * w + p) * D + d] = feats[(i * D + d) * h * w + p]!;
    const N = 150;
    const pixels = new BigInt64Array(N * 3);
    const labels = new BigInt64Array(N);
    for (let k = 0; k < N; k++) {
      pixels[3 * k] = BigInt(Math.floor(rnd() * I));
      pixels[3 * k + 1] = BigInt(Math.floor(rnd() * H));
      pixels[3 * k + 2] = BigInt(Math.floor(rnd() * W));
      labels[k] = BigInt(Math.floor(rnd() * C));
    }
    head = await A.loadHead(templatePath('pixel_classifier'), 'cpu');
    await head.configure({ buckets: [2, 1], channels: [6, 4], classes: [C], members: [1], out_size: [H, W], assigner_hidden: [16], hidden: [12, 8] }, 3);
    const init = join(dir, 'init.pt');
    await head.save(init);
    const options = { seed: 11, batch: 32, max_epochs: 6, early_stop_after: 3, patience: 5, min_batch: 2, lr: 1e-3 };
    const data = [
      A.RawTensor.fromTypedArray(pixels, [N, 3], 'int64'), A.RawTensor.fromTypedArray(labels, [N], 'int64'),
      A.RawTensor.fromTypedArray(channelsLast, [I, h, w, D], 'float32'),
    ];
    const run = head.fit(data, {
      items: N, optimizer: 'adam', lr: options.lr, batchSize: options.batch, maxEpochs: options.max_epochs,
      earlyStopAfterEpoch: options.early_stop_after, patience: options.patience, minBatch: options.min_batch, seed: options.seed,
    });
    const r = await run.promise;
    for (const d of data) d.dispose();
    const trained = join(dir, 'trained.pt');
    await head.save(trained);

    await writeSafetensors(join(dir, 'data.safetensors'), {
      features: { dtype: 'F32', shape: [I, D, h, w], data: feats },
      pixels: { dtype: 'I64', shape: [N, 3], data: pixels },
      labels: { dtype: 'I64', shape: [N], data: labels },
    });
    const py = spawnSync(python, ['weights/heads/reference.py', '--init', init, '--data', join(dir, 'data.safetensors'),
      '--options', JSON.stringify(options), '--out', join(dir, 'ref.safetensors')], { cwd: root, encoding: 'utf8', env: { ...process.env, OMP_NUM_THREADS: '1' } });
    t.is(py.status, 0, py.stderr);
    // the native weights as Python reads them from the saved head
    const dump = spawnSync(python, ['-c', [
      'import sys, torch', `sys.path.insert(0, ${JSON.stringify(root)})`, 'from weights import st',
      `m = torch.jit.load(${JSON.stringify(trained)})`,
      'st.save(sys.argv[1], {k: v.detach() for k, v in list(m.named_parameters()) + list(m.named_buffers())})',
    ].join('\n'), join(dir, 'native.safetensors')], { cwd: root, encoding: 'utf8' });
    t.is(dump.status, 0, dump.stderr);

    const ref = await SafetensorsFile.open(join(dir, 'ref.safetensors'));
    const nat = await SafetensorsFile.open(join(dir, 'native.safetensors'));
    const refLosses = ref.float32('losses');
    t.true(r.steps > 20, `${r.steps} steps`);
    t.is(refLosses.length, r.losses.length, 'same number of steps (same early stop)');
    let maxLoss = 0;
    r.losses.forEach((v, i) => (maxLoss = Math.max(maxLoss, Math.abs(v - refLosses[i]!))));
    t.true(maxLoss < 1e-5, `max loss difference ${maxLoss}`);
    t.true(r.losses[r.losses.length - 1]! < r.losses[0]!, 'the loss went down');
    let maxW = 0;
    let names = 0;
    for (const name of ref.names()) {
      // a_b2 (the assigners' output bias) is added to every bucket's logit of a channel alike, so the
      // softmax over buckets cancels it: its true gradient is exactly 0 and Adam turns the rounding noise
      // of either side into steps of ~lr. It affects no output (weights/tests/test_heads.py checks that).
      if (name === 'losses' || name === 'a_b2') continue;
      const a = ref.float32(name);
      const b = nat.float32(name);
      t.is(a.length, b.length, name);
      let m = 0;
      a.forEach((v, i) => (m = Math.max(m, Math.abs(v - b[i]!))));
      if (m >= 1e-5) t.log(`${name}: max difference ${m}`);
      maxW = Math.max(maxW, m);
      names++;
    }
    t.is(names, 21);
    t.true(maxW < 1e-5, `max weight difference ${maxW}`);
    t.log(`${r.steps} steps, max |Δloss| ${maxLoss.toExponential(2)}, max |Δw| ${maxW.toExponential(2)}`);
  } finally {
    head?.dispose();
    await rm(dir, { recursive: true, force: true });
  }
});
