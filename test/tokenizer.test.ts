import test from 'ava';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ClipTokenizer, MAX_PROMPT_LENGTH, basicClean, isLongPrompt } from '../lib/tokenizer.js';

const ROOT = join(import.meta.dirname, '..');
// The bundled micro export's tokenizer files (the real CLIP ViT-L/14 vocabulary and merges).
const TOKENIZER_DIR = process.env.DF_TEST_TOKENIZER_DIR ?? join(ROOT, 'models', 'micro');
// Hugging Face CLIPTokenizer's ids for ~20 prompts (copied from the reference data).
const fixture = JSON.parse(await readFile(join(ROOT, 'test', 'fixtures', 'tokenizer.json'), 'utf8')) as {
  info: { vocab_json_sha256: string; merges_txt_sha256: string };
  prompts: {
    prompt: string; category: string; ids_77: number[]; ids_untruncated: number[]; tokens_untruncated: string[];
    gdf_path: 'chunked' | 'max_length_77'; chunks?: number[][];
  }[];
};
const tok = await ClipTokenizer.fromDir(TOKENIZER_DIR);

test('tokenizer files are the ones the reference ids were computed with', async (t) => {
  const sha = async (f: string) => createHash('sha256').update(await readFile(join(TOKENIZER_DIR, f))).digest('hex');
  t.is(await sha('vocab.json'), fixture.info.vocab_json_sha256);
  t.is(await sha('merges.txt'), fixture.info.merges_txt_sha256);
  t.is(tok.vocabSize, 49408);
  t.is(tok.bosId, 49406);
  t.is(tok.eosId, 49407);
  t.is(tok.padId, 49407);
});

for (const [i, p] of fixture.prompts.entries()) {
  test(`HF CLIPTokenizer ids, prompt ${i} (${p.category})`, (t) => {
    t.deepEqual(tok.tokenize(p.prompt), p.tokens_untruncated.slice(1, -1));
    t.deepEqual(tok.encode(p.prompt), p.ids_77);
    t.deepEqual(tok.encode(p.prompt, { truncate: false, pad: false }), p.ids_untruncated);
    t.is(isLongPrompt(p.prompt), p.gdf_path === 'chunked');
    const chunks = tok.chunks(p.prompt);
    if (p.gdf_path === 'chunked') {
      const expected: number[][] = [];
      for (let k = 0; k < p.ids_untruncated.length; k += 77) expected.push(p.ids_untruncated.slice(k, k + 77));
      t.deepEqual(chunks, expected);
      if (p.chunks) t.deepEqual(chunks, p.chunks);
      t.true(chunks.length >= 2);
      t.is(chunks[0][0], 49406);
      t.false(chunks.slice(1).some((c) => c.includes(49406)));
      t.is(chunks.at(-1)!.at(-1), 49407);
      t.false(chunks.slice(0, -1).some((c) => c.includes(49407)));
    } else {
      t.deepEqual(chunks, [p.ids_77]);
    }
  });
}

test('the fixture covers both paths and truncation', (t) => {
  t.true(fixture.prompts.some((p) => p.gdf_path === 'chunked'));
  // a ≤70-word prompt longer than 77 tokens is truncated to BOS + 75 + EOS
  const trunc = fixture.prompts.find((p) => p.gdf_path === 'max_length_77' && p.ids_untruncated.length > 77)!;
  t.truthy(trunc);
  const ids = tok.encode(trunc.prompt);
  t.is(ids.length, 77);
  t.is(ids[76], 49407);
  t.deepEqual(ids.slice(0, 76), trunc.ids_untruncated.slice(0, 76));
});

test('basic clean-up: control chars, unicode whitespace, CJK spacing, NFC, lower-case', (t) => {
  t.is(basicClean('  A\u00a0B\u2003C\tD\r\nE  '), 'a b c d e');
  t.is(basicClean('x\u0000y\ufffdz\u200bw\u0007v'), 'xyzwv'); // NUL, U+FFFD, Cf, Cc removed
  t.is(basicClean('ねこ猫の写真'), 'ねこ 猫 の 写 真'); // spaces around CJK ideographs, not around kana
  t.is(basicClean('Cafe\u0301'), 'café'); // NFC composes e + combining acute
  t.is(basicClean('ΣΟΦΟΣ'), 'σοφος'); // final sigma as Python's str.lower()
  t.is(basicClean('a\u2028b'), 'a b'); // Python str.split() whitespace
  t.is(basicClean(''), '');
});

test('edge cases: special tokens in text, unicode, CJK, emoji, long words', (t) => {
  // literal special tokens are kept as their ids
  t.deepEqual(tok.encode('a<|endoftext|>b', { pad: false }), [49406, ...tok.encode('a', { pad: false }).slice(1, -1), 49407,
    ...tok.encode('b', { pad: false }).slice(1, -1), 49407]);
  t.deepEqual(tok.tokenize('!<|startoftext|>'), ['!</w>', '<|startoftext|>']);
  // same text after clean-up → same ids
  t.deepEqual(tok.encode('A  PHOTO\tof a\u3000Cat'), tok.encode('a photo of a cat'));
  // emoji and CJK round-trip through the byte-level encoder
  for (const s of ['a 🐱 on a mat', '東京の夜景', 'naïve façade', 'x'.repeat(300)]) {
    const ids = tok.encode(s, { truncate: false, pad: false });
    t.true(ids.every((id) => Number.isInteger(id) && id >= 0 && id < 49408));
    t.is(tok.decode(ids, { skipSpecialTokens: true }).replaceAll(' ', ''), basicClean(s).replaceAll(' ', ''));
  }
  // the chunking rule counts words split on ' ', not tokens
  const seventy = Array(70).fill('cat').join(' ');
  const seventyOne = Array(71).fill('cat').join(' ');
  t.false(isLongPrompt(seventy));
  t.true(isLongPrompt(seventyOne));
  t.deepEqual(tok.chunks(seventyOne).map((c) => c.length), [73]);
  t.is(tok.chunks(seventy)[0].length, 77);
  t.throws(() => tok.encode(5 as never), { message: /prompt must be a string/ });
});

test('missing or malformed tokenizer files give clear errors', async (t) => {
  await t.throwsAsync(ClipTokenizer.fromDir('/nonexistent/dir'), { message: /\/nonexistent\/dir\/(vocab\.json|merges\.txt): cannot read tokenizer file \(ENOENT\)/ });
  const dir = await mkdtemp(join(tmpdir(), 'tok-'));
  try {
    await writeFile(join(dir, 'vocab.json'), '{not json');
    await writeFile(join(dir, 'merges.txt'), '#version: 0.2\na b\n');
    await t.throwsAsync(ClipTokenizer.fromDir(dir), { message: /vocab\.json: not valid JSON/ });
    await writeFile(join(dir, 'vocab.json'), '{"a": 0}');
    await t.throwsAsync(ClipTokenizer.fromDir(dir), { message: /vocab\.json: missing the special tokens/ });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('prompt length is bounded with a typed error; non-strings are E_INVALID_ARGUMENT', (t) => {
  const e = t.throws(() => tok.encode('a'.repeat(MAX_PROMPT_LENGTH + 1)));
  t.is((e as { code?: string }).code, 'E_LIMIT_EXCEEDED');
  t.regex(e!.message, new RegExp(`${MAX_PROMPT_LENGTH + 1} characters long; at most ${MAX_PROMPT_LENGTH}`));
  t.is(tok.encode('a '.repeat(MAX_PROMPT_LENGTH / 2)).length, 77);
  for (const bad of [null, undefined, 42, {}, ['a']]) {
    const eb = t.throws(() => tok.encode(bad as never));
    t.is((eb as { code?: string }).code, 'E_INVALID_ARGUMENT');
  }
});

test('long words: the heap BPE equals the round-by-round BPE, and stays fast', (t) => {
  const impl = tok as unknown as { bpeRounds(s: string[]): string[]; bpeHeap(s: string[]): string[] };
  let seed = 7;
  const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
  const alphabets = ['ab', 'abc', 'etaoinshrdlu', 'abcdefghijklmnopqrstuvwxyz', '!.,?', 'ééèa'];
  for (let k = 0; k < 300; k++) {
    const alpha = alphabets[k % alphabets.length]!;
    const n = 1 + rnd(k < 200 ? 40 : 300);
    const word = Array.from({ length: n }, () => alpha[rnd(alpha.length)]!).join('');
    const syms = [...new TextEncoder().encode(word)].map((b) => String.fromCodePoint(b < 128 && b > 32 ? b : 256 + b));
    syms[syms.length - 1] += '</w>';
    t.deepEqual(impl.bpeHeap(syms), impl.bpeRounds(syms), word);
  }
  // a 9,000-letter word: the plain rounds take seconds, the heap version milliseconds
  const long = Array.from({ length: 9000 }, () => 'abcdefghijklmnopqrstuvwxyz'[rnd(26)]).join('');
  const t0 = performance.now();
  const ids = tok.encode(long, { truncate: false, pad: false });
  t.log(`9,000-letter word: ${ids.length} ids in ${(performance.now() - t0).toFixed(0)} ms`);
  t.true(ids.length > 1000);
});
