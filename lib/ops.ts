/**
 * Access to `models/ops.pt`, the TorchScript module holding the pipeline's tensor math
 * (preprocessing, scheduler, packaging, attention aggregation, canny, PCA, GATE score,
 * correspondence). Generated from `weights/ops.py`.
 *
 * @module
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ScriptModule, Tensor, resolveDevice, type Device, type IValue } from './native.js';
import { DiffusionFeaturesError, FileNotFoundError } from './errors.js';

/** The package root (holds `models/`), from the sources or from dist/. */
export function packageRoot(): string {
  let dir = fileURLToPath(new URL('.', import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'models', 'ops.pt'))) return dir;
    dir = resolve(dir, '..');
  }
  throw new FileNotFoundError('models/ops.pt', 'cannot locate the package root (models/ops.pt is missing)');
}

const cache = new Map<string, Promise<ScriptModule>>();

/** The ops module on `device`, loaded once per device and shared. */
export function loadOps(device: Device = 'cpu'): Promise<ScriptModule> {
  const dev = resolveDevice(device);
  let p = cache.get(dev);
  if (!p) {
    p = ScriptModule.load(join(packageRoot(), 'models', 'ops.pt'), { device: dev as Device });
    cache.set(dev, p);
    p.catch(() => cache.delete(dev));
  }
  return p;
}

/** Calls an ops method and checks that it returned a tensor. */
export async function opTensor(ops: ScriptModule, method: string, ...args: IValue[]): Promise<Tensor> {
  const v = await ops.call(method, ...args);
  if (!(v instanceof Tensor)) throw new DiffusionFeaturesError('E_INVALID_FILE', `ops.${method} did not return a tensor`);
  return v;
}
