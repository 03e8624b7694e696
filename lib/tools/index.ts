/**
 * Analysis tools over extracted features, one module per tool:
 * - `./visualize.ts`: PCA → RGB per feature, attention token maps, a PNG grid of a features file;
 * - `./gate-score.ts`: GATE's Laplacian content-shift score;
 * - `./correspondence.ts`: nearest-neighbour semantic correspondence and PCK@α on SPair-71k-style pairs;
 * - `./feature-file.ts`: reading feature files and choosing the feature to use;
 * - `./common.ts`, `./resize.ts`: the feature type, running ops on features, resizing.
 *
 * Tensor math runs in `models/ops.pt` (`pca_rgb`, `laplacian_map`, `correspondence`); bookkeeping
 * (PCK counting, point rescaling, resizing panels) is plain TypeScript. See docs/method.md.
 *
 * @module
 */
export type { FeatureArray, FeatureInput, Point } from './common.js';
export { resizeBilinear, resizeNearest } from './resize.js';
export { readFeatureFile, selectFeature } from './feature-file.js';
export {
  visualize, visualizeFile, attentionTokenMaps,
  type RawImage, type VisualizeOptions, type VisualizeFileOptions, type VisualizeFileResult,
} from './visualize.js';
export { gateScore, gateScoreFiles, gateScoreFromDiffs, laplacianMap, contentDiff, type GateScore, type GateScoreRow } from './gate-score.js';
export {
  correspondence, correspondenceFiles, parsePairAnnotation, pck, roundHalfEven,
  type CorrespondenceOptions, type CorrespondenceFilesOptions, type CorrespondenceResult, type PairAnnotation, type PairResult,
} from './correspondence.js';
