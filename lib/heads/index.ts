/**
 * GATE's trained heads, trained and run natively through libtorch (no Python):
 *
 * - {@link trainSegmenter}: the label-scarce pixel classifier ensemble of docs/method.md §Amalgamation and heads on feature files
 *   and label maps; {@link Segmenter} / {@link segmentFiles} turn features into label maps;
 * - {@link trainAmalgamation}: the correspondence amalgamation network of docs/method.md §Amalgamation and heads (per-channel softmax over
 *   feature buckets) trained with its symmetric CLIP-style loss; {@link Amalgamator} applies it.
 *
 * Heads are TorchScript files (`models/heads/*.pt` templates shaped at run time, trained by the native
 * fit loop of src/train.cc) that Python's `torch.jit.load` also reads. Training never upsamples whole
 * feature maps: pixels are sampled and their features bilinearly interpolated (align_corners=False) on
 * the fly, so memory is the features at their own size plus a mini-batch.
 *
 * @module
 */
import { readdir, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';

export { IGNORE, readMask, decodeMaskNpy, ignoreSmallClasses, type LabelMap } from './data.js';
export type { TrainProgress } from './common.js';
export { meanIoU, colorize } from './metrics.js';
export {
  trainSegmenter, Segmenter, segmentFiles, type TrainSegmenterOptions, type TrainSegmenterResult, type SegmentFilesOptions,
} from './segmenter.js';
export { trainAmalgamation, Amalgamator, type TrainAmalgamationOptions, type TrainAmalgamationResult } from './amalgamation.js';

/** Removes a folder made by the CLI for temporary features (never anything else). @internal */
export async function removeTempDir(dir: string): Promise<void> {
  if (!basename(dir).startsWith('df-segment-')) return;
  const entries = await readdir(dir).catch(() => []);
  for (const e of entries) if (e.endsWith('.safetensors') || e.endsWith('.npy')) await rm(join(dir, e), { force: true });
  await rm(dir, { recursive: true, force: true });
}
