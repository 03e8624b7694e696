/**
 * The production HTTP front (docs/scale-out.md, "The service"), on fastify:
 *
 * - `POST /v1/extract`: the image as the body (any content type but JSON and multipart) or as the
 *   file part of a multipart upload; options in the query string, or as the JSON field `options` of
 *   the multipart form. Answers the features as safetensors bytes (what `extract` writes).
 * - `POST /v1/jobs`, `GET /v1/jobs/:id`, `GET /v1/jobs/:id/result` (with `redis`): the upload is
 *   spooled to a folder the workers see, one job is enqueued, and the result is read from the
 *   workers' output folder (feature bytes never go through Redis).
 * - `GET /healthz` (the process serves), `GET /readyz` (model loaded, Redis reachable, not draining),
 *   `GET /metrics` (Prometheus text).
 *
 * Bounded: the declared body size is checked before a byte is read (413, and the rest of the body is
 * drained so the client reads the answer instead of a reset); bodies without a length are cut at the
 * same limit; requests beyond the local queue are refused before their body is read (503 with
 * Retry-After); decoded pixels (header check before decoding) and `size` are bounded; a client that
 * disconnects aborts its extraction (or leaves the local queue). No option names a file, and error
 * bodies carry our messages only (never file contents, never a parser's echo of the body).
 *
 * @module
 */
import { createReadStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import multipart from '@fastify/multipart';
import { readBody } from './body.js';
import sharp, { type Metadata } from 'sharp';
import type { Redis } from 'ioredis';
import type { Device } from '../native.js';
import { AbortError, InvalidArgumentError, isDiffusionFeaturesError } from '../errors.js';
import { loadPipeline, type Pipeline } from '../pipeline/index.js';
import { encodeFeatures } from '../io/features.js';
import { writeFileAtomic } from '../io/atomic.js';
import { outputPathFor } from '../outputs.js';
import { pathExists } from '../queue/job.js';
import { ServiceMetrics } from './metrics.js';
import { optionsSchema, extractOptionsOf, jobOptionsOf, typedOptions, type ServiceOptions } from './options.js';

/** Options of {@link createServer}. */
export interface ServerOptions {
  /** Exported weights folder (ignored when `pipeline` is given). */
  weights?: string;
  /** A pipeline to serve (the caller keeps ownership); default: one loaded from `weights`. */
  pipeline?: Pipeline;
  device?: Device;
  dtype?: 'auto' | 'float32' | 'float16';
  /** Redis URL: enables `/v1/jobs` (needs `spool` and `out`). */
  redis?: string;
  queue?: string;
  /** Folder the workers see, where uploads of `/v1/jobs` are kept (content-addressed). */
  spool?: string;
  /** The workers' output folder (results of `/v1/jobs` are read from it). */
  out?: string;
  /** Largest request body (bytes; default 16 MiB). */
  maxBodyBytes?: number;
  /** Largest decoded image (width × height; default 40 M pixels). */
  maxPixels?: number;
  /** Largest `size` option (default 1024). */
  maxSize?: number;
  /** In-process extractions that may wait behind the running one (default 8); more get 503. */
  maxQueue?: number;
  /** Jobs that may wait in the Redis queue before `/v1/jobs` answers 503 (default 10000). */
  maxQueueJobs?: number;
  /** Retry-After of 503 answers (seconds; default 5). */
  retryAfterSeconds?: number;
  /** fastify's logger (default off). */
  logger?: boolean;
}

/** A running service. */
export interface FeatureServer {
  readonly app: FastifyInstance;
  readonly pipeline: Pipeline;
  readonly metrics: ServiceMetrics;
  /** Listens; resolves to the base URL. */
  listen(opts?: { host?: string; port?: number }): Promise<string>;
  /** Stops accepting, lets running requests finish, then releases the pipeline (if it loaded it) and Redis. */
  close(): Promise<void>;
}

/** An error answered with a status and a message of ours. */
class HttpError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly retryAfter?: number) {
    super(message);
  }
}

const CLIENT_CODES = new Set(['E_IMAGE_DECODE', 'E_UNKNOWN_LAYER', 'E_INVALID_ARGUMENT', 'E_INVALID_FILE', 'E_NOT_FOUND']);

/** Runs extractions one at a time; waiting callers leave the line when their signal aborts. */
class Gate {
  private busy = false;
  private readonly waiting: { go: () => void; fail: (e: unknown) => void; signal: AbortSignal }[] = [];

  get depth(): number {
    return this.waiting.length + (this.busy ? 1 : 0);
  }

  async run<T>(signal: AbortSignal, fn: () => Promise<T>): Promise<T> {
    if (this.busy) {
      await new Promise<void>((go, fail) => {
        const entry = { go, fail, signal };
        this.waiting.push(entry);
        signal.addEventListener(
          'abort',
          () => {
            const i = this.waiting.indexOf(entry);
            if (i >= 0) {
              this.waiting.splice(i, 1);
              fail(new AbortError('client went away while waiting'));
            }
          },
          { once: true },
        );
      });
    } else this.busy = true;
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next) next.go();
      else this.busy = false;
    }
  }
}

/** Creates the service (loads the pipeline unless one is given); call `listen` to serve. */
export async function createServer(o: ServerOptions): Promise<FeatureServer> {
  const maxBody = o.maxBodyBytes ?? 16 * 2 ** 20;
  const maxPixels = o.maxPixels ?? 40e6;
  const maxQueue = o.maxQueue ?? 8;
  const retryAfter = o.retryAfterSeconds ?? 5;
  const schema = optionsSchema(o.maxSize ?? 1024);
  if (o.redis && (!o.spool || !o.out)) throw new InvalidArgumentError('serve with --redis needs --spool DIR (uploads the workers can read) and --out DIR (the workers\' output folder)');
  const ownPipeline = !o.pipeline;
  if (!o.pipeline && !o.weights) throw new InvalidArgumentError('createServer: give weights or a pipeline');
  const pipeline = o.pipeline ?? (await loadPipeline(o.weights!, { device: o.device ?? 'auto', dtype: o.dtype ?? 'auto' }));
  const gate = new Gate();
  let admitted = 0;
  let draining = false;

  let redis: Redis | undefined;
  let queueMod: typeof import('../queue/enqueue.js') | undefined;
  let jobMod: typeof import('../queue/job.js') | undefined;
  let queue: import('../queue/redis.js').FeatureQueue | undefined;
  if (o.redis) {
    const r = await import('../queue/redis.js');
    queueMod = await import('../queue/enqueue.js');
    jobMod = await import('../queue/job.js');
    redis = r.connectRedis(o.redis, 'durable');
    queue = r.openQueue(redis, o.queue);
    await mkdir(o.spool!, { recursive: true });
  }
  const metrics = new ServiceMetrics(() => gate.depth, queue ? () => withTimeout(queue!.getWaitingCount(), 1000) : undefined);

  const app = Fastify({
    logger: o.logger ?? false,
    bodyLimit: maxBody,
    requestTimeout: 120_000,
    return503OnClosing: true,
    forceCloseConnections: 'idle',
    // no coercion: query strings become numbers and booleans in typedOptions (strict decimal)
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, allErrors: false } },
  });
  await app.register(multipart, { limits: { fileSize: maxBody, files: 1, fields: 4, fieldSize: 64 * 1024, parts: 6, headerPairs: 100 } });
  // Any body that is not JSON or multipart is the image itself.
  // Read chunk by chunk into a buffer of the declared size (lib/serve/body.ts: no 8 MB copy in one task).
  app.addContentTypeParser('*', (req, payload, done) => {
    readBody(payload, Number(req.headers['content-length'] ?? NaN), maxBody).then((body) => done(null, body), (e: Error) => done(e, undefined));
  });

  const fail = (reply: FastifyReply, e: HttpError): FastifyReply => {
    metrics.errors.inc({ code: e.code });
    if (e.retryAfter !== undefined) void reply.header('retry-after', String(e.retryAfter));
    return reply.code(e.status).type('application/json').send({ error: e.message, code: e.code });
  };

  app.setErrorHandler((err: Error & { statusCode?: number; code?: string; validation?: unknown }, _req, reply) => {
    if (err instanceof HttpError) return fail(reply, err);
    if (err.validation) return fail(reply, new HttpError(400, 'E_INVALID_ARGUMENT', `invalid options: ${err.message}`));
    if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE' || err.code === 'FST_REQ_FILE_TOO_LARGE') {
      void reply.header('connection', 'close');
      return fail(reply, new HttpError(413, 'E_LIMIT_EXCEEDED', `request body larger than ${maxBody} bytes`));
    }
    if (typeof err.code === 'string' && err.code.startsWith('FST_')) {
      // fastify's own messages are generic; JSON parse errors would echo the body: say less.
      const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 500 ? err.statusCode : 400;
      return fail(reply, new HttpError(status, 'E_INVALID_ARGUMENT', /JSON/i.test(err.code) ? 'the body is not valid JSON' : err.message));
    }
    return fail(reply, toHttp(err));
  });

  /** Admission before the body is read: declared size, local queue. */
  const admit = async (req: FastifyRequest, reply: FastifyReply, local: boolean): Promise<void> => {
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (declared > maxBody) {
      drain(req);
      void reply.header('connection', 'close');
      throw new HttpError(413, 'E_LIMIT_EXCEEDED', `request body of ${declared} bytes is larger than ${maxBody}`);
    }
    if (draining) {
      drain(req);
      throw new HttpError(503, 'E_UNAVAILABLE', 'the server is shutting down', retryAfter);
    }
    if (local) {
      if (admitted >= maxQueue + 1) {
        drain(req);
        throw new HttpError(503, 'E_QUEUE_FULL', `${admitted} requests are running or waiting (limit ${maxQueue + 1}); try again later`, retryAfter);
      }
      admitted++;
      reply.raw.once('close', () => admitted--);
    }
  };

  // While draining, answers close their connection: keep-alive sockets must not hold the exit back.
  app.addHook('onSend', async (_req, reply, payload) => {
    if (draining) void reply.header('connection', 'close');
    return payload;
  });

  app.addHook('onResponse', async (req, reply) => {
    metrics.requests.inc({ route: req.routeOptions.url ?? 'none', status: String(reply.statusCode) });
  });

  /** The image bytes and options of an upload (raw body + query, or multipart file + `options` field). */
  const readUpload = async (req: FastifyRequest): Promise<{ image: Buffer; options: ServiceOptions }> => {
    if (req.isMultipart()) {
      let image: Buffer | undefined;
      let options: unknown = {};
      for await (const part of req.parts()) {
        if (part.type === 'file') {
          if (image) throw new HttpError(400, 'E_INVALID_ARGUMENT', 'send one image per request');
          image = await part.toBuffer();
        } else if (part.fieldname === 'options') {
          try {
            options = JSON.parse(String(part.value));
          } catch {
            throw new HttpError(400, 'E_INVALID_ARGUMENT', 'the options field is not valid JSON');
          }
          options = typedOptions(options, schema);
        } else throw new HttpError(400, 'E_INVALID_ARGUMENT', `unknown form field (expected a file and 'options')`);
      }
      if (!image?.length) throw new HttpError(400, 'E_INVALID_ARGUMENT', 'no image in the form');
      if (!req.validateInput(options, schema)) throw new HttpError(400, 'E_INVALID_ARGUMENT', `invalid options: ${validationText(req, schema)}`);
      return { image, options: options as ServiceOptions };
    }
    const body = req.body;
    if (!Buffer.isBuffer(body) || body.length === 0) throw new HttpError(400, 'E_INVALID_ARGUMENT', 'send the image bytes as the body (or a multipart form)');
    return { image: body, options: req.query as ServiceOptions };
  };

  /** Header-only check of the decoded size (sharp reads dimensions without decoding pixels). */
  const checkPixels = async (image: Buffer): Promise<void> => {
    let meta: Metadata;
    try {
      meta = await sharp(image, { limitInputPixels: false }).metadata();
    } catch {
      throw new HttpError(400, 'E_IMAGE_DECODE', 'the body is not an image sharp can read');
    }
    const px = (meta.width ?? 0) * (meta.height ?? 0) * Math.max(1, meta.pages ?? 1);
    if (!px) throw new HttpError(400, 'E_IMAGE_DECODE', 'the image has no pixels');
    if (px > maxPixels) throw new HttpError(413, 'E_LIMIT_EXCEEDED', `the image has ${px} pixels, more than the limit of ${maxPixels}`);
  };

  const routeSchema = { querystring: schema };
  /** Strict typing of the query before the schema sees it (a bad number is a 400 naming the option). */
  const typeQuery = async (req: FastifyRequest): Promise<void> => {
    req.query = typedOptions(req.query, schema);
  };

  app.post('/v1/extract', { schema: routeSchema, onRequest: (req, reply) => admit(req, reply, true), preValidation: typeQuery }, async (req, reply) => {
    const abort = new AbortController();
    reply.raw.once('close', () => {
      if (!reply.raw.writableFinished) abort.abort(new AbortError('client disconnected'));
    });
    const { image, options } = await readUpload(req);
    await checkPixels(image);
    const opts = extractOptionsOf(options);
    const onProgress = metrics.stageTimer();
    const bytes = await gate.run(abort.signal, async () => {
      if (abort.signal.aborted) throw new AbortError('client disconnected');
      const [f] = await pipeline.extract([{ name: 'upload', data: image }], { ...opts, signal: abort.signal, onProgress });
      try {
        return encodeFeatures(f!);
      } finally {
        f!.dispose();
      }
    });
    metrics.imageDone();
    return reply.type('application/octet-stream').send(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  });

  if (queue && queueMod && jobMod) {
    const q = queue;
    const { enqueue, QueueFullError } = queueMod;
    const { extractJobSettings, settingsKey } = jobMod;
    const idParams = { type: 'object', properties: { id: { type: 'string', pattern: '^df-[0-9a-f]{48}$' } }, required: ['id'] };

    app.post('/v1/jobs', { schema: routeSchema, onRequest: (req, reply) => admit(req, reply, false), preValidation: typeQuery }, async (req, reply) => {
      const { image, options } = await readUpload(req);
      await checkPixels(image);
      const settings = await extractJobSettings(jobOptionsOf(options));
      const sha = createHash('sha256').update(image).digest('hex');
      // content-addressed: the output name carries the image and settings hashes, so two uploads never share an output
      const path = join(o.spool!, `${sha.slice(0, 24)}-${settingsKey(settings).slice(0, 16)}.img`);
      if (!(await pathExists(path))) await writeFileAtomic(path, [image]);
      let r;
      try {
        r = await withTimeout(enqueue({ redis: redis!, queue: o.queue, images: [path], settings, maxWaiting: o.maxQueueJobs ?? 10_000 }), 10_000);
      } catch (e) {
        if (e instanceof QueueFullError) throw new HttpError(503, 'E_QUEUE_FULL', e.message, retryAfter);
        throw e;
      }
      if (r === undefined) throw new HttpError(503, 'E_UNAVAILABLE', 'Redis does not answer', retryAfter);
      const job = r.jobs[0];
      if (!job) throw new HttpError(500, 'E_INTERNAL', 'the upload could not be enqueued');
      metrics.images.inc({ route: 'jobs' });
      return reply.code(202).header('location', `/v1/jobs/${job.id}`).send({ id: job.id, duplicate: !job.added, status: `/v1/jobs/${job.id}` });
    });

    app.get('/v1/jobs/:id', { schema: { params: idParams } }, async (req, reply) => {
      const { id } = req.params as { id: string };
      const job = await withTimeout(q.getJob(id), 5000);
      if (!job) throw new HttpError(404, 'E_NOT_FOUND', `no job ${id}`);
      const state = await job.getState();
      return reply.send({
        id,
        state,
        progress: job.progress,
        attempts: job.attemptsMade,
        reason: state === 'failed' ? job.failedReason : undefined,
        result: state === 'completed' ? `/v1/jobs/${id}/result` : undefined,
      });
    });

    app.get('/v1/jobs/:id/result', { schema: { params: idParams } }, async (req, reply) => {
      const { id } = req.params as { id: string };
      const job = await withTimeout(q.getJob(id), 5000);
      if (!job) throw new HttpError(404, 'E_NOT_FOUND', `no job ${id}`);
      if ((await job.getState()) !== 'completed') throw new HttpError(409, 'E_NOT_READY', `job ${id} has not completed`);
      const data = jobMod!.checkJobData(job.data);
      if (data.settings.kind !== 'extract' || data.settings.format !== 'safetensors') throw new HttpError(409, 'E_NOT_READY', 'only safetensors results are served');
      const path = outputPathFor(o.out!, data.name, 'safetensors');
      if (!(await pathExists(path))) throw new HttpError(410, 'E_GONE', `the output of job ${id} is no longer there`);
      return reply.type('application/octet-stream').send(createReadStream(path));
    });
  }

  app.get('/healthz', async () => ({ ok: true }));
  app.get('/readyz', async (_req, reply) => {
    const checks: Record<string, boolean> = { model: !!pipeline && !draining };
    if (redis) checks.redis = (await withTimeout(redis.ping(), 1000).catch(() => undefined)) === 'PONG';
    const ok = Object.values(checks).every(Boolean);
    return reply.code(ok ? 200 : 503).send({ ok, ...checks, draining });
  });
  app.get('/metrics', async (_req, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));

  let closing: Promise<void> | undefined;
  return {
    app,
    pipeline,
    metrics,
    async listen(l = {}) {
      return app.listen({ host: l.host ?? '127.0.0.1', port: l.port ?? 8080 });
    },
    close() {
      closing ??= (async () => {
        draining = true;
        await app.close();
        await queue?.close().catch(() => undefined);
        redis?.disconnect();
        if (ownPipeline) pipeline.dispose();
      })();
      return closing;
    },
  };
}

/** Reads and discards what is left of a refused request's body, up to 4× the limit, so the client reads our answer. */
function drain(req: FastifyRequest): void {
  let n = 0;
  const raw = req.raw;
  raw.on('data', (c: Buffer) => {
    n += c.length;
    if (n > 64 * 2 ** 20) raw.destroy();
  });
  raw.resume();
}

function validationText(req: FastifyRequest, schema: Record<string, unknown>): string {
  const errs = req.getValidationFunction(schema)?.errors ?? [];
  return errs.map((e) => `${e.instancePath || 'options'} ${e.message ?? ''}`).join('; ') || 'not allowed';
}

function toHttp(err: unknown): HttpError {
  if (isDiffusionFeaturesError(err)) {
    if (err.code === 'E_ABORTED') return new HttpError(499, err.code, 'aborted');
    if (err.code === 'E_LIMIT_EXCEEDED') return new HttpError(413, err.code, err.message);
    if (err.code === 'E_OUT_OF_MEMORY') return new HttpError(503, err.code, 'out of memory; try again later', 5);
    if (CLIENT_CODES.has(err.code)) return new HttpError(400, err.code, err.message);
    return new HttpError(500, err.code, err.message);
  }
  return new HttpError(500, 'E_INTERNAL', 'internal error');
}


/** Resolves to undefined when `p` takes longer than `ms`. */
async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

