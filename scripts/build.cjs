'use strict';
/**
 * Builds the addon from source with cmake-js, offline (headers from node-api-headers), against the libtorch
 * binding/libtorch.cjs finds (passed to CMake as Torch_DIR when it has a TorchConfig.cmake, so build and run
 * time agree). Shared by scripts/install.cjs and scripts/prebuild.cjs.
 *
 * Direct-link mode (-DDF_TORCH_DIRECT=ON: link libtorch's libraries without TorchConfig.cmake) is used when
 * DIFFUSION_FEATURES_TORCH_DIRECT=1, and tried once automatically when the first configure/build fails
 * (TorchConfig.cmake of a CUDA libtorch stops with a fatal error on some CUDA toolkits: "Failed to find
 * nvToolsExt").
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');

const { onPath } = require('../binding/libtorch.cjs');

/** The first of `names` found on PATH, or null. */
function which(...names) {
  for (const name of names) {
    const f = onPath(name);
    if (f) return f;
  }
  return null;
}

/** What a build needs that is missing from PATH: [] when cmake, a C++ compiler and make/ninja are there. */
function missingTools() {
  const missing = [];
  if (!which('cmake')) missing.push('cmake');
  if (!which(...(process.env.CXX ? [process.env.CXX] : []), 'c++', 'g++', 'clang++')) missing.push('a C++ compiler (g++ or clang++)');
  if (!which('make', 'ninja')) missing.push('make (or ninja)');
  return missing;
}

/** CMake -D flags that point at the libtorch found (empty: CMakeLists.txt searches itself, in the same order). */
function torchFlags(lt) {
  if (!lt) return [];
  const cands = [
    path.join(lt.libDir, '..', 'share', 'cmake', 'Torch'), // libtorch zip, pip torch (torch/lib -> torch/share)
    path.join(lt.libDir, 'cmake', 'Torch'), // Debian: /usr/lib/<multiarch>/cmake/Torch
  ];
  const dir = cands.find((d) => fs.existsSync(path.join(d, 'TorchConfig.cmake')));
  return dir ? [`--CDTorch_DIR=${path.resolve(dir)}`] : [];
}

/**
 * Builds into `outDir` (relative to the package root; cmake-js's default 'build'). Returns
 * { ok, file, direct, log } — `log` the tail of the output on failure. `inherit` streams the output.
 */
function buildAddon({ outDir = 'build', lt = null, jobs, inherit = true, extra = [] } = {}) {
  let cmakeJs;
  try {
    cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
  } catch {
    return { ok: false, file: null, direct: false, log: 'cmake-js is not installed (it is a dependency of diffusion-features; reinstall the package)' };
  }
  const j = String(jobs || process.env.DIFFUSION_FEATURES_JOBS || (os.availableParallelism ? os.availableParallelism() : os.cpus().length));
  const file = path.join(root, outDir, 'Release', 'diffusion_features.node');
  const attempt = (direct) => {
    const args = [cmakeJs, 'compile', '-O', outDir, '--parallel', j, '--CDCMAKE_BUILD_TYPE=Release', ...torchFlags(lt), ...extra];
    if (direct) args.push('--CDDF_TORCH_DIRECT=ON');
    const r = spawnSync(process.execPath, args, {
      cwd: root, env: process.env, encoding: 'utf8', stdio: inherit ? 'inherit' : 'pipe', maxBuffer: 64 << 20,
    });
    return { ok: r.status === 0 && fs.existsSync(file), log: inherit ? '' : `${r.stdout || ''}${r.stderr || ''}`.split('\n').slice(-40).join('\n') };
  };
  const forced = process.env.DIFFUSION_FEATURES_TORCH_DIRECT === '1';
  let r = attempt(forced);
  if (!r.ok && !forced) {
    console.error('diffusion-features: the build failed; retrying with libtorch linked directly (DIFFUSION_FEATURES_TORCH_DIRECT=1)');
    fs.rmSync(path.join(root, outDir, 'CMakeCache.txt'), { force: true });
    const r2 = attempt(true);
    if (r2.ok) return { ok: true, file, direct: true, log: '' };
    r = { ok: false, log: `${r.log}\n--- direct-link retry ---\n${r2.log}` };
  }
  return { ok: r.ok, file: r.ok ? file : null, direct: forced, log: r.log };
}

/**
 * RPATH / RUNPATH entries of an ELF file (via readelf), or null when readelf is missing.
 */
function rpaths(file) {
  const r = spawnSync('readelf', ['-d', file], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  const out = [];
  for (const m of r.stdout.matchAll(/\((?:RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]/g)) out.push(...m[1].split(':'));
  return out;
}

module.exports = { buildAddon, missingTools, which, torchFlags, rpaths, root };
