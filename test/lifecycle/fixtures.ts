/**
 * The small TorchScript modules of test/fixtures/native/make_modules.py, built (with a Python that has
 * torch) into test/.cache/native/ when missing or when the script changed. Shared by test/native.test.ts
 * and test/lifecycle.test.ts.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
export const root = fileURLToPath(new URL('../..', import.meta.url));
const script = join(root, 'test', 'fixtures', 'native', 'make_modules.py');
export const nativeFixtureDir = join(root, 'test', '.cache', 'native');

/** Builds the fixture modules when needed; returns their folder. */
export function ensureNativeFixtures(): string {
  mkdirSync(nativeFixtureDir, { recursive: true });
  const stamp = join(nativeFixtureDir, 'stamp.txt');
  const hash = createHash('sha256').update(readFileSync(script)).digest('hex');
  if (existsSync(stamp) && readFileSync(stamp, 'utf8') === hash && existsSync(join(nativeFixtureDir, 'reference.json'))) {
    return nativeFixtureDir;
  }
  const python: string | null = require('../../scripts/python.cjs').findPython();
  if (!python) throw new Error('a Python with torch is needed to build the test modules (apt-get install python3-torch or set PYTHON)');
  const r = spawnSync(python, [script, nativeFixtureDir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`make_modules.py failed: ${r.stderr}`);
  writeFileSync(stamp, hash);
  return nativeFixtureDir;
}
