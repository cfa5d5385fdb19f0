import type { BlockDriver } from '../../driver';
import { BlockError } from '../../errors';
import type { BlockChild, BlockNode } from '../../node';
import { opt } from '../../options';
import { ChildRole, filterChildPerm } from '../../perm';

interface RawState {
  offset: number;
  /** Fixed size when the size option was given. */
  size: number | undefined;
}

const st = (node: BlockNode) => node.opaque as RawState;
const file = (node: BlockNode) => node.file as BlockChild;

/** Requests are checked against a fixed size window; beyond it writes get ENOSPC as in QEMU. */
function shift(node: BlockNode, offset: number, bytes: number): number {
  const s = st(node);
  if (s.size !== undefined && offset + bytes > s.size) {
    throw new BlockError(`Request beyond the raw size window (${s.size} bytes)`, { errno: 'ENOSPC' });
  }
  return s.offset + offset;
}

/** raw: the image is the file, optionally a window of it (offset, size). */
export const rawDriver: BlockDriver = {
  name: 'raw',
  options: {
    file: opt.child('The protocol node holding the data', { required: true }),
    offset: opt.size('Offset of the image in the file', { default: 0 }),
    size: opt.size('Size of the image (default: from offset to the end of the file)'),
  },
  supportedWriteFlags: 0x1,

  async open(node, opts, ctx) {
    const offset = opts.offset as number;
    const size = opts.size as number | undefined;
    const windowed = offset !== 0 || size !== undefined;
    const role = windowed ? ChildRole.DATA | ChildRole.PRIMARY : ChildRole.FILTERED | ChildRole.PRIMARY;
    const child = (await ctx.openChild('file', opts.file, role))!;
    const real = child.node.length;
    if (offset > real) {
      throw new BlockError(`Offset (${offset}) cannot be greater than virtual disk size (${real})`);
    }
    if (size !== undefined && real - offset < size) {
      throw new BlockError(
        `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${real})`,
      );
    }
    if (size !== undefined && size % 512 !== 0)
      throw new BlockError('Specified size is not multiple of 512!');
    node.opaque = { offset, size } satisfies RawState;
  },

  // raw needs nothing for itself: its users' permissions pass straight down.
  childPerm: (_node, _child, perm, shared) => filterChildPerm(perm, shared),

  limits: (node) => ({ ...file(node).node.limits }),

  getLength(node) {
    const s = st(node);
    return s.size ?? Math.max(0, file(node).node.length - s.offset);
  },

  read: (node, offset, bytes, iov, flags) => file(node).readv(shift(node, offset, bytes), bytes, iov, flags),
  write: (node, offset, bytes, iov, flags) => file(node).write(shift(node, offset, bytes), iov, flags),
  writeZeroes: (node, offset, bytes, flags) =>
    file(node).writeZeroes(shift(node, offset, bytes), bytes, flags),
  discard: (node, offset, bytes) => file(node).discard(shift(node, offset, bytes), bytes),

  async blockStatus(node, offset, bytes) {
    return {
      bytes,
      data: true,
      zero: false,
      allocated: true,
      offset: st(node).offset + offset,
      file: file(node).node,
      recurse: true,
    };
  },

  async truncate(node, length, opts) {
    const s = st(node);
    if (s.size !== undefined || s.offset !== 0) {
      throw new BlockError('Cannot resize fixed-size raw disks', { errno: 'ENOTSUP' });
    }
    await file(node).truncate(length, opts);
  },
};
