/**
 * The extraction engine: the loaded models and the named stages an extraction runs through.
 *
 *   prepareBatch   decode + resize (sharp) → `ops.preprocess` → VAE encoder (mean, logvar)
 *   runVariants    for one prepared batch and one or more planned variants sharing a schedule:
 *     latents        VAE posterior (sample or mean) × scaling → noise added at the noise timestep
 *     prompts        prompt embeddings (cached by text)
 *     control        canny control image (once per batch) for the ControlNet
 *     denoise        PLMS/DDIM steps from the noise timestep down to the extraction timestep
 *     forward        hooked UNet forward at the extraction timestep, capturing the requested taps
 *     handoff        per variant: taps, aggregated attention `attn`, featureResize, packaging,
 *                    split into per-image CPU float32 tensors
 *
 * {@link Pipeline.extract} and {@link extractRecipe} both drive this engine, inside its call queue
 * ({@link Engine.run}). Everything here is internal: the public surface is the {@link Pipeline} facade.
 * Method names of the ops are documented in `lib/ops.ts`, the method in `docs/method.md`.
 *
 * @module
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Tensor, ScriptModule, type Device, type DType, type IValue } from '../native.js';
import type { ClipTokenizer } from '../tokenizer.js';
import { loadImage } from '../image.js';
import { sortForwardOrder } from '../layers.js';
import { IncompatibleModelError, InvalidArgumentError, InvalidFileError, UnknownLayerError, throwIfAborted } from '../errors.js';
import { LoraManager } from '../lora/manager.js';
import { PLMS_START, type Ops } from '../ops.js';
import type { ModelJson } from './model-json.js';
import { planVariant, type Plan } from './plan.js';
import { CallQueue } from './queue.js';
import { Scope, imageName, streamSeed, type BatchContext, type Variant } from './batch.js';
import type { ExtractOptions, ImageFeatures, ImageInput, Progress } from './types.js';

function asTensor(v: IValue, what: string): Tensor {
  if (!(v instanceof Tensor)) throw new InvalidFileError(what, 'expected a tensor from the model');
  return v;
}

/** The loaded TorchScript models (the ControlNet is loaded on first use). */
export interface Modules {
  unet: ScriptModule;
  vae: ScriptModule;
  text: ScriptModule;
  controlnet?: ScriptModule;
}

/** The models of one weights folder and the stages that run them. */
export class Engine {
  readonly lora: LoraManager;
  private readonly promptCache = new Map<string, Tensor>();
  private readonly calls = new CallQueue(() => this.disposedFlag);
  private disposedFlag = false;

  constructor(
    readonly weightsDir: string,
    readonly model: ModelJson,
    readonly device: Device,
    readonly dtype: DType,
    readonly modules: Modules,
    readonly ops: Ops,
    readonly tokenizer: ClipTokenizer,
  ) {
    this.lora = new LoraManager(modules.unet, modules.text, (fn) => this.run(fn));
  }

  get disposed(): boolean {
    return this.disposedFlag;
  }

  /** Runs `fn` in the call queue (see {@link CallQueue.run}): calls on one pipeline run one after the other. */
  run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.calls.run(fn, signal);
  }

  /** Validates `o` and resolves it into a {@link Plan} for this model and LoRA state. */
  plan(images: readonly ImageInput[], o: ExtractOptions): Promise<Plan> {
    return planVariant({ model: this.model, device: this.device, dtype: this.dtype, ops: this.ops, lora: this.lora.describe() }, images, o);
  }

  clearPromptCache(): void {
    for (const t of this.promptCache.values()) t.dispose();
    this.promptCache.clear();
  }

  get promptCacheSize(): number {
    return this.promptCache.size;
  }

  /** The prompt embedding (1×L×D on the device), cached by text (the cache owns it). Call inside {@link run}. */
  async encodePrompt(text: string): Promise<Tensor> {
    const cached = this.promptCache.get(text);
    if (cached && !cached.disposed) return cached;
    const scope = new Scope();
    try {
      const parts: Tensor[] = [];
      for (const ids of this.tokenizer.chunks(text)) {
        const idsT = scope.add(Tensor.fromInt64Array(ids, [1, ids.length]));
        const onDev = scope.add(await idsT.to(this.device));
        parts.push(scope.add(asTensor(await this.modules.text.forward(onDev), 'text_encoder')));
      }
      const emb = parts.length === 1 ? parts[0]! : scope.add(await this.ops.cat(parts, 1));
      const kept = await emb.to(this.device, this.dtype);
      if (this.promptCache.size >= 64) {
        const [oldest] = this.promptCache.keys();
        this.promptCache.get(oldest!)!.dispose();
        this.promptCache.delete(oldest!);
      }
      this.promptCache.set(text, kept);
      return kept;
    } finally {
      scope.dispose();
    }
  }

  private async controlnet(): Promise<ScriptModule> {
    if (this.modules.controlnet) return this.modules.controlnet;
    const path = join(this.weightsDir, 'controlnet.pt');
    if (!existsSync(path)) {
      throw new IncompatibleModelError(`${this.weightsDir}: ControlNet requested but controlnet.pt is missing (export it with --components controlnet)`);
    }
    this.modules.controlnet = await ScriptModule.load(path, { device: this.device, dtype: this.dtype });
    return this.modules.controlnet;
  }

  // ------------------------------------------------------------------------------------ stages

  /** Stage `decode` + `vae`: decodes a batch and encodes it with the VAE (shared by all variants run on it). */
  async prepareBatch(images: readonly ImageInput[], start: number, plan: Pick<Plan, 'size' | 'batchSize'>, o: Pick<ExtractOptions, 'signal' | 'onProgress' | 'maxPixels' | 'maxImageBytes'>): Promise<BatchContext> {
    const scope = new Scope();
    try {
      const { size } = plan;
      const batch = images.slice(start, start + plan.batchSize);
      const B = batch.length;
      throwIfAborted(o.signal, 'extraction');
      o.onProgress?.({ stage: 'decode', done: start, total: images.length });
      const decoded = await Promise.all(
        batch.map((img, i) =>
          loadImage(typeof img === 'string' || img instanceof Uint8Array ? img : img.data, size, {
            name: typeof img === 'string' ? undefined : `images[${start + i}] (${imageName(img, start + i)}, ${(img instanceof Uint8Array ? img : img.data).length} bytes)`,
            signal: o.signal,
            maxPixels: o.maxPixels,
            maxBytes: o.maxImageBytes,
          }),
        ),
      );
      const pixels = new Uint8Array(B * size * size * 3);
      decoded.forEach((d, i) => pixels.set(d.data, i * size * size * 3));
      const u8 = scope.add(await scope.add(Tensor.fromUint8Array(pixels, [B, size, size, 3])).to(this.device));
      throwIfAborted(o.signal, 'extraction');
      o.onProgress?.({ stage: 'vae', done: start, total: images.length });
      const pre = scope.add(await this.ops.preprocess(u8));
      const x = scope.add(await pre.to(this.device, this.dtype));
      const moments = (await this.modules.vae.forward(x)) as IValue[];
      scope.addAll(moments);
      const [mean, logvar] = moments as [Tensor, Tensor];
      return { scope, start, B, total: images.length, names: batch.map((img, i) => imageName(img, start + i)), u8, mean, logvar, cond: null };
    } catch (err) {
      scope.dispose();
      throw err;
    }
  }

  /**
   * Whether two planned variants can run as one batched UNet (and ControlNet) call: same schedule
   * (control, scale, timesteps, scheduler, posterior, resize) and prompt embeddings of the same
   * length. Prompt, noise seed, layers and attention may differ.
   */
  batchable(a: Variant, b: Variant): boolean {
    const same = (x: number[], y: number[]): boolean => x.length === y.length && x.every((v, i) => v === y[i]);
    return (
      (a.o.control ?? null) === (b.o.control ?? null) &&
      a.plan.controlScale === b.plan.controlScale &&
      a.plan.size === b.plan.size &&
      a.plan.noiseT === b.plan.noiseT &&
      a.plan.unetT === b.plan.unetT &&
      same(a.plan.denoiseSteps, b.plan.denoiseSteps) &&
      a.plan.scheduler === b.plan.scheduler &&
      a.plan.posterior === b.plan.posterior &&
      a.plan.featureResize === b.plan.featureResize &&
      this.tokenizer.chunks(a.o.prompt ?? '').length === this.tokenizer.chunks(b.o.prompt ?? '').length
    );
  }

  /**
   * Runs several {@link batchable} variants on one prepared batch as one batched denoising loop and
   * final forward: the batch is variant-major (V·B rows), each variant with its own prompt embedding
   * and noise draws, the captured layers the union of theirs. Progress and abort go through the first
   * variant's options. Resolves to the features per variant. Call inside {@link run}.
   */
  async runVariants(ctx: BatchContext, items: readonly Variant[]): Promise<ImageFeatures[][]> {
    if (items.length === 0) return [];
    for (const it of items.slice(1)) {
      if (!this.batchable(items[0]!, it)) throw new InvalidArgumentError('runVariants: the variants do not share a schedule and cannot be batched');
    }
    const scope = new Scope();
    const head = items[0]!;
    const progress = (p: Omit<Progress, 'total'>): void => head.o.onProgress?.({ ...p, total: ctx.total });
    try {
      let latents = await this.latents(ctx, items, scope);
      progress({ stage: 'text', done: ctx.start });
      const ehs = await this.prompts(ctx, items, scope);
      const cond = await this.control(ctx, head, items.length, scope);
      const unetAt = async (lat: Tensor, ts: number, cap: string[]): Promise<Record<string, Tensor>> => {
        const tsT = scope.add(await scope.add(Tensor.fromInt64Array([ts], [1])).to(this.device));
        let down: Tensor[] | null = null;
        let mid: Tensor | null = null;
        if (cond) {
          const cn = await this.controlnet();
          const res = (await cn.forward(lat, tsT, ehs, cond, head.plan.controlScale)) as Tensor[];
          scope.addAll(res);
          down = res.slice(0, -1);
          mid = res[res.length - 1]!;
        }
        const out = (await this.modules.unet.forward(lat, tsT, ehs, cap, down, mid)) as Record<string, Tensor>;
        scope.addAll(out);
        return out;
      };
      latents = await this.denoise(ctx, head, latents, unetAt, scope);

      throwIfAborted(head.o.signal, 'extraction');
      progress({ stage: 'unet', done: ctx.start });
      const capture = sortForwardOrder([...new Set(items.flatMap((it) => it.plan.capture))]);
      const out = await unetAt(latents, head.plan.unetT, capture);

      progress({ stage: 'handoff', done: ctx.start });
      return await this.handoff(ctx, items, out, scope);
    } finally {
      scope.dispose();
    }
  }

  private async cat0(xs: Tensor[], scope: Scope): Promise<Tensor> {
    return xs.length === 1 ? xs[0]! : scope.add(await this.ops.cat(xs, 0));
  }

  /** Caller-supplied noise rows, or per-image seeded draws (see {@link streamSeed}). */
  private async noiseFor(ctx: BatchContext, { plan, o }: Variant, kind: 0 | 1, scope: Scope): Promise<Tensor> {
    const given = kind === 0 ? o.noise?.vaeNoise : o.noise?.noise;
    if (given) {
      const rows = scope.add(await this.ops.rows(given, ctx.start, ctx.B));
      return scope.add(await rows.to(this.device, this.dtype));
    }
    const parts: Tensor[] = [];
    for (let i = 0; i < ctx.B; i++) {
      const seed = streamSeed(plan.seed, (o.seedOffset ?? 0) + ctx.start + i, kind);
      parts.push(scope.add(await Tensor.randn([1, 4, plan.latent, plan.latent], { seed, device: this.device, dtype: this.dtype })));
    }
    return this.cat0(parts, scope);
  }

  /** Stage `latents`: z0 from the VAE posterior, noised to the noise timestep; variant-major rows. */
  private async latents(ctx: BatchContext, items: readonly Variant[], scope: Scope): Promise<Tensor> {
    const sample = items[0]!.plan.posterior === 'sample';
    const parts: Tensor[] = [];
    for (const it of items) {
      const vaeNoise = sample ? await this.noiseFor(ctx, it, 0, scope) : null;
      const z0 = scope.add(await this.ops.posterior(ctx.mean, ctx.logvar, vaeNoise, sample, this.model.scaling_factor));
      const noise = await this.noiseFor(ctx, it, 1, scope);
      parts.push(scope.add(await this.ops.addNoise(z0, noise, it.plan.noiseT)));
    }
    return this.cat0(parts, scope);
  }

  /** Stage `text`: each variant's prompt embedding repeated over the batch; variant-major rows. */
  private async prompts(ctx: BatchContext, items: readonly Variant[], scope: Scope): Promise<Tensor> {
    const parts: Tensor[] = [];
    for (const { o } of items) {
      const ehs1 = await this.encodePrompt(o.prompt ?? '');
      parts.push(ctx.B === 1 ? ehs1 : scope.add(await this.ops.repeatBatch(ehs1, ctx.B)));
    }
    return this.cat0(parts, scope);
  }

  /** Stage `control`: the canny conditioning image (computed once per batch), repeated per variant; null without control. */
  private async control(ctx: BatchContext, head: Variant, V: number, scope: Scope): Promise<Tensor | null> {
    if (head.o.control !== 'canny') return null;
    if (!ctx.cond) {
      const edges = ctx.scope.add(await this.ops.canny(ctx.u8, 100.0, 200.0));
      const img = ctx.scope.add(await this.ops.controlImage(edges));
      ctx.cond = ctx.scope.add(await img.to(this.device, this.dtype));
    }
    return V === 1 ? ctx.cond : scope.add(await this.ops.repeatBatch(ctx.cond, V));
  }

  /**
   * Stage `denoise`: multi-step denoising from the noise timestep (docs/method.md §Denoising). The
   * PLMS/DDIM updates are elementwise, so one batched loop is the same as one loop per variant.
   */
  private async denoise(
    ctx: BatchContext,
    head: Variant,
    latents: Tensor,
    unetAt: (lat: Tensor, ts: number, cap: string[]) => Promise<Record<string, Tensor>>,
    scope: Scope,
  ): Promise<Tensor> {
    const { denoiseSteps, scheduler, unetT } = head.plan;
    let state = PLMS_START;
    for (let k = 0; k < denoiseSteps.length; k++) {
      throwIfAborted(head.o.signal, 'extraction');
      head.o.onProgress?.({ stage: 'denoise', done: ctx.start, step: k + 1, steps: denoiseSteps.length, total: ctx.total });
      const ts = denoiseSteps[k]!;
      const eps = (await unetAt(latents, ts, [])).out!;
      if (scheduler === 'plms') {
        const r = await this.ops.plmsStep(eps, ts, latents, state);
        scope.addAll([r.sample, r.state.ets, r.state.cur]);
        latents = r.sample;
        state = r.state;
      } else {
        const prev = denoiseSteps[k + 1] ?? unetT;
        latents = scope.add(await this.ops.ddimStep(eps, ts, prev, latents));
      }
    }
    return latents;
  }

  /** Stage `handoff`: per variant, its taps, `attn`, featureResize and packaging, split into per-image CPU tensors. */
  private async handoff(ctx: BatchContext, items: readonly Variant[], out: Record<string, Tensor>, scope: Scope): Promise<ImageFeatures[][]> {
    const V = items.length;
    const results: ImageFeatures[][] = [];
    try {
      for (let v = 0; v < V; v++) {
        const { plan, o } = items[v]!;
        const rowsOf = async (t: Tensor): Promise<Tensor> => (V === 1 ? t : scope.add(await this.ops.rows(t, v * ctx.B, ctx.B)));
        const feats: Record<string, Tensor> = {};
        for (const id of plan.userIds) {
          const f = out[id];
          if (!f) throw new UnknownLayerError(`the UNet did not return layer '${id}'`, [id]);
          feats[id] = await rowsOf(f);
        }
        const attnParts: Tensor[] = [];
        for (const c of plan.categories) {
          const maps: Tensor[] = [];
          for (const id of plan.mapIds.get(c) ?? []) maps.push(await rowsOf(out[id]!));
          if (maps.length) attnParts.push(scope.add(await this.ops.aggregateAttention(maps, plan.latent, plan.minQ, plan.maxQ)));
        }
        if (attnParts.length) feats.attn = attnParts.length === 1 ? attnParts[0]! : scope.add(await this.ops.cat(attnParts, 1));
        if (plan.featureResize > 1) {
          for (const id of Object.keys(feats)) {
            if (id === 'attn') continue;
            feats[id] = scope.add(await this.ops.featureResize(feats[id]!, plan.featureResize));
          }
        }
        const toSplit: Record<string, Tensor> = { ...feats };
        if (o.packaged) toSplit.packaged = scope.add(await this.ops.package(Object.values(feats)));
        const perImage = await this.ops.splitToCpu(toSplit);
        results.push(
          perImage.map((d, i) => {
            const ordered: Record<string, Tensor> = {};
            for (const k of Object.keys(feats)) ordered[k] = d[k]!;
            const packaged = d.packaged;
            const all = [...Object.values(ordered), ...(packaged ? [packaged] : [])];
            const dispose = (): void => all.forEach((x) => !x.disposed && x.dispose());
            return { name: ctx.names[i]!, features: ordered, packaged, settings: plan.settings, dispose, [Symbol.dispose]: dispose };
          }),
        );
      }
    } catch (err) {
      results.flat().forEach((r) => r.dispose());
      throw err;
    }
    return results;
  }

  /** Releases every model and cached tensor (the shared ops module stays loaded). */
  dispose(): void {
    if (this.disposedFlag) return;
    this.disposedFlag = true;
    this.clearPromptCache();
    this.lora.dispose();
    for (const m of [this.modules.unet, this.modules.vae, this.modules.text, this.modules.controlnet]) m?.dispose();
  }
}
