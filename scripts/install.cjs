#!/usr/bin/env node
'use strict';
/**
 * `npm install` hook of diffusion-features.
 *  1. Native addon: a matching prebuild (prebuilds/<platform>-<arch>/) that loads is used as is; otherwise
 *     the addon is built from source with cmake-js, offline (headers from node-api-headers). libtorch is
 *     found from LIBTORCH, Torch_DIR, a Python torch install, or the system (see CMakeLists.txt); when none
 *     exists this prints how to get one and fails.
 *     On Debian/Ubuntu as root, DIFFUSION_FEATURES_INSTALL_LIBTORCH=1 installs libtorch-dev with apt-get first.
 *  2. TypeScript: `tsup` when dist/ is missing (a git checkout; the npm package ships dist/).
 *  3. The bundled tiny model: models/micro/ exported from models/micro-src/ when missing and a Python with
 *     torch exists. Never fails the install: it prints why it was skipped.
 * Environment: DIFFUSION_FEATURES_BUILD_FROM_SOURCE=1 ignores prebuilds; DIFFUSION_FEATURES_JOBS=N sets the
 * build parallelism (default: the number of cores).
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const log = (msg) => console.log(`diffusion-features: ${msg}`);

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env: process.env, ...opts });
  return r.status === 0;
}

/** Python interpreters that can import torch (same order as scripts/python.cjs). */
function findPython() {
  try {
    return require('./python.cjs').findPython();
  } catch {
    return null;
  }
}

/** Where libtorch would come from (the same order as CMakeLists.txt), or null. */
function findLibtorch() {
  if (process.env.LIBTORCH && fs.existsSync(path.join(process.env.LIBTORCH, 'share', 'cmake', 'Torch'))) return `LIBTORCH=${process.env.LIBTORCH}`;
  if (process.env.Torch_DIR && fs.existsSync(process.env.Torch_DIR)) return `Torch_DIR=${process.env.Torch_DIR}`;
  for (const py of [process.env.PYTHON, '/usr/bin/python3', 'python3'].filter(Boolean)) {
    const r = spawnSync(py, ['-c', 'import torch; print(torch.utils.cmake_prefix_path)'], { encoding: 'utf8' });
    const dir = r.status === 0 ? r.stdout.trim() : '';
    if (dir && fs.existsSync(path.join(dir, 'Torch'))) return `Python torch (${py}: ${dir})`;
  }
  for (const base of ['/usr/lib', '/usr/local/lib']) {
    let entries = [];
    try {
      entries = fs.readdirSync(base);
    } catch {
      continue;
    }
    for (const e of ['', ...entries]) {
      const dir = path.join(base, e, 'cmake', 'Torch');
      if (fs.existsSync(path.join(dir, 'TorchConfig.cmake'))) return `system (${dir})`;
    }
  }
  return null;
}

function isDebianLike() {
  try {
    return /^(ID|ID_LIKE)=.*(debian|ubuntu)/m.test(fs.readFileSync('/etc/os-release', 'utf8'));
  } catch {
    return false;
  }
}

function noLibtorchMessage() {
  const lines = [
    'no libtorch found, so the native addon cannot be built. Get one in any of these ways, then run `npm rebuild diffusion-features`:',
  ];
  if (isDebianLike()) lines.push('  - Debian/Ubuntu: apt-get install libtorch-dev   (CPU; or set DIFFUSION_FEATURES_INSTALL_LIBTORCH=1 as root)');
  lines.push(
    '  - LIBTORCH=/path/to/libtorch   (unpack a libtorch zip from https://pytorch.org, CPU or CUDA)',
    '  - Torch_DIR=/path/to/share/cmake/Torch',
    '  - a Python with torch (pip install torch), found through $PYTHON, /usr/bin/python3 or python3',
  );
  return lines.join('\n');
}

function prebuildLoads() {
  if (process.env.DIFFUSION_FEATURES_BUILD_FROM_SOURCE === '1') return null;
  const binding = require('../binding/index.cjs');
  const pre = binding.candidates().filter((f) => f.includes(`${path.sep}prebuilds${path.sep}`));
  for (const file of pre) {
    const v = binding.testLoad(file);
    if (v.ok) return file;
    log(`prebuild ${path.relative(root, file)} does not load here: ${v.reason}`);
  }
  return null;
}

function buildNative() {
  const pre = prebuildLoads();
  if (pre) {
    log(`using prebuilt addon ${path.relative(root, pre)}`);
    return true;
  }
  let via = findLibtorch();
  if (!via && process.env.DIFFUSION_FEATURES_INSTALL_LIBTORCH === '1' && isDebianLike() && process.getuid && process.getuid() === 0) {
    log('installing libtorch-dev with apt-get (DIFFUSION_FEATURES_INSTALL_LIBTORCH=1)');
    run('apt-get', ['install', '-y', '--no-install-recommends', 'libtorch-dev']);
    via = findLibtorch();
  }
  if (!via) {
    console.error(`diffusion-features: ${noLibtorchMessage()}`);
    return false;
  }
  log(`building the native addon from source against libtorch from ${via}`);
  let cmakeJs;
  try {
    cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  } catch {
    console.error('diffusion-features: cmake-js is not installed (it is a dependency; reinstall the package)');
    return false;
  }
  const jobs = String(process.env.DIFFUSION_FEATURES_JOBS || (os.availableParallelism ? os.availableParallelism() : os.cpus().length));
  if (!run(process.execPath, [cmakeJs, 'compile', '-j', jobs, '--CDCMAKE_BUILD_TYPE=Release'])) {
    console.error('diffusion-features: building the native addon failed (see the output above). It needs cmake >= 3.18 and a C++17 compiler ' +
      '(Debian/Ubuntu: apt-get install cmake g++ make).');
    return false;
  }
  const built = path.join(root, 'build', 'Release', 'diffusion_features.node');
  const v = require('../binding/index.cjs').testLoad(built);
  if (!v.ok) {
    console.error(`diffusion-features: the addon was built but does not load: ${v.reason}`);
    return false;
  }
  log(`native addon built: ${path.relative(root, built)}`);
  return true;
}

function buildTs() {
  if (fs.existsSync(path.join(root, 'dist', 'index.js'))) return;
  let tsup;
  try {
    tsup = require.resolve('tsup/dist/cli-default.js', { paths: [root] });
  } catch {
    log('dist/ is missing and tsup is not installed; skipping the TypeScript build');
    return;
  }
  log('building the TypeScript (tsup)');
  if (!run(process.execPath, [tsup])) console.error('diffusion-features: the TypeScript build failed (see above)');
}

function buildMicroModel() {
  const out = path.join(root, 'models', 'micro');
  if (fs.existsSync(path.join(out, 'model.json'))) return;
  const why = (msg) => log(`bundled tiny model not built: ${msg}`);
  if (!fs.existsSync(path.join(root, 'weights', 'export.py'))) return why('weights/export.py is missing');
  if (!fs.existsSync(path.join(root, 'models', 'micro-src'))) return why('models/micro-src/ is missing');
  if (!findPython()) return why('no Python with torch found (Debian/Ubuntu: apt-get install python3-torch, or set PYTHON)');
  log('exporting the bundled tiny model to models/micro/');
  const ok = run(process.execPath, [path.join(root, 'scripts', 'python.cjs'), 'weights/export.py', '--from', 'models/micro-src',
    '--out', 'models/micro', '--dtype', 'float16']);
  if (!ok) why('weights/export.py failed (see above); run it again with `node scripts/python.cjs weights/export.py --from models/micro-src --out models/micro --dtype float16`');
}

function main() {
  const nativeOk = buildNative();
  buildTs();
  try {
    buildMicroModel();
  } catch (err) {
    log(`bundled tiny model not built: ${err && err.message}`);
  }
  if (!nativeOk) process.exit(1);
}

main();
