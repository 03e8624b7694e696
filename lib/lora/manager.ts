/**
 * {@link LoraManager}: merges LoRA sets into a loaded UNet (and optionally the text encoder) with
 * `ops.lora_merge` on the model's device (docs/method.md §LoRA), and swaps them without reloading.
 * Parsing and mapping onto parameters are in `./parse.ts`.
 *
 * @module
 */
import { stat } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import { Tensor, type ScriptModule, type Device } from '../native.js';
import { InvalidArgumentError } from '../errors.js';
import { loadOps } from '../ops.js';
import { planLoraMerge, readLoraFile, type LoraFile, type LoraSpec, type LoraTarget } from './parse.js';

interface Saved {
  target: LoraTarget;
  param: string;
  original: Tensor;
}

interface Active {
  file: string;
  scale: number;
}

/** Largest accepted |scale| of a LoRA (GATE uses 1; beyond a few the merged weights are meaningless). */
export const MAX_LORA_SCALE = 1000;

/**
 * Merges LoRA sets into a loaded UNet (and optionally text encoder) and swaps them without reloading:
 * the original weights of touched parameters are kept (on the CPU) and restored exactly.
 */
export class LoraManager {
  private readonly modules: Record<LoraTarget, ScriptModule | null | undefined>;
  private saved = new Map<string, Saved>();
  private activeSet: Active[] = [];
  private textApplied = false;
  private signature = '';
  private queue: Promise<unknown> = Promise.resolve();
  private readonly cache = new Map<string, { stamp: string; lora: LoraFile }>();
  /** Text-encoder modules not applied by the last {@link swap} (`file#key`). */
  skipped: string[] = [];

  /**
   * @param unet the UNet ScriptModule (diffusers parameter names)
   * @param text the CLIP text encoder ScriptModule (transformers names), if LoRA may touch it
   */
  constructor(unet: ScriptModule, text?: ScriptModule | null, schedule?: <T>(fn: () => Promise<T>) => Promise<T>) {
    this.modules = { unet, text_encoder: text ?? null };
    this.schedule = schedule;
  }

  /** The owning pipeline's call queue: {@link swap} waits for running extractions instead of changing weights under them. */
  private readonly schedule?: <T>(fn: () => Promise<T>) => Promise<T>;

  /** The LoRA files currently merged, with their scales. */
  get active(): readonly Readonly<Active>[] {
    return this.activeSet.map((a) => ({ ...a }));
  }

  /** Parameters currently differing from the base weights (`unet:<name>` / `text_encoder:<name>`). */
  touched(): string[] {
    return [...this.saved.keys()];
  }

  /** A short description of the merged set for metadata: `a.safetensors:1,b.safetensors:0.3` ('' when none). */
  describe(): string {
    if (!this.activeSet.length) return '';
    return this.activeSet.map((a) => `${basename(a.file)}:${a.scale}`).join(',') + (this.textApplied ? ' (+text encoder)' : '');
  }

  /**
   * Replaces the merged LoRA set by `loras` (an empty list restores the base weights). All files are
   * read and validated before any weight changes; on a failure while writing, the base weights are
   * restored. Text-encoder modules are skipped unless `opts.textEncoder` (GATE uses the base text
   * encoder); skipped modules are listed in {@link skipped}.
   */
  swap(loras: readonly LoraSpec[], opts: { textEncoder?: boolean } = {}): Promise<void> {
    return this.schedule ? this.schedule(() => this.applyNow(loras, opts)) : this.applyNow(loras, opts);
  }

  /**
   * @internal {@link swap} for callers already inside the pipeline's call queue (the pipeline's
   * `setLora`, recipes): swaps serialised only against other swaps.
   */
  applyNow(loras: readonly LoraSpec[], opts: { textEncoder?: boolean } = {}): Promise<void> {
    const run = this.queue.then(() => this.swapNow(loras, opts));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Restores the base weights. */
  clear(): Promise<void> {
    return this.swap([]);
  }

  private async load(spec: LoraSpec): Promise<{ lora: LoraFile; scale: number; stamp: string }> {
    if (!spec || typeof spec.file !== 'string' || !spec.file) throw new InvalidArgumentError('LoRA spec needs a file');
    const scale = spec.scale ?? 1;
    if (typeof scale !== 'number' || !Number.isFinite(scale) || Math.abs(scale) > MAX_LORA_SCALE) {
      throw new InvalidArgumentError(`LoRA scale of ${spec.file} must be a finite number in [-${MAX_LORA_SCALE}, ${MAX_LORA_SCALE}], got ${String(scale)}`);
    }
    const path = resolve(spec.file);
    let stamp = '';
    try {
      const st = await stat(path);
      stamp = `${st.size}:${st.mtimeMs}`;
    } catch {
      // SafetensorsFile.open reports the missing file
    }
    const hit = this.cache.get(path);
    if (hit && hit.stamp === stamp) return { lora: hit.lora, scale, stamp };
    const lora = await readLoraFile(spec.file);
    this.cache.set(path, { stamp, lora });
    while (this.cache.size > 4) this.cache.delete(this.cache.keys().next().value!);
    return { lora, scale, stamp };
  }

  private async swapNow(loras: readonly LoraSpec[], opts: { textEncoder?: boolean }): Promise<void> {
    if (!Array.isArray(loras)) throw new InvalidArgumentError('swap: loras must be an array of { file, scale }');
    const loaded = [];
    for (const spec of loras) loaded.push(await this.load(spec));
    const useText = !!opts.textEncoder && !!this.modules.text_encoder;
    const signature = JSON.stringify([useText, loaded.map((l) => [resolve(l.lora.path), l.stamp, l.scale])]);
    if (signature === this.signature) return;

    const unet = this.modules.unet!;
    const text = this.modules.text_encoder;
    const plan = planLoraMerge(loaded, unet.parameters(), useText && text ? text.parameters() : null);
    const wanted = new Set<string>();
    for (const target of ['unet', 'text_encoder'] as const) for (const p of plan[target].keys()) wanted.add(`${target}:${p}`);

    try {
      // 1. parameters no longer touched: restore and forget
      for (const [key, s] of [...this.saved]) {
        if (wanted.has(key)) continue;
        await this.restore(s);
        s.original.dispose();
        this.saved.delete(key);
      }
      // 2. merge the new set from the saved originals
      for (const target of ['unet', 'text_encoder'] as const) {
        const mod = this.modules[target];
        if (!mod || plan[target].size === 0) continue;
        const dev = mod.device as Device;
        const ops = await loadOps(dev);
        for (const [param, terms] of plan[target]) {
          const key = `${target}:${param}`;
          let s = this.saved.get(key);
          if (!s) {
            const cur = await mod.getParameter(param);
            let original = cur;
            if (cur.device !== 'cpu') {
              original = await cur.to('cpu');
              cur.dispose();
            }
            s = { target, param, original };
            this.saved.set(key, s);
          }
          const tmp: Tensor[] = [];
          try {
            const w = s.original.device === dev || dev === 'cpu' ? s.original : await s.original.to(dev);
            if (w !== s.original) tmp.push(w);
            const ups: Tensor[] = [];
            const downs: Tensor[] = [];
            for (const t of terms) {
              const r = t.down.shape[0]!;
              const out = t.up.shape[0]!;
              const upC = Tensor.fromFloat32Array(t.up.data, [out, r]);
              const downC = Tensor.fromFloat32Array(t.down.data, [r, t.down.data.length / r]);
              tmp.push(upC, downC);
              const upD = dev === 'cpu' ? upC : await upC.to(dev);
              const downD = dev === 'cpu' ? downC : await downC.to(dev);
              if (upD !== upC) tmp.push(upD);
              if (downD !== downC) tmp.push(downD);
              ups.push(upD);
              downs.push(downD);
            }
            const merged = await ops.loraMerge(w, ups, downs, terms.map((t) => t.scale));
            tmp.push(merged);
            await mod.setParameter(param, merged);
          } finally {
            for (const t of tmp) if (!t.disposed) t.dispose();
          }
        }
      }
    } catch (err) {
      // leave the model at its base weights rather than half-merged
      for (const s of this.saved.values()) {
        try {
          await this.restore(s);
        } catch {
          // keep the original error
        }
        s.original.dispose();
      }
      this.saved.clear();
      this.activeSet = [];
      this.textApplied = false;
      this.signature = '';
      throw err;
    }
    this.activeSet = loaded.map((l) => ({ file: l.lora.path, scale: l.scale }));
    this.textApplied = useText && plan.text_encoder.size > 0;
    this.skipped = plan.skipped;
    this.signature = signature;
  }

  private async restore(s: Saved): Promise<void> {
    const mod = this.modules[s.target]!;
    const dev = mod.device;
    if (dev === 'cpu' || s.original.device === dev) {
      await mod.setParameter(s.param, s.original);
      return;
    }
    const d = await s.original.to(dev as Device);
    try {
      await mod.setParameter(s.param, d);
    } finally {
      if (d !== s.original) d.dispose();
    }
  }

  /** Forgets the saved originals (call after disposing the modules). */
  dispose(): void {
    for (const s of this.saved.values()) if (!s.original.disposed) s.original.dispose();
    this.saved.clear();
  }
}
