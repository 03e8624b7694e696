/**
 * The call queue of a pipeline: calls (extractions, recipe runs, LoRA swaps) run one after the other,
 * never interleaved, because they share the loaded models and their weights. A call whose signal
 * aborts while it waits rejects at once and its turn is skipped; calls on a disposed pipeline reject.
 *
 * @module
 */
import { AbortError, DisposedError } from '../errors.js';

/** Runs async calls one at a time, in order. */
export class CallQueue {
  private queue: Promise<unknown> = Promise.resolve();

  /** @param isDisposed whether the owner has been disposed (checked when a call is made and when its turn comes) */
  constructor(private readonly isDisposed: () => boolean) {}

  /**
   * Runs `fn` after every call queued before it. Rejects with `E_DISPOSED` once the owner is disposed,
   * and with an `AbortError` as soon as `signal` aborts before the call's turn.
   */
  run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (this.isDisposed()) return Promise.reject(new DisposedError('pipeline has been disposed'));
    if (signal?.aborted) return Promise.reject(new AbortError('call aborted before it started', { cause: signal.reason }));
    let abortedWhileQueued = false;
    const turn = (): Promise<T> => {
      if (abortedWhileQueued || signal?.aborted) return Promise.reject(new AbortError('call aborted before it started', { cause: signal?.reason }));
      if (this.isDisposed()) return Promise.reject(new DisposedError('pipeline has been disposed'));
      signal?.removeEventListener('abort', onAbort);
      return fn();
    };
    const run = this.queue.then(turn, turn);
    this.queue = run.catch(() => undefined);
    if (!signal) return run;
    // a call still waiting for its turn rejects as soon as its signal aborts (its turn is then skipped)
    let rejectNow: (e: unknown) => void = () => undefined;
    const early = new Promise<never>((_, reject) => (rejectNow = reject));
    const onAbort = (): void => {
      abortedWhileQueued = true;
      rejectNow(new AbortError('call aborted while waiting in the queue', { cause: signal.reason }));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    run.then(() => signal.removeEventListener('abort', onAbort), () => signal.removeEventListener('abort', onAbort));
    return Promise.race([run, early]);
  }
}
