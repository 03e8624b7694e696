/**
 * Lazy access to the scale-out API (`./scale.ts`: BullMQ workers, enqueue, the HTTP service). The
 * main entry exports only {@link scale} and types, so BullMQ, ioredis, fastify and prom-client load
 * on the first call, never for users who do not scale out.
 *
 * ```ts
 * import { scale } from 'diffusion-features';
 * const { enqueue, waitForJobs, runWorker, createServer } = await scale();
 * ```
 *
 * @module
 */

/** The scale-out API: queue ({@link import('./queue/index.js')}) and service ({@link import('./serve/index.js')}). */
export type ScaleApi = typeof import('./scale.js');

/** Loads the scale-out API (once; later calls resolve to the same module). */
export function scale(): Promise<ScaleApi> {
  return import('./scale.js');
}

export type {
  EnqueueOptions,
  EnqueueResult,
  EnqueuedJob,
  ExtractJobOptions,
  ExtractJobSettings,
  FailedJob,
  FeatureWorker,
  FeatureWorkerEvents,
  JobData,
  JobProgress,
  JobResult,
  JobSettings,
  QueueStatus,
  RecipeJobOptions,
  RecipeJobSettings,
  WaitOptions,
  WaitProgress,
  WaitResult,
  WorkerOptions,
} from './queue/index.js';
export type { FeatureServer, ServerOptions, ServiceOptions } from './serve/index.js';
