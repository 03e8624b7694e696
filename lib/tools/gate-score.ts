/**
 * GATE's Laplacian content-shift score (docs/method.md §GATE score).
 *
 * @module
 */
import type { Device } from '../native.js';
import { InvalidArgumentError, NotFoundError } from '../errors.js';
import { check3d, sameShape, toFeatureArray, withTensors, type FeatureArray, type FeatureInput } from './common.js';
import { isSpatial, readFeatureFile } from './feature-file.js';


/** m(F) of docs/method.md §GATE score: per-channel 4-neighbour Laplacian (replicate padding), L2 norm over channels → H×W. */
export async function laplacianMap(feature: FeatureInput, device: Device = 'cpu'): Promise<FeatureArray> {
  check3d(feature, 'laplacianMap');
  return withTensors(device, [feature], (ops, [t]) => toFeatureArray(ops.laplacianMap(t!)));
}

/** diff(F) = Σ_ij |m_ref[i,j] − m[i,j]| (float64). */
export function contentDiff(mRef: Float32Array, m: Float32Array): number {
  if (mRef.length !== m.length) throw new InvalidArgumentError(`contentDiff: maps of different sizes (${mRef.length} vs ${m.length})`);
  let s = 0;
  for (let i = 0; i < m.length; i++) s += Math.abs(mRef[i]! - m[i]!);
  return s;
}

/** Score(F) = (diff_anchor − diff(F)) / diff_anchor: 1 = contours of the t=0 reference, smaller = more content shift. */
export function gateScoreFromDiffs(diffAnchor: number, diff: number): number {
  return (diffAnchor - diff) / diffAnchor;
}

/** Result of {@link gateScore}. */
export interface GateScore {
  /** diff of the anchor. */
  anchorDiff: number;
  /** diff of each feature. */
  diffs: number[];
  /** Score of each feature. */
  scores: number[];
}

/**
 * GATE's content-shift score (docs/method.md §GATE score) of `features` against the t=0 `reference` feature,
 * relative to `anchor` (e.g. the feature without the technique). All C×H×W of one shape.
 */
export async function gateScore(reference: FeatureInput, anchor: FeatureInput, features: readonly FeatureInput[], device: Device = 'cpu'): Promise<GateScore> {
  check3d(reference, 'gateScore reference');
  sameShape(reference, anchor, 'gateScore anchor');
  features.forEach((f, i) => sameShape(reference, f, `gateScore feature ${i}`));
  const mRef = (await laplacianMap(reference, device)).data;
  const anchorDiff = contentDiff(mRef, (await laplacianMap(anchor, device)).data);
  const diffs: number[] = [];
  for (const f of features) diffs.push(contentDiff(mRef, (await laplacianMap(f, device)).data));
  return { anchorDiff, diffs, scores: diffs.map((d) => gateScoreFromDiffs(anchorDiff, d)) };
}

/** One row of {@link gateScoreFiles}. */
export interface GateScoreRow {
  file: string;
  layer: string;
  diff: number;
  anchor_diff: number;
  /** (anchor_diff − diff) / anchor_diff; null when the anchor's diff is 0. */
  score: number | null;
}

/**
 * {@link gateScore} over feature files: for `layer`, or every C×H×W tensor the reference, the anchor
 * and all files share, one row per (file, layer).
 */
export async function gateScoreFiles(referenceFile: string, anchorFile: string, files: readonly string[], layer?: string, device: Device = 'cpu'): Promise<GateScoreRow[]> {
  if (!files.length) throw new InvalidArgumentError('gate-score: give at least one features file');
  const ref = await readFeatureFile(referenceFile);
  const anchor = await readFeatureFile(anchorFile);
  const others: Map<string, FeatureArray>[] = [];
  for (const f of files) others.push(await readFeatureFile(f));
  let layers: string[];
  if (layer) {
    for (const [name, m] of [[referenceFile, ref], [anchorFile, anchor], ...files.map((f, i) => [f, others[i]!] as const)] as const) {
      if (!m.has(layer)) throw new NotFoundError(`${name}: no tensor '${layer}' (has: ${[...m.keys()].join(', ')})`);
    }
    layers = [layer];
  } else {
    layers = [...ref.keys()].filter((n) => isSpatial(n, ref.get(n)!) && anchor.has(n) && others.every((o) => o.has(n)));
    if (!layers.length) throw new InvalidArgumentError(`gate-score: the files share no C×H×W tensor`);
  }
  const rows: GateScoreRow[] = [];
  for (const id of layers) {
    const g = await gateScore(ref.get(id)!, anchor.get(id)!, others.map((o) => o.get(id)!), device);
    files.forEach((file, i) => {
      rows.push({ file, layer: id, diff: g.diffs[i]!, anchor_diff: g.anchorDiff, score: g.anchorDiff === 0 ? null : g.scores[i]! });
    });
  }
  return rows;
}
