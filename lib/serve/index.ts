/**
 * The HTTP service (`diffusion-features serve`) as a library: {@link createServer}.
 *
 * @module
 */
export { createServer, type ServerOptions, type FeatureServer } from './app.js';
export { ServiceMetrics } from './metrics.js';
export { optionsSchema, extractOptionsOf, LAYERS_PATTERN, type ServiceOptions } from './options.js';
