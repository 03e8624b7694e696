#!/usr/bin/env node
'use strict';
/**
 * `npm run prebuild [-- --cuda|--cpu]`: builds the addon with cmake-js and places it where node-gyp-build
 * (and binding/index.cjs) look for prebuilt binaries, with prebuildify's naming for a napi build
 * (prebuildify itself has no cmake-js backend):
 *
 *   prebuilds/linux-x64/diffusion-features.napi.node       CPU build. Needs, at run time, the libtorch it was
 *       built against: Debian/Ubuntu `apt-get install libtorch-dev` (1.13, /usr/lib/x86_64-linux-gnu, found
 *       through the RPATH) when built on Debian's libtorch; otherwise that libtorch's lib/ dir on the RPATH or
 *       LD_LIBRARY_PATH.
 *   prebuilds/linux-x64/diffusion-features.napi.cuda.node  CUDA build (built against a CUDA libtorch, e.g.
 *       LIBTORCH=/opt/libtorch from pytorch.org's libtorch 2.x cu12x zip). Needs that libtorch (its lib/ at the
 *       same path, or on LD_LIBRARY_PATH) and an NVIDIA driver. binding/index.cjs prefers it when an NVIDIA GPU
 *       is present and falls back to the CPU build when it does not load.
 *
 * The flavor is detected from the libtorch found (torch_cuda present → CUDA); --cuda / --cpu assert it.
 * Each binary is test-loaded in a child process after the build. No libtorch libraries are copied into
 * prebuilds/ (they are ~1-3 GB); the prebuild is only the addon itself (~0.4 MB, stripped).
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const args = process.argv.slice(2);
const want = args.includes('--cuda') ? 'cuda' : args.includes('--cpu') ? 'cpu' : null;
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));

function fail(msg) {
  console.error(`prebuild: ${msg}`);
  process.exit(1);
}

const buildDir = path.join(root, 'build');
const jobs = String(process.env.DIFFUSION_FEATURES_JOBS || (os.availableParallelism ? os.availableParallelism() : os.cpus().length));
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const r = spawnSync(process.execPath, [cmakeJs, 'compile', '-j', jobs, '--CDCMAKE_BUILD_TYPE=Release'], { cwd: root, stdio: 'inherit' });
if (r.status !== 0) fail('cmake-js build failed');
const built = path.join(buildDir, 'Release', 'diffusion_features.node');
if (!fs.existsSync(built)) fail(`${built} was not produced`);

// Which flavor did we build? Ask the binary itself (in a child process: it may not load).
const probe = spawnSync(process.execPath, ['-e', `const m = require(${JSON.stringify(built)}); console.log(JSON.stringify(m.buildInfo()))`],
  { encoding: 'utf8' });
if (probe.status !== 0) fail(`the built addon does not load:\n${probe.stderr}`);
const info = JSON.parse(probe.stdout.trim().split('\n').pop());
const flavor = info.cuda ? 'cuda' : 'cpu';
if (want && want !== flavor) fail(`asked for a ${want} build but the libtorch found is ${flavor} (libtorch ${info.torchVersion})`);

// prebuildify naming: <name>.napi.node (+ our 'cuda' tag, which node-gyp-build ignores when matching).
const name = `${pkg.name.replace(/\//g, '+')}.napi${flavor === 'cuda' ? '.cuda' : ''}.node`;
const destDir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
fs.mkdirSync(destDir, { recursive: true });
const tmp = path.join(destDir, `${name}.tmp`);
fs.copyFileSync(built, tmp);
spawnSync('strip', ['--strip-unneeded', tmp], { stdio: 'ignore' }); // best effort, like prebuildify --strip
fs.renameSync(tmp, path.join(destDir, name));
console.log(`prebuild: wrote ${path.relative(root, path.join(destDir, name))} (${flavor}, libtorch ${info.torchVersion}, napi ${info.napiVersion})`);
