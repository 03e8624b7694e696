/**
 * Event-loop responsiveness under hostile-sized inputs (issue 10, target: longest stall < 50 ms):
 *
 * 1. `extract` of one 16000×16000 PNG (256 M pixels, under the default 16383² limit) on the bundled
 *    micro model at 128 px — the decode and the Pillow-exact resize run in the image worker threads;
 *    baseline: the same extract with `setImageThreads(0)` (decode in libuv's pool, resize on the JS
 *    thread, as before this change).
 * 2. 20 uploads of a 4000×3000 JPEG arriving at once at `serve` (`POST /v1/extract`, micro model,
 *    size 64); the uploads come from this process, the service runs in another (as in production: the
 *    clients' own work is not the service's stall); baseline: the same with the resize on the JS thread.
 *
 * Every measurement runs in a fresh process (bench/eventloop-case.ts), so one case's garbage, heap and
 * threads do not weigh on the next. The stall is the largest event-loop delay seen by
 * `monitorEventLoopDelay` (5 ms resolution) during the work, plus a control: the same monitor over an
 * idle second in a fresh process (what the machine's load alone gives). Each case runs
 * DF_BENCH_EVENTLOOP_RUNS times (default 3); the table gives the median and the worst.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import sharp from 'sharp';
import { ROOT, fmt, table } from './common.js';

interface Stall { maxMs: number; p99Ms: number; wallMs: number; pngBytes?: number }

const CASE = join(ROOT, 'bench', 'eventloop-case.ts');
const RUNS = Math.max(1, Number(process.env.DF_BENCH_EVENTLOOP_RUNS ?? 3));

/** Runs one case in a child; `drive` (serve) talks to it once it printed its URL. */
function runCase(kind: string, threads: number, drive?: (url: string) => Promise<void>): Promise<Stall> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', CASE, kind, String(threads)], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] });
    let result: Stall | undefined;
    const lines = createInterface({ input: p.stdout });
    lines.on('line', (line) => {
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return;
      }
      if (typeof msg.url === 'string' && drive) {
        p.stdin.write('start\n');
        drive(msg.url).then(() => p.stdin.write('stop\n'), (e: unknown) => { p.kill(); reject(e); });
      } else if (typeof msg.maxMs === 'number') {
        result = msg as unknown as Stall;
      }
    });
    p.on('error', reject);
    p.on('close', (code) => (result ? resolve(result) : reject(new Error(`eventloop case ${kind} exited with ${code}`))));
  });
}

async function repeat(kind: string, threads: number, drive?: (url: string) => Promise<void>): Promise<Stall[]> {
  const out: Stall[] = [];
  for (let i = 0; i < RUNS; i++) out.push(await runCase(kind, threads, drive));
  return out;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
const worst = (xs: number[]): number => Math.max(...xs);

export async function run(): Promise<string> {
  const rows: (string | number)[][] = [];
  const idle = (await repeat('idle', 2)).map((s) => s.maxMs);
  rows.push(['idle 1 s (control: machine load alone)', '-', '-', fmt(median(idle)), fmt(worst(idle)), '-', '-', '-']);

  // 1. one 16000² PNG through extract
  const side = Number(process.env.DF_BENCH_EVENTLOOP_SIDE ?? 16000);
  const base = await repeat('extract', 0);
  const ours = await repeat('extract', 2);
  const pngKb = ((ours[0]!.pngBytes ?? 0) / 1024).toFixed(0);
  const row = (label: string, b: Stall[], o: Stall[]) => {
    const bm = median(b.map((s) => s.maxMs));
    const om = median(o.map((s) => s.maxMs));
    const ow = worst(o.map((s) => s.maxMs));
    return [label, fmt(bm), fmt(worst(b.map((s) => s.maxMs))), fmt(om), fmt(ow), fmt(bm / om), fmt(median(o.map((s) => s.wallMs)) / 1000), ow < 50 ? 'yes' : om < 50 ? 'median only' : 'no'];
  };
  rows.push(row(`extract, one ${side}² PNG (${pngKb} KB), micro model, 128 px`, base, ours));

  // 2. 20 uploads at once to serve, from this process
  const jpeg = await sharp({ create: { width: 4000, height: 3000, channels: 3, background: { r: 30, g: 60, b: 90 } } })
    .composite([{ input: Buffer.from(Uint8Array.from({ length: 400 * 300 * 3 }, (_, i) => (i * 2654435761) >>> 24)), raw: { width: 400, height: 300, channels: 3 }, tile: true }])
    .jpeg({ quality: 90 })
    .toBuffer();
  const uploads = async (url: string) => {
    const rs = await Promise.all(
      Array.from({ length: 20 }, () => fetch(`${url}/v1/extract?size=64&layers=legacy`, { method: 'POST', body: jpeg, headers: { 'content-type': 'image/jpeg' } }).then(async (r) => ({ status: r.status, bytes: (await r.arrayBuffer()).byteLength }))),
    );
    const bad = rs.filter((r) => r.status !== 200);
    if (bad.length) throw new Error(`${bad.length} of 20 uploads failed (status ${bad[0]!.status})`);
  };
  try {
    rows.push(row(`serve, 20 uploads of a 4000×3000 JPEG (${(jpeg.length / 1024).toFixed(0)} KB) at once, size 64`, await repeat('serve', 0, uploads), await repeat('serve', 2, uploads)));
  } catch (e) {
    rows.push([`serve, 20 uploads: not measured (${(e as Error).message.slice(0, 120)})`, '-', '-', '-', '-', '-', '-', '-']);
  }
  return [
    table(['work', 'baseline: resize on the JS thread, longest stall (ms), median', 'baseline worst', 'ours: longest stall (ms), median', 'ours worst', 'ratio (baseline / ours, medians)', 'ours: wall (s)', '< 50 ms'], rows),
    '',
    `Stall = longest event-loop delay (monitorEventLoopDelay, 5 ms resolution) while the work runs, each of ${RUNS} runs in a fresh process; the idle row is what the machine alone gives.`,
  ].join('\n');
}
