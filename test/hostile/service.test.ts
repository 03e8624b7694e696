/**
 * Hostile corpus, part 4: the HTTP service (`serve`, lib/serve) over real HTTP on the micro model.
 * Hostile query options (paths and JSON files as layers, huge sizes, non-numbers), hostile bodies
 * (garbage, truncated images, a header-only pixel bomb, an over-size body): every answer is a 4xx with
 * a JSON error of ours, never a 5xx, never the content of a file on the host; afterwards a good
 * upload still gets features.
 */
import test from 'ava';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadPipeline, type Pipeline } from '../../lib/pipeline/index.js';
import { createServer, type FeatureServer } from '../../lib/serve/index.js';
import { SafetensorsFile } from '../../lib/io/safetensors.js';
import { IMAGES, WEIGHTS, pngWithHeader, scratch } from './helpers.js';

let pipe: Pipeline;
let server: FeatureServer;
let url: string;

test.before(async () => {
  pipe = await loadPipeline(WEIGHTS, { device: 'cpu' });
  server = await createServer({ pipeline: pipe, maxBodyBytes: 4 * 2 ** 20, maxQueue: 64 });
  url = await server.listen({ port: 0 });
});
test.after.always(async () => {
  await server?.close();
  pipe?.dispose();
});

async function post(query: string, body: Uint8Array | string): Promise<{ status: number; text: string }> {
  const r = await fetch(`${url}/v1/extract?${query}`, { method: 'POST', body: typeof body === 'string' ? body : Buffer.from(body), headers: { 'content-type': 'application/octet-stream' } });
  return { status: r.status, text: Buffer.from(await r.arrayBuffer()).toString('latin1') };
}

test.serial('hostile options and bodies get 4xx JSON errors, never 5xx, never file contents', async (t) => {
  const dir = await scratch(t);
  const secret = join(dir, 'secret.json');
  await writeFile(secret, JSON.stringify({ 'up-level0-upsampler-out': 'TOP-SECRET-VALUE' }));
  const png = await readFile(join(IMAGES, 'chelsea.png'));
  const q = (o: Record<string, string>) => new URLSearchParams({ size: '64', ...o }).toString();
  const cases: [string, string, Uint8Array | string, number[]][] = [
    ['layers = /etc/passwd', q({ layers: '/etc/passwd' }), png, [400]],
    ['layers = a JSON file on the host', q({ layers: secret }), png, [400]],
    ['layers = ../../x.json', q({ layers: '../../x.json' }), png, [400]],
    ['layers = file: URL', q({ layers: 'file:///etc/shadow' }), png, [400]],
    ['layers = ","', q({ layers: ',' }), png, [400]],
    ['layers = unknown id', q({ layers: 'up-level9-upsampler-out' }), png, [400]],
    ['layers = __proto__', q({ layers: '__proto__' }), png, [400]],
    ['size = 2048 (over the limit)', q({ size: '2048' }), png, [400]],
    ['size = 100', q({ size: '100' }), png, [400]],
    ['size = empty', 'size=', png, [400]],
    ['t = 1e300', q({ t: '1e300' }), png, [400]],
    ['controlScale = 1e308', q({ controlScale: '1e308' }), png, [400]],
    ['featureResize = 64 (larger than the maps)', q({ featureResize: '64' }), png, [400]],
    ['unknown option', q({ weights: '/etc' }), png, [400]],
    ['prompt over the length limit', q({ prompt: 'a'.repeat(10_001) }), png, [400, 413, 414, 431]],
    ['empty body', q({}), '', [400]],
    ['text body', q({}), 'root:x:0:0:root:/root:/bin/bash', [400]],
    ['PNG cut at 100 bytes', q({}), png.subarray(0, 100), [400]],
    ['PNG cut in half', q({}), png.subarray(0, png.length >> 1), [400]],
    ['header-only 20000² PNG bomb', q({}), pngWithHeader(20000, 20000), [400, 413]],
    ['body over the limit', q({}), new Uint8Array(5 * 2 ** 20), [413]],
  ];
  for (const [label, query, body, statuses] of cases) {
    const r = await post(query, body);
    t.true(statuses.includes(r.status), `${label}: status ${r.status} (${r.text.slice(0, 200)})`);
    t.false(/root:x:0|TOP-SECRET-VALUE|shadow:/.test(r.text), `${label}: no file content in the answer`);
    if (r.status !== 413 || r.text) t.notThrows(() => JSON.parse(r.text), `${label}: a JSON error body`);
  }
  // the service still serves
  const ok = await fetch(`${url}/v1/extract?size=64&layers=legacy`, { method: 'POST', body: png, headers: { 'content-type': 'image/png' } });
  t.is(ok.status, 200);
  const f = SafetensorsFile.fromBuffer(new Uint8Array(await ok.arrayBuffer()));
  t.true(f.names().includes('up-level0-upsampler-out'));
  t.true(f.float32('up-level0-upsampler-out').every(Number.isFinite));
});

// Numbers in the query are strict decimal, as on the CLI: hex, exponents, fractions for integers,
// blanks and repeated options are refused with a 400 naming the option; plain decimals still work.
test.serial('serve refuses non-decimal numbers in the query (size=0x40, t=0x10, 1e1, " 64", repeated)', async (t) => {
  const png = await readFile(join(IMAGES, 'chelsea.png'));
  const bad: [string, RegExp][] = [
    ['size=0x40', /size/],
    ['size=64&t=0x10', /\bt\b/],
    ['size=64&t=1e1', /\bt\b/],
    ['size=64&t=10.0', /\bt\b/],
    ['size=%2064', /size/],
    ['size=64&seed=0b11', /seed/],
    ['size=64&controlScale=0x1', /controlScale/],
    ['size=64&controlScale=Infinity', /controlScale/],
    ['size=64&attention=1', /attention/],
    ['size=64&size=128', /size/],
  ];
  for (const [query, names] of bad) {
    const r = await post(query, png);
    t.is(r.status, 400, `${query}: ${r.status}`);
    t.regex((JSON.parse(r.text) as { error: string }).error, names, query);
  }
  // multipart options are typed the same way
  const form = new FormData();
  form.append('options', JSON.stringify({ size: '0x40' }));
  form.append('image', new Blob([png]), 'chelsea.png');
  const m = await fetch(`${url}/v1/extract`, { method: 'POST', body: form });
  t.is(m.status, 400);
  await m.arrayBuffer();
  const ok = await post('size=64&t=10&seed=3&attention=false', png);
  t.is(ok.status, 200, ok.text.slice(0, 200));
});
