#!/usr/bin/env node
'use strict';
/**
 * `npm run prebuilds [-- --cpu|--cuda] [-- --from FILE [--source-dir DIR]]`: makes the prebuilt binary for the libtorch found
 * here (binding/libtorch.cjs order) and puts it in prebuildify's layout, named so the loader can pick it:
 *
 *   prebuilds/linux-x64/diffusion-features.torch-<major.minor>.<variant>.napi.node
 *     variant: cpu | cu<cuda major><cuda minor> (cu130 = CUDA 13.0)
 *   prebuilds/linux-x64/<that name>.json   { torch, variant, cudaVersion, napi, sourceHash, sha256, size }
 *
 * Steps: build with cmake-js into build-prebuild/ (not build/), or take --from FILE (an existing build, e.g.
 * CI's build/Release/diffusion_features.node; it must be newer than every source file); strip it; refuse
 * it when it carries an RPATH/RUNPATH other than $ORIGIN-relative ones (the loader finds libtorch at run time);
 * test-load it in a child process with the libtorch found; write it atomically (temp file + rename).
 * sourceHash (sha256 of src/** and CMakeLists.txt) tells the loader and the install script whether a
 * prebuild was made from the sources beside it. The CUDA prebuild is made on a machine with a CUDA
 * libtorch (bench/gpu/run.sh does it on the GPU machine). `--check` only reports whether each prebuild
 * is current (exit 1 if one is stale).
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const { spawnSync } = require('node:child_process');
const { buildAddon, rpaths, root } = require('./build.cjs');
const binding = require('../binding/index.cjs');

const args = process.argv.slice(2);
const want = args.includes('--cuda') ? 'cuda' : args.includes('--cpu') ? 'cpu' : null;
const fromIdx = args.indexOf('--from');
const from = fromIdx >= 0 ? path.resolve(args[fromIdx + 1] || '') : null;
// --source-dir DIR: the sources --from FILE was built from, when not this checkout's (e.g. `git archive HEAD`
// of a checkout whose working tree has uncommitted C++ changes), so sourceHash names what a clean clone has.
const srcIdx = args.indexOf('--source-dir');
const sourceDir = srcIdx >= 0 ? path.resolve(args[srcIdx + 1] || '') : root;

function fail(msg) {
  console.error(`prebuild: ${msg}`);
  process.exit(1);
}

function newestSource(dir) {
  let newest = 0;
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  walk(path.join(dir, 'src'));
  return Math.max(newest, fs.statSync(path.join(dir, 'CMakeLists.txt')).mtimeMs);
}

if (args.includes('--check')) {
  const current = binding.sourceHash();
  let stale = 0;
  for (const p of binding.prebuilds()) {
    const ok = p.sourceHash === current;
    if (!ok) stale++;
    console.log(`${path.relative(root, p.file)}: ${ok ? 'current' : 'STALE (made from other sources; run `npm run prebuilds`)'}`);
  }
  process.exit(stale ? 1 : 0);
}

const { found, tried } = binding.libtorch.locate({ refresh: true });
if (!found) fail(`no libtorch found:\n  - ${tried.join('\n  - ')}`);
console.log(`prebuild: ${binding.libtorch.label(found)}`);

let built = from;
if (from) {
  if (!fs.existsSync(from)) fail(`${from} does not exist`);
  if (fs.statSync(from).mtimeMs < newestSource(sourceDir)) fail(`${from} is older than the sources in src/ or CMakeLists.txt; build it again first`);
} else {
  const r = buildAddon({ outDir: 'build-prebuild', lt: found });
  if (!r.ok) fail(`the build failed\n${r.log}`);
  built = r.file;
}

const variant = found.variant;
if (want && (want === 'cuda') !== (variant !== 'cpu')) fail(`asked for a ${want} build but the libtorch found is ${binding.libtorch.label(found)}`);
const name = `diffusion-features.torch-${found.short}.${variant}.napi.node`;
const destDir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
fs.mkdirSync(destDir, { recursive: true });
const dest = path.join(destDir, name);
// stripped and test-loaded outside the package (require() needs the .node extension), then moved in atomically
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'df-prebuild-'));
process.on('exit', () => fs.rmSync(work, { recursive: true, force: true }));
const tmp = path.join(work, name);
fs.copyFileSync(built, tmp);
const strip = spawnSync('strip', ['--strip-unneeded', tmp], { stdio: 'inherit' });
if (strip.status !== 0) console.warn('prebuild: strip failed or is missing; the binary is not stripped');
const rp = rpaths(tmp);
if (rp === null) console.warn('prebuild: readelf is missing; RPATH not checked');
else if (rp.some((p) => p && !p.startsWith('$ORIGIN'))) {
  fs.rmSync(tmp);
  fail(`${built} carries an absolute RPATH/RUNPATH (${rp.join(':')}); CMakeLists.txt must not set one`);
}
const v = binding.testLoad(tmp, found);
if (!v.ok) {
  fs.rmSync(tmp);
  fail(`the binary does not load: ${v.reason}`);
}
if (v.info && !String(v.info.torchVersion).startsWith(found.short)) {
  fs.rmSync(tmp);
  fail(`the binary reports libtorch ${v.info.torchVersion}, but ${found.version} was found`);
}
if (v.info && v.info.cuda !== (variant !== 'cpu')) {
  fs.rmSync(tmp);
  fail(`the binary ${v.info.cuda ? 'has' : 'lacks'} CUDA but the libtorch found is ${variant}`);
}
const bytes = fs.readFileSync(tmp);
const meta = {
  torch: found.version,
  short: found.short,
  variant,
  cudaVersion: found.cudaVersion,
  napi: (v.info && v.info.napiVersion) || 8,
  sourceHash: binding.sourceHash(sourceDir),
  sha256: crypto.createHash('sha256').update(bytes).digest('hex'),
  size: bytes.length,
};
fs.copyFileSync(tmp, `${dest}.tmp`);
fs.renameSync(`${dest}.tmp`, dest);
fs.writeFileSync(`${dest}.json.tmp`, `${JSON.stringify(meta, null, 2)}\n`);
fs.renameSync(`${dest}.json.tmp`, `${dest}.json`);
console.log(`prebuild: wrote ${path.relative(root, dest)} (${(bytes.length / 1e6).toFixed(2)} MB, ${variant}, libtorch ${found.version}, ` +
  `RPATH ${rp && rp.length ? rp.join(':') : 'none'})`);
