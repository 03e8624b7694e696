/**
 * The producer side of the scale-out: {@link enqueue} (one job per image, id from bytes and
 * settings), {@link waitForJobs} (until every job ended; re-adds jobs a Redis restart lost) and
 * {@link queueStatus} (counts by state and the failed jobs with their reasons).
 *
 * @module
 */
import type { Redis } from 'ioredis';
import type { JobsOptions } from 'bullmq';
import { AbortError, InvalidArgumentError, DiffusionFeaturesError } from '../errors.js';
import {
  jobFor,
  extractJobSettings,
  recipeJobSettings,
  type ExtractJobOptions,
  type RecipeJobOptions,
  type JobData,
  type JobSettings,
  type JobResult,
} from './job.js';
import { connectRedis, openQueue, redisError, type FeatureQueue, type RedisTarget } from './redis.js';

/** Retry policy of the jobs {@link enqueue} adds. */
export interface RetryOptions {
  /** Attempts per job for transient failures (default 5; broken input fails at once). */
  attempts?: number;
  /** First backoff delay in ms, doubled per attempt (default 2000). */
  backoffMs?: number;
}

/** Options of {@link enqueue}. */
export interface EnqueueOptions extends RetryOptions {
  /** Redis URL or connection. */
  redis: RedisTarget;
  /** Queue name (default `diffusion-features`). */
  queue?: string;
  /** Image paths as the workers see them (relative paths are resolved here). */
  images: readonly string[];
  /** `extract` options of every job; give this or `recipe`. */
  extract?: ExtractJobOptions;
  /** A GATE recipe for every job. */
  recipe?: RecipeJobOptions;
  /** Already canonical settings (e.g. from {@link extractJobSettings}); overrides `extract`/`recipe`. */
  settings?: JobSettings;
  /** Re-run jobs of this work that are in the failed state (default: they count as duplicates). */
  retryFailed?: boolean;
  /** Refuse to add new jobs beyond this many waiting ones (the service's bound); default: no bound. */
  maxWaiting?: number;
}

/** One image's outcome in {@link enqueue}. */
export interface EnqueuedJob {
  id: string;
  image: string;
  /** The output base name. */
  name: string;
  /** `true`: added (or a failed duplicate re-queued); `false`: the same work was already queued. */
  added: boolean;
  data: JobData;
}

/** Result of {@link enqueue}. */
export interface EnqueueResult {
  added: number;
  duplicates: number;
  jobs: EnqueuedJob[];
  /** Images that could not be read (missing, not a regular file, too large): not enqueued. */
  rejected: { image: string; reason: string }[];
}

/** The queue is longer than the caller allows (`maxWaiting`); try again later. */
export class QueueFullError extends DiffusionFeaturesError {
  /** Jobs waiting. */
  readonly waiting: number;
  constructor(waiting: number, max: number) {
    super('E_LIMIT_EXCEEDED', `the queue holds ${waiting} waiting jobs (limit ${max}); try again later`);
    this.waiting = waiting;
  }
}

/** BullMQ options of every job: retry with exponential backoff; finished jobs are kept (the ids deduplicate). */
export function jobOptions(id: string, o: RetryOptions = {}): JobsOptions {
  const attempts = o.attempts ?? 5;
  const backoffMs = o.backoffMs ?? 2000;
  if (!Number.isInteger(attempts) || attempts < 1 || attempts > 100) throw new InvalidArgumentError(`attempts must be an integer in [1, 100], got ${attempts}`);
  if (!Number.isInteger(backoffMs) || backoffMs < 0 || backoffMs > 3_600_000) throw new InvalidArgumentError(`backoff must be an integer number of ms in [0, 3600000], got ${backoffMs}`);
  return { jobId: id, attempts, backoff: { type: 'exponential', delay: backoffMs } };
}

async function withQueue<T>(target: RedisTarget, name: string | undefined, kind: 'durable' | 'quick', fn: (q: FeatureQueue, redis: Redis) => Promise<T>): Promise<T> {
  const own = typeof target === 'string';
  const redis = own ? connectRedis(target, kind) : target;
  const q = openQueue(redis, name);
  try {
    return await fn(q, redis);
  } catch (e) {
    throw typeof target === 'string' && !(e instanceof DiffusionFeaturesError) ? redisError(target, e) : e;
  } finally {
    await q.close().catch(() => undefined);
    if (own) redis.disconnect();
  }
}

/** The canonical settings of `o` (exactly one of `settings`, `extract`, `recipe`). */
export async function settingsOf(o: Pick<EnqueueOptions, 'settings' | 'extract' | 'recipe'>): Promise<JobSettings> {
  if (o.settings) return o.settings;
  if (o.recipe && o.extract) throw new InvalidArgumentError('give extract options or a recipe, not both');
  if (o.recipe) return recipeJobSettings(o.recipe);
  return extractJobSettings(o.extract ?? {});
}

/**
 * Adds one job per image. The job id comes from the image bytes, its output name and the canonical
 * settings, so work already queued (waiting, running, done or failed) is not added again: it counts
 * as a duplicate. Two images that would write the same output name with different bytes are an error
 * (nothing is added), as in `extract`.
 */
export async function enqueue(o: EnqueueOptions): Promise<EnqueueResult> {
  if (!Array.isArray(o.images) || o.images.length === 0) throw new InvalidArgumentError('enqueue: give at least one image');
  if (o.images.some((i) => typeof i !== 'string')) throw new InvalidArgumentError('enqueue: images must be paths (strings)');
  const settings = await settingsOf(o);
  const jobs: EnqueuedJob[] = [];
  const rejected: EnqueueResult['rejected'] = [];
  const byName = new Map<string, EnqueuedJob>();
  for (const image of o.images) {
    let job: Awaited<ReturnType<typeof jobFor>>;
    try {
      job = await jobFor(image, settings);
    } catch (e) {
      if (!(e instanceof DiffusionFeaturesError)) throw e;
      rejected.push({ image, reason: `${e.code}: ${e.message}` });
      continue;
    }
    const { id, data } = job;
    const prev = byName.get(data.name);
    if (prev && prev.id !== id) throw new InvalidArgumentError(`${image} and ${prev.image} would both write ${data.name}; rename one`);
    const j = { id, image: data.image, name: data.name, added: false, data };
    if (!prev) byName.set(data.name, j);
    jobs.push(j);
  }
  if (!jobs.length) return { added: 0, duplicates: 0, jobs, rejected };
  return withQueue(o.redis, o.queue, 'quick', async (q, redis) => {
    // The first image of each id carries the job; repeats in the same call are duplicates.
    const seen = new Set<string>();
    const unique = jobs.filter((j) => !seen.has(j.id) && !!seen.add(j.id));
    let added = 0;
    for (let i = 0; i < unique.length; i += 500) {
      const chunk = unique.slice(i, i + 500);
      const pipe = redis.pipeline();
      for (const j of chunk) pipe.exists(q.toKey(j.id));
      const exists = (await pipe.exec())!.map(([err, n]) => {
        if (err) throw err;
        return n === 1;
      });
      const fresh = chunk.filter((_, k) => !exists[k]);
      if (fresh.length && o.maxWaiting !== undefined) {
        // only new work is refused: a duplicate of queued work is answered as such
        const waiting = await q.getWaitingCount();
        if (waiting + fresh.length > o.maxWaiting) throw new QueueFullError(waiting, o.maxWaiting);
      }
      if (fresh.length) await q.addBulk(fresh.map((j) => ({ name: j.data.settings.kind, data: j.data, opts: jobOptions(j.id, o) })));
      for (const j of fresh) j.added = true;
      added += fresh.length;
      if (o.retryFailed) {
        for (const j of chunk.filter((_, k) => exists[k])) {
          const job = await q.getJob(j.id);
          if (job && (await job.isFailed())) {
            await job.retry('failed');
            j.added = true;
            added++;
          }
        }
      }
    }
    return { added, duplicates: jobs.length - added, jobs, rejected };
  });
}

/** A job that ended in the failed state. */
export interface FailedJob {
  id: string;
  image: string;
  reason: string;
}

/** Progress of {@link waitForJobs}. */
export interface WaitProgress {
  /** Jobs ended (completed or failed). */
  done: number;
  total: number;
  completed: number;
  failed: number;
  /** Jobs being worked on now. */
  active: number;
}

/** Options of {@link waitForJobs}. */
export interface WaitOptions extends RetryOptions {
  redis: RedisTarget;
  queue?: string;
  /** The jobs to wait for (from {@link enqueue}: jobs lost by a Redis restart are added again). */
  jobs: readonly Pick<EnqueuedJob, 'id' | 'image' | 'data'>[];
  /** How often the job states are read (ms; default 500, slower for many jobs). */
  pollMs?: number;
  onProgress?: (p: WaitProgress) => void;
  signal?: AbortSignal;
}

/** Result of {@link waitForJobs}. */
export interface WaitResult {
  completed: number;
  failed: FailedJob[];
  /** Jobs added again because Redis had lost them (restarted without persistence). */
  readded: number;
}

/**
 * Waits until every job ended. Survives Redis restarts (the connection retries); a job that Redis
 * lost while it was not finished is added again with the same id and data, and since outputs are
 * checked before work starts, work already written is not redone.
 */
export async function waitForJobs(o: WaitOptions): Promise<WaitResult> {
  const byId = new Map(o.jobs.map((j) => [j.id, j]));
  return withQueue(o.redis, o.queue, 'durable', async (q, redis) => {
    const pending = new Set(byId.keys());
    const failed: FailedJob[] = [];
    let completed = 0;
    let readded = 0;
    const poll = o.pollMs ?? (pending.size > 2000 ? 3000 : 500);
    const completedKey = q.toKey('completed');
    const failedKey = q.toKey('failed');
    const activeKey = q.toKey('active');
    while (pending.size) {
      if (o.signal?.aborted) throw new AbortError('waiting aborted', { cause: o.signal.reason });
      const ids = [...pending];
      let active = 0;
      try {
        for (let i = 0; i < ids.length; i += 1000) {
          const chunk = ids.slice(i, i + 1000);
          const pipe = redis.pipeline();
          for (const id of chunk) pipe.exists(q.toKey(id)).zscore(completedKey, id).zscore(failedKey, id).lpos(activeKey, id);
          const res = (await pipe.exec())!;
          const lost: string[] = [];
          chunk.forEach((id, k) => {
            const [[e1, exists], [e2, doneScore], [e3, failScore], [e4, activePos]] = res.slice(4 * k, 4 * k + 4) as [Error | null, unknown][];
            if (e1 || e2 || e3 || e4) throw e1 ?? e2 ?? e3 ?? e4;
            if (doneScore !== null) {
              completed++;
              pending.delete(id);
            } else if (failScore !== null) {
              failed.push({ id, image: byId.get(id)!.image, reason: '' });
              pending.delete(id);
            } else if (exists === 0) {
              lost.push(id);
            } else if (activePos !== null) {
              active++;
            }
          });
          if (lost.length) {
            await q.addBulk(lost.map((id) => ({ name: byId.get(id)!.data.settings.kind, data: byId.get(id)!.data, opts: jobOptions(id, o) })));
            readded += lost.length;
          }
        }
      } catch (e) {
        // Redis is restarting: the durable connection reconnects; try again after the poll delay.
        if (o.signal?.aborted) throw e;
      }
      o.onProgress?.({ done: byId.size - pending.size, total: byId.size, completed, failed: failed.length, active });
      if (pending.size) await new Promise((r) => setTimeout(r, poll));
    }
    for (const f of failed) {
      const job = await q.getJob(f.id).catch(() => undefined);
      f.reason = job?.failedReason ?? 'unknown (the job is gone)';
    }
    return { completed, failed, readded };
  });
}

/** What {@link queueStatus} reports. */
export interface QueueStatus {
  queue: string;
  /** Jobs per state (`waiting`, `active`, `delayed`, `completed`, `failed`, `prioritized`, `waiting-children`). */
  counts: Record<string, number>;
  /** Workers connected now. */
  workers: number;
  /** Every failed job with its image and reason, most recent first. */
  failed: (FailedJob & { attempts: number; finishedOn: number | null })[];
}

/** Counts by state and the failed jobs (paged through, so any number is fine). */
export async function queueStatus(o: { redis: RedisTarget; queue?: string; maxFailed?: number }): Promise<QueueStatus> {
  return withQueue(o.redis, o.queue, 'quick', async (q) => {
    const counts = await q.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed', 'prioritized', 'waiting-children');
    const workers = (await q.getWorkers()).length;
    const failed: QueueStatus['failed'] = [];
    const max = o.maxFailed ?? Infinity;
    for (let start = 0; failed.length < max; start += 500) {
      const page = await q.getFailed(start, start + 499);
      if (!page.length) break;
      for (const j of page) {
        if (!j || failed.length >= max) continue;
        const image = typeof j.data?.image === 'string' ? j.data.image : '(unknown)';
        failed.push({ id: j.id ?? '', image, reason: j.failedReason ?? '', attempts: j.attemptsMade, finishedOn: j.finishedOn ?? null });
      }
      if (page.length < 500) break;
    }
    return { queue: q.name, counts, workers, failed };
  });
}
