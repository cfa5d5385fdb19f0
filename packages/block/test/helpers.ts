import {
  BlockBackend,
  type BlockDriver,
  BlockError,
  type BlockNode,
  ChildRole,
  createGraph,
  type IoVec,
  iovSlice,
  opt,
  Perm,
} from '../src/index';

/** A file node (aio and other options as given) under a read-write BlockBackend. */
export async function fileBackend(filename: string, aio?: string, extra: Record<string, unknown> = {}) {
  const g = createGraph();
  const node = await g.open({ driver: 'file', filename, ...(aio ? { aio } : {}), ...extra });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  return { g, blk, node };
}

/** An in-memory protocol driver for tests, with a configurable alignment and transfer limit. */
export interface MemState {
  data: Buffer;
  /** Every request the driver saw: [op, offset, bytes]. */
  log: [string, number, number][];
  /** Resolves pending requests when set (to hold requests in flight). */
  gate: Promise<void> | null;
}

export const memDriver: BlockDriver = {
  name: 'test-mem',
  protocol: true,
  options: {
    size: opt.size('size', { default: 1 << 20 }),
    align: opt.int('request alignment', { default: 1 }),
    'max-transfer': opt.int('max transfer', { default: 1 << 30 }),
  },
  async open(node, opts) {
    node.opaque = { data: Buffer.alloc(opts.size as number), log: [], gate: null, opts } as MemState & {
      opts: any;
    };
  },
  limits: (node) => ({
    requestAlignment: (node.opaque as any).opts.align,
    maxTransfer: (node.opaque as any).opts['max-transfer'],
  }),
  getLength: (node) => (node.opaque as MemState).data.length,
  async read(node, offset, bytes, iov) {
    const s = node.opaque as MemState;
    s.log.push(['read', offset, bytes]);
    if (s.gate) await s.gate;
    let pos = offset;
    for (const b of iov) {
      s.data.copy(b, 0, pos, pos + b.length);
      pos += b.length;
    }
  },
  async write(node, offset, bytes, iov) {
    const s = node.opaque as MemState;
    s.log.push(['write', offset, bytes]);
    if (s.gate) await s.gate;
    if (offset + bytes > s.data.length) {
      const grown = Buffer.alloc(offset + bytes);
      s.data.copy(grown);
      s.data = grown;
    }
    let pos = offset;
    for (const b of iov) {
      b.copy(s.data, pos);
      pos += b.length;
    }
  },
  async discard(node, offset, bytes) {
    const s = node.opaque as MemState;
    s.log.push(['discard', offset, bytes]);
    s.data.fill(0, offset, offset + bytes);
  },
  async truncate(node, length) {
    const s = node.opaque as MemState;
    const n = Buffer.alloc(length);
    s.data.copy(n, 0, 0, Math.min(length, s.data.length));
    s.data = n;
  },
};

/**
 * A minimal copy-on-write format for chain tests: a map of allocated 4 KiB blocks in memory over
 * an optional backing child. Reads of unallocated blocks go to the backing file.
 */
interface CowState {
  blocks: Map<number, Buffer>;
  size: number;
}
const BS = 4096;

export const cowDriver: BlockDriver = {
  name: 'test-cow',
  supportsBacking: true,
  options: {
    size: opt.size('size', { default: 1 << 20 }),
    backing: opt.child('backing', { nullable: true }),
  },
  async open(node, opts, ctx) {
    await ctx.openChild('backing', opts.backing, ChildRole.COW, { optional: true });
    node.opaque = { blocks: new Map(), size: opts.size as number } satisfies CowState;
  },
  getLength: (node) => (node.opaque as CowState).size,
  limits: () => ({ requestAlignment: BS }),
  async read(node, offset, bytes, iov) {
    const s = node.opaque as CowState;
    for (let pos = 0; pos < bytes; pos += BS) {
      const blk = s.blocks.get((offset + pos) / BS);
      const dst = iovSlice(iov, pos, BS);
      if (blk) {
        let o = 0;
        for (const b of dst) {
          blk.copy(b, 0, o, o + b.length);
          o += b.length;
        }
      } else if (node.backing) await node.backing.readv(offset + pos, BS, dst);
      else for (const b of dst) b.fill(0);
    }
  },
  async write(node, offset, bytes, iov) {
    const s = node.opaque as CowState;
    const data = Buffer.concat(iov);
    for (let pos = 0; pos < bytes; pos += BS)
      s.blocks.set((offset + pos) / BS, Buffer.from(data.subarray(pos, pos + BS)));
  },
  async blockStatus(node, offset, bytes) {
    const s = node.opaque as CowState;
    const first = s.blocks.has(Math.floor(offset / BS));
    let n = 0;
    while (n < bytes && s.blocks.has(Math.floor((offset + n) / BS)) === first) n += BS - ((offset + n) % BS);
    return { bytes: Math.min(n, bytes), data: first, zero: false, allocated: first };
  },
  async makeEmpty(node) {
    (node.opaque as CowState).blocks.clear();
  },
};

export function testGraph() {
  return createGraph([memDriver, cowDriver]);
}

export function memState(node: BlockNode): MemState {
  return node.opaque as MemState;
}

export function iovText(iov: IoVec): string {
  return Buffer.concat(iov).toString();
}

export async function expectBlockError(
  p: Promise<unknown> | (() => unknown),
  re: RegExp,
): Promise<BlockError> {
  try {
    if (typeof p === 'function') await p();
    else await p;
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    if (!re.test(e.message)) throw new Error(`error "${e.message}" does not match ${re}`);
    return e;
  }
  throw new Error(`expected an error matching ${re}`);
}
