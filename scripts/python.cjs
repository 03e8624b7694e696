#!/usr/bin/env node
'use strict';
// Runs Python with the arguments given, choosing an interpreter that can `import torch`:
// $PYTHON, then /usr/bin/python3 (Debian's python3-torch), then python3 on PATH.
const { spawnSync } = require('node:child_process');

function findPython() {
  const candidates = [process.env.PYTHON, '/usr/bin/python3', 'python3', 'python'].filter(Boolean);
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
    console.error('No Python with torch found. Install python3-torch (Debian/Ubuntu: apt-get install python3-torch) or set PYTHON.');
    process.exit(1);
  }
  const r = spawnSync(exe, process.argv.slice(2), { stdio: 'inherit' });
  process.exit(r.status === null ? 1 : r.status);
}
