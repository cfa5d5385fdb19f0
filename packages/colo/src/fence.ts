import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockNode,
  ChildRole,
  filterChildPerm,
  opt,
  ReqFlags,
} from '@blockrep/block';

/*
 * colo-fence: the filter between the guest export and the guest disk of a COLO primary. A write
 * (or zeroes, discard) is acknowledged only if the side may acknowledge writes both when it
 * starts and when it ends (`allow`, the pair's lease check): a side that lost its lease meanwhile
 * answers with an error, so no write is acknowledged outside the lease. Reads pass.
 */

interface FenceState {
  allow: () => boolean;
  /** Acknowledged writes (for status). */
  acked: number;
  refused: number;
}

const st = (node: BlockNode) => node.opaque as FenceState;
const below = (node: BlockNode) => node.filtered as BlockChild;

function refused(node: BlockNode): BlockError {
  st(node).refused++;
  return new BlockError('COLO: this side does not hold the pair lease; write not acknowledged', {
    errno: 'EACCES',
  });
}

async function fenced(node: BlockNode, op: () => Promise<void>): Promise<void> {
  const s = st(node);
  if (!s.allow()) throw refused(node);
  await op();
  if (!s.allow()) throw refused(node);
  s.acked++;
}

export const coloFenceDriver: BlockDriver = {
  name: 'colo-fence',
  isFilter: true,
  options: {
    file: opt.child('The guest disk', { required: true }),
  },
  supportedWriteFlags: ReqFlags.FUA | ReqFlags.MAY_UNMAP,

  async open(node, opts, ctx) {
    await ctx.openChild('file', opts.file, ChildRole.FILTERED | ChildRole.PRIMARY);
    // Closed until the pair says otherwise (setFenceCheck).
    node.opaque = { allow: () => false, acked: 0, refused: 0 } satisfies FenceState;
  },

  childPerm: (_node, _child, perm, shared) => filterChildPerm(perm, shared),
  limits: (node) => ({ ...below(node).node.limits }),
  getLength: (node) => below(node).node.length,
  filename: (node) => below(node).node.filename,

  read: (node, offset, bytes, iov, flags) => below(node).readv(offset, bytes, iov, flags),
  write: (node, offset, _bytes, iov, flags) => fenced(node, () => below(node).write(offset, iov, flags)),
  writeZeroes: (node, offset, bytes, flags) =>
    fenced(node, () => below(node).writeZeroes(offset, bytes, flags)),
  discard: (node, offset, bytes) => fenced(node, () => below(node).discard(offset, bytes)),
};

/** Sets what a colo-fence node asks before and after each write. */
export function setFenceCheck(node: BlockNode, allow: () => boolean): void {
  if (node.driver !== coloFenceDriver) throw new BlockError(`'${node.nodeName}' is not a colo-fence node`);
  st(node).allow = allow;
}

export function fenceCounters(node: BlockNode): { acked: number; refused: number } {
  const s = st(node);
  return { acked: s.acked, refused: s.refused };
}
