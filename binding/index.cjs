'use strict';
/**
 * Loads the diffusion-features native addon (a Node-API module over libtorch) and exposes its raw surface.
 * The typed, user-facing API is lib/native.ts; this file only finds, checks and loads the binary.
 *
 * Candidates, in order (the first that loads wins):
 *   1. $DIFFUSION_FEATURES_BINARY (an explicit .node file)
 *   2. prebuilds/<platform>-<arch>/diffusion-features.napi.cuda.node, when an NVIDIA GPU is present
 *      (needs a CUDA libtorch, see scripts/prebuild.cjs)
 *   3. prebuilds/<platform>-<arch>/diffusion-features.napi.node (prebuildify naming, napi 8)
 *   4. the local build found by node-gyp-build (build/Release/diffusion_features.node)
 * Each candidate is first loaded in a child process (once per process; the verdict is cached), so a
 * binary that cannot load (missing libtorch, wrong libtorch version, a crash in a static initializer)
 * yields a readable error naming the missing library instead of killing this process.
 * Set DIFFUSION_FEATURES_SKIP_LOAD_CHECK=1 to skip the child-process check.
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const verdicts = new Map(); // file -> { ok: true } | { ok: false, reason }
let addon = null;
let loadError = null;
let loadedFrom = null;

function hasNvidiaGpu() {
  return fs.existsSync('/dev/nvidiactl') || fs.existsSync('/proc/driver/nvidia/version');
}

function candidates() {
  const list = [];
  if (process.env.DIFFUSION_FEATURES_BINARY) list.push(path.resolve(process.env.DIFFUSION_FEATURES_BINARY));
  const dir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  if (hasNvidiaGpu()) list.push(path.join(dir, 'diffusion-features.napi.cuda.node'));
  list.push(path.join(dir, 'diffusion-features.napi.node'));
  try {
    list.push(require('node-gyp-build').path(root));
  } catch {
    list.push(path.join(root, 'build', 'Release', 'diffusion_features.node'));
  }
  return [...new Set(list)].filter((f) => fs.existsSync(f));
}

/** Turns a dlopen / crash report into a sentence naming the problem. */
function explain(file, stderr, signal) {
  const text = String(stderr || '');
  const missing = /(lib[\w.+-]+\.so[\w.]*): cannot open shared object file/.exec(text);
  if (missing) {
    return `missing shared library ${missing[1]} (needed by ${file}). Install libtorch (Debian/Ubuntu: ` +
      `apt-get install libtorch-dev), or put the libtorch it was built against on LD_LIBRARY_PATH, or rebuild ` +
      `from source with \`npm rebuild diffusion-features\` (LIBTORCH=/path/to/libtorch for a custom one).`;
  }
  const sym = /undefined symbol: (\S+)/.exec(text);
  if (sym) {
    return `${file} was built against a different libtorch (undefined symbol ${sym[1]}); rebuild with ` +
      '`npm rebuild diffusion-features`.';
  }
  if (signal) return `loading ${file} crashed the test process (signal ${signal}). ${text.trim().split('\n').slice(-3).join(' ')}`;
  const line = text.trim().split('\n').filter((l) => /Error|error/.test(l)).pop() || text.trim().split('\n').pop() || 'unknown error';
  return `${file} cannot be loaded: ${line}`;
}

function testLoad(file) {
  if (verdicts.has(file)) return verdicts.get(file);
  let verdict;
  if (process.env.DIFFUSION_FEATURES_SKIP_LOAD_CHECK === '1') {
    verdict = { ok: true };
  } else {
    const code = `const m = require(${JSON.stringify(file)}); if (typeof m.libtorchVersion !== 'function') ` +
      `{ console.error('Error: not the diffusion-features addon'); process.exit(3); }`;
    const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8', timeout: 120000, env: process.env });
    verdict = r.status === 0 ? { ok: true } : { ok: false, reason: explain(file, r.stderr || (r.error && r.error.message), r.signal) };
  }
  verdicts.set(file, verdict);
  return verdict;
}

class NativeLoadError extends Error {
  constructor(message, reasons) {
    super(message);
    this.name = 'NativeLoadError';
    this.code = 'E_NATIVE_LOAD';
    this.reasons = reasons;
  }
}

function configureThreads(m) {
  if (process.env.OMP_NUM_THREADS) return;
  const n = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  if (n > 0) m.setNumThreads(n);
}

/** Loads (once) and returns the raw addon; throws a NativeLoadError explaining why when it cannot. */
function load() {
  if (addon) return addon;
  if (loadError) throw loadError;
  const files = candidates();
  const reasons = [];
  for (const file of files) {
    const v = testLoad(file);
    if (!v.ok) {
      reasons.push(v.reason);
      continue;
    }
    try {
      // libgomp reads OMP_WAIT_POLICY once, when libtorch is loaded. Its default (threads spin after each
      // parallel region) fights OpenBLAS's own threads for the cores: passive waiting measured ~2x faster
      // on BLAS-bound modules and ~5-10% on the SD1.5 UNet (2-core CPU). A value set by the user wins.
      if (process.env.OMP_WAIT_POLICY === undefined) process.env.OMP_WAIT_POLICY = 'PASSIVE';
      const m = require(file);
      configureThreads(m);
      addon = m;
      loadedFrom = file;
      return addon;
    } catch (err) {
      reasons.push(explain(file, err && err.message));
    }
  }
  const msg = files.length === 0
    ? 'diffusion-features: the native addon is not built. Run `npm rebuild diffusion-features` (or ' +
      '`npm run build:native` in a checkout); it needs libtorch (Debian/Ubuntu: apt-get install libtorch-dev, ' +
      'or LIBTORCH=/path/to/libtorch, Torch_DIR=..., or a Python with torch).'
    : `diffusion-features: no usable native addon:\n  - ${reasons.join('\n  - ')}`;
  loadError = new NativeLoadError(msg, reasons);
  throw loadError;
}

/** Path of the loaded binary (null before load()). */
function binaryPath() {
  return loadedFrom;
}

module.exports = { load, binaryPath, candidates, testLoad, NativeLoadError };
