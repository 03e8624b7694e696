/**
 * `models/ops.pt`, the TorchScript module holding every piece of tensor math that is not a model
 * (built from the Python package `weights/ops/`), as a typed class: one method per TorchScript
 * method, each result checked once, here. {@link loadOps} is the only loader; the module is loaded
 * once per device and shared by every pipeline, tool and LoRA manager on that device.
 *
 * What each op computes is documented in `docs/method.md` (the sections named below) and, for the
 * exact arithmetic, in `weights/ops/`.
 *
 * @module
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ScriptModule, Tensor, resolveDevice, type Device, type IValue } from './native.js';
import { FileNotFoundError, InvalidFileError } from './errors.js';

/** The package root (holds `models/`), from the sources or from dist/. */
export function packageRoot(): string {
  let dir = fileURLToPath(new URL('.', import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'models', 'ops.pt'))) return dir;
    dir = resolve(dir, '..');
  }
  throw new FileNotFoundError('models/ops.pt', 'cannot locate the package root (models/ops.pt is missing)');
}

/** State of the PLMS scheduler between steps; start with {@link PLMS_START}. */
export interface PlmsState {
  /** The last (up to four) noise predictions. */
  ets: Tensor[];
  /** Steps taken so far. */
  counter: number;
  /** The sample of the first step, kept for the second (PLMS start-up). */
  cur: Tensor | null;
}

/** The PLMS state before the first step. */
export const PLMS_START: Readonly<PlmsState> = Object.freeze({ ets: [], counter: 0, cur: null });

/** The typed `models/ops.pt` module on one device. Obtain it with {@link loadOps}. */
export class Ops {
  /** @internal use {@link loadOps} */
  constructor(private readonly m: ScriptModule) {}

  /** The device the ops run on (`'cpu'`, `'cuda:0'`, …). */
  get device(): string {
    return this.m.device;
  }

  private async tensor(method: string, ...args: IValue[]): Promise<Tensor> {
    const v = await this.m.call(method, ...args);
    if (!(v instanceof Tensor)) throw new InvalidFileError('models/ops.pt', `ops.${method} did not return a tensor`);
    return v;
  }

  private async int(method: string, ...args: IValue[]): Promise<number> {
    const v = await this.m.call(method, ...args);
    if (typeof v !== 'number') throw new InvalidFileError('models/ops.pt', `ops.${method} did not return an int`);
    return v;
  }

  // ---------------------------------------------------------------- images and latents (method.md §Latents)

  /** uint8 B×H×W×3 RGB → float32 B×3×H×W in [-1, 1] (channels-last strides, as diffusers hands the VAE). */
  preprocess(u8: Tensor): Promise<Tensor> {
    return this.tensor('preprocess', u8);
  }

  /** z0 = scaling · (mean + exp(½·clamp(logvar, −30, 20)) · noise) when `sample`, else scaling · mean. */
  posterior(mean: Tensor, logvar: Tensor, noise: Tensor | null, sample: boolean, scaling: number): Promise<Tensor> {
    return this.tensor('posterior', mean, logvar, noise, sample, scaling);
  }

  /** diffusers `PNDMScheduler.add_noise` at timestep `t` (ᾱ cast to the sample's dtype). */
  addNoise(z0: Tensor, noise: Tensor, t: number): Promise<Tensor> {
    return this.tensor('add_noise', z0, noise, t);
  }

  // ---------------------------------------------------------------- timesteps and schedulers (method.md §Timesteps, §Denoising)

  /** The timestep the UNet sees for nominal `t`: `'reference'` → t+1 (999 → 999), `'exact'` → t. */
  unetTimestep(t: number, mode: 'reference' | 'exact'): Promise<number> {
    return this.int('unet_timestep', t, mode);
  }

  /** The reference's multi-step schedule, e.g. (60, 50) → [61, 60, …, 50]: noise at [0], PLMS over [:-1], features at [-1]. */
  async plmsTimesteps(denoiseFrom: number, t: number): Promise<number[]> {
    const v = await this.m.call('plms_timesteps', denoiseFrom, t);
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'number')) throw new InvalidFileError('models/ops.pt', 'ops.plms_timesteps did not return a list of ints');
    return v as number[];
  }

  /**
   * One diffusers `PNDMScheduler.step_plms` (1000 inference steps) from `t`. Resolves to the previous
   * sample and the next state; the returned tensors (sample, `ets`, `cur`) are new handles the caller owns.
   */
  async plmsStep(eps: Tensor, t: number, sample: Tensor, state: Readonly<PlmsState>): Promise<{ sample: Tensor; state: PlmsState }> {
    const r = await this.m.call('plms_step', eps, t, sample, state.ets, state.counter, state.cur);
    if (!Array.isArray(r) || r.length !== 4 || !(r[0] instanceof Tensor) || !Array.isArray(r[1]) || typeof r[2] !== 'number') {
      throw new InvalidFileError('models/ops.pt', 'ops.plms_step did not return (sample, ets, counter, cur)');
    }
    const [prev, ets, counter, cur] = r as [Tensor, Tensor[], number, Tensor | null];
    return { sample: prev, state: { ets, counter, cur } };
  }

  /** Deterministic DDIM (eta 0) from `t` to `prev` (prev < 0 → ᾱ₀). */
  ddimStep(eps: Tensor, t: number, prev: number, sample: Tensor): Promise<Tensor> {
    return this.tensor('ddim_step', eps, t, prev, sample);
  }

  /** The 1000-entry `scaled_linear` β table (CPU float32). */
  betas(): Promise<Tensor> {
    return this.tensor('betas');
  }

  /** ᾱ (cumulative product of 1 − β), CPU float32. */
  alphasCumprod(): Promise<Tensor> {
    return this.tensor('alphas_cumprod');
  }

  // ---------------------------------------------------------------- ControlNet (method.md §ControlNet)

  /** OpenCV 4.6 `Canny(img, low, high)` on B×H×W×C uint8 → B×H×W uint8 0/255 (integer-exact). */
  canny(u8: Tensor, low: number, high: number): Promise<Tensor> {
    return this.tensor('canny', u8, low, high);
  }

  /** B×H×W uint8 edges → B×3×H×W float32 in [0, 1], the ControlNet's conditioning image. */
  controlImage(edges: Tensor): Promise<Tensor> {
    return this.tensor('control_image', edges);
  }

  // ---------------------------------------------------------------- features (method.md §Attention, §Packaging)

  /** The aggregated attention feature: head mean, maps of min_q ≤ n_q ≤ max_q averaged per size, nearest-resized to latent², concatenated. */
  aggregateAttention(maps: Tensor[], latent: number, minQ: number, maxQ: number): Promise<Tensor> {
    return this.tensor('aggregate_attention', maps, latent, minQ, maxQ);
  }

  /** adaptive_avg_pool2d of the last two dims to (H//r, W//r). */
  featureResize(x: Tensor, r: number): Promise<Tensor> {
    return this.tensor('feature_resize', x, r);
  }

  /** Packaging: every feature nearest-resized to the largest spatial size, concatenated on channels in order. */
  package(feats: Tensor[]): Promise<Tensor> {
    return this.tensor('package', feats);
  }

  /** Per image i: `{ key: d[key][i] }` as C×h×w CPU float32 contiguous tensors (own storage), key order kept. */
  async splitToCpu(d: Record<string, Tensor>): Promise<Record<string, Tensor>[]> {
    const v = await this.m.call('split_to_cpu', d);
    if (!Array.isArray(v)) throw new InvalidFileError('models/ops.pt', 'ops.split_to_cpu did not return a list');
    return v as Record<string, Tensor>[];
  }

  /** Rows [start, start + n) of the first dim, contiguous. */
  rows(x: Tensor, start: number, n: number): Promise<Tensor> {
    return this.tensor('rows', x, start, n);
  }

  /** `torch.cat(xs, dim)`. */
  cat(xs: Tensor[], dim: number): Promise<Tensor> {
    return this.tensor('cat', xs, dim);
  }

  /** `x` repeated `n` times along the first dim. */
  repeatBatch(x: Tensor, n: number): Promise<Tensor> {
    return this.tensor('repeat_batch', x, n);
  }

  // ---------------------------------------------------------------- LoRA (method.md §LoRA)

  /** W + Σ sᵢ · reshape(upᵢ @ downᵢ, W.shape), in float64, rounded once to W's dtype. */
  loraMerge(w: Tensor, ups: Tensor[], downs: Tensor[], scales: number[]): Promise<Tensor> {
    return this.tensor('lora_merge', w, ups, downs, scales);
  }

  // ---------------------------------------------------------------- analysis (method.md §Visualisation, §GATE score, §Correspondence)

  /** C×H×W → H×W×3 uint8: 3-component PCA, per-component min–max. */
  pcaRgb(x: Tensor): Promise<Tensor> {
    return this.tensor('pca_rgb', x);
  }

  /** m(F): per-channel 4-neighbour Laplacian (replicate padding), L2 norm over channels → H×W. */
  laplacianMap(x: Tensor): Promise<Tensor> {
    return this.tensor('laplacian_map', x);
  }

  /** Nearest-neighbour matches of `srcYx` (N×2, in the size×size space) from f1 into f2 → N×2 (y, x). */
  correspondence(f1: Tensor, f2: Tensor, srcYx: Tensor, size: number): Promise<Tensor> {
    return this.tensor('correspondence', f1, f2, srcYx, size);
  }
}

const cache = new Map<string, Promise<Ops>>();

/** The ops module on `device`, loaded once per device and shared (never disposed). */
export function loadOps(device: Device = 'cpu'): Promise<Ops> {
  const dev = resolveDevice(device);
  let p = cache.get(dev);
  if (!p) {
    p = ScriptModule.load(join(packageRoot(), 'models', 'ops.pt'), { device: dev as Device }).then((m) => new Ops(m));
    cache.set(dev, p);
    p.catch(() => cache.delete(dev));
  }
  return p;
}
