/**
 * A small typed error hierarchy shared by the whole package.
 *
 * Every error the library raises on purpose is a {@link DiffusionFeaturesError} with a stable
 * machine-readable {@link DiffusionFeaturesError.code | code}, so callers (the CLI, a service) can
 * tell "bad input" from "bug" without parsing messages. Messages always name the offending file,
 * id or argument.
 *
 * @module
 */

/** Stable error codes. New codes may be added; existing ones keep their meaning. */
export type ErrorCode =
  /** A file is missing or cannot be read. */
  | 'E_FILE_NOT_FOUND'
  /** A file exists but its content is malformed (corrupt safetensors, bad JSON, truncated image…). */
  | 'E_INVALID_FILE'
  /** An image cannot be decoded (not an image, truncated, zero bytes). */
  | 'E_IMAGE_DECODE'
  /** An unknown layer id or malformed layer configuration. */
  | 'E_UNKNOWN_LAYER'
  /** A caller-supplied argument is out of range or of the wrong kind. */
  | 'E_INVALID_ARGUMENT'
  /** A tensor name was requested that a file does not hold. */
  | 'E_NOT_FOUND'
  /** A weights folder is incomplete or was written by an incompatible version. */
  | 'E_INCOMPATIBLE_MODEL'
  /** The operation was aborted through an AbortSignal. */
  | 'E_ABORTED'
  /** Writing an output failed (nothing partial is left behind). */
  | 'E_WRITE_FAILED'
  /** libtorch raised an error (wrong shapes or dtypes for a model, out of memory…); the message names it. */
  | 'E_TORCH'
  /** A tensor or module was used after `dispose()`. */
  | 'E_DISPOSED'
  /** The native addon could not be loaded (the message names the missing library). */
  | 'E_NATIVE_LOAD'
  /** A file exists but may not be read or written (EACCES, EPERM), or is not a regular file. */
  | 'E_FILE_ACCESS'
  /** An input exceeds a configured bound (bytes, pixels, prompt length, tensor count…). */
  | 'E_LIMIT_EXCEEDED'
  /** An existing output was written with settings that differ from this run's. */
  | 'E_SETTINGS_MISMATCH'
  /** Memory (CPU or CUDA) could not be allocated. */
  | 'E_OUT_OF_MEMORY';

/** Base class of every error the library throws deliberately. */
export class DiffusionFeaturesError extends Error {
  /** Stable, machine-readable error code. */
  readonly code: ErrorCode;

  /**
   * @param code stable error code
   * @param message human-readable message (names the file / id / argument concerned)
   * @param options standard `ErrorOptions` (e.g. `{ cause }`)
   */
  constructor(code: ErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A file's content is malformed (safetensors, npy, JSON config, tokenizer files…). */
export class InvalidFileError extends DiffusionFeaturesError {
  /** Path (or description) of the offending file. */
  readonly file: string;

  /**
   * @param file path or description of the file
   * @param problem what is wrong with it
   * @param options standard `ErrorOptions`
   */
  constructor(file: string, problem: string, options?: ErrorOptions) {
    super('E_INVALID_FILE', `${file}: ${problem}`, options);
    this.file = file;
  }
}

/** A required file does not exist or cannot be opened. */
export class FileNotFoundError extends DiffusionFeaturesError {
  /** Path of the missing file. */
  readonly file: string;

  /**
   * @param file path of the missing file
   * @param detail optional extra explanation
   * @param options standard `ErrorOptions`
   */
  constructor(file: string, detail?: string, options?: ErrorOptions) {
    super('E_FILE_NOT_FOUND', `${file}: ${detail ?? 'file not found'}`, options);
    this.file = file;
  }
}

/** An image could not be decoded. */
export class ImageDecodeError extends DiffusionFeaturesError {
  /** Path or name of the image. */
  readonly file: string;

  /**
   * @param file path or name of the image
   * @param problem what went wrong
   * @param options standard `ErrorOptions`
   */
  constructor(file: string, problem: string, options?: ErrorOptions) {
    super('E_IMAGE_DECODE', `${file}: ${problem}`, options);
    this.file = file;
  }
}

/** One or more layer ids are unknown, or a layer configuration is malformed. */
export class UnknownLayerError extends DiffusionFeaturesError {
  /** The offending ids (empty when the configuration itself is malformed). */
  readonly ids: string[];

  /**
   * @param message full message (names the ids and suggests close matches)
   * @param ids the unknown ids
   */
  constructor(message: string, ids: string[] = []) {
    super('E_UNKNOWN_LAYER', message);
    this.ids = ids;
  }
}

/** A caller-supplied argument is invalid. */
export class InvalidArgumentError extends DiffusionFeaturesError {
  /**
   * @param message what is wrong (names the argument)
   * @param options standard `ErrorOptions`
   */
  constructor(message: string, options?: ErrorOptions) {
    super('E_INVALID_ARGUMENT', message, options);
  }
}

/** A named entry (tensor, component) is not present. */
export class NotFoundError extends DiffusionFeaturesError {
  /**
   * @param message what is missing and where
   */
  constructor(message: string) {
    super('E_NOT_FOUND', message);
  }
}

/** Writing an output file failed; no partial file was left behind. */
export class WriteError extends DiffusionFeaturesError {
  /** Destination path. */
  readonly file: string;

  /**
   * @param file destination path
   * @param problem what went wrong
   * @param options standard `ErrorOptions`
   */
  constructor(file: string, problem: string, options?: ErrorOptions) {
    super('E_WRITE_FAILED', `${file}: ${problem}`, options);
    this.file = file;
  }
}

/** A weights folder or LoRA file does not fit this release or this model (missing file, wrong format, shapes). */
export class IncompatibleModelError extends DiffusionFeaturesError {
  /**
   * @param message what does not fit (names the folder or file)
   * @param options standard `ErrorOptions`
   */
  constructor(message: string, options?: ErrorOptions) {
    super('E_INCOMPATIBLE_MODEL', message, options);
  }
}

/** The operation was stopped through its `AbortSignal` (`name` is `'AbortError'`, as for fetch). */
export class AbortError extends DiffusionFeaturesError {
  /**
   * @param message what was aborted
   * @param options standard `ErrorOptions` (e.g. `{ cause: signal.reason }`)
   */
  constructor(message = 'operation aborted', options?: ErrorOptions) {
    super('E_ABORTED', message, options);
  }
}

/** A pipeline, tensor, module or head was used after `dispose()`. */
export class DisposedError extends DiffusionFeaturesError {
  /**
   * @param message what was used (e.g. `pipeline has been disposed`)
   * @param options standard `ErrorOptions`
   */
  constructor(message: string, options?: ErrorOptions) {
    super('E_DISPOSED', message, options);
  }
}

/** A file exists but cannot be used: permission denied, or not a regular file (FIFO, device, socket, folder). */
export class FileAccessError extends DiffusionFeaturesError {
  /** Path of the file. */
  readonly file: string;

  /**
   * @param file path of the file
   * @param problem what is wrong (e.g. `permission denied (EACCES)`)
   * @param options standard `ErrorOptions`
   */
  constructor(file: string, problem: string, options?: ErrorOptions) {
    super('E_FILE_ACCESS', `${file}: ${problem}`, options);
    this.file = file;
  }
}

/** An input is larger than a configured bound (the message names the bound and the option that sets it). */
export class LimitExceededError extends DiffusionFeaturesError {
  /**
   * @param message what exceeded which bound
   * @param options standard `ErrorOptions`
   */
  constructor(message: string, options?: ErrorOptions) {
    super('E_LIMIT_EXCEEDED', message, options);
  }
}

/** Throws an {@link AbortError} (with the signal's reason as `cause`) when `signal` is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined, what = 'operation'): void {
  if (signal?.aborted) throw new AbortError(`${what} aborted`, { cause: signal.reason });
}

/**
 * Maps a Node.js file-system error to a library error for `file`: ENOENT/ENOTDIR → `E_FILE_NOT_FOUND`;
 * EACCES/EPERM/EISDIR/ELOOP and others → `E_FILE_ACCESS`. Library errors pass through unchanged.
 */
export function fileError(file: string, e: unknown, what = 'file'): DiffusionFeaturesError {
  if (e instanceof DiffusionFeaturesError) return e;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT' || code === 'ENOTDIR') return new FileNotFoundError(file, `${what} not found`, { cause: e });
  if (code === 'EACCES' || code === 'EPERM') return new FileAccessError(file, `permission denied reading the ${what} (${code})`, { cause: e });
  if (code === 'EISDIR') return new FileAccessError(file, `the ${what} is a directory`, { cause: e });
  return new FileAccessError(file, `cannot read the ${what} (${code ?? (e as Error)?.message ?? String(e)})`, { cause: e });
}

/** Narrowing helper: is `e` one of this library's errors (optionally with a given code)? */
export function isDiffusionFeaturesError(e: unknown, code?: ErrorCode): e is DiffusionFeaturesError {
  return e instanceof DiffusionFeaturesError && (code === undefined || e.code === code);
}
