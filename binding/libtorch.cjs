'use strict';
/**
 * Finds the libtorch this process should use, at run time, in the documented order (README.md "CPU vs CUDA"):
 *
 *   1. LIBTORCH            an unpacked libtorch folder (LIBTORCH/lib)
 *   2. Torch_DIR           a folder holding TorchConfig.cmake (its prefix's lib/)
 *   3. a Python torch      $PYTHON, then `python3` on PATH (the active environment), then /usr/bin/python3;
 *                          the torch package's lib/ folder
 *   4. the system          /usr/lib/<multiarch>, /usr/lib64, /usr/lib, /usr/local/lib (Debian/Ubuntu libtorch)
 *
 * and describes it: library folder, version (major.minor.patch), variant ('cpu', or 'cu130' for CUDA 13.0,
 * 'cuda' when the CUDA version cannot be read). Nothing here imports torch: a Python is only asked where its
 * `torch` package lies (importlib.util.find_spec, ~30 ms), and that answer is cached on disk
 * (cacheDir()/python-<key>.json) keyed by the environment (PYTHON, PATH, VIRTUAL_ENV, CONDA_PREFIX) and
 * checked against a fingerprint (size and mtime of each interpreter, its site-packages folders and the
 * libtorch_cpu library found), so a changed, added or removed install is noticed and the Python asked again.
 * Versions come from files: the Python package's version.py, a libtorch zip's build-version, the
 * installed headers' version.h, or the library's versioned file name (Debian: libtorch_cpu.so.1.13.0).
 *
 * Environment: DIFFUSION_FEATURES_CACHE_DIR (where answers are cached; default $XDG_CACHE_HOME or
 * ~/.cache, /diffusion-features), DIFFUSION_FEATURES_NO_PYTHON=1 (skip step 3: never start a Python).
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const { spawnSync } = require('node:child_process');

const PY_ENV_KEYS = ['PYTHON', 'PATH', 'VIRTUAL_ENV', 'CONDA_PREFIX'];
const CACHE_FORMAT = 1;

/** Where the loader keeps its answers: $DIFFUSION_FEATURES_CACHE_DIR, $XDG_CACHE_HOME or ~/.cache. */
function cacheDir() {
  if (process.env.DIFFUSION_FEATURES_CACHE_DIR) return path.resolve(process.env.DIFFUSION_FEATURES_CACHE_DIR);
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir() || os.tmpdir(), '.cache');
  return path.join(base, 'diffusion-features');
}

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return null;
  }
}

/** Writes JSON atomically (temp file + rename); a cache that cannot be written is silently skipped. */
function writeJson(file, value) {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(value));
    fs.renameSync(tmp, file);
  } catch {
    /* read-only home, full disk: the answer is recomputed next time */
  }
}

function hash(value) {
  return crypto.createHash('sha256').update(JSON.stringify(value)).digest('hex').slice(0, 20);
}

/** [path, size, mtimeMs] of a file or folder (following symlinks), or [path, -1, -1] when absent. */
function stamp(p) {
  try {
    const s = fs.statSync(p);
    return [p, s.size, s.mtimeMs];
  } catch {
    return [p, -1, -1];
  }
}

function stampsMatch(list) {
  return Array.isArray(list) && list.every((s) => JSON.stringify(stamp(s[0])) === JSON.stringify(s));
}

/** The file in `dir` that provides lib<name>.so: the unversioned name, else the shortest versioned one. */
function findLib(dir, name) {
  const plain = path.join(dir, `lib${name}.so`);
  if (fs.existsSync(plain)) return plain;
  let entries = [];
  try {
    entries = fs.readdirSync(dir).filter((e) => e.startsWith(`lib${name}.so.`));
  } catch {
    return null;
  }
  entries.sort((a, b) => a.length - b.length || a.localeCompare(b));
  return entries.length ? path.join(dir, entries[0]) : null;
}

function parseVersionPy(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  const v = /^__version__\s*(?::[^=]*)?=\s*['"]([^'"]+)['"]/m.exec(text);
  const c = /^cuda\s*(?::[^=]*)?=\s*['"]([^'"]+)['"]/m.exec(text);
  return v ? { version: v[1], cuda: c ? c[1] : null } : null;
}

function parseVersionH(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  const part = (n) => (new RegExp(`define TORCH_VERSION_${n} (\\d+)`).exec(text) || [])[1];
  return part('MAJOR') !== undefined ? `${part('MAJOR')}.${part('MINOR')}.${part('PATCH')}` : null;
}

/** 'cu130' for '13.0', 'cu124' for '12.4'. */
function cudaTag(cuda) {
  const m = /^(\d+)\.(\d+)/.exec(String(cuda));
  return m ? `cu${m[1]}${m[2]}` : 'cuda';
}

/**
 * Describes the libtorch in `libDir`: { libDir, version, short ('1.13'), variant, cudaVersion, libs, stamp }
 * or null when the folder holds no libtorch_cpu. `prefix` (optional) is the folder above lib/.
 */
function describe(libDir, via, prefix) {
  const torchCpu = findLib(libDir, 'torch_cpu');
  if (!torchCpu) return null;
  const libs = {};
  for (const n of ['c10', 'torch_cpu', 'c10_cuda', 'torch_cuda', 'torch']) {
    const f = findLib(libDir, n);
    if (f) libs[n] = f;
  }
  // A CUDA torch's libtorch_global_deps pulls in the CUDA libraries (cublas, cudnn…) with RTLD_GLOBAL, as
  // `import torch` does first; the loader does the same.
  if (libs.torch_cuda) {
    const deps = findLib(libDir, 'torch_global_deps');
    if (deps) libs.torch_global_deps = deps;
  }
  const top = prefix || path.dirname(libDir);
  let version = null;
  let cuda = null;
  const py = parseVersionPy(path.join(top, 'version.py')); // a Python torch package: torch/lib -> torch/version.py
  if (py) ({ version, cuda } = py);
  if (!version) {
    try {
      const bv = fs.readFileSync(path.join(top, 'build-version'), 'utf8').trim(); // libtorch zip: "2.5.1+cu124"
      if (bv) {
        version = bv;
        const m = /\+cu(\d+)(\d)$/.exec(bv);
        if (m) cuda = `${m[1]}.${m[2]}`;
      }
    } catch { /* not a libtorch zip */ }
  }
  if (!version) {
    const incs = [path.join(top, 'include')];
    if (libDir.startsWith('/usr/local/')) incs.push('/usr/local/include');
    else if (libDir.startsWith('/usr/')) incs.push('/usr/include');
    for (const inc of incs) {
      version = parseVersionH(path.join(inc, 'torch', 'csrc', 'api', 'include', 'torch', 'version.h'));
      if (version) break;
    }
  }
  if (!version) {
    // Debian/Ubuntu: libtorch_cpu.so -> libtorch_cpu.so.1.13 -> libtorch_cpu.so.1.13.0
    let real = torchCpu;
    try {
      real = fs.realpathSync(torchCpu);
    } catch { /* keep the name */ }
    const m = /\.so\.(\d+\.\d+(?:\.\d+)?)$/.exec(real) || /\.so\.(\d+\.\d+(?:\.\d+)?)$/.exec(torchCpu);
    if (m) version = m[1];
  }
  const m = /^(\d+)\.(\d+)/.exec(version || '');
  const isCuda = !!libs.torch_cuda;
  return {
    via,
    libDir,
    version: version || 'unknown',
    short: m ? `${m[1]}.${m[2]}` : 'unknown',
    variant: isCuda ? cudaTag(cuda) : 'cpu',
    cudaVersion: isCuda ? cuda : null,
    libs,
    stamp: stamp(torchCpu),
  };
}

/** `name` resolved on PATH (as a shell would), or null. */
function onPath(name) {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (!dir) continue;
    const f = path.join(dir, name);
    try {
      fs.accessSync(f, fs.constants.X_OK);
      if (fs.statSync(f).isFile()) return f;
    } catch { /* next */ }
  }
  return null;
}

/** The Pythons to ask, in order: $PYTHON, python3 on PATH, /usr/bin/python3 (duplicates dropped). */
function pythonCandidates() {
  const list = [];
  if (process.env.PYTHON) list.push({ exe: process.env.PYTHON, via: `PYTHON=${process.env.PYTHON}` });
  const p3 = onPath('python3');
  if (p3) list.push({ exe: p3, via: `python3 on PATH (${p3})` });
  list.push({ exe: '/usr/bin/python3', via: '/usr/bin/python3' });
  const seen = new Set();
  return list.filter((c) => !seen.has(c.exe) && seen.add(c.exe));
}

const PROBE = [
  'import importlib.util, json, site, sys',
  's = importlib.util.find_spec("torch")',
  'd = list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else None',
  'sp = []',
  'try: sp = list(site.getsitepackages()) + [site.getusersitepackages()]',
  'except Exception: pass',
  'print(json.dumps({"torch": d, "exe": sys.executable, "site": [p for p in sp + sys.path if p]}))',
].join('\n');

/** Asks one Python where its torch package is (no `import torch`). */
function probePython(exe) {
  const r = spawnSync(exe, ['-c', PROBE], { encoding: 'utf8', timeout: 20000, env: process.env });
  if (r.status !== 0) return { exe, ok: false, torch: null, fingerprint: [stamp(exe)] };
  let out;
  try {
    out = JSON.parse(r.stdout.trim().split('\n').pop());
  } catch {
    return { exe, ok: false, torch: null, fingerprint: [stamp(exe)] };
  }
  const real = (() => {
    try {
      return fs.realpathSync(out.exe || exe);
    } catch {
      return exe;
    }
  })();
  const dirs = [...new Set(out.site)].filter((d) => /(site|dist)-packages\/?$/.test(d) && fs.existsSync(d));
  return { exe, ok: true, torch: out.torch, fingerprint: [stamp(exe), stamp(real), ...dirs.map(stamp)] };
}

/** Python probes, from the cache when nothing they depend on changed. `refresh` ignores the cache. */
function pythonProbes(refresh) {
  const key = hash({ v: CACHE_FORMAT, env: PY_ENV_KEYS.map((k) => process.env[k] || ''), arch: process.arch });
  const file = path.join(cacheDir(), `python-${key}.json`);
  const cands = pythonCandidates();
  if (!refresh) {
    const cached = readJson(file);
    if (cached && cached.format === CACHE_FORMAT && Array.isArray(cached.probes) &&
        cached.probes.every((p, i) => cands[i] && p.exe === cands[i].exe) &&
        (cached.probes.length === cands.length || (cached.probes.length > 0 && cached.probes[cached.probes.length - 1].libStamp)) &&
        cached.probes.every((p) => stampsMatch(p.fingerprint) && (!p.libStamp || stampsMatch([p.libStamp])))) {
      return { probes: cached.probes, cached: true };
    }
  }
  const probes = [];
  for (const c of cands) {
    if (c.exe !== process.env.PYTHON && !fs.existsSync(c.exe)) {
      probes.push({ exe: c.exe, ok: false, torch: null, fingerprint: [stamp(c.exe)] });
      continue;
    }
    const p = probePython(c.exe);
    if (p.torch) {
      const lt = describe(path.join(p.torch, 'lib'), c.via, p.torch);
      if (lt) p.libStamp = lt.stamp;
    }
    probes.push(p);
    if (p.libStamp) break; // later Pythons are not needed
  }
  writeJson(file, { format: CACHE_FORMAT, probes });
  return { probes, cached: false };
}

function systemLibDirs() {
  const dirs = [];
  const multi = { x64: 'x86_64-linux-gnu', arm64: 'aarch64-linux-gnu', ppc64: 'powerpc64le-linux-gnu' }[process.arch];
  if (multi) dirs.push(`/usr/lib/${multi}`);
  dirs.push('/usr/lib64', '/usr/lib', '/usr/local/lib');
  return dirs;
}

let memo = null;

/**
 * Finds libtorch. Returns { found: description|null, tried: [sentences], cached: boolean }.
 * `refresh` re-asks the Pythons even when the cached answer still matches.
 */
function locate({ refresh = false } = {}) {
  if (memo && !refresh) return memo;
  const tried = [];
  let found = null;
  const env = process.env;
  if (env.LIBTORCH) {
    found = describe(path.join(path.resolve(env.LIBTORCH), 'lib'), `LIBTORCH=${env.LIBTORCH}`, path.resolve(env.LIBTORCH));
    if (!found) tried.push(`LIBTORCH=${env.LIBTORCH}: no lib/libtorch_cpu.so there`);
  }
  if (!found && env.Torch_DIR) {
    const prefix = path.resolve(env.Torch_DIR, '..', '..', '..');
    found = describe(path.join(prefix, 'lib'), `Torch_DIR=${env.Torch_DIR}`, prefix);
    if (!found) tried.push(`Torch_DIR=${env.Torch_DIR}: no libtorch_cpu.so in ${path.join(prefix, 'lib')}`);
  }
  let cached = false;
  if (!found && env.DIFFUSION_FEATURES_NO_PYTHON !== '1') {
    const cands = pythonCandidates();
    const r = pythonProbes(refresh);
    cached = r.cached;
    for (const p of r.probes) {
      const c = cands.find((x) => x.exe === p.exe);
      const via = c ? c.via : p.exe;
      if (!p.ok) {
        tried.push(`${via}: not found or not runnable`);
        continue;
      }
      if (!p.torch) {
        tried.push(`${via}: has no torch package`);
        continue;
      }
      found = describe(path.join(p.torch, 'lib'), `Python torch (${via}: ${p.torch})`, p.torch);
      if (found) break;
      tried.push(`${via}: torch at ${p.torch} has no lib/libtorch_cpu.so`);
    }
  }
  if (!found) {
    for (const dir of systemLibDirs()) {
      found = describe(dir, `system (${dir})`, null);
      if (found) break;
    }
    if (!found) tried.push(`the system: no libtorch_cpu.so in ${systemLibDirs().join(', ')}`);
  }
  memo = { found, tried, cached };
  return memo;
}

/** One line naming a libtorch: "libtorch 2.11.0 CUDA 13.0 in /x/torch/lib (via …)". */
function label(lt) {
  const v = lt.variant === 'cpu' ? 'CPU' : `CUDA ${lt.cudaVersion || '?'}`;
  return `libtorch ${lt.version} ${v} in ${lt.libDir} (found via ${lt.via})`;
}

module.exports = { locate, describe, onPath, label, cacheDir, readJson, writeJson, hash, stamp, stampsMatch, pythonCandidates, findLib };
