/**
 * A host process that forks (child_process) while the addon runs a GEMM on a torch thread must not hang.
 * OpenBLAS's pthread build shuts its pool down in a fork handler; binding/index.cjs therefore sets
 * OPENBLAS_NUM_THREADS=1 unless the user set it. Before that, this hung 3 of 3 runs within a minute.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { ensureNativeFixtures, root } from './lifecycle/fixtures.js';

function runChild(seconds: number, timeoutMs: number): Promise<{ code: number | null; signal: string | null; out: string; hung: boolean }> {
  const dir = ensureNativeFixtures();
  const env = { ...process.env };
  delete env.OPENBLAS_NUM_THREADS;
  const child = spawn(process.execPath, [join(root, 'test', 'lifecycle', 'fork-child.mjs'), join(root, 'dist', 'index.cjs'), join(dir, 'mlp.pt'), String(seconds)], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  return new Promise((resolve) => {
    let hung = false;
    const timer = setTimeout(() => {
      hung = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, out, hung });
    });
  });
}

test('forking child processes while forwards run does not hang the process (3 runs)', async (t) => {
  for (let i = 0; i < 3; i++) {
    const r = await runChild(6, 60_000);
    t.false(r.hung, `run ${i}: hung (killed after 60 s); output: ${r.out.slice(-500)}`);
    t.is(r.code, 0, `run ${i}: exit ${r.code} ${r.signal}; output: ${r.out.slice(-500)}`);
    const m = /\{"forwards":(\d+),"spawns":(\d+)\}/.exec(r.out);
    t.truthy(m, r.out.slice(-500));
    if (m) {
      t.true(Number(m[1]) > 0 && Number(m[2]) > 0, `both loops ran: ${m[0]}`);
      t.log(`run ${i}: ${m[0]}`);
    }
  }
});
