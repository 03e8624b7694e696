/**
 * The built package works for both kinds of consumers: CommonJS `require` and ESM `import` of
 * dist/, each extracting features with the bundled model in a fresh process.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile, symlink, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

const body = (weights: string, img: string) => `
  const pipe = await loadPipeline(${JSON.stringify(weights)}, { device: 'cpu' });
  const [r] = await pipe.extract([${JSON.stringify(img)}], { layers: 'legacy', seed: 1 });
  const f = r.features['up-level1-upsampler-out'];
  const out = { shape: f.shape, n: f.toFloat32Array().length, isTensor: f instanceof Tensor, cuda: typeof cudaAvailable() };
  r.dispose(); pipe.dispose();
  console.log(JSON.stringify(out));
`;

let dir: string;
test.before(async () => {
  // a consumer project with diffusion-features in its node_modules
  dir = await mkdtemp(join(tmpdir(), 'df-consumer-'));
  await mkdir(join(dir, 'node_modules'));
  await symlink(ROOT, join(dir, 'node_modules', 'diffusion-features'), 'dir');
});
test.after.always(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

const weights = join(ROOT, 'models', 'micro');
const img = join(ROOT, 'test', 'fixtures', 'images', 'rocket.png');
const expected = { shape: [32, 8, 8], n: 2048, isTensor: true, cuda: 'boolean' };

test('CommonJS consumer: require("diffusion-features")', async (t) => {
  const file = join(dir, 'consumer.cjs');
  await writeFile(file, `const { loadPipeline, Tensor, cudaAvailable } = require('diffusion-features');\n(async () => {${body(weights, img)}})();\n`);
  const { stdout } = await run(process.execPath, [file], { cwd: dir });
  t.deepEqual(JSON.parse(stdout), expected);
});

test('ESM consumer: import from "diffusion-features"', async (t) => {
  const file = join(dir, 'consumer.mjs');
  await writeFile(file, `import { loadPipeline, Tensor, cudaAvailable } from 'diffusion-features';\n${body(weights, img)}\n`);
  const { stdout } = await run(process.execPath, [file], { cwd: dir });
  t.deepEqual(JSON.parse(stdout), expected);
});

test('the package exports its typings for both', async (t) => {
  const pkg = (await import('../package.json', { with: { type: 'json' } })).default;
  t.is(pkg.exports['.'].import.types, './dist/index.d.ts');
  t.is(pkg.exports['.'].require.types, './dist/index.d.cts');
});
