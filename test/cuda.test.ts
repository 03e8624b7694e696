/**
 * CUDA checks, run where a GPU and a CUDA libtorch are present (skipped on CPU-only machines):
 * the pipeline on CUDA float32 matches the CPU, float16 runs and stays close, tensors come back to JS.
 */
import test from 'ava';
import { join } from 'node:path';
import { cudaAvailable, Tensor } from '../lib/native.js';
import { loadPipeline, type ExtractOptions } from '../lib/pipeline/index.js';

const ROOT = join(import.meta.dirname, '..');
const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const IMGS = ['chelsea', 'rocket'].map((n) => join(ROOT, 'test', 'fixtures', 'images', `${n}.png`));
const cuda = cudaAvailable();
const maybe = cuda ? test.serial : test.serial.skip;

function rel(a: Float32Array, b: Float32Array): number {
  let n = 0;
  let d = 0;
  for (let i = 0; i < a.length; i++) {
    n += (a[i]! - b[i]!) ** 2;
    d += b[i]! ** 2;
  }
  return Math.sqrt(n / d);
}

if (!cuda) test('CUDA tests skipped: no GPU or no CUDA libtorch here', (t) => t.pass());

maybe('CUDA float32 matches the CPU; float16 stays close (legacy + attn, ControlNet multi-step)', async (t) => {
  const o: ExtractOptions = { layers: 'legacy', attention: true, seed: 2, prompt: 'a photo of a cat', control: 'canny', denoiseFrom: 60, batchSize: 2 };
  const cpu = await loadPipeline(WEIGHTS, { device: 'cpu' });
  const g32 = await loadPipeline(WEIGHTS, { device: 'cuda', dtype: 'float32' });
  const g16 = await loadPipeline(WEIGHTS, { device: 'cuda' });
  t.is(g16.dtype, 'float16');
  try {
    const [a, b, c] = await Promise.all([cpu.extract(IMGS, o), g32.extract(IMGS, o), g16.extract(IMGS, o)]);
    for (let i = 0; i < IMGS.length; i++) {
      for (const id of Object.keys(a[i]!.features)) {
        const ref = a[i]!.features[id]!.toFloat32Array();
        const e32 = rel(b[i]!.features[id]!.toFloat32Array(), ref);
        const e16 = rel(c[i]!.features[id]!.toFloat32Array(), ref);
        t.log(`${id}: cuda f32 ${e32.toExponential(2)}, cuda f16 ${e16.toExponential(2)}`);
        t.true(e32 < 1e-4, `${id} f32 ${e32}`);
        t.true(e16 < 5e-2, `${id} f16 ${e16}`);
        t.is(c[i]!.features[id]!.device, 'cpu');
      }
    }
    [...a, ...b, ...c].forEach((r) => r.dispose());
  } finally {
    [cpu, g32, g16].forEach((p) => p.dispose());
  }
});

maybe('a CUDA tensor is handed to JS once, through host memory', async (t) => {
  const x = await Tensor.randn([3, 5], { seed: 4, device: 'cuda' });
  const y = await Tensor.randn([3, 5], { seed: 4 });
  t.deepEqual(Array.from(x.toFloat32Array()), Array.from(y.toFloat32Array()));
  x.dispose();
  y.dispose();
});
