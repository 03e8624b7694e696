/**
 * `npm run bench [-- --only native,unet,pipeline,recipe,canny,heads,queue,eventloop] [--out FILE]`
 *
 * Runs the benchmarks. Each one measures this implementation against a baseline in the same run and
 * prints a table with the ratio. Results can be saved (with machine and date) under bench/results/.
 */
import { writeFileSync, mkdirSync, renameSync } from 'node:fs';
import { dirname } from 'node:path';
import os from 'node:os';
import { parseArgs } from 'node:util';

const suites: Record<string, string> = {
  native: './native.ts',
  unet: './unet.ts',
  pipeline: './pipeline.ts',
  recipe: './recipe.ts',
  canny: './canny.ts',
  heads: './heads.ts',
  queue: './queue.ts',
  eventloop: './eventloop.ts',
};

const { values } = parseArgs({
  options: { only: { type: 'string' }, out: { type: 'string' } },
  allowPositionals: false,
});
const chosen = values.only ? values.only.split(',').map((s) => s.trim()) : Object.keys(suites);

const header = [
  `# diffusion-features benchmarks`,
  `date: ${new Date().toISOString()}`,
  `machine: ${os.cpus()[0]?.model ?? 'unknown cpu'} x${os.cpus().length}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${os.platform()} ${os.arch()}, node ${process.version}`,
  `command: ${Object.entries(process.env)
    .filter(([k]) => /^(BENCH_|DF_BENCH|OMP_NUM_THREADS)/.test(k))
    .map(([k, v]) => `${k}=${v} `)
    .join('')}npm run bench -- ${process.argv.slice(2).join(' ')}`,
  '',
].join('\n');
let report = header;
console.log(header);
let failed = 0;
for (const name of chosen) {
  const file = suites[name];
  if (!file) {
    console.error(`unknown suite '${name}' (known: ${Object.keys(suites).join(', ')})`);
    process.exitCode = 2;
    continue;
  }
  console.log(`## ${name}`);
  try {
    const mod = (await import(file)) as { run: () => Promise<string> };
    const text = await mod.run();
    console.log(text);
    report += `## ${name}\n${text}\n\n`;
  } catch (err) {
    failed++;
    const msg = err instanceof Error ? err.message : String(err);
    console.error(`suite ${name} failed: ${msg}`);
    report += `## ${name}\nFAILED: ${msg}\n\n`;
  }
}
if (values.out) {
  mkdirSync(dirname(values.out), { recursive: true });
  writeFileSync(`${values.out}.tmp`, report);
  renameSync(`${values.out}.tmp`, values.out);
}
if (failed) process.exitCode = 1;
