'use strict';
/**
 * Loads the diffusion-features native addon (a Node-API module over libtorch) and exposes its raw surface.
 * The typed, user-facing API is lib/native.ts; this file only finds, checks and loads the binary.
 *
 * 1. libtorch is found at run time (binding/libtorch.cjs: LIBTORCH, Torch_DIR, $PYTHON, python3 on PATH,
 *    /usr/bin/python3, the system), with its version and variant (cpu, cu130…).
 * 2. Candidates, in order (the first that loads wins):
 *      a. $DIFFUSION_FEATURES_BINARY (an explicit .node file, e.g. a build of your own)
 *      b. prebuilds/<platform>-<arch>/diffusion-features.torch-<major.minor>.<variant>.napi.node matching
 *         the libtorch found (for a CUDA libtorch, then a build for another CUDA version, then the CPU
 *         prebuild of the same libtorch version)
 *      c. the local build, build/Release/diffusion_features.node (`npm rebuild`, `npm run build:native`)
 *      d. matching prebuilds made from other sources than this package's src/ (a checkout whose C++ changed
 *         since `npm run prebuilds`): only when there is no local build
 *    Prebuilds for another libtorch are not tried; the error lists them.
 * 3. Each candidate is first loaded in a child process, so a binary that cannot load (missing or mismatched
 *    libtorch, a crash in a static initializer) gives a readable reason instead of killing this process. The
 *    verdict is cached on disk (binding/libtorch.cjs cacheDir()), keyed by the binary's and the libtorch's
 *    identity (path, size, mtime) and Node's major version, so the ~0.5 s check runs once, not on every start.
 *    DIFFUSION_FEATURES_SKIP_LOAD_CHECK=1 skips it.
 * 4. libtorch is loaded from the folder found ([torch_global_deps (RTLD_GLOBAL),] c10, torch_cpu, [c10_cuda, torch_cuda], torch; RTLD_LOCAL,
 *    RTLD_NODELETE), then the addon: its NEEDED entries resolve to the libraries already loaded, so no binary
 *    needs an RPATH or LD_LIBRARY_PATH.
 * Nothing found: a NativeLoadError (code E_NATIVE_LOAD) listing everything tried and how to fix it.
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const { spawnSync } = require('node:child_process');
const libtorch = require('./libtorch.cjs');
const help = require('./help.cjs');

const root = path.join(__dirname, '..');
const platformDir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
const PREBUILD_RE = /^diffusion-features\.torch-(\d+\.\d+)\.(cpu|cu\d+|cuda)\.napi\.node$/;
const LOCAL_BUILD = path.join(root, 'build', 'Release', 'diffusion_features.node');
const VERDICT_FORMAT = 2; // 2: Bun's message for a non-addon library is accepted by preload()

const verdicts = new Map(); // identity key -> verdict (same object on repeated calls)
let addon = null;
let loadError = null;
let loaded = null; // { file, kind, libtorch, ms }

class NativeLoadError extends Error {
  constructor(message, reasons) {
    super(message);
    this.name = 'NativeLoadError';
    this.code = 'E_NATIVE_LOAD';
    this.reasons = reasons;
  }
}

function variantLabel(variant) {
  return variant === 'cpu' ? 'CPU' : variant === 'cuda' ? 'CUDA' : `CUDA ${variant.slice(2, -1)}.${variant.slice(-1)}`;
}

/** sha256 over src/** and CMakeLists.txt (what a binary is made from), or null when src/ is absent. */
function sourceHash(dir = root) {
  const files = [];
  const walk = (d) => {
    let entries;
    try {
      entries = fs.readdirSync(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.(cc|cpp|h|hpp)$/.test(e.name)) files.push(p);
    }
  };
  walk(path.join(dir, 'src'));
  if (files.length === 0) return null;
  files.push(path.join(dir, 'CMakeLists.txt'));
  files.sort();
  const h = crypto.createHash('sha256');
  for (const f of files) {
    h.update(path.relative(dir, f).split(path.sep).join('/'));
    h.update('\0');
    try {
      h.update(fs.readFileSync(f));
    } catch { /* absent CMakeLists.txt */ }
    h.update('\0');
  }
  return h.digest('hex');
}

/** The prebuilt binaries of this platform: [{ file, torch ('1.13'), variant, sourceHash|null }]. */
function prebuilds() {
  let names = [];
  try {
    names = fs.readdirSync(platformDir);
  } catch {
    return [];
  }
  const list = [];
  for (const name of names.sort()) {
    const m = PREBUILD_RE.exec(name);
    if (!m) continue;
    const file = path.join(platformDir, name);
    const meta = libtorch.readJson(`${file}.json`) || {};
    list.push({ file, torch: m[1], variant: m[2], sourceHash: meta.sourceHash || null, meta });
  }
  return list;
}

/**
 * A local build (or $DIFFUSION_FEATURES_BINARY) as a candidate. CMake writes `<name>.libtorch.json` beside
 * it (the libtorch it was built against): with no libtorch found, that one is loaded; with another version
 * or variant found, the candidate is skipped with the reason (two libtorch builds cannot share a process).
 */
function localCandidate(file, kind, why, found) {
  const side = libtorch.readJson(file.replace(/\.node$/, '.libtorch.json'));
  if (!side || !side.libDir) return { file, kind, libtorch: found, why };
  if (!found) return { file, kind, libtorch: libtorch.describe(side.libDir, `the libtorch ${path.basename(file)} was built against`, null), why };
  const short = (/^(\d+\.\d+)/.exec(side.torchVersion || '') || [])[1];
  if (short === found.short && !!side.cuda === (found.variant !== 'cpu')) return { file, kind, libtorch: found, why };
  return {
    file, kind, libtorch: null, why,
    skip: `built for libtorch ${side.torchVersion} ${side.cuda ? 'CUDA' : 'CPU'} (${side.libDir}), found libtorch ${found.version} ` +
      `${variantLabel(found.variant)}: rebuild it (\`npm rebuild diffusion-features\`), or make that libtorch the one found`,
  };
}

/**
 * The candidates to try, in order: [{ file, kind, libtorch, why }], plus `skipped` (prebuilds for another
 * libtorch, as sentences).
 */
function plan(found = libtorch.locate().found) {
  const list = [];
  const skipped = [];
  if (process.env.DIFFUSION_FEATURES_BINARY) {
    const file = path.resolve(process.env.DIFFUSION_FEATURES_BINARY);
    list.push(localCandidate(file, 'env', 'DIFFUSION_FEATURES_BINARY', found));
  }
  const hasLocal = fs.existsSync(LOCAL_BUILD);
  let current;
  const stale = [];
  const pre = prebuilds();
  // same libtorch version: the exact variant, then (CUDA libtorch) a build for another CUDA version (the addon
  // calls no CUDA API itself, so it links the same libtorch symbols), then the CPU build (no CUDA)
  const same = found ? pre.filter((p) => p.torch === found.short) : [];
  const ordered = !found ? [] : [
    ...same.filter((p) => p.variant === found.variant),
    ...(found.variant !== 'cpu' ? same.filter((p) => p.variant !== found.variant && p.variant !== 'cpu') : []),
    ...(found.variant !== 'cpu' ? same.filter((p) => p.variant === 'cpu') : []),
  ];
  for (const p of pre) {
    if (!ordered.includes(p)) {
      skipped.push(`${path.relative(root, p.file)}: built for libtorch ${p.torch} ${variantLabel(p.variant)}` +
        (found ? `, found libtorch ${found.version} ${variantLabel(found.variant)}` : ', no libtorch found'));
    }
  }
  for (const p of ordered) {
    const c = { file: p.file, kind: 'prebuild', libtorch: found, why: `prebuilt for libtorch ${p.torch} ${variantLabel(p.variant)}` };
    if (hasLocal && p.sourceHash) {
      current ??= sourceHash();
      if (current && current !== p.sourceHash) {
        c.why += ' (made from other sources than src/)';
        stale.push(c);
        continue;
      }
    }
    list.push(c);
  }
  if (hasLocal) list.push(localCandidate(LOCAL_BUILD, 'local', 'local build', found));
  list.push(...stale);
  const seen = new Set();
  return { list: list.filter((c) => !seen.has(c.file) && seen.add(c.file)), skipped };
}

/** Files the loader would try, in order (the libtorch found decides which prebuilds). */
function candidates() {
  return plan().list.map((c) => c.file).filter((f) => fs.existsSync(f));
}

const RTLD_NODELETE = process.platform === 'linux' ? 0x1000 : 0;

/**
 * Loads libtorch's libraries (paths from libtorch.describe().libs) into this process, in dependency order,
 * and keeps them loaded. The addon's NEEDED entries then resolve to these (glibc matches loaded libraries by
 * soname whatever their scope), so no binary needs an RPATH. Only libtorch_global_deps (a CUDA torch's
 * cublas/cudnn/... loader) goes in the global scope, as Python torch does it; the others stay RTLD_LOCAL:
 * Debian's libtorch_cpu pulls in the system GLib/GObject, and in the global scope those would interpose
 * on the GLib that sharp's libvips carries (thousands of GLib-GObject-CRITICAL lines, objects of one GLib
 * handed to the other). process.dlopen reports "did not self-register" (Bun: "symbol
 * 'napi_register_module_v1' not found") for a library that is not a Node addon; that is expected and ignored (RTLD_NODELETE keeps the library after Node's dlclose). Any other
 * failure (a missing dependency of libtorch, e.g. libcudart) is thrown.
 */
function notAnAddon(err) {
  // Node: "Module did not self-register"; Bun: "symbol 'napi_register_module_v1' not found in native module"
  return /did not self-register|symbol 'napi_register_module_v1' not found/.test(String(err && err.message));
}

function preload(libs) {
  if (!libs) return;
  const { RTLD_LAZY, RTLD_GLOBAL, RTLD_LOCAL } = os.constants.dlopen;
  for (const n of ['torch_global_deps', 'c10', 'torch_cpu', 'c10_cuda', 'torch_cuda', 'torch']) {
    if (!libs[n]) continue;
    try {
      const scope = n === 'torch_global_deps' ? RTLD_GLOBAL : RTLD_LOCAL;
      process.dlopen({ exports: {} }, libs[n], RTLD_LAZY | scope | RTLD_NODELETE);
    } catch (err) {
      if (!notAnAddon(err)) throw err;
    }
  }
}

/** Turns a dlopen / crash report into a sentence naming the problem. */
function explain(file, stderr, signal) {
  const text = String(stderr || '');
  const missing = /(lib[\w.+-]+\.so[\w.]*): cannot open shared object file/.exec(text);
  if (missing) {
    return `missing shared library ${missing[1]} (needed by ${file}). Install the libtorch it needs (Debian/Ubuntu: ` +
      'apt-get install libtorch-dev; or LIBTORCH=/path/to/libtorch, Torch_DIR, or a Python with torch), ' +
      'or rebuild from source with `npm rebuild diffusion-features`.';
  }
  const sym = /undefined symbol: (\S+)/.exec(text);
  if (sym) {
    return `${file} was built against a different libtorch (undefined symbol ${sym[1]}); use the libtorch it was built ` +
      'for or rebuild with `npm rebuild diffusion-features`.';
  }
  if (signal) return `loading ${file} crashed the test process (signal ${signal}). ${text.trim().split('\n').slice(-3).join(' ')}`;
  const line = text.trim().split('\n').filter((l) => /Error|error/.test(l)).pop() || text.trim().split('\n').pop() || 'unknown error';
  return `${file} cannot be loaded: ${line}`;
}

function childCode(file, libs) {
  return `const b = require(${JSON.stringify(__filename)}); b.preload(${JSON.stringify(libs || null)});\n` +
    `const m = require(${JSON.stringify(file)});\n` +
    "if (typeof m.buildInfo !== 'function') { console.error('Error: not the diffusion-features addon'); process.exit(3); }\n" +
    "process.stdout.write('\\n@@DF ' + JSON.stringify(m.buildInfo()) + '\\n');";
}

/**
 * Loads `file` (with libtorch `lt`, default: the one found) in a child process: { ok: true, info } or
 * { ok: false, reason }. Cached in memory and on disk, keyed by the identity of the binary and the libtorch.
 */
function testLoad(file, lt = libtorch.locate().found) {
  const key = libtorch.hash({
    v: VERDICT_FORMAT, bin: libtorch.stamp(file), lib: lt ? [lt.libDir, lt.stamp] : null,
    node: process.versions.node.split('.')[0], napi: process.versions.napi,
  });
  if (verdicts.has(key)) return verdicts.get(key);
  let verdict;
  const cacheFile = path.join(libtorch.cacheDir(), `verdict-${key}.json`);
  if (process.env.DIFFUSION_FEATURES_SKIP_LOAD_CHECK === '1') {
    verdict = { ok: true, info: null };
  } else {
    const cached = libtorch.readJson(cacheFile);
    if (cached && cached.format === VERDICT_FORMAT && cached.file === file) {
      verdict = cached.verdict;
    } else {
      const env = { ...process.env };
      if (env.OMP_WAIT_POLICY === undefined) env.OMP_WAIT_POLICY = 'PASSIVE';
      if (env.OPENBLAS_NUM_THREADS === undefined) env.OPENBLAS_NUM_THREADS = '1';
      const r = spawnSync(process.execPath, ['-e', childCode(file, lt && lt.libs)], { encoding: 'utf8', timeout: 300000, env });
      const m = /\n@@DF (.*)\n/.exec(r.stdout || '');
      if (r.status === 0 && m) {
        verdict = { ok: true, info: JSON.parse(m[1]) };
      } else {
        verdict = { ok: false, reason: explain(file, r.stderr || (r.error && r.error.message), r.signal) };
      }
      // A timeout or a signal may be the machine, not the binary: only definite answers are kept.
      if (verdict.ok || (r.status !== null && !r.error)) libtorch.writeJson(cacheFile, { format: VERDICT_FORMAT, file, verdict });
    }
  }
  verdicts.set(key, verdict);
  return verdict;
}

function configureThreads(m) {
  if (process.env.OMP_NUM_THREADS) return;
  // Once per process: the setting is process-wide, and each call checks that the threads can start.
  if (!require('node:worker_threads').isMainThread) return;
  const n = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  if (n > 0) m.setNumThreads(n);
}

/** The E_NATIVE_LOAD text: what was found, everything tried, and what to do. */
function failureMessage(found, tried, reasons, skipped) {
  const labels = prebuilds().map((p) => `libtorch ${p.torch} ${variantLabel(p.variant)}`);
  const lines = ['diffusion-features: the native addon cannot be loaded.'];
  lines.push(found ? `libtorch: ${libtorch.label(found)}` : 'libtorch: none found');
  for (const t of tried) lines.push(`  - ${t}`);
  if (reasons.length || skipped.length) lines.push('binaries:');
  for (const r of [...reasons, ...skipped]) lines.push(`  - ${r}`);
  if (!reasons.length && !skipped.length) lines.push('binaries: none (no prebuilt binary for this platform and no local build)');
  lines.push(help.advice(found, labels));
  return lines.join('\n');
}

/** Loads (once) and returns the raw addon; throws a NativeLoadError explaining why when it cannot. */
function load() {
  if (addon) return addon;
  if (loadError) throw loadError;
  const t0 = performance.now();
  const { found, tried } = libtorch.locate();
  const { list, skipped } = plan(found);
  const reasons = [];
  for (const c of list) {
    if (!fs.existsSync(c.file)) {
      reasons.push(`${c.file} (${c.why}): no such file`);
      continue;
    }
    if (c.skip) {
      reasons.push(`${path.relative(root, c.file) || c.file} (${c.why}): ${c.skip}`);
      continue;
    }
    if (!c.libtorch) {
      reasons.push(`${path.relative(root, c.file) || c.file} (${c.why}): no libtorch to load it with`);
      continue;
    }
    const v = testLoad(c.file, c.libtorch);
    if (!v.ok) {
      reasons.push(`${c.why}: ${v.reason}`);
      continue;
    }
    try {
      // libgomp reads OMP_WAIT_POLICY once, when libtorch is loaded. Its default (threads spin after each
      // parallel region) fights OpenBLAS's own threads for the cores: passive waiting measured ~2x faster
      // on BLAS-bound modules and ~5-10% on the SD1.5 UNet (2-core CPU). A value set by the user wins.
      if (process.env.OMP_WAIT_POLICY === undefined) process.env.OMP_WAIT_POLICY = 'PASSIVE';
      // OpenBLAS's pthread build (Debian's libopenblas0-pthread) shuts its thread pool down in a fork()
      // handler. A fork (any child_process call of the host) while a GEMM runs on a torch thread then hangs
      // the whole process: the handler joins a pool thread that waits for work which never comes, or the
      // GEMM waits for pool threads that are gone (reproduced: a forward loop beside a spawn loop hung 3 of
      // 3 runs within a minute; 0 hangs with one BLAS thread). libtorch still parallelises through OpenMP;
      // one BLAS thread cost ~14% on a GEMM-bound MLP on 2 cores. Read by OpenBLAS when libtorch loads it;
      // a value set by the user wins (at that risk).
      if (process.env.OPENBLAS_NUM_THREADS === undefined) process.env.OPENBLAS_NUM_THREADS = '1';
      preload(c.libtorch.libs);
      const m = require(c.file);
      configureThreads(m);
      addon = m;
      loaded = { file: c.file, kind: c.kind, libtorch: c.libtorch, ms: performance.now() - t0 };
      return addon;
    } catch (err) {
      reasons.push(`${c.why}: ${explain(c.file, err && err.message)}`);
      // libtorch may now be loaded in this process: later candidates would mix two libtorch builds.
      break;
    }
  }
  loadError = new NativeLoadError(failureMessage(found, tried, reasons, skipped), reasons);
  throw loadError;
}

/** Path of the loaded binary (null before load()). */
function binaryPath() {
  return loaded ? loaded.file : null;
}

/** What was loaded: { file, kind ('env'|'prebuild'|'local'), libtorch, ms } or null before load(). */
function loadedInfo() {
  return loaded;
}

module.exports = {
  load, binaryPath, loadedInfo, candidates, plan, prebuilds, testLoad, preload, notAnAddon, sourceHash, failureMessage,
  explain, NativeLoadError, PREBUILD_RE, LOCAL_BUILD, libtorch,
};
