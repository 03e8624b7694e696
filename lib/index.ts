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
 * This is the public API; everything else under `lib/` is internal (see docs/architecture.md).
 *
 * @module
 */

// ---- extraction: load a weights folder once, extract features of many images
export {
  loadPipeline,
  Pipeline,
  bundledModelDir,
  readModelJson,
  defaultSize,
  type LoadOptions,
  type ExtractOptions,
  type ImageFeatures,
  type ImageInput,
  type Progress,
  type ModelJson,
} from './pipeline/index.js';

// ---- GATE recipes: every feature variant of a task, shared work done once
export {
  RECIPES,
  getRecipe,
  extractRecipe,
  variantOptions,
  type Recipe,
  type RecipeVariant,
  type RecipeOptions,
  type RecipeResult,
} from './recipes.js';

// ---- features <-> files
export { encodeFeatures, writeFeatures, featureTensors, recipeTensors, writeRecipeResult, readNoiseFile } from './io/features.js';
export {
  SafetensorsFile,
  encodeSafetensors,
  writeSafetensors,
  type StDType,
  type StTensorInfo,
  type StTensorInput,
} from './io/safetensors.js';
export { encodeNpy, decodeNpy, writeNpy, readNpy, type NpyArray, type NpyDType } from './io/npy.js';

// ---- analysis tools: visualisation, GATE score, correspondence
export * from './tools/index.js';

// ---- layers, prompts, images, control images
export {
  LAYER_IDS,
  PRESETS,
  ATTENTION_CATEGORIES,
  isLayerId,
  isMapId,
  resolveLayerSpec,
  parseLayerConfig,
  sortForwardOrder,
  suggestLayerId,
  type AttentionCategory,
  type LayerSpec,
  type ResolveLayerOptions,
  type PresetName,
} from './layers.js';
export { ClipTokenizer, MAX_PROMPT_LENGTH, type EncodeOptions } from './tokenizer.js';
export {
  loadImage,
  setImageThreads,
  MAX_IMAGE_SIZE,
  DEFAULT_MAX_IMAGE_BYTES,
  DEFAULT_MAX_PIXELS,
  type LoadImageOptions,
  type LoadedImage,
  type ResampleMode,
} from './image.js';
// ---- output names and resume checks (what extract, recipe and the queue worker all follow)
export { outputNameFor, outputPathFor, checkExistingOutput, SettingsMismatchError, type OutputFormat, type ExistingOutput } from './outputs.js';
export { cannyImage, type CannyImage, type CannyOptions } from './control.js';

// ---- GATE's trained heads (docs/heads.md): pixel-classifier ensembles that segment from features, and the
// correspondence amalgamation network; trained natively through libtorch (no Python)
export {
  /** Trains GATE's label-scarce pixel classifier ensemble on feature files and label maps; writes one TorchScript head file. */
  trainSegmenter,
  /** A trained segmenter file loaded for use: label maps from feature files (dispose when done). */
  Segmenter,
  /** Segments every feature file of a folder (or the given files) and writes 8-bit label-map PNGs plus colour previews. */
  segmentFiles,
  /** Trains GATE's correspondence amalgamation network on feature files and keypoint pairs. */
  trainAmalgamation,
  /** A trained amalgamation network loaded for use: amalgamated features of an image (dispose when done). */
  Amalgamator,
  /** Mean intersection-over-union of predicted and true label maps (ignore = 255 left out). */
  meanIoU,
  /** Reads an 8-bit PNG or uint8 .npy label map. */
  readMask,
  type TrainSegmenterOptions,
  type TrainSegmenterResult,
  type SegmentFilesOptions,
  type TrainAmalgamationOptions,
  type TrainAmalgamationResult,
  type TrainProgress,
  type LabelMap,
} from './heads/index.js';

// ---- LoRA
export {
  LoraManager,
  readLoraFile,
  parseLora,
  planLoraMerge,
  type LoraSpec,
  type LoraFile,
  type LoraFormat,
  type LoraTarget,
  type LoraModule,
  type LoraFactor,
  type LoraPlan,
  type LoraTerm,
  type ParamInfo,
} from './lora/index.js';

// ---- the native layer: tensors, TorchScript modules, devices, threads, the CPU allocator cache
export {
  Tensor,
  ScriptModule,
  NativeError,
  cudaAvailable,
  deviceCount,
  resolveDevice,
  setNumThreads,
  maxThreads,
  getNumThreads,
  setJitOptimize,
  getJitOptimize,
  libtorchVersion,
  nativeBinaryPath,
  nativeBuildInfo,
  cpuCache,
  emptyCpuCache,
  setCpuCacheLimit,
  type Device,
  type DType,
  type IValue,
  type CpuCacheInfo,
  type ParameterInfo,
} from './native.js';

// ---- errors: every deliberate error is a DiffusionFeaturesError with a stable code
export {
  DiffusionFeaturesError,
  InvalidFileError,
  FileNotFoundError,
  FileAccessError,
  ImageDecodeError,
  UnknownLayerError,
  InvalidArgumentError,
  NotFoundError,
  WriteError,
  IncompatibleModelError,
  AbortError,
  DisposedError,
  LimitExceededError,
  isDiffusionFeaturesError,
  type ErrorCode,
} from './errors.js';

// ---- scale-out (BullMQ workers, enqueue, the HTTP service): loaded on the first call of scale()
export * from './scale-loader.js';
