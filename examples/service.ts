/**
 * Embedding the library in your own HTTP server (plain node:http here; the same calls work in
 * express, koa or fastify). For a ready production front use `diffusion-features serve` instead
 * (limits, queue, metrics: docs/scale-out.md).
 *
 *   node --import tsx examples/service.ts models/micro 8080
 *   curl --data-binary @cat.png 'http://127.0.0.1:8080/features?prompt=a%20cat' -o cat.safetensors
 *
 * The three things to get right when embedding: load the pipeline once (calls on it are queued),
 * bound what you read from the client, and pass an AbortSignal so a client that leaves stops its work.
 */
import http from 'node:http';
import { pathToFileURL } from 'node:url';
import { loadPipeline, encodeFeatures, isDiffusionFeaturesError } from '../lib/index.js';

const MAX_BODY = 8 * 2 ** 20;

/** Starts the example server; resolves to its URL and a close function. */
export async function startExample(weights: string, port = 0, device: 'auto' | 'cpu' | 'cuda' = 'auto'): Promise<{ url: string; close(): Promise<void> }> {
  const pipeline = await loadPipeline(weights, { device });
  const server = http.createServer(async (req, res) => {
    const abort = new AbortController();
    res.on('close', () => abort.abort()); // fires on disconnect (and harmlessly after the answer)
    const reply = (status: number, body: Buffer | string): void => {
      if (!res.headersSent) res.writeHead(status, { 'content-type': typeof body === 'string' ? 'application/json' : 'application/octet-stream' }).end(body);
    };
    if (req.method !== 'POST' || !req.url?.startsWith('/features')) return reply(404, '{"error":"POST /features"}');
    if (Number(req.headers['content-length'] ?? 0) > MAX_BODY) return reply(413, '{"error":"image too large"}');
    try {
      const chunks: Buffer[] = [];
      let size = 0;
      for await (const c of req as AsyncIterable<Buffer>) {
        if ((size += c.length) > MAX_BODY) return reply(413, '{"error":"image too large"}');
        chunks.push(c);
      }
      const prompt = new URL(req.url, 'http://x').searchParams.get('prompt') ?? '';
      // layers as an id/preset array: a string could be read as a layer-config file path
      const [f] = await pipeline.extract([{ name: 'upload', data: Buffer.concat(chunks) }], { layers: ['legacy'], prompt, signal: abort.signal });
      try {
        reply(200, Buffer.from(encodeFeatures(f!)));
      } finally {
        f!.dispose();
      }
    } catch (e) {
      const client = isDiffusionFeaturesError(e) && ['E_IMAGE_DECODE', 'E_INVALID_ARGUMENT', 'E_LIMIT_EXCEEDED'].includes(e.code);
      reply(client ? 400 : 500, JSON.stringify({ error: client ? (e as Error).message : 'internal error' }));
    }
  });
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
  const { port: bound } = server.address() as import('node:net').AddressInfo;
  return {
    url: `http://127.0.0.1:${bound}`,
    close: () =>
      new Promise<void>((r) => {
        server.close(() => (pipeline.dispose(), r()));
        server.closeIdleConnections();
      }),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const s = await startExample(process.argv[2] ?? 'models/micro', Number(process.argv[3] ?? 8080));
  console.log(`POST ${s.url}/features`);
  process.once('SIGTERM', () => void s.close());
  process.once('SIGINT', () => void s.close());
}
