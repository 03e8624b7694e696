/**
 * PNG output of raw 8-bit pixels (sharp encodes, {@link writeFileAtomic} writes).
 *
 * @module
 */
import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import sharp from 'sharp';
import { DiffusionFeaturesError, WriteError } from '../errors.js';
import { writeFileAtomic } from './atomic.js';

/**
 * Writes interleaved 8-bit pixels (`channels` 1 = grey, 3 = RGB; row-major) as a PNG at `path`,
 * atomically; the parent folder is created when missing.
 * @throws WriteError (`E_WRITE_FAILED`) when encoding or writing fails; nothing is left behind.
 */
export async function writePng(path: string, raw: Uint8Array, width: number, height: number, channels: 1 | 3): Promise<void> {
  try {
    await mkdir(dirname(resolve(path)), { recursive: true });
    const png = await sharp(Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength), { raw: { width, height, channels } }).png().toBuffer();
    await writeFileAtomic(path, [png]);
  } catch (err) {
    if (err instanceof DiffusionFeaturesError) throw err;
    throw new WriteError(path, `cannot write PNG (${(err as Error).message})`, { cause: err });
  }
}
