import {
  type BlockChild,
  type BlockDriver,
  type BlockNode,
  ChildRole,
  filterChildPerm,
  type IoVec,
  opt,
  ReqFlags,
} from '@blockrep/block';

/**
 * What the mirror job gives its filter: where guest writes are recorded (background mode) or
 * copied to the target as they happen (write-blocking mode).
 */
export interface MirrorTopJob {
  /** True while guest writes are to reach the target before they complete. */
  readonly writeBlocking: boolean;
  /** Background mode: a guest write changed [offset, offset+bytes) of the source. */
  markDirty(offset: number, bytes: number): void;
  /**
   * Write-blocking mode: runs the source write with the range held against the job's own copies,
   * then writes the same to the target.
   */
  activeWrite(
    offset: number,
    bytes: number,
    write: () => Promise<void>,
    toTarget: () => Promise<void>,
  ): Promise<void>;
  /** The same request, sent to the target (write-blocking mode). */
  targetWrite(offset: number, iov: IoVec, flags: number): Promise<void>;
  targetZeroes(offset: number, bytes: number, flags: number): Promise<void>;
  targetDiscard(offset: number, bytes: number): Promise<void>;
}

interface MirrorTopState {
  job: MirrorTopJob | null;
}

const st = (node: BlockNode) => node.opaque as MirrorTopState;
const source = (node: BlockNode) => node.filtered as BlockChild;

/** Runs a guest write-like request through the filter: recorded or copied, as the job's mode says. */
async function forward(
  node: BlockNode,
  offset: number,
  bytes: number,
  onSource: (c: BlockChild) => Promise<void>,
  onTarget: (job: MirrorTopJob) => Promise<void>,
): Promise<void> {
  const job = st(node).job;
  const c = source(node);
  if (!job) return onSource(c);
  if (job.writeBlocking)
    return job.activeWrite(
      offset,
      bytes,
      () => onSource(c),
      () => onTarget(job),
    );
  try {
    await onSource(c);
  } finally {
    // A failed write may still have changed the source: the range is copied again either way.
    job.markDirty(offset, bytes);
  }
}

/**
 * mirror_top: the filter a mirror job puts above its source for the job's life. Every guest
 * write passes through it, so the job knows what to copy again (or copies it at once), and on
 * completion the filter's parents are what moves onto the target.
 */
export const mirrorTopDriver: BlockDriver = {
  name: 'mirror_top',
  isFilter: true,
  options: {
    backing: opt.child('The source node', { required: true }),
  },
  supportedWriteFlags: ReqFlags.FUA | ReqFlags.MAY_UNMAP | ReqFlags.WRITE_UNCHANGED,

  async open(node, opts, ctx) {
    await ctx.openChild('backing', opts.backing, ChildRole.FILTERED | ChildRole.PRIMARY);
    node.opaque = { job: null } satisfies MirrorTopState;
  },

  childPerm: (_node, _child, perm, shared) => filterChildPerm(perm, shared),
  limits: (node) => ({ ...source(node).node.limits }),
  getLength: (node) => source(node).node.length,
  filename: (node) => source(node).node.filename,

  read: (node, offset, bytes, iov: IoVec, flags) => source(node).readv(offset, bytes, iov, flags),

  write(node, offset, bytes, iov, flags) {
    return forward(
      node,
      offset,
      bytes,
      (c) => c.write(offset, iov, flags),
      (job) => job.targetWrite(offset, iov, flags),
    );
  },

  writeZeroes(node, offset, bytes, flags) {
    return forward(
      node,
      offset,
      bytes,
      (c) => c.writeZeroes(offset, bytes, flags),
      (job) => job.targetZeroes(offset, bytes, flags),
    );
  },

  discard(node, offset, bytes) {
    return forward(
      node,
      offset,
      bytes,
      (c) => c.discard(offset, bytes),
      (job) => job.targetDiscard(offset, bytes),
    );
  },
};

/** Connects (or, with null, disconnects) a mirror job to its filter node. */
export function setMirrorTopJob(node: BlockNode, job: MirrorTopJob | null): void {
  if (node.driver !== mirrorTopDriver) throw new Error(`BUG: ${node.nodeName} is not a mirror_top node`);
  st(node).job = job;
}
