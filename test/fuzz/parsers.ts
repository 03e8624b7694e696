/**
 * Property-based fuzzing (fast-check) of the parsers that read hostile bytes or strings: safetensors,
 * npy, LoRA files, layer specs and layer-config objects, output names, the CLI's number parsers and the
 * tokenizer's BPE. Each target runs `DF_FUZZ_RUNS` generated inputs (default 100,000) and checks its
 * property: the input is accepted and the result is consistent, or it is refused with the library's
 * typed error — never another exception, never a hang. Prints one JSON line per target.
 *
 * Run: `npm run fuzz` (all targets in test/fuzz/), or `node --import tsx test/fuzz/parsers.ts [target…]`.
 */
import fc from 'fast-check';
import { join, resolve } from 'node:path';
import { SafetensorsFile, encodeSafetensors, type StDType } from '../../lib/io/safetensors.js';
import { decodeNpy, encodeNpy } from '../../lib/io/npy.js';
import { parseLora } from '../../lib/lora/parse.js';
import { LAYER_IDS, PRESETS, parseLayerConfig, resolveLayerSpec, sortForwardOrder } from '../../lib/layers.js';
import { outputNameFor, outputPathFor, MAX_NAME_BYTES } from '../../lib/outputs.js';
import { intArg, floatArg } from '../../lib/cli/args.js';
import { ClipTokenizer } from '../../lib/tokenizer.js';
import { DiffusionFeaturesError } from '../../lib/errors.js';

const RUNS = Number(process.env.DF_FUZZ_RUNS ?? 100_000);
const SEED = Number(process.env.DF_FUZZ_SEED ?? 20261202);
const enc = new TextEncoder();

/** Runs `fn`; returns 'ok' or the typed error's code; rethrows anything else (a finding). */
function typed(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (e) {
    if (e instanceof DiffusionFeaturesError) {
      if (e.message.length > 4000) throw new Error(`message of ${e.message.length} characters (${e.code})`);
      return e.code;
    }
    throw e;
  }
}

// ---- generators ----------------------------------------------------------------------------------

const DTYPES: StDType[] = ['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL'];
const SIZE: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

/** A header value that is often almost right: mostly valid entries with one field mutated. */
const weirdNumber = fc.oneof(
  fc.integer({ min: -4, max: 64 }),
  fc.constantFrom(0, 1, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, -0, 1.5, 1e20, Number.MAX_VALUE),
  fc.double(),
);
const weirdValue = fc.oneof(weirdNumber, fc.string({ maxLength: 6 }), fc.constant(null), fc.boolean(), fc.array(weirdNumber, { maxLength: 3 }), fc.constant({}));

const safetensorsBytes = fc
  .record({
    tensors: fc.array(
      fc.record({
        name: fc.oneof(fc.string({ maxLength: 8 }), fc.constantFrom('__metadata__', '__proto__', 'constructor', '')),
        dtype: fc.oneof(fc.constantFrom(...DTYPES), weirdValue),
        shape: fc.oneof(fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 3 }), weirdValue),
        mutateOffsets: fc.option(fc.tuple(weirdValue, weirdValue), { freq: 4 }),
      }),
      { maxLength: 5 },
    ),
    metadata: fc.option(fc.oneof(fc.dictionary(fc.string({ maxLength: 5 }), fc.oneof(fc.string({ maxLength: 5 }), weirdValue), { maxKeys: 3 }), weirdValue), { freq: 2 }),
    lengthDelta: fc.oneof(fc.constant(0), fc.constant(0), fc.integer({ min: -20, max: 20 }), fc.constantFrom(2 ** 40, -8)),
    truncate: fc.option(fc.nat(), { freq: 3 }),
    extra: fc.uint8Array({ maxLength: 8 }),
  })
  .map(({ tensors, metadata, lengthDelta, truncate, extra }) => {
    const header: Record<string, unknown> = {};
    let off = 0;
    for (const t of tensors) {
      const n = Array.isArray(t.shape) ? (t.shape as number[]).reduce((a, b) => a * (Number(b) || 0), 1) : 1;
      const bytes = n * (typeof t.dtype === 'string' ? SIZE[t.dtype] ?? 1 : 1);
      const offsets = t.mutateOffsets ? [t.mutateOffsets[0], t.mutateOffsets[1]] : [off, off + bytes];
      off += Number.isFinite(bytes) ? bytes : 0;
      header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: offsets };
    }
    if (metadata !== null) header.__metadata__ = metadata;
    const h = enc.encode(JSON.stringify(header));
    const out = new Uint8Array(8 + h.length + Math.max(0, Math.min(off, 4096)) + extra.length);
    new DataView(out.buffer).setBigUint64(0, BigInt(Math.max(0, h.length + lengthDelta)) % 2n ** 64n, true);
    out.set(h, 8);
    out.set(extra, out.length - extra.length);
    return truncate === null ? out : out.subarray(0, truncate % (out.length + 1));
  });

// ---- targets -------------------------------------------------------------------------------------

interface Outcome {
  target: string;
  runs: number;
  seconds: number;
  outcomes: Record<string, number>;
  failure?: string;
}

const targets: Record<string, () => Promise<Outcome>> = {
  async safetensors() {
    const outcomes: Record<string, number> = {};
    await fc.assert(
      fc.property(fc.oneof({ weight: 4, arbitrary: safetensorsBytes }, { weight: 1, arbitrary: fc.uint8Array({ maxLength: 64 }) }), (bytes) => {
        let parsed: SafetensorsFile | undefined;
        const r = typed(() => (parsed = SafetensorsFile.fromBuffer(bytes, 'fuzz')));
        outcomes[r] = (outcomes[r] ?? 0) + 1;
        if (r !== 'ok' && r !== 'E_INVALID_FILE') throw new Error(`unexpected code ${r}`);
        if (parsed) {
          // accepted: every tensor is readable and its bytes match its shape
          for (const name of parsed.names()) {
            const info = parsed.info(name);
            const n = info.shape.reduce((a, b) => a * b, 1);
            if (info.end - info.begin !== n * SIZE[info.dtype]!) throw new Error(`${name}: ${info.end - info.begin} bytes for ${n} × ${info.dtype}`);
            if (parsed.raw(name).length !== info.end - info.begin) throw new Error('raw length');
          }
        }
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'safetensors', runs: RUNS, seconds: 0, outcomes };
  },

  async npy() {
    const outcomes: Record<string, number> = {};
    const valid = encodeNpy(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
    const header = fc
      .record({
        descr: fc.oneof(fc.constantFrom('<f4', '<f2', '<f8', '|u1', '>f4', '<i8', '|O', '<c8'), fc.string({ maxLength: 4 })),
        fortran: fc.constantFrom('False', 'True', 'false', '0'),
        shape: fc.array(fc.oneof(fc.integer({ min: -2, max: 7 }), fc.constantFrom('1.5', '1e9', '', 'x')), { maxLength: 4 }),
        version: fc.constantFrom(1, 2, 3, 0, 4),
        data: fc.nat({ max: 64 }),
        lenDelta: fc.integer({ min: -10, max: 10 }),
      })
      .map(({ descr, fortran, shape, version, data, lenDelta }) => {
        const h = enc.encode(`{'descr': '${descr}', 'fortran_order': ${fortran}, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`);
        const pre = version === 1 ? 10 : 12;
        const out = new Uint8Array(pre + h.length + data);
        out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, version, 0]);
        const dv = new DataView(out.buffer);
        const n = Math.max(0, h.length + lenDelta);
        if (version === 1) dv.setUint16(8, n & 0xffff, true);
        else dv.setUint32(8, n, true);
        out.set(h, pre);
        return out;
      });
    const mutated = fc.tuple(fc.nat({ max: valid.length - 1 }), fc.integer({ min: 0, max: 255 }), fc.nat({ max: valid.length })).map(([i, v, cut]) => {
      const b = new Uint8Array(valid);
      b[i] = v;
      return b.subarray(0, cut);
    });
    await fc.assert(
      fc.property(fc.oneof(header, mutated, fc.uint8Array({ maxLength: 80 })), (bytes) => {
        let arr: ReturnType<typeof decodeNpy> | undefined;
        const r = typed(() => (arr = decodeNpy(bytes, 'fuzz')));
        outcomes[r] = (outcomes[r] ?? 0) + 1;
        if (r !== 'ok' && r !== 'E_INVALID_FILE') throw new Error(`unexpected code ${r}`);
        if (arr && arr.data.length !== arr.shape.reduce((a, b) => a * b, 1)) throw new Error('data length does not match the shape');
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'npy', runs: RUNS, seconds: 0, outcomes };
  },

  async lora() {
    const outcomes: Record<string, number> = {};
    const mod = fc.constantFrom(
      'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q',
      'lora_te_text_model_encoder_layers_0_self_attn_q_proj',
      'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q',
      'base_model.model.down_blocks.0.attentions.0.proj_in',
      'lora_unet_weird',
    );
    const part = fc.constantFrom('.lora_down.weight', '.lora_up.weight', '.alpha', '.lora_A.weight', '.lora_B.weight', '.lora_mid.weight', '.hada_w1_a', '');
    const value = fc.oneof({ weight: 8, arbitrary: fc.float({ min: -2, max: 2, noNaN: true }) }, { weight: 1, arbitrary: fc.constantFrom(NaN, Infinity, -Infinity, 3e38, -3e38, 1e7) });
    const tensor = fc.record({
      key: fc.tuple(mod, part).map(([m, p]) => m + p),
      shape: fc.oneof(fc.array(fc.integer({ min: 0, max: 4 }), { minLength: 0, maxLength: 4 })),
      dtype: fc.constantFrom<StDType>('F32', 'F16', 'I32', 'BOOL'),
      value,
    });
    // mostly well-formed modules (down r×in, up out×r, alpha), then with one field perturbed
    const moduleTensors = fc
      .record({ m: mod, r: fc.integer({ min: 1, max: 3 }), i: fc.integer({ min: 1, max: 4 }), o: fc.integer({ min: 1, max: 4 }), v: value, alpha: fc.option(value), bad: fc.option(fc.constantFrom('rank', 'dims', 'drop-up', 'i32'), { freq: 3 }) })
      .map(({ m, r, i, o, v, alpha, bad }) => {
        const peft = m.includes('.');
        const [dn, up] = peft ? ['.lora_A.weight', '.lora_B.weight'] : ['.lora_down.weight', '.lora_up.weight'];
        const out: { key: string; shape: number[]; dtype: StDType; value: number }[] = [
          { key: m + dn, shape: bad === 'dims' ? [r, i, 2] : [r, i], dtype: bad === 'i32' ? 'I32' : 'F32', value: v },
          { key: m + up, shape: [o, bad === 'rank' ? r + 1 : r], dtype: 'F32', value: 0.5 },
        ];
        if (bad === 'drop-up') out.pop();
        if (alpha !== null && !peft) out.push({ key: `${m}.alpha`, shape: [], dtype: 'F32', value: alpha });
        return out;
      });
    await fc.assert(
      fc.property(fc.oneof({ weight: 3, arbitrary: moduleTensors }, { weight: 1, arbitrary: fc.array(tensor, { maxLength: 4 }) }), (ts) => {
        const input: Parameters<typeof encodeSafetensors>[0] = {};
        for (const t of ts) {
          const n = t.shape.reduce((a, b) => a * b, 1);
          const data = t.dtype === 'F32' ? new Float32Array(n).fill(t.value) : t.dtype === 'F16' ? new Uint16Array(n).fill(0x3c00) : t.dtype === 'I32' ? new Int32Array(n) : new Uint8Array(n);
          input[t.key] = { dtype: t.dtype, shape: t.shape, data };
        }
        const st = SafetensorsFile.fromBuffer(encodeSafetensors(input), 'fuzz.safetensors');
        let parsed: ReturnType<typeof parseLora> | undefined;
        const r = typed(() => (parsed = parseLora(st)));
        outcomes[r] = (outcomes[r] ?? 0) + 1;
        if (r !== 'ok' && r !== 'E_INVALID_FILE' && r !== 'E_INCOMPATIBLE_MODEL') throw new Error(`unexpected code ${r}`);
        for (const m of parsed?.modules ?? []) {
          for (const f of [m.up, m.down]) if (!f.data.every((x) => Math.abs(x) <= 1e6)) throw new Error(`accepted a non-finite or absurd factor in ${m.key}`);
          if (m.up.shape[1] !== m.rank || m.down.shape[0] !== m.rank) throw new Error('rank mismatch accepted');
        }
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'lora', runs: RUNS, seconds: 0, outcomes };
  },

  async 'layer-specs'() {
    const outcomes: Record<string, number> = {};
    const id = fc.oneof(fc.constantFrom(...LAYER_IDS, ...Object.keys(PRESETS), 'attn', 'vae-out', 'up-level1-repeat1-vit-block0-cross-k', '__proto__', 'constructor', ''), fc.string({ maxLength: 12 }));
    const spec = fc.oneof(
      fc.array(id, { maxLength: 6 }).map((xs) => xs.join(fc.sample(fc.constantFrom(',', ', ', ',,'), 1)[0]!)),
      fc.array(id, { maxLength: 6 }),
      fc.dictionary(id, fc.oneof(fc.boolean(), weirdValue), { maxKeys: 6 }),
      fc.oneof(fc.string({ maxLength: 20 }), weirdValue),
    );
    await fc.assert(
      fc.asyncProperty(spec, async (s) => {
        let out: Awaited<ReturnType<typeof resolveLayerSpec>> | undefined;
        let code = 'ok';
        try {
          out = await resolveLayerSpec(s as never, { allowFiles: false });
        } catch (e) {
          if (!(e instanceof DiffusionFeaturesError)) throw e;
          if (e.message.length > 4000) throw new Error(`message of ${e.message.length} characters`);
          code = e.code;
        }
        outcomes[code] = (outcomes[code] ?? 0) + 1;
        if (code !== 'ok' && code !== 'E_UNKNOWN_LAYER') throw new Error(`unexpected code ${code}`);
        if (out) {
          if (!out.ids.every((i) => LAYER_IDS.includes(i) || i === 'vae-out')) throw new Error(`illegal id in ${out.ids.join(',')}`);
          if (sortForwardOrder(out.ids).join() !== out.ids.join()) throw new Error('not in forward order');
          if (new Set(out.ids).size !== out.ids.length) throw new Error('duplicates');
        }
        if (s && typeof s === 'object' && !Array.isArray(s)) typed(() => parseLayerConfig(s, 'fuzz'));
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'layer-specs', runs: RUNS, seconds: 0, outcomes };
  },

  async 'output-names'() {
    const outcomes: Record<string, number> = {};
    const dir = resolve('/tmp/df-fuzz-out');
    const piece = fc.oneof(fc.string({ maxLength: 12, unit: 'grapheme' }), fc.string({ maxLength: 12, unit: 'binary' }), fc.constantFrom('.', '..', '...', '/', '\\', '\u0000', '\n', '\u202e', ' ', '.png', 'x'.repeat(300)));
    await fc.assert(
      fc.property(fc.array(piece, { maxLength: 5 }), (parts) => {
        const input = parts.join('');
        const name = outputNameFor(input);
        const bytes = enc.encode(name).length;
        if (!name || name === '.' || name === '..' || name.startsWith('.') || /[/\\\p{Cc}\p{Cf}]/u.test(name)) throw new Error(`unsafe name ${JSON.stringify(name)} for ${JSON.stringify(input)}`);
        if (bytes > MAX_NAME_BYTES) throw new Error(`name of ${bytes} bytes`);
        for (const fmt of ['safetensors', 'npy'] as const) {
          const p = outputPathFor(dir, name, fmt);
          if (resolve(p) !== join(dir, fmt === 'npy' ? name : `${name}.safetensors`)) throw new Error(`${p} escapes ${dir}`);
        }
        outcomes.ok = (outcomes.ok ?? 0) + 1;
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'output-names', runs: RUNS, seconds: 0, outcomes };
  },

  async 'cli-numbers'() {
    const outcomes: Record<string, number> = {};
    const int = intArg('--n', -1000, 1000);
    const num = floatArg('--x', -100, 100);
    const text = fc.oneof(fc.integer({ min: -2000, max: 2000 }).map(String), fc.double().map(String), fc.string({ maxLength: 8 }), fc.constantFrom('', ' 1', '0x10', '1e3', '1_000', '+5', '-0', '.5', '5.', 'Infinity'));
    await fc.assert(
      fc.property(text, (s) => {
        for (const [f, isInt] of [[int, true], [num, false]] as const) {
          let v: number | undefined;
          try {
            v = f(s);
          } catch (e) {
            if ((e as Error).name !== 'InvalidArgumentError' && (e as { code?: string }).code !== 'commander.invalidArgument') throw e;
          }
          if (v === undefined) {
            outcomes.refused = (outcomes.refused ?? 0) + 1;
            continue;
          }
          outcomes.accepted = (outcomes.accepted ?? 0) + 1;
          if (!Number.isFinite(v) || (isInt && !Number.isInteger(v))) throw new Error(`${JSON.stringify(s)} → ${v}`);
          if (Math.abs(v) > (isInt ? 1000 : 100)) throw new Error(`${JSON.stringify(s)} → ${v} out of range`);
          if (!/^[+-]?[\d.]+(e[+-]?\d+)?$/i.test(s)) throw new Error(`accepted ${JSON.stringify(s)}`);
        }
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'cli-numbers', runs: RUNS, seconds: 0, outcomes };
  },

  async tokenizer() {
    const outcomes: Record<string, number> = {};
    const tok = await ClipTokenizer.fromDir(join(import.meta.dirname, '..', '..', 'models', 'micro'));
    const impl = tok as unknown as { bpeRounds(s: string[]): string[]; bpeHeap(s: string[]): string[] };
    const word = fc.string({ minLength: 1, maxLength: 60, unit: fc.constantFrom(...'aabcdeeilnorstuy!.é') });
    await fc.assert(
      fc.property(word, fc.string({ maxLength: 40, unit: 'grapheme' }), (w, text) => {
        const syms = [...w];
        syms[syms.length - 1] += '</w>';
        if (impl.bpeHeap(syms).join(' ') !== impl.bpeRounds(syms).join(' ')) throw new Error(`BPE differs for ${JSON.stringify(w)}`);
        const ids = tok.encode(text);
        if (ids.length !== 77 || !ids.every((i) => Number.isInteger(i) && i >= 0 && i < tok.vocabSize)) throw new Error(`bad ids for ${JSON.stringify(text)}`);
        outcomes.ok = (outcomes.ok ?? 0) + 1;
      }),
      { numRuns: RUNS, seed: SEED },
    );
    return { target: 'tokenizer', runs: RUNS, seconds: 0, outcomes };
  },
};

const wanted = process.argv.slice(2);
let failed = false;
for (const [name, run] of Object.entries(targets)) {
  if (wanted.length && !wanted.includes(name)) continue;
  const t0 = performance.now();
  try {
    const r = await run();
    r.seconds = Math.round((performance.now() - t0) / 100) / 10;
    console.log(JSON.stringify(r));
  } catch (e) {
    failed = true;
    console.log(JSON.stringify({ target: name, runs: RUNS, seconds: Math.round((performance.now() - t0) / 100) / 10, failure: String((e as Error).message).slice(0, 3000) }));
  }
}
process.exitCode = failed ? 1 : 0;
