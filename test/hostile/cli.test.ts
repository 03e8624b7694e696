/**
 * Hostile corpus, part 3: the command line. Argument values (strict decimal integers and numbers in
 * range, flags named in errors) in-process through the parsers, then real `diffusion-features`
 * processes on the micro model: hostile output names (`...png`, `..png`, separators, control
 * characters) never make it write or delete outside `--out`; duplicate names; resume with different
 * settings; `recipe` with a broken image; Ctrl-C (SIGINT) and kill -9 mid-run: exit 130, no temporary
 * left, the next run cleans up after a SIGKILLed one and resumes.
 */
import test from 'ava';
import { copyFile, mkdir, readdir, readFile, stat, writeFile, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { InvalidArgumentError as CliArgError } from 'commander';
import { intArg, floatArg, parseLoraSpec, loraSlotArg, cliMessage } from '../../lib/cli/args.js';
import { SafetensorsFile } from '../../lib/io/safetensors.js';
import { IMAGES, WEIGHTS, leftovers, runCli, scratch } from './helpers.js';

const COMMON = ['--weights', WEIGHTS, '--device', 'cpu', '--size', '64', '--no-progress'];

test('int and number arguments: strict decimal, in range, the flag named', (t) => {
  const int = intArg('--t', 0, 999);
  for (const bad of ['', ' ', '0x10', '1e3', '1.0', '1.5', '-1', '1000', '+', '--5', 'NaN', 'Infinity', '99999999999999999999', '5 ', ' 5', '0b1', '0o7', '١٢', '5\n']) {
    const e = t.throws(() => int(bad), { instanceOf: CliArgError }, JSON.stringify(bad));
    t.regex(e!.message, /^--t must be/, JSON.stringify(bad));
  }
  for (const [s, n] of [['0', 0], ['999', 999], ['050', 50], ['+7', 7]] as const) t.is(int(s), n);
  const f = floatArg('--control-scale', -100, 100);
  for (const bad of ['', 'abc', '0x10', 'Infinity', '-Infinity', 'NaN', '1e308', '-1e308', '101', '1,5', '.', '1e', '--1']) {
    const e = t.throws(() => f(bad), { instanceOf: CliArgError }, JSON.stringify(bad));
    t.regex(e!.message, /^--control-scale must be/);
  }
  for (const [s, n] of [['1', 1], ['-0.5', -0.5], ['.25', 0.25], ['1e1', 10], ['2.', 2]] as const) t.is(f(s), n);
  for (const bad of ['x.safetensors:1e308', 'x.safetensors:-1e308', 'x.safetensors:1001', ':1', '']) {
    t.throws(() => parseLoraSpec(bad), { instanceOf: CliArgError }, bad);
  }
  t.deepEqual(parseLoraSpec('a:b.safetensors:0.5'), { file: 'a:b.safetensors', scale: 0.5 });
  t.deepEqual(parseLoraSpec('x.safetensors'), { file: 'x.safetensors', scale: 1 });
  for (const bad of ['__proto__=x.safetensors', '=x', 'a b=x', 'x', '1a=x', 'a/b=x']) {
    t.throws(() => loraSlotArg(bad), { instanceOf: CliArgError }, bad);
  }
  const slots = loraSlotArg('a1=x.safetensors:2');
  t.is(Object.getPrototypeOf(slots), null);
  t.deepEqual({ ...slots }, { a1: { file: 'x.safetensors', scale: 2 } });
  t.is(cliMessage('controlScale must be a finite number'), '--control-scale must be a finite number');
  t.is(cliMessage('featureResize 9 is larger than layer x'), '--feature-resize 9 is larger than layer x');
  t.is(cliMessage('size must be a multiple of 64'), '--size must be a multiple of 64');
  t.is(cliMessage('a photo of a size'), 'a photo of a size', 'ordinary words are left alone');
  t.is(cliMessage('featureResize 64 is larger than layer x (2×2 at size 64)'), '--feature-resize 64 is larger than layer x (2×2 at size 64)');
});

test('bad argument values end the process before any work, naming the flag', async (t) => {
  const dir = await scratch(t);
  const img = join(IMAGES, 'chelsea.png');
  const cases: [string[], RegExp][] = [
    [['--t', ''], /--t must be a decimal integer/],
    [['--t', '0x10'], /--t must be a decimal integer/],
    [['--batch-size', '0'], /--batch-size must be in \[1, 1024\]/],
    [['--batch-size', '-1'], /--batch-size must be/],
    [['--feature-resize', '1e300'], /--feature-resize must be a decimal integer/],
    [['--control-scale', '1e308'], /--control-scale must be in/],
    [['--seed', '1.5'], /--seed must be a decimal integer/],
    [['--lora', 'x.safetensors:1e308'], /--lora: scale must be/],
    [['--layers', ','], /--layers: the layer spec "," selects no layer/],
    [['--feature-resize', '64'], /--feature-resize 64 is larger than layer/],
  ];
  for (const [args, re] of cases) {
    const out = join(dir, `o${cases.findIndex((c) => c[0] === args)}`);
    const r = await runCli(['extract', ...COMMON, '--out', out, ...args, img]);
    t.not(r.code, 0, args.join(' '));
    t.regex(r.stderr, re, `${args.join(' ')}: ${r.stderr}`);
    t.deepEqual(await readdir(out).catch(() => []), [], `${args.join(' ')}: nothing written`);
  }
});

test('hostile output names stay inside --out; npy --overwrite never deletes what it did not write', async (t) => {
  const dir = await scratch(t);
  const src = join(dir, 'src');
  const out = join(dir, 'work', 'out');
  await mkdir(src);
  await mkdir(out, { recursive: true });
  // sentinels: a sibling of --out, a file in --out's parent, an earlier unrelated file in --out
  await writeFile(join(dir, 'work', 'keep.txt'), 'parent');
  await mkdir(join(dir, 'work', 'sibling'));
  await writeFile(join(dir, 'work', 'sibling', 'keep.txt'), 'sibling');
  await writeFile(join(out, 'mine.txt'), 'mine');
  const names = ['...png', '..png', '.png', 'a .png', 'a\nb.png', 'tab\there.png', '\u202eevil.png', 'x'.repeat(240) + '.png'];
  for (const n of names) await copyFile(join(IMAGES, 'chelsea.png'), join(src, n));
  const files = names.map((n) => join(src, n));
  for (const pass of ['first', 'overwrite'] as const) {
    const r = await runCli(['extract', ...COMMON, '--format', 'npy', '--out', out, ...(pass === 'overwrite' ? ['--overwrite'] : []), ...files]);
    t.is(r.code, 0, `${pass}: ${r.stderr}`);
  }
  t.is(await readFile(join(dir, 'work', 'keep.txt'), 'utf8'), 'parent');
  t.is(await readFile(join(dir, 'work', 'sibling', 'keep.txt'), 'utf8'), 'sibling');
  t.is(await readFile(join(out, 'mine.txt'), 'utf8'), 'mine');
  const made = (await readdir(out)).filter((n) => n !== 'mine.txt');
  t.is(made.length, names.length, made.join(' | '));
  for (const n of made) {
    t.false(n === '.' || n === '..' || n.startsWith('.') || /[/\n\t\u202e]/.test(n), `safe name: ${JSON.stringify(n)}`);
    t.true((await stat(join(out, n))).isDirectory());
    t.truthy(JSON.parse(await readFile(join(out, n, 'settings.json'), 'utf8')).layers, `${n} records its settings`);
  }
  t.deepEqual(await leftovers(dir), []);
  // an npy output path that is not ours is never replaced, even with --overwrite
  const foreign = join(out, 'rocket');
  await mkdir(foreign);
  await writeFile(join(foreign, 'notes.txt'), 'precious');
  const r = await runCli(['extract', ...COMMON, '--format', 'npy', '--overwrite', '--out', out, join(IMAGES, 'rocket.png')]);
  t.not(r.code, 0);
  t.regex(r.stderr, /rocket.*not an output of diffusion-features/);
  t.is(await readFile(join(foreign, 'notes.txt'), 'utf8'), 'precious');
});

test('duplicate output names: extract and recipe refuse before doing anything', async (t) => {
  const dir = await scratch(t);
  for (const sub of ['a', 'b']) {
    await mkdir(join(dir, sub));
    await copyFile(join(IMAGES, 'chelsea.png'), join(dir, sub, 'x.png'));
  }
  await copyFile(join(IMAGES, 'rocket.png'), join(dir, 'a', 'x.jpg.png'));
  for (const cmd of [['extract', ...COMMON], ['recipe', '--weights', WEIGHTS, '--device', 'cpu', '--size', '64', '--recipe', 'bedroom28', '--skip-missing-lora']]) {
    const out = join(dir, `out-${cmd[0]}`);
    const r = await runCli([...cmd, '--out', out, join(dir, 'a', 'x.png'), join(dir, 'b', 'x.png')]);
    t.is(r.code, 2, `${cmd[0]}: ${r.stderr}`);
    t.regex(r.stderr, /would both write x/);
    t.deepEqual(await readdir(out).catch(() => []), []);
  }
});

test('resume: an output with different settings is an error naming the file and the difference; --overwrite redoes it', async (t) => {
  const dir = await scratch(t);
  const out = join(dir, 'out');
  const img = join(IMAGES, 'chelsea.png');
  t.is((await runCli(['extract', ...COMMON, '--layers', 'practical', '--out', out, img])).code, 0);
  const again = await runCli(['extract', ...COMMON, '--layers', 'practical', '--out', out, img]);
  t.is(again.code, 0);
  t.regex(again.stderr, /1 image\(s\) already have output with these settings/);
  const r = await runCli(['extract', ...COMMON, '--out', out, img]); // default layers (legacy)
  t.is(r.code, 2);
  t.regex(r.stderr, /chelsea\.safetensors exists but was written with different settings \((--)?layers: /);
  t.regex(r.stderr, /use --overwrite/);
  const f1 = await SafetensorsFile.open(join(out, 'chelsea.safetensors'));
  t.true(f1.names().includes('up-level1-repeat2-res-out'), 'the practical output is untouched');
  const o = await runCli(['extract', ...COMMON, '--overwrite', '--out', out, img]);
  t.is(o.code, 0, o.stderr);
  const f2 = await SafetensorsFile.open(join(out, 'chelsea.safetensors'));
  t.true(f2.names().includes('up-level0-upsampler-out'));
  t.is(f2.metadata?.size, '64');
  // a file at an output path that is not ours is never overwritten
  await writeFile(join(out, 'rocket.safetensors'), 'not a safetensors file');
  const w = await runCli(['extract', ...COMMON, '--overwrite', '--out', out, join(IMAGES, 'rocket.png')]);
  t.is(w.code, 2);
  t.is(await readFile(join(out, 'rocket.safetensors'), 'utf8'), 'not a safetensors file');
});

test('recipe: a broken image is skipped, the others are written, exit 1', async (t) => {
  const dir = await scratch(t);
  const out = join(dir, 'out');
  const broken = join(dir, 'broken.png');
  await writeFile(broken, (await readFile(join(IMAGES, 'rocket.png'))).subarray(0, 300));
  const r = await runCli(['recipe', '--weights', WEIGHTS, '--device', 'cpu', '--size', '64', '--recipe', 'bedroom28', '--skip-missing-lora', '--batch-size', '2', '--out', out,
    join(IMAGES, 'chelsea.png'), broken, join(IMAGES, 'coffee.png')]);
  t.is(r.code, 1, r.stderr);
  t.regex(r.stderr, /failed: .*broken\.png/);
  t.deepEqual((await readdir(out)).sort(), ['chelsea.safetensors', 'coffee.safetensors']);
  const f = await SafetensorsFile.open(join(out, 'coffee.safetensors'));
  const seeds = f.metadata!.variants!.split(',').map((v) => JSON.parse(f.metadata![`${v}.settings`]!).seed);
  t.is(new Set(seeds).size, seeds.length, `every variant has its own noise draw: ${seeds.join(',')}`);
});

test('Ctrl-C stops at once with exit 130, removes its temporary, restores the cursor and says how to resume; kill -9 leftovers are cleaned by the next run', async (t) => {
  const dir = await scratch(t);
  const out = join(dir, 'out');
  const imgs = Array.from({ length: 12 }, () => join(IMAGES, 'coffee.png')).map((p, i) => p.replace('coffee', ['coffee', 'chelsea', 'rocket', 'astronaut', 'motorcycle_left'][i % 5]!));
  const src = join(dir, 'src');
  await mkdir(src);
  const files: string[] = [];
  for (const [i, p] of imgs.entries()) {
    const f = join(src, `img${i}.png`);
    await copyFile(p, f);
    files.push(f);
  }
  // SIGINT as soon as the first output exists (mid-run: 11 images still to go)
  let sent = false;
  let poll: NodeJS.Timeout | undefined;
  const r = await runCli(['extract', ...COMMON, '--size', '128', '--layers', 'full', '--out', out, ...files], {
    onSpawn: (child) => {
      poll = setInterval(() => {
        void readdir(out).then((names) => {
          if (!sent && names.some((n) => n.endsWith('.safetensors') && !n.startsWith('.'))) {
            sent = true;
            child.kill('SIGINT');
          }
        }, () => undefined);
      }, 50);
    },
  });
  clearInterval(poll);
  t.true(sent, 'SIGINT was sent mid-run');
  t.is(r.code, 130, r.stderr);
  t.regex(r.stderr, /interrupted \(SIGINT\): \d+ of 12 image\(s\) written/);
  t.regex(r.stderr, /Run the same command again to resume/);
  t.deepEqual(await leftovers(out), [], 'no temporary left');
  // a SIGKILLed run's leftover (dead pid) and an old one are removed by the next run, which resumes
  await writeFile(join(out, '.img0.safetensors.df-tmp-999999-0123456789ab'), 'partial');
  await writeFile(join(out, `.img1.safetensors.df-tmp-${process.pid}-0123456789ab`), 'partial, old');
  await utimes(join(out, `.img1.safetensors.df-tmp-${process.pid}-0123456789ab`), new Date(0), new Date(0));
  await writeFile(join(out, '.notes.txt'), 'not ours');
  const done = await runCli(['extract', ...COMMON, '--size', '128', '--layers', 'full', '--out', out, ...files.slice(0, 3)]);
  t.is(done.code, 0, done.stderr);
  t.regex(done.stderr, /removed 2 temporary file\(s\) left in/);
  t.deepEqual(await leftovers(out), []);
  t.is(await readFile(join(out, '.notes.txt'), 'utf8'), 'not ours');
});

test('SIGKILL mid-run leaves no output half-written; the next run completes', async (t) => {
  const dir = await scratch(t);
  const out = join(dir, 'out');
  const files = ['chelsea', 'coffee', 'rocket', 'astronaut'].map((n) => join(IMAGES, `${n}.png`));
  // SIGKILL as soon as the first output exists: later images may be half-way through a write
  let killed = false;
  let poll: NodeJS.Timeout | undefined;
  const k = await runCli(['extract', ...COMMON, '--size', '128', '--layers', 'full', '--out', out, ...files], {
    onSpawn: (child) => {
      poll = setInterval(() => {
        void readdir(out).then((names) => {
          if (!killed && names.some((n) => n.endsWith('.safetensors') && !n.startsWith('.'))) {
            killed = true;
            child.kill('SIGKILL');
          }
        }, () => undefined);
      }, 20);
    },
  });
  clearInterval(poll);
  t.true(killed, 'SIGKILL was sent mid-run');
  t.is(k.signal, 'SIGKILL');
  for (const n of await readdir(out).catch(() => [] as string[])) {
    if (n.endsWith('.safetensors') && !n.startsWith('.')) t.truthy(await SafetensorsFile.open(join(out, n)), `${n} is complete`);
  }
  const r = await runCli(['extract', ...COMMON, '--size', '128', '--layers', 'full', '--out', out, ...files]);
  t.is(r.code, 0, r.stderr);
  t.deepEqual((await readdir(out)).sort(), files.map((f) => f.split('/').pop()!.replace('.png', '.safetensors')).sort());
  t.deepEqual(await leftovers(out), []);
});
