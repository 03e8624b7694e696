// A child process of test/lifecycle.test.ts: runs addon work and ends it in a hostile way (a Worker
// terminated mid-call, process.exit() during a load or a forward, ...). The parent only checks how this
// process ends: exit code 0, no signal, no hang. Usage: node child.mjs <scenario> <seed> <fixtureDir>
// Env: DIFFUSION_FEATURES_BINARY (the addon), DIFFUSION_FEATURES_SKIP_LOAD_CHECK=1 (no child test-load per Worker).
import { Worker, isMainThread, workerData, parentPort } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..', '..');

/** Small deterministic PRNG so a failing seed can be replayed. */
function rng(seed) {
  let s = (Number(seed) * 2654435761) >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 32;
  };
}

const addon = () => require(join(root, 'binding', 'index.cjs')).load();
const micro = (name) => join(root, 'models', 'micro', name);

/** Work a thread does until it is stopped: loads and forwards, never awaiting the end. */
async function churn(A, dir, kind, rand) {
  const conv = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
  const x = await A.RawTensor.randn([64, 64], 1n, 'cpu', null);
  const loads = [];
  for (;;) {
    const calls = [conv.call('slow', [x, 1 + Math.floor(rand() * 20)]), conv.call('forward', [await A.RawTensor.randn([1, 3, 8, 8], 2n, 'cpu', null)])];
    if (kind === 'load' || rand() < 0.3) loads.push(A.loadModule(micro(rand() < 0.5 ? 'unet.pt' : 'text_encoder.pt'), 'cpu', null).then((m) => m.dispose()));
    await Promise.all(calls);
    if (loads.length > 2) await loads.shift();
  }
}

/** Calls that fail on the torch thread (a wrong input shape), many in flight: delivery builds rejections. */
async function rejects(A, dir) {
  const conv = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
  const bad = await A.RawTensor.randn([1, 5, 8, 8], 2n, 'cpu', null);
  let first = true;
  for (;;) {
    const calls = Array.from({ length: 16 }, () => conv.call('forward', [bad]).then(() => 'resolved', (e) => e.code));
    const codes = await Promise.all(calls);
    if (codes.some((c) => c !== 'E_TORCH')) { console.error('unexpected outcome', codes); process.exit(7); }
    if (first) parentPort.postMessage('rejecting');
    first = false;
  }
}

async function main() {
  const [scenario, seedArg, dir] = process.argv.slice(2);
  const rand = rng(seedArg);
  const A = addon();
  const delay = (ms) => new Promise((r) => setTimeout(r, ms));
  switch (scenario) {
    case 'worker-terminate': {
      // Several Workers at once, each terminated at a random point (during load, forward or delivery).
      const n = 2 + Math.floor(rand() * 3);
      const workers = Array.from({ length: n }, () => new Worker(fileURLToPath(import.meta.url), {
        workerData: { dir, seed: Math.floor(rand() * 1e9), kind: rand() < 0.5 ? 'load' : 'forward' }, env: process.env,
      }));
      for (const w of workers) w.on('error', (e) => { console.error('worker error', e); process.exitCode = 3; });
      await Promise.all(workers.map(async (w) => { await delay(rand() * 1500); await w.terminate(); }));
      // The main thread still works afterwards.
      const m = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
      await m.call('forward', [await A.RawTensor.randn([1, 3, 8, 8], 3n, 'cpu', null)]);
      console.log('ok');
      return;
    }
    case 'worker-terminate-rejections': {
      // Rounds of Workers terminated while their failed calls are being delivered (rejections are
      // built in the drain callback of an env that N-API already refuses: must not std::terminate).
      for (let round = 0; round < 6; round++) {
        const workers = Array.from({ length: 3 }, () => new Worker(fileURLToPath(import.meta.url), { workerData: { dir, kind: 'reject' }, env: process.env }));
        for (const w of workers) w.on('error', (e) => { console.error('worker error', e); process.exitCode = 3; });
        await Promise.all(workers.map(async (w) => {
          await new Promise((r) => w.once('message', r));
          await delay(rand() * 40);
          await w.terminate();
        }));
      }
      const m = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
      await m.call('forward', [await A.RawTensor.randn([1, 3, 8, 8], 3n, 'cpu', null)]);
      console.log('ok');
      return;
    }
    case 'worker-exit': {
      // A Worker that calls process.exit() in its own thread while its calls are in flight.
      const w = new Worker(fileURLToPath(import.meta.url), { workerData: { dir, seed: Math.floor(rand() * 1e9), kind: 'forward', exitAfter: rand() * 800 }, env: process.env });
      await new Promise((r) => w.on('exit', r));
      const m = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
      await m.call('forward', [await A.RawTensor.randn([1, 3, 8, 8], 3n, 'cpu', null)]);
      console.log('ok');
      return;
    }
    case 'exit-during-load': {
      for (const f of ['unet.pt', 'text_encoder.pt', 'vae_encoder.pt']) A.loadModule(micro(f), 'cpu', null).catch(() => {});
      setTimeout(() => process.exit(0), rand() * 400);
      return;
    }
    case 'exit-during-forward': {
      churn(A, dir, 'forward', rand).catch((e) => { console.error(e); process.exit(4); });
      setTimeout(() => process.exit(0), 100 + rand() * 900);
      return;
    }
    case 'exit-after-load-error': {
      // A pipeline whose unet.pt is corrupt: the first rejection ends the process while the others load.
      const loads = ['text_encoder.pt', 'vae_encoder.pt', 'controlnet.pt'].map((f) => A.loadModule(micro(f), 'cpu', null));
      loads.splice(Math.floor(rand() * 3), 0, A.loadModule(join(dir, 'corrupt.pt'), 'cpu', null));
      try {
        await Promise.all(loads);
        console.error('corrupt file loaded');
        process.exit(5);
      } catch {
        process.exit(0);
      }
      return;
    }
    case 'main-exit-workers-busy': {
      // process.exit() on the main thread while Workers have calls in flight.
      for (let i = 0; i < 2; i++) new Worker(fileURLToPath(import.meta.url), { workerData: { dir, seed: Math.floor(rand() * 1e9), kind: 'forward' }, env: process.env });
      setTimeout(() => process.exit(0), 300 + rand() * 700);
      return;
    }
    case 'load-vs-forward': {
      // One thread loads pipelines (a Worker starting up: addon load + setNumThreads + module loads)
      // while the main thread runs forwards: must not hang.
      const stop = { done: false };
      const conv = await A.loadModule(join(dir, 'conv.pt'), 'cpu', null);
      const mlp = await A.loadModule(join(dir, 'mlp.pt'), 'cpu', null);
      const x = await A.RawTensor.randn([32, 256], 4n, 'cpu', null);
      const fwd = (async () => { while (!stop.done) await Promise.all([mlp.call('forward', [x]), conv.call('forward', [await A.RawTensor.randn([1, 3, 16, 16], 2n, 'cpu', null)])]); })();
      for (let i = 0; i < 2; i++) {
        const w = new Worker(fileURLToPath(import.meta.url), { workerData: { dir, seed: i, kind: 'load-once' }, env: process.env });
        await new Promise((r, j) => { w.on('exit', r); w.on('error', j); });
      }
      stop.done = true;
      await fwd;
      console.log('ok');
      return;
    }
    case 'threads-churn': {
      // setNumThreads from the JS thread and Workers starting up (each sets the thread count on load)
      // while calls run: the thread settings must never reach a running call in a bad state.
      const stop = { done: false };
      const mlp = await A.loadModule(join(dir, 'mlp.pt'), 'cpu', null);
      const x = await A.RawTensor.randn([64, 256], 4n, 'cpu', null);
      const fwd = Promise.all([0, 1, 2].map(async () => { while (!stop.done) await mlp.call('forward', [x]); }));
      const workers = [];
      for (let i = 0; i < 24; i++) {
        A.setNumThreads(1 + Math.floor(rand() * 3));
        if (i % 12 === 0) {
          // listen for 'exit' at once: a Worker that finishes its loads during this loop emits it only once
          const w = new Worker(fileURLToPath(import.meta.url), { workerData: { dir, seed: i, kind: 'load-once' }, env: process.env });
          workers.push(new Promise((r, j) => { w.on('exit', r); w.on('error', j); }));
        }
        await delay(rand() * 30);
      }
      await Promise.all(workers);
      stop.done = true;
      await fwd;
      console.log('ok');
      return;
    }
    default:
      console.error(`unknown scenario ${scenario}`);
      process.exit(2);
  }
}

if (isMainThread) {
  main().catch((e) => { console.error(e); process.exit(6); });
} else {
  const { dir, seed, kind, exitAfter } = workerData;
  const A = addon();
  if (kind === 'load-once') {
    Promise.all(['unet.pt', 'text_encoder.pt'].map((f) => A.loadModule(micro(f), 'cpu', null)))
      .then((ms) => { for (const m of ms) m.dispose(); parentPort.postMessage('loaded'); });
  } else if (kind === 'reject') {
    rejects(A, dir).catch(() => {});
  } else {
    if (exitAfter !== undefined) setTimeout(() => process.exit(0), exitAfter);
    churn(A, dir, kind, rng(seed)).catch(() => {});
  }
}
