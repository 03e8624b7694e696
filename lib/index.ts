/**
 * diffusion-features: dense diffusion features (Stable Diffusion 1.5) and the GATE method for Node.js.
 *
 * ```ts
 * import { loadPipeline } from 'diffusion-features';
 * const pipe = await loadPipeline('sd15-export', { device: 'auto' });
 * const [cat] = await pipe.extract(['cat.jpg'], { layers: 'legacy', prompt: 'a photo of a cat', seed: 1 });
 * const f = cat.features['up-level1-upsampler-out'];  // Tensor 1280×32×32, CPU float32
 * const data = f.toFloat32Array();                    // zero-copy view
 * cat.dispose(); pipe.dispose();
 * ```
 *
 * @module
 */
export * from './native.js';
export * from './errors.js';
export * from './safetensors.js';
export * from './npy.js';
export * from './tokenizer.js';
export * from './image.js';
export * from './layers.js';
export * from './lora.js';
export * from './control.js';
export {
  visualize,
  visualizeFile,
  attentionTokenMaps,
  gateScore,
  gateScoreFiles,
  gateScoreFromDiffs,
  laplacianMap,
  contentDiff,
  correspondence,
  correspondenceFiles,
  parsePairAnnotation,
  pck,
  readFeatureFile,
  selectFeature,
  resizeBilinear,
  resizeNearest,
  roundHalfEven,
  type FeatureArray,
  type FeatureInput,
  type Point,
  type RawImage,
  type VisualizeOptions,
  type VisualizeFileOptions,
  type VisualizeFileResult,
  type GateScore,
  type GateScoreRow,
  type CorrespondenceOptions,
  type CorrespondenceFilesOptions,
  type CorrespondenceResult,
  type PairAnnotation,
  type PairResult,
} from './tools.js';
export {
  RECIPES,
  getRecipe,
  extractRecipe,
  type Recipe,
  type RecipeVariant,
  type RecipeOptions,
  type RecipeResult,
} from './recipes.js';
export {
  loadPipeline,
  bundledModelDir,
  readModelJson,
  readNoiseFile,
  encodeFeatures,
  writeFeatures,
  featureTensors,
  Pipeline,
  type LoadOptions,
  type ExtractOptions,
  type ImageFeatures,
  type ImageInput,
  type Progress,
  type ModelJson,
} from './pipeline.js';
