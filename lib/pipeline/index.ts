/**
 * The extraction pipeline: {@link loadPipeline} and the {@link Pipeline} facade, its option and result
 * types, and the weights folder's model.json. The stage engine (`./engine.ts`) and planning
 * (`./plan.ts`) are internal.
 *
 * @module
 */
export { loadPipeline, Pipeline } from './facade.js';
export { bundledModelDir, defaultSize, readModelJson, type ModelJson } from './model-json.js';
export type { ExtractOptions, ImageFeatures, ImageInput, LoadOptions, Progress } from './types.js';
