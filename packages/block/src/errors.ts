/** QMP error classes QEMU uses (qapi/error.json). */
export type ErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotFound'
  | 'DeviceNotActive'
  | 'KVMMissingCap';

/** POSIX-style error codes the block layer reports (and NBD maps onto its own). */
export type Errno =
  | 'EIO'
  | 'EINVAL'
  | 'EPERM'
  | 'EACCES'
  | 'ENOSPC'
  | 'ENOTSUP'
  | 'ENOMEDIUM'
  | 'EBUSY'
  | 'ENOENT'
  | 'EEXIST'
  | 'EOVERFLOW'
  | 'ECANCELED'
  | 'ESHUTDOWN'
  | 'ETIMEDOUT'
  | 'ENOTCONN'
  | 'EAGAIN'
  | 'EFBIG'
  | 'ENOMEM'
  | 'EMFILE'
  | 'ELOOP';

/** Every error the block layer raises: a stable QMP class, a human sentence, and an errno. */
export class BlockError extends Error {
  readonly errorClass: ErrorClass;
  readonly errno: Errno;
  /** A line for a person at a terminal, after the message (QEMU's error hints; not sent over QMP). */
  readonly hint: string | undefined;

  constructor(
    message: string,
    opts: { errno?: Errno; errorClass?: ErrorClass; cause?: unknown; hint?: string } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'BlockError';
    this.errno = opts.errno ?? 'EINVAL';
    this.errorClass = opts.errorClass ?? 'GenericError';
    this.hint = opts.hint;
  }
}

const ERRNO_TEXT: Record<Errno, string> = {
  EIO: 'Input/output error',
  EINVAL: 'Invalid argument',
  EPERM: 'Operation not permitted',
  EACCES: 'Permission denied',
  ENOSPC: 'No space left on device',
  ENOTSUP: 'Operation not supported',
  ENOMEDIUM: 'No medium found',
  EBUSY: 'Device or resource busy',
  ENOENT: 'No such file or directory',
  EEXIST: 'File exists',
  EOVERFLOW: 'Value too large for defined data type',
  ECANCELED: 'Operation canceled',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  ETIMEDOUT: 'Connection timed out',
  ENOTCONN: 'Transport endpoint is not connected',
  EAGAIN: 'Resource temporarily unavailable',
  EFBIG: 'File too large',
  ENOMEM: 'Cannot allocate memory',
  EMFILE: 'Too many open files',
  ELOOP: 'Too many levels of symbolic links',
};

/** strerror() text for an errno, as QEMU prints it. */
export function errnoText(errno: Errno): string {
  return ERRNO_TEXT[errno];
}

/** An I/O error with the given errno (message = strerror, optionally prefixed). */
export function ioError(errno: Errno, prefix?: string): BlockError {
  return new BlockError(prefix ? `${prefix}: ${ERRNO_TEXT[errno]}` : ERRNO_TEXT[errno], { errno });
}

/** Maps any thrown value (Node fs errors included) onto a BlockError. */
export function toBlockError(e: unknown): BlockError {
  if (e instanceof BlockError) return e;
  const code = (e as { code?: string } | null)?.code;
  const errno: Errno = code && code in ERRNO_TEXT ? (code as Errno) : 'EIO';
  const msg = e instanceof Error ? e.message : String(e);
  return new BlockError(msg, { errno, cause: e });
}
