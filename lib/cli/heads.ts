/**
 * GATE's trained heads on the command line (docs/heads.md): `train-segmenter`, `segment`,
 * `train-amalgamation`. The training code (lib/heads) is imported only when one of them runs.
 *
 * `segment` from images takes every option of `extract` (the same commander options): it runs
 * `extract` (or `--recipe`) in a child process into a temporary folder, segments those features, and
 * removes the folder.
 *
 * @module
 */
import { spawn } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, Option, InvalidArgumentError as CliArgError } from 'commander';
import cliProgress from 'cli-progress';
import type { Device } from '../native.js';
import type { TrainProgress } from '../heads/index.js';

function intIn(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min || n > max) throw new CliArgError(`${name} must be an integer in [${min}, ${max}], got '${v}'`);
    return n;
  };
}

function positiveFloat(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new CliArgError(`${name} must be a non-negative number, got '${v}'`);
    return n;
  };
}

/** A progress bar over training members (stderr), or null with --no-progress. */
function trainBar(enabled: boolean, what: string) {
  if (!enabled) return null;
  const bar = new cliProgress.SingleBar({
    format: `${what} |{bar}| member {member}/{members} | {stage} epoch {epoch} step {step} | loss {loss}`,
    stream: process.stderr, hideCursor: true,
  }, cliProgress.Presets.shades_classic);
  let started = false;
  return {
    update(p: TrainProgress) {
      const payload = { member: p.member + 1, members: p.members, stage: p.stage, epoch: p.epoch, step: p.step, loss: Number.isFinite(p.loss) ? p.loss.toFixed(4) : '-' };
      if (!started) {
        bar.start(p.members, 0, payload);
        started = true;
      }
      bar.update(p.member, payload);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/** An AbortSignal fired by the first SIGINT/SIGTERM (training stops, nothing is written). */
function interruptSignal(): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const on = () => ac.abort(new Error('interrupted'));
  process.once('SIGINT', on);
  process.once('SIGTERM', on);
  return { signal: ac.signal, dispose: () => { process.off('SIGINT', on); process.off('SIGTERM', on); } };
}

/** The raw arguments after the subcommand name minus our own options: what `extract` gets. */
function extractArgs(argv: readonly string[], own: ReadonlySet<string>, ownFlags: ReadonlySet<string>): string[] {
  const i = argv.indexOf('segment');
  const rest = argv.slice(i + 1);
  const out: string[] = [];
  for (let k = 0; k < rest.length; k++) {
    const a = rest[k]!;
    const name = a.startsWith('--') ? a.split('=')[0]! : '';
    if (own.has(name)) {
      if (!a.includes('=')) k++;
      continue;
    }
    if (ownFlags.has(name)) continue;
    out.push(a);
  }
  return out;
}

async function runExtractChild(args: string[]): Promise<void> {
  await new Promise<void>((resolvePromise, reject) => {
    const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, 'extract', ...args], { stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', reject);
    child.on('exit', (code, sig) => (code === 0 ? resolvePromise() : reject(new Error(`extract failed (${sig ?? `exit code ${code}`})`))));
  });
}

interface SegmentCli {
  segmenter: string;
  features?: string;
  weights?: string;
  out: string;
  maskSize?: number;
  preview: boolean;
  device: Device;
  progress: boolean;
}

/** Adds `train-segmenter`, `segment` and `train-amalgamation` to `program` (after `extract`). */
export function registerHeadCommands(program: Command): void {
  program
    .command('train-segmenter')
    .description("train GATE's label-scarce pixel classifier ensemble (docs/method.md §Amalgamation and heads) on feature files and label maps")
    .requiredOption('--features <dir>', 'folder of <name>.safetensors features (extract / recipe output)')
    .requiredOption('--masks <dir>', 'folder of <name>.png (8-bit class ids) or <name>.npy label maps; 255 = ignore')
    .requiredOption('--out <file>', 'trained segmenter (TorchScript) to write')
    .option('--ensemble <n>', 'classifiers in the ensemble (majority vote)', intIn('--ensemble', 1, 1000), 10)
    .option('--seed <n>', 'seed of initialisation, shuffles and dropout', intIn('--seed', 0, 2 ** 31), 0)
    .option('--classes <n>', 'number of classes (default: largest label + 1)', intIn('--classes', 2, 255))
    .option('--batch-size <n>', 'pixels per mini-batch', intIn('--batch-size', 2, 1 << 20), 64)
    .option('--epochs <n>', 'epochs at most (early stopping as DatasetGAN)', intIn('--epochs', 1, 100000), 100)
    .option('--lr <x>', 'Adam learning rate', positiveFloat('--lr'), 1e-3)
    .option('--val-masks <dir>', 'validation label maps: mIoU is reported at the end')
    .option('--val-features <dir>', 'features of the validation images (default: --features)')
    .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('cpu'))
    .option('--no-progress', 'no progress bar')
    .action(async (o: { features: string; masks: string; out: string; ensemble: number; seed: number; classes?: number; batchSize: number; epochs: number; lr: number; valMasks?: string; valFeatures?: string; device: Device; progress: boolean }) => {
      const { trainSegmenter } = await import('../heads/index.js');
      const bar = trainBar(o.progress && process.stderr.isTTY, 'train-segmenter');
      const intr = interruptSignal();
      try {
        const r = await trainSegmenter({
          features: o.features, masks: o.masks, out: o.out, ensemble: o.ensemble, seed: o.seed, classes: o.classes,
          batchSize: o.batchSize, maxEpochs: o.epochs, lr: o.lr, valMasks: o.valMasks, valFeatures: o.valFeatures,
          device: o.device, onProgress: bar ? (p) => bar.update(p) : undefined, signal: intr.signal,
        });
        bar?.stop();
        if (r.validation) console.error(`validation: mIoU ${(100 * r.validation.miou).toFixed(2)} over ${r.validation.images} image(s)`);
        console.error(`wrote ${r.out} (${r.members} classifier(s), ${r.classes} classes, ${r.pixels} pixels of ${r.images} image(s), ${r.seconds.toFixed(1)} s)`);
        console.log(JSON.stringify(r));
      } finally {
        bar?.stop();
        intr.dispose();
      }
    });

  const extract = program.commands.find((c) => c.name() === 'extract');
  const segment = program
    .command('segment')
    .description('label maps from a trained segmenter: from feature files (--features) or straight from images (--weights + extract options)')
    .requiredOption('--segmenter <file>', 'trained segmenter (train-segmenter output)')
    .option('--features <dir>', 'folder of <name>.safetensors features')
    .requiredOption('--out <dir>', 'output folder: <name>.png label maps, preview/<name>.png colour previews')
    .option('--mask-size <n>', 'output size N×N (default: the training masks\' size)', intIn('--mask-size', 1, 8192))
    .option('--no-preview', 'no colour previews');
  const own = new Set(['--segmenter', '--features', '--out', '--mask-size']);
  const ownFlags = new Set(['--no-preview', '--no-progress']);
  const skip = new Set(['--out', '--format', '--overwrite', '--aggregate', '--no-progress']);
  for (const opt of extract?.options ?? []) {
    if (skip.has(opt.long ?? '')) continue;
    if (opt.long === '--weights') {
      segment.option('--weights <dir>', 'exported weights: extract features of IMAGE… first (with the extract options)');
      continue;
    }
    segment.addOption(opt);
  }
  if (!extract) segment.addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('cpu'));
  segment
    .option('--no-progress', 'no progress bar')
    .argument('[images...]', 'images to segment (with --weights)')
    .action(async (images: string[], o: SegmentCli) => {
      if (!!o.features === !!o.weights) throw new CliArgError('segment needs exactly one of --features DIR or --weights W with images');
      if (o.weights && !images.length) throw new CliArgError('segment --weights needs image files');
      if (o.features && images.length) throw new CliArgError('segment --features takes no image arguments');
      const { segmentFiles, removeTempDir } = await import('../heads/index.js');
      let dir = o.features;
      let tmp: string | undefined;
      const intr = interruptSignal();
      const bar = o.progress && process.stderr.isTTY
        ? new cliProgress.SingleBar({ format: 'segment |{bar}| {value}/{total} images | {name}', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic)
        : null;
      try {
        if (o.weights) {
          tmp = await mkdtemp(join(tmpdir(), 'df-segment-'));
          await runExtractChild([...extractArgs(process.argv, own, ownFlags), '--out', tmp]);
          dir = tmp;
        }
        let started = false;
        const size = o.maskSize ? ([o.maskSize, o.maskSize] as [number, number]) : undefined;
        const device = (o.device ?? 'cpu') as Device;
        const r = await segmentFiles(o.segmenter, dir!, o.out, {
          size, preview: o.preview, device: device === 'auto' ? 'auto' : device, signal: intr.signal,
          onProgress: (p) => {
            if (!bar) return;
            if (!started) {
              bar.start(p.total, 0, { name: '' });
              started = true;
            }
            bar.update(p.done, { name: p.name });
          },
        });
        bar?.stop();
        console.error(`wrote ${r.written.length} label map(s) to ${o.out}`);
      } finally {
        bar?.stop();
        intr.dispose();
        if (tmp) await removeTempDir(tmp);
      }
    });

  program
    .command('train-amalgamation')
    .description("train GATE's correspondence amalgamation network (docs/method.md §Amalgamation and heads) on feature files and keypoint pairs")
    .requiredOption('--features <dir>', 'folder of <image>.safetensors features (recipe output: one bucket per variant)')
    .requiredOption('--pairs <dir>', 'folder of SPair-71k-style pair JSON files (or one file)')
    .requiredOption('--out <file>', 'trained network (TorchScript) to write')
    .option('--val-pairs <dir>', 'validation pairs: PCK@0.1 is reported at the end')
    .option('--epochs <n>', 'epochs over the pairs', intIn('--epochs', 1, 100000), 2)
    .option('--max-steps <n>', 'stop after this many steps', intIn('--max-steps', 1, 1e12))
    .option('--lr <x>', 'AdamW learning rate', positiveFloat('--lr'), 5e-4)
    .option('--weight-decay <x>', 'AdamW weight decay', positiveFloat('--weight-decay'), 0.01)
    .option('--output-conv', "GATE's `conv` setting: an output Conv3×3 after the mix")
    .addOption(new Option('--weighting <mode>', "channel: a softmax over the buckets per channel (GATE's code); scalar: one weight per bucket (the paper's Eq. 3-4)").choices(['channel', 'scalar']).default('channel'))
    .option('--seed <n>', 'seed', intIn('--seed', 0, 2 ** 31), 0)
    .addOption(new Option('--device <device>', 'cpu | cuda | cuda:N | auto').default('cpu'))
    .option('--no-progress', 'no progress bar')
    .action(async (o: { features: string; pairs: string; out: string; valPairs?: string; epochs: number; maxSteps?: number; lr: number; weightDecay: number; outputConv?: boolean; weighting: 'channel' | 'scalar'; seed: number; device: Device; progress: boolean }) => {
      const { trainAmalgamation } = await import('../heads/index.js');
      const bar = trainBar(o.progress && process.stderr.isTTY, 'train-amalgamation');
      const intr = interruptSignal();
      try {
        const r = await trainAmalgamation({
          features: o.features, pairs: o.pairs, out: o.out, valPairs: o.valPairs, epochs: o.epochs, maxSteps: o.maxSteps, lr: o.lr,
          weightDecay: o.weightDecay, outputConv: !!o.outputConv, weighting: o.weighting, seed: o.seed, device: o.device,
          onProgress: bar ? (p) => bar.update(p) : undefined, signal: intr.signal,
        });
        bar?.stop();
        if (r.validation) console.error(`validation: PCK@0.1 img ${(100 * r.validation.pckImg).toFixed(2)}${r.validation.pckBbox !== undefined ? `, bbox ${(100 * r.validation.pckBbox).toFixed(2)}` : ''} over ${r.validation.keypoints} keypoints`);
        console.error(`wrote ${r.out} (${r.buckets} × ${r.channels} + ${r.extra} channels, ${r.steps} steps over ${r.pairs} pairs, ${r.seconds.toFixed(1)} s)`);
        console.log(JSON.stringify(r));
      } finally {
        bar?.stop();
        intr.dispose();
      }
    });
}
