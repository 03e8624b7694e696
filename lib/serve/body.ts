/**
 * The raw image body of `POST /v1/extract`, read without one large copy on the JS thread.
 *
 * fastify's `parseAs: 'buffer'` keeps the chunks and joins them with `Buffer.concat` when the body
 * ends: for an 8 MB upload that is one 8 MB allocation and copy in a single task (25–100 ms on the
 * benchmark machine, mostly page faults on the fresh memory), and 20 uploads ending together stall
 * the event loop for hundreds of milliseconds. Here a body with a declared Content-Length (at most the
 * limit, checked before anything is read) is copied chunk by chunk into a buffer of exactly that size
 * as the chunks arrive, so the work is spread over the socket's reads. That buffer is a SharedArrayBuffer,
 * which the image worker reads in place (lib/image.ts shares such buffers instead of copying them), so
 * there is no second 8 MB copy either. Each chunk yields the event loop (pause, resume on the next turn),
 * so many uploads arriving together are read a chunk per socket per loop turn. A chunked body (no length) is collected and
 * joined at the end, as fastify does. Limits and errors are fastify's own (413 `FST_ERR_CTP_BODY_TOO_LARGE`,
 * 400 `FST_ERR_CTP_INVALID_CONTENT_LENGTH`), so the service's error handler answers them unchanged.
 */
import type { Readable } from 'node:stream';
import { errorCodes } from 'fastify';

/** Reads `payload` whole; `declared` is the Content-Length header's value (NaN when absent). */
export function readBody(payload: Readable, declared: number, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    if (declared > limit) {
      reject(new errorCodes.FST_ERR_CTP_BODY_TOO_LARGE());
      return;
    }
    const sized = Number.isSafeInteger(declared) && declared >= 0;
    // shared memory: the image worker reads it where it is (lib/image.ts), no copy on this thread
    const whole = sized ? Buffer.from(new SharedArrayBuffer(declared)) : undefined;
    const chunks: Buffer[] = [];
    let received = 0;
    const stop = (): void => {
      payload.removeListener('data', onData);
      payload.removeListener('end', onEnd);
      payload.removeListener('error', onEnd);
    };
    function onData(chunk: Buffer | string): void {
      const b = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      if (received + b.length > limit || (whole && received + b.length > whole.length)) {
        stop();
        reject(whole && received + b.length <= limit ? new errorCodes.FST_ERR_CTP_INVALID_CONTENT_LENGTH() : new errorCodes.FST_ERR_CTP_BODY_TOO_LARGE());
        return;
      }
      if (whole) b.copy(whole, received);
      else chunks.push(b);
      received += b.length;
      // One chunk per socket per loop turn: libuv reads up to 32 × 64 KB from a readable socket in one
      // iteration, so 20 uploads arriving at once would be ~40 MB of copying between two timer checks.
      payload.pause();
      setImmediate(() => payload.resume());
    }
    function onEnd(err?: Error & { statusCode?: number }): void {
      stop();
      if (err) {
        if (!(typeof err.statusCode === 'number' && err.statusCode >= 400)) err.statusCode = 400;
        reject(err);
        return;
      }
      if (whole) {
        if (received !== whole.length) reject(new errorCodes.FST_ERR_CTP_INVALID_CONTENT_LENGTH());
        else resolve(whole);
        return;
      }
      resolve(Buffer.concat(chunks, received));
    }
    payload.on('data', onData);
    payload.on('end', onEnd);
    payload.on('error', onEnd);
    payload.resume();
  });
}
