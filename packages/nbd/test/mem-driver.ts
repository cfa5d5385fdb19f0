import { type BlockDriver, type BlockNode, iovCopyFrom, iovSlice, opt } from '@blockrep/block';

/** An in-memory protocol driver that logs requests and can hold reads of chosen offsets. */
export interface MemState {
  data: Buffer;
  log: [op: string, offset: number, bytes: number][];
  /** Reads at these offsets wait until released. */
  held: Map<number, () => void>;
  holdOffsets: Set<number>;
}

export const mem = (node: BlockNode) => node.opaque as MemState & { align: number; max: number };

export const memDriver: BlockDriver = {
  name: 'test-mem',
  protocol: true,
  options: {
    size: opt.size('size', { default: 1 << 20 }),
    align: opt.int('request alignment', { default: 1 }),
    'max-transfer': opt.int('max transfer', { default: 1 << 30 }),
  },
  async open(node, opts) {
    node.opaque = {
      data: Buffer.alloc(opts.size as number),
      log: [],
      held: new Map(),
      holdOffsets: new Set(),
      align: opts.align,
      max: opts['max-transfer'],
    };
  },
  limits: (node) => ({ requestAlignment: mem(node).align, maxTransfer: mem(node).max }),
  getLength: (node) => mem(node).data.length,
  async read(node, offset, bytes, iov) {
    const s = mem(node);
    s.log.push(['read', offset, bytes]);
    if (s.holdOffsets.has(offset)) await new Promise<void>((r) => s.held.set(offset, r));
    let done = 0;
    for (const b of iovSlice(iov, 0, bytes)) {
      s.data.copy(b, 0, offset + done, offset + done + b.length);
      done += b.length;
    }
  },
  async write(node, offset, bytes, iov) {
    const s = mem(node);
    s.log.push(['write', offset, bytes]);
    const tmp = Buffer.alloc(bytes);
    iovCopyFrom([tmp], 0, Buffer.concat(iov));
    tmp.copy(s.data, offset);
  },
};
