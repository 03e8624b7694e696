/**
 * The package's one atomic writer: every output file (safetensors, npy, PNG) and output folder is
 * produced under a hidden temporary name in the destination's own folder, then renamed over the
 * destination. On any failure the temporary is removed and the destination is untouched, so a reader
 * never sees a half-written output.
 *
 * @module
 */
import { mkdir, open, rename, type FileHandle } from 'node:fs/promises';
import { DiffusionFeaturesError, WriteError } from '../errors.js';
import { removeTemp, tempPathFor } from '../outputs.js';

function writeFailed(path: string, e: unknown): DiffusionFeaturesError {
  if (e instanceof DiffusionFeaturesError) return e;
  const err = e as NodeJS.ErrnoException;
  return new WriteError(path, `write failed (${err.code ?? err.message})`, { cause: e });
}

/**
 * Runs `produce(tmp)` to create a file (or, with `kind: 'dir'`, a folder) at a temporary path next to
 * `path` (named by `tempPathFor` of lib/outputs.ts, so stale temporaries are recognised), then moves it
 * into place with `commit` (default: `rename(tmp, path)`). On failure the temporary is removed and the
 * error is rethrown as a `WriteError` (`E_WRITE_FAILED`) unless it already is a library error.
 * @param path destination
 * @param produce writes the temporary (for `'dir'`, the folder already exists when it is called)
 * @param opts `kind` (default `'file'`); `commit(tmp, path)` to move a folder over an existing output
 *   (e.g. `replaceOutputDir`)
 */
export async function atomicWrite(
  path: string,
  produce: (tmp: string) => Promise<void>,
  opts: { kind?: 'file' | 'dir'; commit?: (tmp: string, path: string) => Promise<void> } = {},
): Promise<void> {
  const tmp = tempPathFor(path);
  try {
    if (opts.kind === 'dir') await mkdir(tmp);
    await produce(tmp);
    await (opts.commit ?? rename)(tmp, path);
  } catch (e) {
    await removeTemp(tmp);
    throw writeFailed(path, e);
  }
}

/**
 * Writes a file atomically: the chunks go to a temporary file in the same directory, which is flushed
 * and renamed over `path`. On any failure the temporary file is removed and `path` is untouched.
 * @param path destination path
 * @param chunks byte chunks written in order
 */
export async function writeFileAtomic(path: string, chunks: Iterable<Uint8Array>): Promise<void> {
  await atomicWrite(path, async (tmp) => {
    let fh: FileHandle | undefined;
    try {
      fh = await open(tmp, 'wx');
      for (const c of chunks) {
        let off = 0;
        while (off < c.length) {
          const { bytesWritten } = await fh.write(c, off, c.length - off);
          off += bytesWritten;
        }
      }
      await fh.sync();
    } finally {
      await fh?.close().catch(() => undefined);
    }
  });
}
