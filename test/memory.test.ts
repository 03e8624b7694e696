/**
 * Long runs keep memory flat: many extractions (disposed deterministically) and many without
 * dispose (left to the finalizers) must not grow the resident set.
 */
import test from 'ava';
import { join } from 'node:path';
import { loadPipeline } from '../lib/pipeline/index.js';

const ROOT = join(import.meta.dirname, '..');
const WEIGHTS = process.env.DF_TEST_WEIGHTS ?? join(ROOT, 'models', 'micro');
const IMG = join(ROOT, 'test', 'fixtures', 'images', 'coffee.png');

const rssMb = (): number => process.memoryUsage().rss / 2 ** 20;

/**
 * Runs `once` n times after a warm-up, sampling RSS every 10 calls, and returns the growth between the
 * peak of the first third of the samples and the peak of the last third: allocator caches make single
 * readings noisy, a leak makes the peaks climb.
 */
async function rssTrend(once: (i: number) => Promise<void>, warm: number, n: number, every?: () => Promise<void>): Promise<number> {
  for (let i = 0; i < warm; i++) await once(i);
  const samples: number[] = [];
  for (let i = 0; i < n; i++) {
    await once(i);
    if (i % 10 === 9) {
      await every?.();
      samples.push(rssMb());
    }
  }
  const k = Math.max(1, Math.floor(samples.length / 3));
  return Math.max(...samples.slice(-k)) - Math.max(...samples.slice(0, k));
}
const gc = (): void => (globalThis as { gc?: () => void }).gc?.();

test.serial('180 extractions with dispose(): RSS stays flat', async (t) => {
  t.timeout(10 * 60_000);
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  try {
    const once = async (i: number) => {
      const [r] = await pipe.extract([IMG], { layers: 'practical', attention: true, seed: i, packaged: true });
      r!.features.attn!.toFloat32Array();
      r!.dispose();
    };
    // collect JS garbage at each sample so the reading is native memory, not a lazy V8 heap
    const growth = await rssTrend(once, 40, 180, async () => {
      gc();
      await new Promise((r) => setTimeout(r, 10));
    });
    t.log(`RSS peak growth over 180 extractions: ${growth.toFixed(1)} MB`);
    t.true(growth < 30, `RSS grew by ${growth.toFixed(1)} MB`);
  } finally {
    pipe.dispose();
  }
});

test.serial('results that are never disposed are released by the finalizers', async (t) => {
  t.timeout(10 * 60_000);
  const pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  try {
    // large features (full preset incl. self maps) so a leak would show quickly
    const once = async (i: number) => {
      const [r] = await pipe.extract([IMG], { layers: 'full', seed: i });
      r!.features['up-level3-repeat0-vit-block0-self-map']!.toFloat32Array();
    };
    const growth = await rssTrend(once, 10, 90, async () => {
      gc();
      await new Promise((r) => setTimeout(r, 10));
    });
    t.log(`RSS peak growth over 90 undisposed extractions: ${growth.toFixed(1)} MB`);
    t.true(growth < 60, `RSS grew by ${growth.toFixed(1)} MB`);
  } finally {
    pipe.dispose();
  }
});
