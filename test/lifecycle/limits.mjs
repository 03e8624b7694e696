// A child process of test/lifecycle.test.ts: the parent lowers this process's address-space limit
// (prlimit --as) once the addon is loaded, so that no new thread stack fits; then thread starts must fail
// with a clear error (never std::terminate, never a hang). Prints one JSON line of error codes.
import { createRequire } from 'node:module';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readFileSync } from 'node:fs';

const require = createRequire(import.meta.url);
const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const A = require(join(root, 'binding', 'index.cjs')).load();
const vm = /VmSize:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1];
process.stdout.write(`${vm}\n`);
process.stdin.once('data', async () => {
  const codeOf = async (fn) => {
    try {
      await fn();
      return 'ok';
    } catch (e) {
      return `${e.code}: ${e.message}`;
    }
  };
  const out = {
    torchThread: await codeOf(() => A.RawTensor.randn([4], 1n, 'cpu', null)),
    setNumThreads: await codeOf(() => A.setNumThreads(A.maxThreads())),
    numThreadsAfter: A.getNumThreads(),
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(0);
});
