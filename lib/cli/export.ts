/**
 * `diffusion-features export …`: runs the exporter (`weights/export.py`, README.md "Exporting real SD1.5 weights") with the flags given,
 * unchanged (`--from DIR|FILE.safetensors --out OUT [--components …] [--tokenizer DIR] [--config DIR]
 * [--dtype float32|float16] [--force] [--threads N]`; `export --help` prints the exporter's own help), with a
 * Python that can `import torch`: $PYTHON, then python3 on PATH (the active environment), then
 * /usr/bin/python3, then python. Where there is none, it says how to get one and exits 2.
 *
 * @module
 */
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import type { Command } from 'commander';
import { packageRoot } from '../ops.js';

/** How to get a Python with torch (printed when none is found). */
export const NO_PYTHON_HELP = [
  'diffusion-features export needs a Python with torch; none was found (tried $PYTHON, python3 on PATH, /usr/bin/python3, python).',
  'Get one in either way, then run the same command again:',
  '  - Debian/Ubuntu: apt-get install python3-torch   (torch 1.13: its exports run on every libtorch >= 1.13)',
  '  - any Linux: python3 -m venv ~/.venvs/df && ~/.venvs/df/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu',
  '    then activate it (source ~/.venvs/df/bin/activate) or set PYTHON=~/.venvs/df/bin/python',
  'An export made with torch 2.x needs libtorch >= 2.0 at run time (the loader checks: E_INCOMPATIBLE_MODEL).',
].join('\n');

/** The first Python that can `import torch` (scripts/python.cjs, shared with the npm scripts), or null. */
export function findTorchPython(): string | null {
  const req = createRequire(import.meta.url);
  const { findPython } = req(join(packageRoot(), 'scripts', 'python.cjs')) as { findPython(): string | null };
  return findPython();
}

/** Runs weights/export.py with `args`; resolves to its exit code (2 when no Python with torch exists). */
export async function runExporter(args: readonly string[]): Promise<number> {
  const python = findTorchPython();
  if (!python) {
    console.error(NO_PYTHON_HELP);
    return 2;
  }
  const script = join(packageRoot(), 'weights', 'export.py');
  const child = spawn(python, [script, ...args], { stdio: 'inherit' });
  const forward = (sig: NodeJS.Signals) => () => child.kill(sig);
  const onInt = forward('SIGINT');
  const onTerm = forward('SIGTERM');
  process.on('SIGINT', onInt).on('SIGTERM', onTerm);
  try {
    return await new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 + 1 : 1)));
    });
  } finally {
    process.off('SIGINT', onInt).off('SIGTERM', onTerm);
  }
}

/** Registers `export` on the CLI program: every argument after it goes to weights/export.py unchanged. */
export function registerExportCommand(program: Command): void {
  program
    .command('export')
    .description('export SD1.5 weights to TorchScript (runs weights/export.py with these flags; `export --help` shows them)')
    .usage('--from DIR|FILE.safetensors --out OUT [--components unet,vae,text_encoder,controlnet] [--dtype float16] …')
    .helpOption(false)
    .allowUnknownOption()
    .allowExcessArguments()
    .argument('[args...]', 'weights/export.py arguments')
    .action(async (_args: string[], _opts: unknown, cmd: Command) => {
      process.exitCode = await runExporter(cmd.args);
    });
}
