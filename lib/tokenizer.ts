/**
 * CLIP BPE tokenizer reproducing Hugging Face `CLIPTokenizer` (transformers 4.38, slow/Python
 * implementation, **ftfy not installed**) id for id, plus generic-diffusion-feature's long-prompt
 * chunking (docs/method.md §Prompts).
 *
 * Pipeline (as HF does it):
 * 1. split the text on the literal special tokens `<|startoftext|>` / `<|endoftext|>` (case-sensitive);
 * 2. for each other segment, `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`: drop NUL,
 *    U+FFFD and control characters (category C* except \t \n \r), map whitespace (\t \n \r, Zs) to a
 *    space, put spaces around CJK ideographs, NFC-normalise, split on whitespace, lower-case each
 *    word, re-join with single spaces;
 * 3. the CLIP pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`;
 * 4. each piece's UTF-8 bytes through GPT-2's byte→unicode map, then BPE with `</w>` marking the end of a
 *    word, using the first 48,894 merges of `merges.txt`;
 * 5. ids from `vocab.json` (unknown → `<|endoftext|>`), then BOS … EOS, truncation to 77 keeping EOS
 *    last, padding with EOS (the SD1.5 pad token) to 77.
 *
 * @module
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FileNotFoundError, InvalidArgumentError, InvalidFileError, LimitExceededError } from './errors.js';

/** CLIP's context length (`model_max_length`). */
export const CLIP_MAX_LENGTH = 77;

/** generic-diffusion-feature switches to chunked encoding above this many space-separated words. */
export const LONG_PROMPT_WORDS = 70;

/**
 * Longest accepted prompt in UTF-16 code units (about 2,500 CLIP tokens, 33 chunks). Longer prompts
 * are refused with `E_LIMIT_EXCEEDED` so that no caller can make the text encoder's work unbounded.
 */
export const MAX_PROMPT_LENGTH = 10_000;

/** Words shorter than this use the plain round-by-round BPE; longer ones the heap version (same result). */
const HEAP_BPE_MIN = 48;

const BOS_TOKEN = '<|startoftext|>';
const EOS_TOKEN = '<|endoftext|>';
/** HF reads `merges.txt` lines [1, 49152 - 256 - 2 + 1), i.e. at most 48,894 merges. */
const MAX_MERGES = 49152 - 256 - 2;

const CLIP_PATTERN = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/giu;
/** Characters Python's `str.split()` treats as whitespace. */
const PY_WHITESPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;
const CONTROL = /^\p{C}$/u;
const SPACE_SEPARATOR = /^\p{Zs}$/u;

/** Options of {@link ClipTokenizer.encode}. */
export interface EncodeOptions {
  /** Truncate to `maxLength` ids, keeping EOS last (default true). */
  truncate?: boolean;
  /** Pad with the pad id (EOS) to `maxLength` (default true). */
  pad?: boolean;
  /** Context length (default 77). */
  maxLength?: number;
}

/** GPT-2 / CLIP reversible byte → printable-unicode map. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const map: string[] = new Array(256);
  for (const b of bs) map[b] = String.fromCodePoint(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCodePoint(256 + n++);
  }
  return map;
}

const BYTE_ENCODER = bytesToUnicode();
const BYTE_DECODER = new Map(BYTE_ENCODER.map((c, b) => [c, b]));

function isChineseChar(cp: number): boolean {
  return (
    (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) || (cp >= 0x20000 && cp <= 0x2a6df) ||
    (cp >= 0x2a700 && cp <= 0x2b73f) || (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b820 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f)
  );
}

/**
 * HF `BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False).tokenize(text)`
 * joined with spaces — the clean-up `CLIPTokenizer` applies when ftfy is not installed.
 */
export function basicClean(text: string): string {
  let out = '';
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    if (ch === ' ' || ch === '\t' || ch === '\n' || ch === '\r' || SPACE_SEPARATOR.test(ch)) {
      out += ' ';
    } else if (cp === 0 || cp === 0xfffd || CONTROL.test(ch)) {
      continue;
    } else if (isChineseChar(cp)) {
      out += ` ${ch} `;
    } else {
      out += ch;
    }
  }
  const words = out.normalize('NFC').split(PY_WHITESPACE).filter((w) => w.length > 0).map((w) => w.toLowerCase());
  return words.join(' ').split(PY_WHITESPACE).filter((w) => w.length > 0).join(' ');
}

/** Whether generic-diffusion-feature takes the chunked long-prompt path (`len(prompt.split(' ')) > 70`). */
export function isLongPrompt(text: string): boolean {
  return text.split(' ').length > LONG_PROMPT_WORDS;
}

/** A CLIP BPE tokenizer giving exactly Hugging Face `CLIPTokenizer`'s ids. */
export class ClipTokenizer {
  /** Id of `<|startoftext|>` (49406 for CLIP). */
  readonly bosId: number;
  /** Id of `<|endoftext|>` (49407 for CLIP); also the padding and unknown-token id. */
  readonly eosId: number;
  /** Padding id (= {@link eosId}, as in SD1.5's tokenizer). */
  readonly padId: number;
  private readonly vocab: Map<string, number>;
  private readonly idToToken: Map<number, string>;
  private readonly ranks: Map<string, number>;
  private readonly cache = new Map<string, string[]>();

  /**
   * @param vocab token → id (the content of `vocab.json`)
   * @param merges the lines of `merges.txt` (first line = version header, as in the file)
   * @param source name used in error messages
   */
  constructor(vocab: Record<string, number>, merges: string, source = 'tokenizer') {
    if (vocab === null || typeof vocab !== 'object' || Array.isArray(vocab)) {
      throw new InvalidFileError(`${source}/vocab.json`, 'not a JSON object of token → id');
    }
    this.vocab = new Map();
    this.idToToken = new Map();
    for (const [tok, id] of Object.entries(vocab)) {
      if (!Number.isSafeInteger(id)) throw new InvalidFileError(`${source}/vocab.json`, `id of token ${JSON.stringify(tok)} is not an integer`);
      this.vocab.set(tok, id);
      this.idToToken.set(id, tok);
    }
    const bos = this.vocab.get(BOS_TOKEN);
    const eos = this.vocab.get(EOS_TOKEN);
    if (bos === undefined || eos === undefined) {
      throw new InvalidFileError(`${source}/vocab.json`, `missing the special tokens ${BOS_TOKEN} / ${EOS_TOKEN}`);
    }
    this.bosId = bos;
    this.eosId = eos;
    this.padId = eos;
    const lines = merges.trim().split('\n').slice(1, MAX_MERGES + 1);
    this.ranks = new Map();
    lines.forEach((line, i) => {
      const parts = line.trim().split(/\s+/);
      if (parts.length !== 2) throw new InvalidFileError(`${source}/merges.txt`, `line ${i + 2} is not a pair: ${JSON.stringify(line)}`);
      const key = `${parts[0]} ${parts[1]}`;
      if (!this.ranks.has(key)) this.ranks.set(key, i);
    });
    if (this.ranks.size === 0) throw new InvalidFileError(`${source}/merges.txt`, 'no merges');
    this.cache.set(BOS_TOKEN, [BOS_TOKEN]);
    this.cache.set(EOS_TOKEN, [EOS_TOKEN]);
  }

  /**
   * Load `vocab.json` and `merges.txt` from a directory (an export's tokenizer files).
   * @throws FileNotFoundError when a file is missing; InvalidFileError when malformed
   */
  static async fromDir(dir: string): Promise<ClipTokenizer> {
    const read = async (name: string): Promise<string> => {
      try {
        return await readFile(join(dir, name), 'utf8');
      } catch (e) {
        throw new FileNotFoundError(join(dir, name), `cannot read tokenizer file (${(e as NodeJS.ErrnoException).code ?? String(e)})`, { cause: e });
      }
    };
    const [vocabText, merges] = await Promise.all([read('vocab.json'), read('merges.txt')]);
    let vocab: Record<string, number>;
    try {
      vocab = JSON.parse(vocabText);
    } catch (e) {
      throw new InvalidFileError(join(dir, 'vocab.json'), `not valid JSON (${(e as Error).message})`, { cause: e });
    }
    return new ClipTokenizer(vocab, merges, dir);
  }

  /** Vocabulary size. */
  get vocabSize(): number {
    return this.vocab.size;
  }

  /** BPE of one byte-encoded word; returns its sub-word tokens (last one ends in `</w>`). */
  private bpe(token: string): string[] {
    const cached = this.cache.get(token);
    if (cached) return cached;
    const chars = [...token];
    const symbols = chars.slice(0, -1);
    symbols.push(chars[chars.length - 1] + '</w>');
    const word = symbols.length < HEAP_BPE_MIN ? this.bpeRounds(symbols) : this.bpeHeap(symbols);
    if (this.cache.size > 50_000) this.cache.clear();
    this.cache.set(token, word);
    return word;
  }

  /**
   * HF's loop: each round finds the lowest-ranked adjacent pair and merges all its occurrences left to
   * right. O(n²) in the word length, so only used for short words.
   * @internal exposed for the equivalence property test
   */
  bpeRounds(symbols: readonly string[]): string[] {
    let word = [...symbols];
    while (word.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const r = this.ranks.get(`${word[i]} ${word[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      const first = word[best];
      const second = word[best + 1];
      const merged: string[] = [];
      for (let i = 0; i < word.length; ) {
        if (i < word.length - 1 && word[i] === first && word[i + 1] === second) {
          merged.push(first + second);
          i += 2;
        } else {
          merged.push(word[i]);
          i += 1;
        }
      }
      word = merged;
    }
    return word;
  }

  /**
   * The same rounds as {@link bpeRounds} in O(n log n): symbols in a linked list, candidate pairs in a
   * min-heap keyed (rank, position). A round takes every heap entry of the lowest rank, applies the
   * still-valid ones left to right (an occurrence overlapping an earlier merge of the round is skipped,
   * as in HF's scan), and only then queues the pairs the merges created.
   * @internal exposed for the equivalence property test
   */
  bpeHeap(symbols: readonly string[]): string[] {
    const n = symbols.length;
    const sym = [...symbols];
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    const alive = new Uint8Array(n).fill(1);
    // heap entries: rank, left position, and the pair's strings for validation
    const hr: number[] = [];
    const hp: number[] = [];
    const hl: string[] = [];
    const hrgt: string[] = [];
    const less = (a: number, b: number): boolean => hr[a]! < hr[b]! || (hr[a] === hr[b] && hp[a]! < hp[b]!);
    const swap = (a: number, b: number): void => {
      [hr[a], hr[b]] = [hr[b]!, hr[a]!];
      [hp[a], hp[b]] = [hp[b]!, hp[a]!];
      [hl[a], hl[b]] = [hl[b]!, hl[a]!];
      [hrgt[a], hrgt[b]] = [hrgt[b]!, hrgt[a]!];
    };
    const push = (pos: number): void => {
      const nx = next[pos]!;
      if (pos < 0 || nx < 0) return;
      const r = this.ranks.get(`${sym[pos]} ${sym[nx]}`);
      if (r === undefined) return;
      hr.push(r);
      hp.push(pos);
      hl.push(sym[pos]!);
      hrgt.push(sym[nx]!);
      for (let i = hr.length - 1; i > 0; ) {
        const parent = (i - 1) >> 1;
        if (!less(i, parent)) break;
        swap(i, parent);
        i = parent;
      }
    };
    const pop = (): { rank: number; pos: number; left: string; right: string } => {
      const top = { rank: hr[0]!, pos: hp[0]!, left: hl[0]!, right: hrgt[0]! };
      const last = hr.length - 1;
      swap(0, last);
      hr.pop();
      hp.pop();
      hl.pop();
      hrgt.pop();
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < hr.length && less(l, m)) m = l;
        if (r < hr.length && less(r, m)) m = r;
        if (m === i) break;
        swap(i, m);
        i = m;
      }
      return top;
    };
    for (let i = 0; i < n - 1; i++) push(i);
    while (hr.length > 0) {
      const rank = hr[0]!;
      const round: { pos: number; left: string; right: string }[] = [];
      while (hr.length > 0 && hr[0] === rank) round.push(pop());
      round.sort((a, b) => a.pos - b.pos);
      const merged: number[] = [];
      for (const { pos, left, right } of round) {
        const nx = next[pos]!;
        if (!alive[pos] || nx < 0 || sym[pos] !== left || sym[nx] !== right) continue;
        sym[pos] = left + right;
        alive[nx] = 0;
        const nn = next[nx]!;
        next[pos] = nn;
        if (nn >= 0) prev[nn] = pos;
        merged.push(pos);
      }
      for (const pos of merged) {
        if (!alive[pos]) continue;
        push(prev[pos]!);
        push(pos);
      }
    }
    const out: string[] = [];
    for (let i = 0; i >= 0; i = next[i]!) out.push(sym[i]!);
    return out;
  }

  /** BPE tokens of a text segment that contains no literal special token. */
  private tokenizeSegment(text: string, out: string[]): void {
    const clean = basicClean(text);
    for (const m of clean.matchAll(CLIP_PATTERN)) {
      let enc = '';
      for (const b of new TextEncoder().encode(m[0])) enc += BYTE_ENCODER[b];
      out.push(...this.bpe(enc));
    }
  }

  /**
   * The BPE tokens of `text` (no BOS/EOS added), e.g. `"a photo"` → `['a</w>', 'photo</w>']`.
   * Literal `<|startoftext|>` / `<|endoftext|>` in the text are kept as special tokens.
   */
  tokenize(text: string): string[] {
    if (typeof text !== 'string') throw new InvalidArgumentError(`prompt must be a string, got ${text === null ? 'null' : typeof text}`);
    if (text.length > MAX_PROMPT_LENGTH) {
      throw new LimitExceededError(`prompt is ${text.length} characters long; at most ${MAX_PROMPT_LENGTH} are accepted`);
    }
    const out: string[] = [];
    let rest = text;
    for (;;) {
      const a = rest.indexOf(BOS_TOKEN);
      const b = rest.indexOf(EOS_TOKEN);
      const at = a < 0 ? b : b < 0 ? a : Math.min(a, b);
      if (at < 0) break;
      const special = at === a ? BOS_TOKEN : EOS_TOKEN;
      if (at > 0) this.tokenizeSegment(rest.slice(0, at), out);
      out.push(special);
      rest = rest.slice(at + special.length);
    }
    if (rest.length > 0) this.tokenizeSegment(rest, out);
    return out;
  }

  /** Ids of tokens (unknown tokens map to `<|endoftext|>`, as HF does). */
  convertTokensToIds(tokens: readonly string[]): number[] {
    return tokens.map((t) => this.vocab.get(t) ?? this.eosId);
  }

  /**
   * Token ids with BOS/EOS, as `tokenizer(text, padding='max_length', max_length=77, truncation=True)`
   * by default; `{ truncate: false, pad: false }` gives the untruncated, unpadded ids.
   */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    const { truncate = true, pad = true, maxLength = CLIP_MAX_LENGTH } = opts;
    if (!Number.isSafeInteger(maxLength) || maxLength < 2) throw new InvalidArgumentError(`maxLength must be an integer ≥ 2, got ${maxLength}`);
    let body = this.convertTokensToIds(this.tokenize(text));
    if (truncate && body.length > maxLength - 2) body = body.slice(0, maxLength - 2);
    const ids = [this.bosId, ...body, this.eosId];
    while (pad && ids.length < maxLength) ids.push(this.padId);
    return ids;
  }

  /**
   * Exactly the id sequences generic-diffusion-feature feeds the text encoder (docs/method.md §Prompts): one
   * padded/truncated 77-id sequence for prompts of ≤ 70 space-separated words; otherwise the
   * untruncated, unpadded ids split into consecutive chunks of 77 (only the first has BOS, only the
   * last has EOS, the last may be shorter).
   */
  chunks(text: string): number[][] {
    if (!isLongPrompt(text)) return [this.encode(text)];
    const ids = this.encode(text, { truncate: false, pad: false });
    const out: number[][] = [];
    for (let i = 0; i < ids.length; i += CLIP_MAX_LENGTH) out.push(ids.slice(i, i + CLIP_MAX_LENGTH));
    return out;
  }

  /** Token strings of ids (unknown ids → `undefined` entries are rejected). */
  idsToTokens(ids: readonly number[]): string[] {
    return ids.map((id) => {
      const t = this.idToToken.get(id);
      if (t === undefined) throw new InvalidArgumentError(`token id ${id} is not in the vocabulary`);
      return t;
    });
  }

  /** Decode ids to text like HF's `decode` (`skipSpecialTokens` drops BOS/EOS/padding). */
  decode(ids: readonly number[], { skipSpecialTokens = false } = {}): string {
    const toks = this.idsToTokens(ids.filter((id) => !skipSpecialTokens || (id !== this.bosId && id !== this.eosId)));
    const bytes: number[] = [];
    for (const ch of toks.join('')) {
      const b = BYTE_DECODER.get(ch);
      if (b !== undefined) bytes.push(b);
    }
    return new TextDecoder('utf-8').decode(new Uint8Array(bytes)).replaceAll('</w>', ' ').trim();
  }
}
