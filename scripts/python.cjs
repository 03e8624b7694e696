#!/usr/bin/env node
'use strict';
// Runs Python with the arguments given, choosing an interpreter that can `import torch`:
// $PYTHON, then python3 on PATH (the active environment: a venv or conda env with its own torch), then
// /usr/bin/python3 (Debian's python3-torch), then python — the order binding/libtorch.cjs and CMakeLists.txt use.
const { spawnSync } = require('node:child_process');

function findPython() {
  const candidates = [process.env.PYTHON, 'python3', '/usr/bin/python3', 'python'].filter(Boolean);
  for (const exe of candidates) {
    const r = spawnSync(exe, ['-c', 'import torch'], { stdio: 'ignore' });
    if (r.status === 0) return exe;
  }
  return null;
}

module.exports = { findPython };

if (require.main === module) {
  const exe = findPython();
  if (!exe) {
    console.error('No Python with torch found (tried $PYTHON, python3 on PATH, /usr/bin/python3, python). Install one: ' +
      'Debian/Ubuntu: apt-get install python3-torch; elsewhere: python3 -m venv .venv && .venv/bin/pip install torch ' +
      '(then activate it, or set PYTHON=/path/to/python).');
    process.exit(1);
  }
  const r = spawnSync(exe, process.argv.slice(2), { stdio: 'inherit' });
  process.exit(r.status === null ? 1 : r.status);
}
