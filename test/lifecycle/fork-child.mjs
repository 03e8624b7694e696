// Child of test/fork.test.ts: GEMM-heavy forwards on a torch thread while the JS thread forks child
// processes in a loop. With OpenBLAS's pthread pool active this hung the process (fork handler vs pool).
import { createRequire } from 'node:module';
import { spawn } from 'node:child_process';
const require = createRequire(import.meta.url);
const [dist, mlp, seconds] = process.argv.slice(2);
const df = require(dist);
const mod = await df.ScriptModule.load(mlp);
const x = df.Tensor.fromFloat32Array(new Float32Array(4096 * 256).fill(0.5), [4096, 256]);
let spawns = 0;
let stop = false;
const spawner = (async () => {
  while (!stop) {
    await new Promise((resolve) => spawn('true').on('exit', resolve).on('error', resolve));
    spawns++;
  }
})();
const t0 = Date.now();
let forwards = 0;
while (Date.now() - t0 < Number(seconds) * 1000) {
  const y = await mod.forward(x);
  y.dispose();
  forwards++;
}
stop = true;
await spawner;
console.log(JSON.stringify({ forwards, spawns }));
