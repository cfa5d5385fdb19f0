import type { BlockDriver } from '../../driver';
import { opt } from '../../options';

interface NullState {
  size: number;
  latencyNs: number;
}

const delay = (ns: number) => (ns > 0 ? new Promise<void>((r) => setTimeout(r, ns / 1e6)) : undefined);

/** null-co: a protocol with no storage. Reads return zeroes, writes are dropped. */
export const nullDriver: BlockDriver = {
  name: 'null-co',
  protocol: true,
  options: {
    size: opt.size('Size of the device in bytes (default 1 GiB)', { default: 1 << 30 }),
    'latency-ns': opt.int('Completion latency of every request in nanoseconds', { min: 0, default: 0 }),
    'read-zeroes': opt.bool('Reads return zeroes (always the case in blockrep)'),
  },
  supportedWriteFlags: 0x1,

  async open(node, opts) {
    node.opaque = { size: opts.size as number, latencyNs: opts['latency-ns'] as number } satisfies NullState;
  },
  getLength: (node) => (node.opaque as NullState).size,
  filename: () => 'null-co://',
  async read(node, _offset, _bytes, iov) {
    await delay((node.opaque as NullState).latencyNs);
    for (const b of iov) b.fill(0);
  },
  async write(node) {
    await delay((node.opaque as NullState).latencyNs);
  },
  async writeZeroes(node) {
    await delay((node.opaque as NullState).latencyNs);
  },
  async discard() {},
  async blockStatus(node, offset, bytes) {
    return { bytes, data: false, zero: true, allocated: true, offset, file: node };
  },
  // No truncate: QEMU's null-co answers resizes with "Image format driver does not support resize".
};
