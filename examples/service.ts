/**
 * A small HTTP feature service: loads the pipeline once, takes image uploads, returns features.
 *
 *   node --import tsx examples/service.ts --weights models/micro --port 8080
 *   curl --data-binary @cat.png 'http://127.0.0.1:8080/extract?layers=legacy&prompt=a%20cat&seed=1' -o cat.safetensors
 *
 * POST /extract   body: the image bytes (any format sharp reads)
 *   query: layers (preset | id,id,…), prompt, t, seed, size, posterior (sample|mean), attention (0|1)
 *   200: a safetensors file (one float32 tensor per layer id, settings in the metadata)
 *   400: unreadable image or bad parameters (JSON {error}); 503: queue full; 500: anything else.
 * GET /healthz    200 {ok, inFlight, queued}
 *
 * At most `concurrency` extractions run at once; up to `maxQueue` more wait; SIGINT/SIGTERM stop
 * accepting connections, let running requests finish, then release the models.
 */
import http from 'node:http';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { loadPipeline, encodeFeatures, isDiffusionFeaturesError, type Pipeline, type ExtractOptions } from '../lib/index.js';

/** Error codes that mean the request was bad (400), not the server (500). */
const CLIENT_ERRORS = new Set(['E_IMAGE_DECODE', 'E_UNKNOWN_LAYER', 'E_INVALID_ARGUMENT', 'E_INVALID_FILE']);

export interface ServiceOptions {
  weights: string;
  port?: number;
  host?: string;
  concurrency?: number;
  maxQueue?: number;
  maxBodyBytes?: number;
  device?: 'cpu' | 'cuda' | 'auto';
}

export interface Service {
  readonly url: string;
  readonly server: http.Server;
  close(): Promise<void>;
}

class BadRequest extends Error {}

/** A counting semaphore with a bounded wait queue. */
class Limiter {
  private running = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly limit: number, private readonly maxQueue: number) {}
  get inFlight(): number { return this.running; }
  get queued(): number { return this.waiting.length; }
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.running >= this.limit) {
      if (this.waiting.length >= this.maxQueue) throw Object.assign(new Error('queue full'), { status: 503 });
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    } else {
      this.running++;
    }
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next) next(); // hand our slot over
      else this.running--;
    }
  }
}

function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > limit) {
        reject(new BadRequest(`body larger than ${limit} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function optionsFromQuery(q: URLSearchParams): ExtractOptions {
  const num = (k: string): number | undefined => {
    const v = q.get(k);
    if (v === null) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new BadRequest(`query parameter ${k} must be a number, got '${v}'`);
    return n;
  };
  const posterior = q.get('posterior') ?? undefined;
  if (posterior !== undefined && posterior !== 'sample' && posterior !== 'mean') {
    throw new BadRequest(`posterior must be 'sample' or 'mean', got '${posterior}'`);
  }
  return {
    layers: q.get('layers') ?? 'legacy',
    prompt: q.get('prompt') ?? '',
    t: num('t'),
    seed: num('seed'),
    size: num('size'),
    posterior: posterior as 'sample' | 'mean' | undefined,
    attention: q.get('attention') === '1' || q.get('attention') === 'true',
  };
}

/** Starts the service; resolves once it listens. */
export async function startService(opts: ServiceOptions): Promise<Service> {
  const pipeline: Pipeline = await loadPipeline(opts.weights, { device: opts.device ?? 'auto' });
  const limiter = new Limiter(opts.concurrency ?? 1, opts.maxQueue ?? 16);
  const maxBody = opts.maxBodyBytes ?? 32 * 2 ** 20;

  const send = (res: http.ServerResponse, status: number, body: unknown): void => {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  };

  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (req.method === 'GET' && url.pathname === '/healthz') {
      send(res, 200, { ok: true, inFlight: limiter.inFlight, queued: limiter.queued });
      return;
    }
    if (req.method !== 'POST' || url.pathname !== '/extract') {
      send(res, 404, { error: `no route ${req.method} ${url.pathname}` });
      return;
    }
    (async () => {
      const options = optionsFromQuery(url.searchParams);
      const body = await readBody(req, maxBody);
      if (body.length === 0) throw new BadRequest('empty body: send the image bytes');
      const bytes = await limiter.run(async () => {
        const [result] = await pipeline.extract([{ name: 'upload', data: body }], options).catch((err: unknown) => {
          if (isDiffusionFeaturesError(err) && CLIENT_ERRORS.has(err.code)) throw new BadRequest(err.message);
          throw err;
        });
        try {
          return encodeFeatures(result!);
        } finally {
          result!.dispose();
        }
      });
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bytes.byteLength });
      res.end(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    })().catch((err: unknown) => {
      const msg = err instanceof Error ? err.message : String(err);
      const status = err instanceof BadRequest ? 400 : ((err as { status?: number }).status ?? 500);
      if (!res.headersSent) send(res, status, { error: msg });
      else res.destroy();
    });
  });

  await new Promise<void>((resolve) => server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', resolve));
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  let closing: Promise<void> | undefined;
  return {
    url: `http://${opts.host ?? '127.0.0.1'}:${port}`,
    server,
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => {
          pipeline.dispose();
          resolve();
        });
        server.closeIdleConnections();
      });
      return closing;
    },
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const { values } = parseArgs({
    options: {
      weights: { type: 'string', default: 'models/micro' },
      port: { type: 'string', default: '8080' },
      host: { type: 'string', default: '127.0.0.1' },
      concurrency: { type: 'string', default: '1' },
      device: { type: 'string', default: 'auto' },
    },
  });
  const service = await startService({
    weights: values.weights!,
    port: Number(values.port),
    host: values.host,
    concurrency: Number(values.concurrency),
    device: values.device as 'cpu' | 'cuda' | 'auto',
  });
  console.log(`diffusion-features service on ${service.url} (POST /extract, GET /healthz)`);
  const stop = (): void => {
    console.log('shutting down…');
    void service.close().then(() => process.exit(0));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}
