/**
 * `npm run fuzz`: runs every fuzz target module in test/fuzz/ (each a script printing one JSON line per
 * target) as its own process, and exits non-zero if any reports a failure. Extra arguments are passed
 * to each module (target names); `DF_FUZZ_RUNS` sets the inputs per target (default 100,000).
 */
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const dir = import.meta.dirname;
let failed = false;
for (const f of readdirSync(dir).filter((n) => n.endsWith('.ts') && n !== 'run.ts').sort()) {
  console.error(`fuzz: ${f}`);
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(dir, f), ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.status !== 0) failed = true;
}
process.exitCode = failed ? 1 : 0;
