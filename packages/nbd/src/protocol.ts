/*
 * NBD wire constants (doc/proto.md of the NBD project, and QEMU's docs/interop/nbd.txt for the
 * qemu: metadata contexts). All integers on the wire are big-endian.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the newstyle magic, also the magic of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags. */
export const TxFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const;

export const isRepError = (rep: number): boolean => rep >= ERR;

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const REPLY_FLAG_DONE = 1;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

export const isReplyTypeError = (t: number): boolean => (t & 0x8000) !== 0;

/** base:allocation flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:<name> flag. */
export const STATE_DIRTY = 1 << 0;

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** qemu:allocation-depth: 0 unallocated, 1 this layer, 2 its backing file, ... */
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';

/** The wire error numbers the spec allows. */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Largest payload the spec lets both sides assume without negotiation (and QEMU's limit). */
export const MAX_PAYLOAD = 32 << 20;
/** Names and strings in the handshake are at most 4096 bytes. */
export const MAX_STRING = 4096;
/** Largest option payload a server reads (anything longer is rejected unread). */
export const MAX_OPTION_LENGTH = 64 * 1024;

/** A block-layer errno as the NBD error number sent on the wire. */
export function errnoToNbd(errno: string): number {
  switch (errno) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NbdErr.EPERM;
    case 'EINVAL':
      return NbdErr.EINVAL;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NbdErr.ENOSPC;
    case 'EOVERFLOW':
      return NbdErr.EOVERFLOW;
    case 'ENOTSUP':
      return NbdErr.ENOTSUP;
    case 'ESHUTDOWN':
    case 'ENOMEDIUM':
      return NbdErr.ESHUTDOWN;
    case 'ENOMEM':
      return NbdErr.ENOMEM;
    default:
      return NbdErr.EIO;
  }
}

/** An NBD error number received from a server as the block-layer errno. */
export function nbdToErrno(
  err: number,
): 'EPERM' | 'EIO' | 'EINVAL' | 'ENOSPC' | 'EOVERFLOW' | 'ENOTSUP' | 'ESHUTDOWN' {
  switch (err) {
    case NbdErr.EPERM:
      return 'EPERM';
    case NbdErr.EINVAL:
      return 'EINVAL';
    case NbdErr.ENOSPC:
      return 'ENOSPC';
    case NbdErr.EOVERFLOW:
      return 'EOVERFLOW';
    case NbdErr.ENOTSUP:
      return 'ENOTSUP';
    case NbdErr.ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return 'EIO';
  }
}
