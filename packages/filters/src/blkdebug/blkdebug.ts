import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockNode,
  ChildRole,
  type Errno,
  filterChildPerm,
  ioError,
  type OptionType,
  opt,
  ReqFlags,
} from '@blockrep/block';

/**
 * blkdebug: a filter that injects errors by rule, with QEMU's rule options. A rule names an event;
 * when that event fires on the node and the rule's state matches, the request that fired it fails
 * with the rule's errno (if its iotype and sector match). Events fired by the node's own requests:
 * read_aio (reads), write_aio (writes), pwrite_zeroes, pdiscard, flush_to_disk; other events can be
 * fired by formats above with `blkdebugEvent(child, name)`.
 */
const IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
type IoType = (typeof IO_TYPES)[number];

interface InjectRule {
  event: string;
  state?: number;
  iotype?: IoType;
  errno: number;
  sector: number;
  once: boolean;
  immediately: boolean;
}

interface SetStateRule {
  event: string;
  state?: number;
  newState: number;
}

interface BlkdebugState {
  inject: InjectRule[];
  setState: SetStateRule[];
  state: number;
  /** Rules armed by an event, applied to the next matching request. */
  active: InjectRule[];
  align: number;
  maxTransfer?: number;
}

const st = (node: BlockNode) => node.opaque as BlkdebugState;
const image = (node: BlockNode) => node.child('image') as BlockChild;

const ERRNO: Record<number, Errno> = {
  1: 'EPERM',
  2: 'ENOENT',
  5: 'EIO',
  13: 'EACCES',
  16: 'EBUSY',
  17: 'EEXIST',
  22: 'EINVAL',
  28: 'ENOSPC',
  95: 'ENOTSUP',
  110: 'ETIMEDOUT',
  125: 'ECANCELED',
};

const injectType: OptionType = {
  kind: 'struct',
  fields: {
    event: opt.string('The event that arms the rule', { required: true }),
    state: opt.int('Only while the state machine is in this state'),
    iotype: opt.enum(IO_TYPES, 'Only requests of this type fail'),
    errno: opt.int('The error to return (default 5, EIO)'),
    sector: opt.int('Only requests touching this 512-byte sector fail (default: any)'),
    once: opt.bool('Remove the rule after it fired once'),
    immediately: opt.bool('Fail without first yielding (accepted; requests fail either way)'),
  },
};

const setStateType: OptionType = {
  kind: 'struct',
  fields: {
    event: opt.string('The event that changes the state', { required: true }),
    state: opt.int('Only from this state'),
    new_state: opt.int('The new state', { required: true }),
  },
};

/** Fires an event on a blkdebug node below `child` (no-op for other drivers). */
export function blkdebugEvent(child: BlockChild | null, event: string): void {
  if (!child || child.node.driver !== blkdebugDriver) return;
  fire(child.node, event);
}

/**
 * An event arms the rules listed for it (replacing the armed set, as QEMU does) and applies the
 * state transitions listed for it. Armed rules stay armed until a later event re-arms, or, with
 * `once`, until they fired.
 */
function fire(node: BlockNode, event: string): void {
  const s = st(node);
  const armed = s.inject.filter((r) => r.event === event && (r.state === undefined || r.state === s.state));
  if (armed.length) s.active = armed;
  let next = s.state;
  for (const r of s.setState) {
    if (r.event === event && (r.state === undefined || r.state === s.state)) next = r.newState;
  }
  s.state = next;
}

/** Fires the event of a request, then fails it if an armed rule matches its type and range. */
function check(node: BlockNode, event: string, iotype: IoType, offset: number, bytes: number): void {
  fire(node, event);
  const s = st(node);
  for (const r of s.active) {
    // Without an iotype a rule hits every type but block-status.
    if (r.iotype ? r.iotype !== iotype : iotype === 'block-status') continue;
    if (r.sector >= 0) {
      const at = r.sector * 512;
      if (at + 512 <= offset || at >= offset + bytes) continue;
    }
    if (r.once) {
      s.inject.splice(s.inject.indexOf(r), 1);
      s.active.splice(s.active.indexOf(r), 1);
    }
    // The error is the errno alone, as QEMU's blkdebug returns it (jobs report its strerror).
    throw ioError(ERRNO[r.errno] ?? 'EIO');
  }
}

export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  isFilter: true,
  options: {
    image: opt.child('The node errors are injected in front of', { required: true }),
    config: opt.string('A rules file (not supported: give the rules as options)'),
    align: opt.int('Request alignment in bytes (power of 2)', { min: 1 }),
    'max-transfer': opt.int('Maximum transfer size in bytes', { min: 0 }),
    'opt-write-zero': opt.int('Preferred zero write alignment (accepted)', { min: 0 }),
    'max-write-zero': opt.int('Maximum zero write (accepted)', { min: 0 }),
    'opt-discard': opt.int('Preferred discard alignment (accepted)', { min: 0 }),
    'max-discard': opt.int('Maximum discard (accepted)', { min: 0 }),
    'inject-error': opt.list(injectType, 'Error injection rules'),
    'set-state': opt.list(setStateType, 'State transition rules'),
    'take-child-perms': opt.list({ kind: 'string' }, 'Accepted for compatibility'),
    'unshare-child-perms': opt.list({ kind: 'string' }, 'Accepted for compatibility'),
  },
  supportedWriteFlags: ReqFlags.FUA,

  async open(node, opts, ctx) {
    if (opts.config !== undefined)
      throw new BlockError('blkdebug: config files are not supported; use inject-error');
    const align = (opts.align as number | undefined) ?? 1;
    if (align & (align - 1)) throw new BlockError(`Cannot meet constraints with align ${align}`);
    const inject = ((opts['inject-error'] as Record<string, unknown>[] | undefined) ?? []).map(
      (r): InjectRule => ({
        event: r.event as string,
        state: r.state as number | undefined,
        iotype: r.iotype as IoType | undefined,
        errno: (r.errno as number | undefined) ?? 5,
        sector: (r.sector as number | undefined) ?? -1,
        once: (r.once as boolean | undefined) ?? false,
        immediately: (r.immediately as boolean | undefined) ?? false,
      }),
    );
    const setState = ((opts['set-state'] as Record<string, unknown>[] | undefined) ?? []).map(
      (r): SetStateRule => ({
        event: r.event as string,
        state: r.state as number | undefined,
        newState: r.new_state as number,
      }),
    );
    node.opaque = {
      inject,
      setState,
      state: 1,
      active: [],
      align,
      maxTransfer: opts['max-transfer'] as number | undefined,
    } satisfies BlkdebugState;
    await ctx.openChild('image', opts.image, ChildRole.FILTERED | ChildRole.PRIMARY);
  },

  childPerm: (_node, _child, perm, shared) => filterChildPerm(perm, shared),

  limits(node) {
    const s = st(node);
    const below = image(node).node.limits;
    return {
      requestAlignment: Math.max(s.align, below.requestAlignment),
      ...(s.maxTransfer ? { maxTransfer: Math.min(s.maxTransfer, below.maxTransfer) } : {}),
    };
  },

  getLength: (node) => image(node).node.length,

  async read(node, offset, bytes, iov, flags) {
    check(node, 'read_aio', 'read', offset, bytes);
    await image(node).readv(offset, bytes, iov, flags);
  },

  async write(node, offset, bytes, iov, flags) {
    check(node, 'write_aio', 'write', offset, bytes);
    await image(node).write(offset, iov, flags);
  },

  async writeZeroes(node, offset, bytes, flags) {
    check(node, 'pwrite_zeroes', 'write-zeroes', offset, bytes);
    await image(node).writeZeroes(offset, bytes, flags);
  },

  async discard(node, offset, bytes) {
    check(node, 'pdiscard', 'discard', offset, bytes);
    await image(node).discard(offset, bytes);
  },

  async flushToOs(node) {
    check(node, 'flush_to_disk', 'flush', 0, 0);
  },

  async truncate(node, length, opts) {
    await image(node).truncate(length, opts);
  },

  makeEmpty: (node) => image(node).makeEmpty(),
};
