/**
 * Redis connections of the scale-out (ioredis), and the BullMQ queue they open.
 *
 * Two kinds: `'durable'` connections (workers, `enqueue --wait`, the service) retry forever, so a
 * Redis restart is a pause, not an error; `'quick'` ones (`enqueue`, `queue-status`) give up after a
 * few seconds with a clear error when Redis cannot be reached.
 *
 * @module
 */
import { Redis, type RedisOptions } from 'ioredis';
import { Queue } from 'bullmq';
import { DiffusionFeaturesError, InvalidArgumentError } from '../errors.js';
import { DEFAULT_QUEUE, type JobData, type JobResult } from './job.js';

/** A Redis URL (`redis://[user:pass@]host:port[/db]`, `rediss://` for TLS) or an ioredis instance. */
export type RedisTarget = string | Redis;

/** The BullMQ queue of feature jobs. */
export type FeatureQueue = Queue<JobData, JobResult, string>;

/** How long a quick connection tries before giving up (ms). */
const QUICK_TIMEOUT_MS = 5000;

/** Validates a queue name (BullMQ keys are `bull:<name>:…`; a colon would break them). */
export function checkQueueName(name: string | undefined): string {
  const q = name ?? DEFAULT_QUEUE;
  if (typeof q !== 'string' || !/^[A-Za-z0-9._-]{1,100}$/.test(q)) throw new InvalidArgumentError(`queue name must be 1-100 characters of A-Z a-z 0-9 . _ -, got ${JSON.stringify(q)}`);
  return q;
}

/** Opens an ioredis connection to `url`. */
export function connectRedis(url: string, kind: 'durable' | 'quick'): Redis {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new InvalidArgumentError(`--redis must be a URL like redis://127.0.0.1:6379, got ${JSON.stringify(url)}`);
  }
  if (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') throw new InvalidArgumentError(`--redis must be a redis:// or rediss:// URL, got ${parsed.protocol}`);
  const opts: RedisOptions =
    kind === 'durable'
      ? { maxRetriesPerRequest: null, enableReadyCheck: true, retryStrategy: (n) => Math.min(100 * 2 ** Math.min(n, 5), 2000) }
      : {
          maxRetriesPerRequest: 2,
          connectTimeout: QUICK_TIMEOUT_MS,
          enableOfflineQueue: true,
          retryStrategy: (n) => (n > 5 ? null : 200 * n),
        };
  const redis = new Redis(url, opts);
  // Connection errors surface through the commands that need Redis; an unhandled 'error' event
  // must not kill the process.
  redis.on('error', () => undefined);
  return redis;
}

/** Wraps a failure to reach Redis in a clear library error. */
export function redisError(url: string, e: unknown): DiffusionFeaturesError {
  if (e instanceof DiffusionFeaturesError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  const safe = redactUrl(url);
  return new InvalidArgumentError(`Redis at ${safe}: ${msg}`, { cause: e });
}

/** `url` without its password (for messages and logs). */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '<invalid url>';
  }
}

/** Opens the queue `name` on a connection (BullMQ duplicates it where it needs a blocking one). */
export function openQueue(connection: Redis, name?: string): FeatureQueue {
  const q = new Queue<JobData, JobResult, string>(checkQueueName(name), { connection });
  q.on('error', () => undefined);
  return q;
}
