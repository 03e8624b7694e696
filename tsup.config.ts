import { writeFile, rm } from 'node:fs/promises';
import { defineConfig } from 'tsup';

/**
 * One set of classes for `require()` and `import`: the ESM entry (dist/index.js) is a thin wrapper that
 * re-exports the CommonJS build (dist/index.cjs), so `Tensor`, `DiffusionFeaturesError` & co. are the same
 * objects whichever way a consumer loads the package (no dual-package hazard: instanceof works across
 * them). Node sees the CJS build's named exports through the `0 && (module.exports = {…})` note esbuild
 * writes (cjs-module-lexer). The ESM build is still made, for its typings (index.d.ts); its JS is replaced.
 */
async function esmWrapper(): Promise<void> {
  await writeFile('dist/index.js', "// ESM entry: re-exports the CommonJS build so both share one set of classes (tsup.config.ts)\nexport * from './index.cjs';\n");
  await rm('dist/index.js.map', { force: true });
}

export default defineConfig([
  {
    entry: { index: 'lib/index.ts' },
    format: ['esm', 'cjs'],
    dts: true,
    sourcemap: true,
    clean: true,
    target: 'node20',
    shims: true,
    onSuccess: esmWrapper,
  },
  {
    entry: { cli: 'lib/cli.ts' },
    format: ['esm'],
    banner: { js: '#!/usr/bin/env node' },
    sourcemap: true,
    target: 'node20',
    shims: true,
  },
]);
