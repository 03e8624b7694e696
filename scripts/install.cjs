#!/usr/bin/env node
'use strict';
/**
 * `npm install` hook of diffusion-features. It never fails the user's install (exit 0 always): when the
 * native part cannot be had it says what to do, and loading later fails with E_NATIVE_LOAD and the same
 * advice (binding/help.cjs). Nothing here is needed when install scripts are blocked (--ignore-scripts,
 * pnpm, bun): the loader finds libtorch and the matching prebuild at run time by itself.
 *
 *  1. libtorch is found (binding/libtorch.cjs: LIBTORCH, Torch_DIR, $PYTHON, python3 on PATH,
 *     /usr/bin/python3, the system); the answer is cached for the loader.
 *  2. A prebuild matching it (prebuilds/<platform>-<arch>/, made from this package's sources) that loads
 *     in a child process: used as is, nothing is compiled (the load verdict is cached for the loader too).
 *  3. Otherwise, when cmake, a C++ compiler and make are on PATH: build from source with cmake-js into
 *     build/ (offline), retrying once with libtorch linked directly when find_package(Torch) fails.
 *     DIFFUSION_FEATURES_TORCH_DIRECT=1 uses direct linking from the start.
 *  4. Otherwise a prebuild made from other sources, if one loads; else the advice.
 *  5. TypeScript: `tsup` when dist/ is missing (a git checkout; the npm package ships dist/).
 * On Debian/Ubuntu as root, DIFFUSION_FEATURES_INSTALL_LIBTORCH=1 installs libtorch-dev with apt-get when
 * no libtorch is found. DIFFUSION_FEATURES_BUILD_FROM_SOURCE=1 (or npm's --build-from-source) skips the
 * prebuilds; DIFFUSION_FEATURES_JOBS=N sets the build parallelism. The bundled tiny model ships exported
 * (models/micro/): no Python is needed.
 */
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const log = (msg) => console.log(`diffusion-features: ${msg}`);
const warn = (msg) => console.warn(`diffusion-features: ${msg}`);

function native() {
  const binding = require('../binding/index.cjs');
  const { buildAddon, missingTools } = require('./build.cjs');
  const help = require('../binding/help.cjs');
  const lt = binding.libtorch;
  let { found, tried } = lt.locate({ refresh: true });
  if (!found && process.env.DIFFUSION_FEATURES_INSTALL_LIBTORCH === '1' && help.isDebianLike() && process.getuid && process.getuid() === 0) {
    log('installing libtorch-dev with apt-get (DIFFUSION_FEATURES_INSTALL_LIBTORCH=1)');
    spawnSync('apt-get', ['install', '-y', '--no-install-recommends', 'libtorch-dev'], { stdio: 'inherit' });
    ({ found, tried } = lt.locate({ refresh: true }));
  }
  log(found ? lt.label(found) : 'no libtorch found');

  const fromSource = process.env.DIFFUSION_FEATURES_BUILD_FROM_SOURCE === '1' || process.env.npm_config_build_from_source === 'true';
  const current = binding.sourceHash();
  const matching = found
    ? binding.plan(found).list.filter((c) => c.kind === 'prebuild')
    : [];
  const meta = new Map(binding.prebuilds().map((p) => [p.file, p]));
  const isFresh = (c) => !current || !meta.get(c.file).sourceHash || meta.get(c.file).sourceHash === current;
  const reasons = [];
  const tryPrebuilds = (list, note) => {
    for (const c of list) {
      const v = binding.testLoad(c.file, found);
      if (v.ok) {
        log(`using the prebuilt binary ${path.relative(root, c.file)}${note}; nothing to compile`);
        return true;
      }
      reasons.push(`${c.why}: ${v.reason}`);
      warn(`prebuilt ${path.relative(root, c.file)} does not load here: ${v.reason}`);
    }
    return false;
  };
  // exact variant first; for a CUDA libtorch the CPU prebuild of the same version is a last resort (no CUDA)
  const exact = (c) => meta.get(c.file).variant === found.variant;
  if (!fromSource && tryPrebuilds(matching.filter((c) => isFresh(c) && exact(c)), '')) return true;

  if (found) {
    const missing = missingTools();
    if (missing.length === 0) {
      log(`building the native addon from source (${fromSource ? 'asked for' : 'no prebuilt binary matches'})`);
      const r = buildAddon({ outDir: 'build', lt: found });
      if (r.ok) {
        const v = binding.testLoad(r.file, found);
        if (v.ok) {
          log(`native addon built${r.direct ? ' (libtorch linked directly)' : ''}: ${path.relative(root, r.file)}`);
          return true;
        }
        reasons.push(`local build: ${v.reason}`);
      } else {
        reasons.push(`building from source failed (see the output above)${r.log ? `:\n${r.log}` : ''}`);
      }
    } else {
      reasons.push(`cannot build from source: ${missing.join(', ')} not found on PATH`);
    }
    if (!fromSource && tryPrebuilds(matching.filter((c) => !isFresh(c) || !exact(c)), ' (a fallback: made from other sources than src/, or for the CPU only)')) return true;
  }
  const skipped = binding.plan(found).skipped;
  warn(binding.failureMessage(found, tried, reasons, skipped));
  warn('The install itself succeeded; the native layer will raise E_NATIVE_LOAD with this advice until it is fixed.');
  return false;
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
  const r = spawnSync(process.execPath, [tsup], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) warn('the TypeScript build failed (see above)');
}

function main() {
  try {
    native();
  } catch (err) {
    warn(`native setup skipped: ${err && err.stack ? err.stack : err}`);
  }
  try {
    buildTs();
  } catch (err) {
    warn(`TypeScript build skipped: ${err && err.message}`);
  }
  process.exitCode = 0;
}

main();
