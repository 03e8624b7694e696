/**
 * Scale-out over BullMQ on Redis (docs/scale-out.md): enqueue extraction work from anywhere, run workers
 * in-process or as `diffusion-features worker`, follow jobs to the end.
 *
 * @module
 */
export {
  DEFAULT_QUEUE,
  JOB_VERSION,
  canonicalJson,
  checkJobData,
  checkJobSettings,
  extractJobSettings,
  recipeJobSettings,
  jobFor,
  jobIdFor,
  settingsKey,
  type ExtractJobOptions,
  type ExtractJobSettings,
  type FileRef,
  type JobData,
  type JobProgress,
  type JobResult,
  type JobSettings,
  type LoraRef,
  type RecipeJobOptions,
  type RecipeJobSettings,
} from './job.js';
export {
  enqueue,
  waitForJobs,
  queueStatus,
  jobOptions,
  QueueFullError,
  type EnqueueOptions,
  type EnqueueResult,
  type EnqueuedJob,
  type FailedJob,
  type QueueStatus,
  type RetryOptions,
  type WaitOptions,
  type WaitProgress,
  type WaitResult,
} from './enqueue.js';
export { runWorker, FeatureWorker, type WorkerOptions, type FeatureWorkerEvents } from './worker.js';
export { connectRedis, openQueue, redactUrl, type RedisTarget, type FeatureQueue } from './redis.js';
