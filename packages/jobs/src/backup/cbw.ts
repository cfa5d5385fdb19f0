import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockNode,
  ChildRole,
  defaultChildPerm,
  type IoVec,
  opt,
  PERM_ALL,
  Perm,
  ReqFlags,
} from '@blockrep/block';
import { BlockCopy } from './block-copy';

/**
 * copy-before-write: a filter above a backup's source. Before a write reaches clusters that have
 * not been copied yet, their old contents go to the target; so the target (with the source as
 * its backing file, or filled by the backup job) keeps the point-in-time image.
 */
export interface CbwState {
  bcs: BlockCopy;
  /** break-guest-write (default): a failed copy fails the guest write. break-snapshot: the write goes on and the snapshot is broken. */
  onCbwError: 'break-guest-write' | 'break-snapshot';
  /** The first copy error (break-snapshot): reads of the snapshot are no longer valid. */
  snapshotError: Error | null;
  /** Told of every failed copy-before-write (the backup job passes it on to its owner). */
  onCopyError: ((err: Error) => void) | null;
}

export const CBW_CLUSTER = 65536;

const st = (node: BlockNode) => node.opaque as CbwState;
const file = (node: BlockNode) => node.file as BlockChild;

/**
 * Copies what a write to [offset, offset+bytes) is about to overwrite, then runs the write. The
 * cluster lock is held only while the old data is copied (as QEMU waits only for copies in
 * flight): once a cluster is copied its bit is clear, so nobody copies it again, and the guest
 * write itself needs no lock.
 */
async function beforeWrite(
  node: BlockNode,
  offset: number,
  bytes: number,
  write: () => Promise<void>,
): Promise<void> {
  const s = st(node);
  // Always through the lock: it also waits for a copy in flight (whose bit is already clear).
  const unlock = await s.bcs.lockRange(offset, bytes);
  try {
    if (!s.snapshotError) await s.bcs.copyLocked(offset, bytes);
  } catch (e) {
    const cause = (e as { error?: Error }).error ?? (e as Error);
    s.onCopyError?.(cause);
    if (s.onCbwError === 'break-guest-write') throw cause;
    s.snapshotError = cause;
  } finally {
    unlock();
  }
  await write();
}

export const cbwDriver: BlockDriver = {
  name: 'copy-before-write',
  isFilter: true,
  options: {
    file: opt.child('The source node', { required: true }),
    target: opt.child('Where old data is copied before it is overwritten', { required: true }),
    'on-cbw-error': opt.enum(['break-guest-write', 'break-snapshot'], 'What a failed copy breaks'),
    'cbw-timeout': opt.int('Copy timeout in seconds (accepted; 0 = none)', { min: 0 }),
  },
  supportedWriteFlags: ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED,

  async open(node, opts, ctx) {
    const source = (await ctx.openChild('file', opts.file, ChildRole.FILTERED | ChildRole.PRIMARY))!;
    const target = (await ctx.openChild('target', opts.target, ChildRole.DATA))!;
    if (target.node.length !== source.node.length) {
      throw new BlockError('Source and target image have different sizes');
    }
    node.opaque = {
      bcs: new BlockCopy(source, target, source.node.length, CBW_CLUSTER),
      onCbwError: (opts['on-cbw-error'] as CbwState['onCbwError'] | undefined) ?? 'break-guest-write',
      snapshotError: null,
      onCopyError: null,
    } satisfies CbwState;
  },

  childPerm(node, child, perm, shared) {
    if (child.name === 'target') return [Perm.WRITE, PERM_ALL & ~Perm.RESIZE];
    let [p, s] = defaultChildPerm(child.role, perm, shared, node.readOnly);
    if (node.parents.length) {
      if (perm & Perm.WRITE) p |= Perm.CONSISTENT_READ;
      // Nobody may change the source behind the filter's back.
      s &= ~(Perm.WRITE | Perm.RESIZE);
    }
    return [p, s];
  },

  limits: (node) => ({ ...file(node).node.limits }),
  getLength: (node) => file(node).node.length,

  read: (node, offset, bytes, iov: IoVec, flags) => file(node).readv(offset, bytes, iov, flags),

  write(node, offset, bytes, iov, flags) {
    return beforeWrite(node, offset, bytes, () => file(node).write(offset, iov, flags));
  },

  writeZeroes(node, offset, bytes, flags) {
    return beforeWrite(node, offset, bytes, () => file(node).writeZeroes(offset, bytes, flags));
  },

  discard(node, offset, bytes) {
    return beforeWrite(node, offset, bytes, () => file(node).discard(offset, bytes));
  },

  // The source only (when the filter writes through to it), as QEMU's filter: the target's durability is its owner's business (a
  // backup target is flushed when it is closed). Flushing it here made every guest flush and the
  // filter's removal at a backup's end write out the whole target (0.4-0.5 s per GiB here).
  async flush(node) {
    const src = file(node);
    if (src.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED)) await src.flush();
  },
};

export function cbwState(node: BlockNode): CbwState {
  if (node.driver !== cbwDriver) throw new Error(`BUG: ${node.nodeName} is not a copy-before-write node`);
  return st(node);
}
