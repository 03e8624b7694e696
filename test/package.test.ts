/**
 * The built package works for both kinds of consumers: CommonJS `require` and ESM `import` of
 * dist/, each extracting features with the bundled model in a fresh process, sharing one set of classes;
 * `demo` runs without Python or a compiler; the committed bundled model is up to date.
 * (The packed tarball installed into a fresh project is checked by .ci/run.)
 */
import test from 'ava';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
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

test('one set of classes: a Tensor or error made through require() is an instance of the imported class', async (t) => {
  const file = join(dir, 'both.mjs');
  await writeFile(file, `
    import * as esm from 'diffusion-features';
    import { createRequire } from 'node:module';
    const cjs = createRequire(import.meta.url)('diffusion-features');
    const names = Object.keys(cjs).filter((k) => typeof cjs[k] === 'function' && /^[A-Z]/.test(k));
    const same = names.filter((k) => esm[k] === cjs[k]);
    const tensor = cjs.Tensor.fromFloat32Array(new Float32Array([1, 2, 3]), [3]);
    let thrown;
    try { cjs.readModelJson('/nonexistent-df-weights'); } catch (e) { thrown = e; }
    console.log(JSON.stringify({
      names: names.length, same: same.length,
      tensor: tensor instanceof esm.Tensor,
      error: thrown instanceof esm.FileNotFoundError && thrown instanceof esm.DiffusionFeaturesError && thrown.code === 'E_FILE_NOT_FOUND',
      made: new esm.InvalidArgumentError('x') instanceof cjs.DiffusionFeaturesError,
    }));
    tensor.dispose();
  `);
  const { stdout } = await run(process.execPath, [file], { cwd: dir });
  const r = JSON.parse(stdout);
  t.true(r.names > 10, `${r.names} classes exported`);
  t.is(r.same, r.names, 'every class is the same object through import and require');
  t.true(r.tensor);
  t.true(r.error);
  t.true(r.made);
});

test('--version prints the package version', async (t) => {
  const pkg = (await import('../package.json', { with: { type: 'json' } })).default;
  const { stdout } = await run(process.execPath, [join(ROOT, 'dist', 'cli.js'), '--version']);
  t.is(stdout.trim(), pkg.version);
});

test('demo needs no Python and no compiler: the bundled model ships exported', async (t) => {
  const bin = join(dir, 'nodebin');
  await mkdir(bin);
  await symlink(process.execPath, join(bin, 'node'));
  const out = join(dir, 'demo-out');
  const env: NodeJS.ProcessEnv = { ...process.env, PATH: bin, DIFFUSION_FEATURES_NO_PYTHON: '1', DIFFUSION_FEATURES_CACHE_DIR: join(dir, 'cache') };
  delete env.PYTHON;
  const { stdout } = await run(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'demo', '--out', out, '--device', 'cpu'], { cwd: dir, env });
  t.regex(stdout, /written to .*astronaut\.safetensors/);
  t.true(existsSync(join(out, 'astronaut.safetensors')));
});

test('models/micro is the reproducible export of models/micro-src (`diffusion-features export`, as npm run models:micro)', async (t) => {
  const model = JSON.parse(readFileSync(join(ROOT, 'models', 'micro', 'model.json'), 'utf8')) as { torch_version: string };
  const py = spawnSync(process.execPath, [join(ROOT, 'scripts', 'python.cjs'), '-c', 'import torch; print(torch.__version__)'], { encoding: 'utf8' });
  if (py.status !== 0) return t.pass('no Python with torch here: not checked');
  if (py.stdout.trim() !== model.torch_version) {
    return t.pass(`models/micro was exported with torch ${model.torch_version}, this Python has ${py.stdout.trim()}: bytes not comparable`);
  }
  const out = join(dir, 'micro-check');
  // `npm run models:micro` through the CLI's `export` (PYTHONHASHSEED=0: TorchScript writes module constants in set order)
  const r = spawnSync(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'export', '--from', 'models/micro-src', '--out', out, '--dtype', 'float16'],
    { cwd: ROOT, encoding: 'utf8', env: { ...process.env, PYTHONHASHSEED: '0' } });
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout + r.stderr, /\[export\] wrote/);
  const committed = readdirSync(join(ROOT, 'models', 'micro')).sort();
  t.deepEqual(readdirSync(out).sort(), committed);
  for (const f of committed) {
    t.true(readFileSync(join(out, f)).equals(readFileSync(join(ROOT, 'models', 'micro', f))), `models/micro/${f} is stale: run npm run models:micro`);
  }
});

test('`diffusion-features export --help` is the exporter\'s own help; bad flags are the exporter\'s errors', async (t) => {
  const help = spawnSync(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'export', '--help'], { encoding: 'utf8' });
  if (help.status !== 0 && /needs a Python with torch/.test(help.stderr)) return t.pass('no Python with torch here');
  t.is(help.status, 0, help.stderr);
  t.regex(help.stdout, /--from DIR\|FILE --out OUT/);
  t.regex(help.stdout, /--components LIST/);
  const bad = spawnSync(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'export', '--from', join(dir, 'nowhere'), '--out', join(dir, 'x')], { encoding: 'utf8' });
  t.not(bad.status, 0);
  t.regex(bad.stderr, /nowhere/);
  t.false(existsSync(join(dir, 'x')));
});
