import { createHash } from 'node:crypto';
import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockNode,
  blockStatusAbove,
  ChildRole,
  type Errno,
  errnoText,
  type IoVec,
  iovCopyFrom,
  opt,
  PERM_ALL,
  PERM_PASSTHROUGH,
  Perm,
  ReqFlags,
  toBlockError,
} from '@blockrep/block';

/**
 * quorum: writes go to every child and succeed when at least vote-threshold children succeed;
 * reads either vote on the children's data (read-pattern=quorum) or take the first child that
 * answers (fifo). The COLO primary uses vote-threshold=1, read-pattern=fifo.
 */
interface QuorumState {
  children: BlockChild[];
  threshold: number;
  blkverify: boolean;
  rewriteCorrupted: boolean;
  readPattern: 'quorum' | 'fifo';
  nextChildIndex: number;
}

const st = (node: BlockNode) => node.opaque as QuorumState;

type OpType = 'read' | 'write' | 'flush';

function sectors(offset: number, bytes: number) {
  const start = Math.floor(offset / 512);
  return { 'sector-num': start, 'sectors-count': Math.ceil((offset + bytes) / 512) - start };
}

function reportBad(
  node: BlockNode,
  type: OpType,
  child: BlockNode,
  offset: number,
  bytes: number,
  err?: BlockError,
) {
  node.graph.emitEvent('QUORUM_REPORT_BAD', {
    type,
    ...(err ? { error: errnoText(err.errno) } : {}),
    'node-name': child.nodeName,
    ...sectors(offset, bytes),
  });
}

function reportFailure(node: BlockNode, offset: number, bytes: number) {
  node.graph.emitEvent('QUORUM_FAILURE', { reference: node.nodeName, ...sectors(offset, bytes) });
}

/** The error most children failed with (QEMU votes on the error codes too). */
function voteError(errors: BlockError[]): BlockError {
  const count = new Map<Errno, number>();
  let best = errors[0]!;
  let max = 0;
  for (const e of errors) {
    const n = (count.get(e.errno) ?? 0) + 1;
    count.set(e.errno, n);
    if (n > max) {
      max = n;
      best = e;
    }
  }
  return new BlockError(errnoText(best.errno), { errno: best.errno, cause: best });
}

function validateThreshold(threshold: number, children: number): void {
  if (threshold < 1) throw new BlockError("Parameter 'vote-threshold' expects a value >= 1");
  if (threshold > children) throw new BlockError('threshold may not exceed children count');
}

/** Writes (or zero writes) to every child; fails unless threshold children succeed. */
async function writeAll(
  node: BlockNode,
  offset: number,
  bytes: number,
  op: (c: BlockChild) => Promise<void>,
): Promise<void> {
  const s = st(node);
  const errors: BlockError[] = [];
  let ok = 0;
  await Promise.all(
    s.children.map(async (c) => {
      try {
        await op(c);
        ok++;
      } catch (e) {
        const be = toBlockError(e);
        errors.push(be);
        reportBad(node, 'write', c.node, offset, bytes, be);
      }
    }),
  );
  if (ok < s.threshold) {
    reportFailure(node, offset, bytes);
    throw voteError(errors);
  }
}

async function readFifo(node: BlockNode, offset: number, bytes: number, iov: IoVec): Promise<void> {
  const s = st(node);
  let last: BlockError | null = null;
  for (const c of s.children) {
    try {
      await c.readv(offset, bytes, iov);
      return;
    } catch (e) {
      last = toBlockError(e);
      reportBad(node, 'read', c.node, offset, bytes, last);
    }
  }
  throw last ?? new BlockError('No children to read from', { errno: 'EIO' });
}

async function readQuorum(node: BlockNode, offset: number, bytes: number, iov: IoVec): Promise<void> {
  const s = st(node);
  // The first child reads straight into the caller's buffers; the others into their own.
  const bufs = s.children.map((_, i) => (i === 0 ? iov : [Buffer.allocUnsafe(bytes)]));
  const errs: (BlockError | null)[] = await Promise.all(
    s.children.map(async (c, i) => {
      try {
        await c.readv(offset, bytes, bufs[i]!);
        return null;
      } catch (e) {
        const be = toBlockError(e);
        reportBad(node, 'read', c.node, offset, bytes, be);
        return be;
      }
    }),
  );
  const good = s.children.map((_, i) => i).filter((i) => !errs[i]);
  if (good.length < s.threshold) {
    reportFailure(node, offset, bytes);
    throw voteError(errs.filter((e): e is BlockError => e !== null));
  }
  const flat = (i: number) => (i === 0 && iov.length !== 1 ? Buffer.concat(iov) : bufs[i]![0]!);
  const first = flat(good[0]!);
  if (good.every((i) => i === good[0] || flat(i).equals(first))) {
    if (good[0] !== 0) iovCopyFrom(iov, 0, first);
    return;
  }
  if (s.blkverify) {
    const other = flat(good[1]!);
    let at = 0;
    while (at < bytes && first[at] === other[at]) at++;
    reportFailure(node, offset, bytes);
    throw new BlockError(
      `quorum: offset=${offset} bytes=${bytes} contents mismatch at offset ${offset + at}`,
      {
        errno: 'EIO',
      },
    );
  }
  // Vote on the content's hash: the version most children returned wins if it has enough votes.
  const versions = new Map<string, number[]>();
  for (const i of good) {
    const h = createHash('sha256').update(flat(i)).digest('hex');
    const v = versions.get(h);
    if (v) v.push(i);
    else versions.set(h, [i]);
  }
  let winner: number[] = [];
  for (const v of versions.values()) if (v.length > winner.length) winner = v;
  if (winner.length < s.threshold) {
    reportFailure(node, offset, bytes);
    throw new BlockError(errnoText('EIO'), { errno: 'EIO' });
  }
  const data = flat(winner[0]!);
  if (winner[0] !== 0) iovCopyFrom(iov, 0, data);
  const losers = good.filter((i) => !winner.includes(i));
  for (const i of losers) reportBad(node, 'read', s.children[i]!.node, offset, bytes);
  if (s.rewriteCorrupted) {
    // A correction attempt only: its errors are ignored.
    await Promise.all(losers.map((i) => s.children[i]!.write(offset, Buffer.from(data)).catch(() => {})));
  }
}

export const quorumDriver: BlockDriver = {
  name: 'quorum',
  options: {
    children: opt.children('The children (node options or node names)', { required: true }),
    'vote-threshold': opt.int('How many children must agree (reads) or succeed (writes)', { required: true }),
    blkverify: opt.bool('Two children, threshold 2: fail reads whose contents differ'),
    'rewrite-corrupted': opt.bool('Rewrite children that lost a read vote with the winning data'),
    'read-pattern': opt.enum(
      ['quorum', 'fifo'],
      'quorum: vote on every read; fifo: read the first child that works',
    ),
  },
  supportedWriteFlags: ReqFlags.WRITE_UNCHANGED,

  async open(node, opts, ctx) {
    const refs = opts.children as unknown[];
    if (refs.length < 1) throw new BlockError('Number of provided children must be 1 or more');
    const threshold = opts['vote-threshold'] as number;
    validateThreshold(threshold, refs.length);
    const readPattern = (opts['read-pattern'] as 'quorum' | 'fifo' | undefined) ?? 'quorum';
    let blkverify = false;
    let rewriteCorrupted = false;
    if (readPattern === 'quorum') {
      blkverify = (opts.blkverify as boolean | undefined) ?? false;
      if (blkverify && (refs.length !== 2 || threshold !== 2)) {
        throw new BlockError(
          'blkverify=on can only be set if there are exactly two files and vote-threshold is 2',
        );
      }
      rewriteCorrupted = (opts['rewrite-corrupted'] as boolean | undefined) ?? false;
      if (rewriteCorrupted && blkverify)
        throw new BlockError('rewrite-corrupted=on cannot be used with blkverify=on');
    }
    const s: QuorumState = {
      children: [],
      threshold,
      blkverify,
      rewriteCorrupted,
      readPattern,
      nextChildIndex: 0,
    };
    node.opaque = s;
    for (let i = 0; i < refs.length; i++) {
      s.children.push((await ctx.openChild(`children.${i}`, refs[i], ChildRole.DATA))!);
    }
    s.nextChildIndex = refs.length;
  },

  childPerm(node, _child, perm, shared) {
    let p = perm & PERM_PASSTHROUGH;
    if (st(node).rewriteCorrupted) p |= Perm.WRITE;
    // Sharing write or resize would let the children drift apart.
    const s = (shared & (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)) | (PERM_ALL & ~PERM_PASSTHROUGH);
    return [p, s];
  },

  getLength(node) {
    const lengths = st(node).children.map((c) => c.node.length);
    if (lengths.some((l) => l !== lengths[0])) {
      throw new BlockError('Could not refresh total sector count: Input/output error', { errno: 'EIO' });
    }
    return lengths[0]!;
  },

  read(node, offset, bytes, iov) {
    return st(node).readPattern === 'fifo'
      ? readFifo(node, offset, bytes, iov)
      : readQuorum(node, offset, bytes, iov);
  },

  write(node, offset, bytes, iov, flags) {
    return writeAll(node, offset, bytes, (c) => c.write(offset, iov, flags));
  },

  writeZeroes(node, offset, bytes, flags) {
    return writeAll(node, offset, bytes, (c) => c.writeZeroes(offset, bytes, flags));
  },

  async flush(node) {
    const s = st(node);
    const errors: BlockError[] = [];
    let ok = 0;
    for (const c of s.children) {
      try {
        await c.flush();
        ok++;
      } catch (e) {
        const be = toBlockError(e);
        errors.push(be);
        reportBad(node, 'flush', c.node, 0, 0, be);
      }
    }
    if (ok < s.threshold) throw voteError(errors);
  },

  async blockStatus(node, offset, bytes) {
    // Zero only where every child says so; data otherwise.
    let zeroBytes = bytes;
    let dataBytes = 0;
    for (const c of st(node).children) {
      try {
        const r = await blockStatusAbove(c.node, null, offset, bytes);
        if (r.zero && !r.data) zeroBytes = Math.min(zeroBytes, r.bytes);
        else dataBytes = Math.max(dataBytes, r.bytes);
      } catch (e) {
        reportBad(node, 'read', c.node, offset, bytes, toBlockError(e));
        dataBytes = bytes;
        break;
      }
    }
    if (dataBytes) return { bytes: dataBytes, data: true, zero: false, allocated: true };
    return { bytes: zeroBytes, data: false, zero: true, allocated: true };
  },

  addChild(node, child) {
    const s = st(node);
    if (s.blkverify) throw new BlockError('Cannot add a child to a quorum in blkverify mode');
    const name = `children.${s.nextChildIndex}`;
    const edge = node.graph.attachChild(node, child, name, ChildRole.DATA);
    s.nextChildIndex++;
    s.children.push(edge);
  },

  delChild(node, child) {
    const s = st(node);
    if (s.children.length <= s.threshold) {
      throw new BlockError(`The number of children cannot be lower than the vote threshold ${s.threshold}`);
    }
    if (child.name === `children.${s.nextChildIndex - 1}`) s.nextChildIndex--;
    node.graph.update((tx) => tx.removeChild(child));
    s.children.splice(s.children.indexOf(child), 1);
  },

  info(node) {
    return { 'vote-threshold': st(node).threshold, children: st(node).children.map((c) => c.node.nodeName) };
  },
};
