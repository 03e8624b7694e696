/**
 * Distribution (DESIGN.md §7, issue 12): run-time libtorch discovery in the documented order with a cached
 * answer that notices a changed install, prebuilds chosen by libtorch version and variant, the load verdict
 * cached (no child process on a warm start), E_NATIVE_LOAD listing everything tried, an install script that
 * never fails, binaries without an RPATH into the build machine, the direct-link build mode.
 * Fake libtorch folders and fake Pythons (shell scripts) stand in for installs this machine does not have.
 */
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFileSync, chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createRequire } from 'node:module';

const ROOT = join(import.meta.dirname, '..');
const BINDING = join(ROOT, 'binding', 'index.cjs');
const tmp = mkdtempSync(join(tmpdir(), 'df-install-'));
test.after.always(() => rmSync(tmp, { recursive: true, force: true }));

/** A fake libtorch folder: empty library files, optional version files. */
function fakeLibtorch(dir: string, opts: { libs?: string[]; buildVersion?: string; versionPy?: string } = {}): string {
  mkdirSync(join(dir, 'lib'), { recursive: true });
  for (const l of opts.libs ?? ['libc10.so', 'libtorch_cpu.so', 'libtorch.so']) writeFileSync(join(dir, 'lib', l), '');
  if (opts.buildVersion) writeFileSync(join(dir, 'build-version'), `${opts.buildVersion}\n`);
  if (opts.versionPy) writeFileSync(join(dir, 'version.py'), opts.versionPy);
  return dir;
}

/** A fake Python: logs each call, answers the probe with `torchDir` as its torch package. */
function fakePython(file: string, torchDir: string | null, log: string): string {
  mkdirSync(dirname(file), { recursive: true });
  const answer = JSON.stringify({ torch: torchDir, exe: file, site: [] });
  writeFileSync(file, `#!/bin/sh\necho call >> '${log}'\necho '${answer}'\n`);
  chmodSync(file, 0o755);
  return file;
}

// A folder holding only `node`: PATH without cmake, a compiler, make or Python (node's own folder may hold them).
const nodeDir = join(tmp, 'nodebin');
mkdirSync(nodeDir);
symlinkSync(process.execPath, join(nodeDir, 'node'));
/** Environment of a child: no libtorch or Python variables of ours, PATH = extra + node's folder only. */
function env(extra: Record<string, string | undefined>, pathDirs: string[] = []): NodeJS.ProcessEnv {
  const e: NodeJS.ProcessEnv = { ...process.env };
  for (const k of ['LIBTORCH', 'Torch_DIR', 'PYTHON', 'VIRTUAL_ENV', 'CONDA_PREFIX', 'DIFFUSION_FEATURES_BINARY', 'DIFFUSION_FEATURES_SKIP_LOAD_CHECK']) delete e[k];
  e.PATH = [...pathDirs, nodeDir].join(':');
  for (const [k, v] of Object.entries(extra)) {
    if (v === undefined) delete e[k];
    else e[k] = v;
  }
  return e;
}

function nodeJson(code: string, e: NodeJS.ProcessEnv, args: string[] = []): any {
  const r = spawnSync(process.execPath, [...args, '-e', code], { env: e, encoding: 'utf8', cwd: ROOT, timeout: 300_000 });
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

const LOCATE = `const l = require(${JSON.stringify(join(ROOT, 'binding', 'libtorch.cjs'))}).locate();
console.log(JSON.stringify({ via: l.found && l.found.via, libDir: l.found && l.found.libDir, version: l.found && l.found.version,
  short: l.found && l.found.short, variant: l.found && l.found.variant, tried: l.tried, cached: l.cached }));`;

test('LIBTORCH comes first; version and CUDA variant from a libtorch zip\'s build-version', (t) => {
  const lt = fakeLibtorch(join(tmp, 'zip'), { libs: ['libc10.so', 'libtorch_cpu.so', 'libtorch_cuda.so', 'libc10_cuda.so', 'libtorch.so'], buildVersion: '2.5.1+cu124' });
  const tdir = fakeLibtorch(join(tmp, 'tdir'), { libs: ['libtorch_cpu.so.2.3.1'] });
  const r = nodeJson(LOCATE, env({ LIBTORCH: lt, Torch_DIR: join(tdir, 'share', 'cmake', 'Torch'), DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c1') }));
  t.is(r.via, `LIBTORCH=${lt}`);
  t.is(r.version, '2.5.1+cu124');
  t.is(r.short, '2.5');
  t.is(r.variant, 'cu124');
});

test('Torch_DIR next; a Debian-style versioned library name gives the version', (t) => {
  const tdir = fakeLibtorch(join(tmp, 'tdir2'), { libs: ['libc10.so.2.3', 'libtorch_cpu.so.2.3.1'] });
  const r = nodeJson(LOCATE, env({ LIBTORCH: join(tmp, 'nowhere'), Torch_DIR: join(tdir, 'share', 'cmake', 'Torch'), DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c2') }));
  t.is(r.via, `Torch_DIR=${join(tdir, 'share', 'cmake', 'Torch')}`);
  t.is(r.version, '2.3.1');
  t.is(r.variant, 'cpu');
  t.true(r.tried.some((s: string) => s.startsWith(`LIBTORCH=${join(tmp, 'nowhere')}`)), 'the failed LIBTORCH is listed');
});

test('$PYTHON before python3 on PATH (the active environment); the answer is cached and a changed install is noticed', (t) => {
  const log = join(tmp, 'py.log');
  const torchA = fakeLibtorch(join(tmp, 'venvA', 'torch'), {
    libs: ['libc10.so', 'libtorch_cpu.so', 'libtorch_cuda.so', 'libtorch.so'],
    versionPy: "__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\n",
  });
  const torchB = fakeLibtorch(join(tmp, 'venvB', 'torch'), { versionPy: "__version__ = '2.4.0+cpu'\ncuda = None\n" });
  const pyA = fakePython(join(tmp, 'binA', 'python'), torchA, log);
  fakePython(join(tmp, 'binB', 'python3'), torchB, log);
  const cache = join(tmp, 'c3');
  const withPython = nodeJson(LOCATE, env({ PYTHON: pyA, DIFFUSION_FEATURES_CACHE_DIR: cache }, [join(tmp, 'binB')]));
  t.is(withPython.via, `Python torch (PYTHON=${pyA}: ${torchA})`);
  t.is(withPython.variant, 'cu130');
  t.is(withPython.short, '2.11');

  const calls = () => (existsSync(log) ? readFileSync(log, 'utf8').trim().split('\n').length : 0);
  const before = calls();
  const e = env({ DIFFUSION_FEATURES_CACHE_DIR: cache }, [join(tmp, 'binB')]);
  const first = nodeJson(LOCATE, e);
  t.is(first.via, `Python torch (python3 on PATH (${join(tmp, 'binB', 'python3')}): ${torchB})`, 'python3 on PATH before /usr/bin/python3');
  t.is(first.version, '2.4.0+cpu');
  t.false(first.cached);
  t.is(calls(), before + 1);
  const second = nodeJson(LOCATE, e);
  t.true(second.cached, 'a warm start asks no Python');
  t.is(calls(), before + 1);
  t.is(second.libDir, first.libDir);
  // the install changes (a new libtorch_cpu): asked again
  appendFileSync(join(torchB, 'lib', 'libtorch_cpu.so'), 'x');
  const third = nodeJson(LOCATE, e);
  t.false(third.cached);
  t.is(calls(), before + 2);
  // the environment changes (another PYTHON): asked again
  const fourth = nodeJson(LOCATE, { ...e, PYTHON: pyA });
  t.is(fourth.variant, 'cu130');
});

test('a libtorch no prebuild matches: E_NATIVE_LOAD lists the libtorch, every binary tried or skipped, and what to do', (t) => {
  const lt = fakeLibtorch(join(tmp, 'zip9'), { buildVersion: '9.9.0' });
  const code = `try { require(${JSON.stringify(BINDING)}).load(); console.log(JSON.stringify({ ok: true })) }
    catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message, reasons: e.reasons })) }`;
  const r = nodeJson(code, env({ LIBTORCH: lt, DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c4') }));
  t.is(r.code, 'E_NATIVE_LOAD');
  t.regex(r.message, new RegExp(`libtorch: libtorch 9\\.9\\.0 CPU in ${lt}/lib \\(found via LIBTORCH=`));
  for (const p of readdirPrebuilds()) t.true(r.message.includes(`${p}: built for libtorch`), `${p} is listed as skipped`);
  if (existsSync(join(ROOT, 'build', 'Release', 'diffusion_features.libtorch.json'))) {
    t.true(r.message.includes('build/Release/diffusion_features.node (local build): built for libtorch'), 'a local build for another libtorch is skipped, not mixed in');
  }
  t.regex(r.message, /npm rebuild diffusion-features/);
  t.regex(r.message, /DIFFUSION_FEATURES_TORCH_DIRECT=1/);
});

function readdirPrebuilds(): string[] {
  const code = `console.log(JSON.stringify(require(${JSON.stringify(BINDING)}).prebuilds().map((p) => require('path').relative(${JSON.stringify(ROOT)}, p.file))))`;
  return nodeJson(code, env({}));
}

test('the install script never fails: no matching binary and no compiler -> advice, exit 0, nothing built', (t) => {
  const lt = fakeLibtorch(join(tmp, 'zip8'), { buildVersion: '8.8.0' });
  const buildDir = join(ROOT, 'build');
  const before = existsSync(join(buildDir, 'CMakeCache.txt')) ? readFileSync(join(buildDir, 'CMakeCache.txt'), 'utf8') : null;
  const r = spawnSync(process.execPath, [join(ROOT, 'scripts', 'install.cjs')], {
    env: env({ LIBTORCH: lt, DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c5') }), encoding: 'utf8', cwd: ROOT, timeout: 300_000,
  });
  t.is(r.status, 0, r.stderr);
  const out = `${r.stdout}${r.stderr}`;
  t.regex(out, /libtorch 8\.8\.0 CPU/);
  t.regex(out, /cannot build from source: cmake, a C\+\+ compiler \(g\+\+ or clang\+\+\), make \(or ninja\) not found on PATH/);
  t.regex(out, /npm rebuild diffusion-features/);
  t.regex(out, /E_NATIVE_LOAD/);
  const after = existsSync(join(buildDir, 'CMakeCache.txt')) ? readFileSync(join(buildDir, 'CMakeCache.txt'), 'utf8') : null;
  t.is(after, before, 'build/ untouched');
});

// ------------------------------------------------------------------------------ the real libtorch of this machine
const realFound = nodeJson(LOCATE, { ...process.env, DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c-real') });
const prebuildFor = (short: string, variant: string) => join(ROOT, 'prebuilds', `${process.platform}-${process.arch}`, `diffusion-features.torch-${short}.${variant}.napi.node`);

function rpaths(file: string): string[] | null {
  const r = spawnSync('readelf', ['-d', file], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  return [...r.stdout.matchAll(/\((?:RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]/g)].map((m) => m[1]!);
}

test('no committed prebuild or local build carries an RPATH into the machine that built it; prebuilds match their .json', (t) => {
  const files = readdirPrebuilds().map((p) => join(ROOT, p));
  const local = join(ROOT, 'build', 'Release', 'diffusion_features.node');
  if (existsSync(local) && existsSync(join(ROOT, 'build', 'Release', 'diffusion_features.libtorch.json'))) files.push(local); // built by this CMakeLists.txt
  if (files.length === 0) return t.pass('no binary to check');
  for (const f of files) {
    const rp = rpaths(f);
    if (rp === null) return t.log('readelf missing: RPATH not checked');
    t.true(rp.every((p) => p.split(':').every((d) => d === '' || d.startsWith('$ORIGIN'))), `${f}: ${rp.join(';')}`);
    if (f.includes('prebuilds')) {
      const meta = JSON.parse(readFileSync(`${f}.json`, 'utf8'));
      const bytes = readFileSync(f);
      t.is(meta.sha256, createHash('sha256').update(bytes).digest('hex'), `${f}.json sha256`);
      t.true(bytes.length < 8e6, `${f} is small (stripped): ${bytes.length} bytes`);
    }
  }
});

test('the prebuild matching this machine\'s libtorch loads with no compiler, and a warm start spawns no test-load child', (t) => {
  if (!realFound.short) return t.pass('no libtorch on this machine');
  const file = prebuildFor(realFound.short, realFound.variant);
  if (!existsSync(file)) return t.pass(`no prebuild for libtorch ${realFound.short} ${realFound.variant}`);
  const counter = join(tmp, 'count.cjs');
  writeFileSync(counter, `const cp = require('node:child_process'); const orig = cp.spawnSync; globalThis.__spawns = [];
cp.spawnSync = function (cmd, args, ...rest) { globalThis.__spawns.push(cmd === process.execPath ? 'node' : 'python'); return orig.call(this, cmd, args, ...rest); };`);
  const code = `const b = require(${JSON.stringify(BINDING)}); const t0 = performance.now(); const m = b.load(); const ms = performance.now() - t0;
    const i = b.loadedInfo(); console.log(JSON.stringify({ file: i.file, kind: i.kind, ms, spawns: globalThis.__spawns, torch: m.libtorchVersion() }));`;
  // a user who sets nothing: the libtorch found by the documented order, the matching prebuild, no compiler on PATH
  const fresh = readdirPrebuilds().length > 0 && nodeJson(`const b = require(${JSON.stringify(BINDING)}); const p = b.prebuilds().find((x) => x.file === ${JSON.stringify(file)}); console.log(JSON.stringify(!p.sourceHash || p.sourceHash === b.sourceHash()))`, env({}));
  const e = { ...process.env, DIFFUSION_FEATURES_CACHE_DIR: join(tmp, 'c6'), PATH: nodeDir } as NodeJS.ProcessEnv;
  delete e.DIFFUSION_FEATURES_BINARY;
  delete e.DIFFUSION_FEATURES_SKIP_LOAD_CHECK;
  const cold = nodeJson(code, e, ['-r', counter]);
  if (fresh) t.is(cold.file, file, 'the prebuild is chosen');
  else t.log(`the prebuild was made from other sources than src/: the local build (${cold.kind}) is preferred`);
  t.true(cold.spawns.includes('node'), 'cold: the candidate is test-loaded in a child');
  t.true(String(cold.torch).startsWith(realFound.short));
  const warm = nodeJson(code, e, ['-r', counter]);
  t.deepEqual(warm.spawns, [], 'warm: no child process, no Python');
  t.is(warm.file, cold.file);
  t.log(`native layer load: cold ${cold.ms.toFixed(0)} ms (incl. test-load), warm ${warm.ms.toFixed(0)} ms`);
});

test('DIFFUSION_FEATURES_TORCH_DIRECT=1 makes CMake link libtorch directly (no TorchConfig.cmake)', (t) => {
  if (spawnSync('cmake', ['--version']).status !== 0) return t.pass('no cmake here');
  if (!realFound.short) return t.pass('no libtorch on this machine');
  const out = join(tmp, 'cmake-direct');
  const r = spawnSync('cmake', ['-S', ROOT, '-B', out, '-DCMAKE_BUILD_TYPE=Release'], {
    env: { ...process.env, DIFFUSION_FEATURES_TORCH_DIRECT: '1' }, encoding: 'utf8', timeout: 300_000,
  });
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /diffusion-features: libtorch \S+ found via .*, linked directly/);
  const side = JSON.parse(readFileSync(join(out, 'diffusion_features.libtorch.json'), 'utf8'));
  t.true(String(side.torchVersion).startsWith(realFound.short), JSON.stringify(side));
});

test('preload: a libtorch library is not an addon, and both Node\'s and Bun\'s wording of that are accepted; other errors are not', (t) => {
  const { notAnAddon } = createRequire(import.meta.url)(BINDING) as { notAnAddon(e: unknown): boolean };
  t.true(notAnAddon(new Error('Module did not self-register: \'/usr/lib/x86_64-linux-gnu/libtorch_cpu.so.1.13\'.')));
  t.true(notAnAddon(new TypeError("symbol 'napi_register_module_v1' not found in native module. Is this a Node API (napi) module?")));
  t.false(notAnAddon(new Error('libcudart.so.12: cannot open shared object file: No such file or directory')));
  t.false(notAnAddon(undefined));
});
