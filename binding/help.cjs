'use strict';
/**
 * The "what to do" text shared by the install script (scripts/install.cjs) and the loader (E_NATIVE_LOAD),
 * so both say the same thing.
 */
const fs = require('node:fs');

function isDebianLike() {
  try {
    return /^(ID|ID_LIKE)=.*(debian|ubuntu)/m.test(fs.readFileSync('/etc/os-release', 'utf8'));
  } catch {
    return false;
  }
}

/** Ways to get a libtorch, one per line. */
function getLibtorchLines() {
  const lines = [];
  if (isDebianLike()) lines.push('Debian/Ubuntu: apt-get install libtorch-dev   (libtorch 1.13, CPU; a prebuilt binary matches it)');
  lines.push(
    'a Python with torch: pip install torch in the active environment (found as python3 on PATH), or PYTHON=/path/to/python',
    'LIBTORCH=/path/to/libtorch   (an unpacked libtorch zip from https://pytorch.org, CPU or CUDA)',
    'Torch_DIR=/path/to/share/cmake/Torch',
  );
  return lines;
}

/** How to build from source, one per line. */
function buildLines() {
  return [
    'build from source: `npm rebuild diffusion-features` (in a checkout: `npm run build:native`); it needs cmake >= 3.18,',
    '  a C++17 compiler and make (Debian/Ubuntu: apt-get install cmake g++ make) and the libtorch headers;',
    '  set DIFFUSION_FEATURES_TORCH_DIRECT=1 when find_package(Torch) fails (e.g. "Failed to find nvToolsExt" with CUDA 12)',
  ];
}

/**
 * The full advice. `found` is binding/libtorch.cjs's description (or null), `prebuilt` the prebuilt binaries'
 * labels ("libtorch 1.13 CPU").
 */
function advice(found, prebuilt) {
  const have = prebuilt.length ? `prebuilt binaries exist for: ${prebuilt.join('; ')}` : 'this package has no prebuilt binary for this platform';
  const lines = [];
  if (!found) {
    lines.push('No libtorch found. Get one in any of these ways (' + have + '):');
    for (const l of getLibtorchLines()) lines.push(`  - ${l}`);
    lines.push('Then load again (no reinstall is needed when a prebuilt binary matches), or');
  } else {
    lines.push(`No binary loads with the libtorch found (${have}). Either:`);
    lines.push('  - make a matching libtorch the one found first (LIBTORCH, Torch_DIR, PYTHON, python3 on PATH, then the system), or');
  }
  buildLines().forEach((l, i) => lines.push(i === 0 ? `  - ${l}` : `  ${l}`));
  return lines.join('\n');
}

module.exports = { advice, getLibtorchLines, buildLines, isDebianLike };
