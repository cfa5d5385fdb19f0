import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { BlockBackend, BlockError, createGraph, PERM_ALL, Perm, ReqFlags } from '../src/index';
import { expectBlockError, memState, testGraph } from './helpers';

const RW = Perm.CONSISTENT_READ | Perm.WRITE;

async function memBackend(opts: Record<string, unknown> = {}) {
  const g = testGraph();
  const node = await g.open({ driver: 'test-mem', 'node-name': 'm', ...opts });
  const blk = new BlockBackend(g, { perm: RW | Perm.RESIZE });
  blk.attach(node);
  return { g, node, blk, s: memState(node) };
}

describe('read and write', () => {
  it('round-trips Buffers and vectors through raw -> file', async () => {
    const f = makeTempDir().file('d.img');
    writeFileSync(f, Buffer.alloc(1 << 20));
    const g = createGraph();
    const n = await g.open({ driver: 'raw', file: { driver: 'file', filename: f } });
    const blk = new BlockBackend(g, { perm: RW });
    blk.attach(n);
    await blk.write(4096, Buffer.alloc(8192, 0xab));
    await blk.write(100, [Buffer.from('hello '), Buffer.from('world')]);
    expect((await blk.read(100, 11)).toString()).toBe('hello world');
    const iov = [Buffer.alloc(4096), Buffer.alloc(4096)];
    await blk.readv(4096, iov);
    expect(iov.every((b) => b.every((x) => x === 0xab))).toBe(true);
    await blk.flush();
    const disk = readFileSync(f);
    expect(disk.subarray(100, 111).toString()).toBe('hello world');
    expect(disk[4096 + 8191]).toBe(0xab);
    expect(disk[4096 + 8192]).toBe(0);
  });

  it('pads unaligned reads and read-modify-writes unaligned writes', async () => {
    const { blk, s } = await memBackend({ align: 4096 });
    s.data.fill(0x11);
    await blk.write(4000, Buffer.alloc(200, 0x22));
    // Two blocks were read (head and tail) and written back whole.
    expect(s.log).toEqual([
      ['read', 0, 4096],
      ['read', 4096, 4096],
      ['write', 0, 8192],
    ]);
    expect(s.data.subarray(3990, 4000).every((x) => x === 0x11)).toBe(true);
    expect(s.data.subarray(4000, 4200).every((x) => x === 0x22)).toBe(true);
    expect(s.data.subarray(4200, 8192).every((x) => x === 0x11)).toBe(true);
    s.log.length = 0;
    // Inside one block: one read, one write.
    await blk.write(10, Buffer.from('abc'));
    expect(s.log).toEqual([
      ['read', 0, 4096],
      ['write', 0, 4096],
    ]);
    s.log.length = 0;
    expect((await blk.read(9, 5)).toString('latin1')).toBe('\x11abc\x11');
    expect(s.log).toEqual([['read', 0, 4096]]);
  });

  it('splits requests at the driver transfer limit', async () => {
    const { blk, s } = await memBackend({ 'max-transfer': 65536 });
    await blk.write(0, Buffer.alloc(200_000, 1));
    expect(s.log.map((l) => l[2])).toEqual([65536, 65536, 65536, 200_000 - 3 * 65536]);
    s.log.length = 0;
    await blk.read(0, 131072);
    expect(s.log).toEqual([
      ['read', 0, 65536],
      ['read', 65536, 65536],
    ]);
  });

  it('writes zeroes by fallback and honours discard=ignore/unmap', async () => {
    const { blk, s } = await memBackend();
    s.data.fill(7);
    await blk.writeZeroes(10, 100);
    expect(s.data.subarray(10, 110).every((x) => x === 0)).toBe(true);
    expect(s.data[9]).toBe(7);
    expect(s.data[110]).toBe(7);
    await expectBlockError(blk.writeZeroes(0, 4096, ReqFlags.NO_FALLBACK), /cannot write zeroes/);
    await blk.discard(0, 4096);
    expect(s.log.some((l) => l[0] === 'discard')).toBe(false);
    const u = await memBackend({ discard: 'unmap' });
    await u.blk.discard(0, 4096);
    expect(u.s.log).toContainEqual(['discard', 0, 4096]);
  });

  it('turns zero writes into zeroing with detect-zeroes', async () => {
    const { blk, s } = await memBackend({ 'detect-zeroes': 'on' });
    s.data.fill(3);
    await blk.write(0, Buffer.alloc(4096));
    // Fallback zeroing writes, but through the zero path (a shared zero buffer), not the caller's.
    expect(s.data.subarray(0, 4096).every((x) => x === 0)).toBe(true);
    const g = testGraph();
    await expectBlockError(
      g.open({ driver: 'test-mem', 'detect-zeroes': 'unmap' }),
      /not allowed without setting discard/,
    );
  });

  it('emulates FUA with a flush where the driver has none', async () => {
    const f = makeTempDir().file('d.img');
    writeFileSync(f, Buffer.alloc(65536));
    const g = createGraph();
    const n = await g.open({ driver: 'file', filename: f });
    const blk = new BlockBackend(g, { perm: RW });
    blk.attach(n);
    let flushed = 0;
    const orig = n.driver.flushToDisk!;
    n.driver = {
      ...n.driver,
      supportedWriteFlags: 0,
      flushToDisk: async (x) => {
        flushed++;
        await orig(x);
      },
    };
    await blk.write(0, Buffer.alloc(512, 1), ReqFlags.FUA);
    expect(flushed).toBe(1);
    await blk.write(0, Buffer.alloc(512, 1));
    expect(flushed).toBe(1);
  });

  it('skips the flush to disk when nothing was written since a flush that succeeded began', async () => {
    const f = makeTempDir().file('gen.img');
    writeFileSync(f, Buffer.alloc(65536));
    const g = createGraph();
    const n = await g.open({ driver: 'file', filename: f, discard: 'unmap' });
    const blk = new BlockBackend(g, { perm: RW | Perm.RESIZE });
    blk.attach(n);
    let flushed = 0;
    let fail = false;
    const orig = n.driver.flushToDisk!;
    n.driver = {
      ...n.driver,
      flushToDisk: async (x) => {
        flushed++;
        if (fail) throw new BlockError('Input/output error', { errno: 'EIO' });
        await orig(x);
      },
    };
    await blk.flush();
    expect(flushed).toBe(0);
    await blk.write(0, Buffer.alloc(512, 1));
    await blk.flush();
    await blk.flush();
    expect(flushed).toBe(1);
    // FUA is emulated with a flush after the write, before its request has finished.
    await blk.writeZeroes(0, 512, ReqFlags.FUA);
    expect(flushed).toBe(2);
    // Every write-like request counts: zeroes, discards, truncate.
    for (const op of [
      () => blk.writeZeroes(0, 512),
      () => blk.discard(0, 65536),
      () => blk.truncate(131072),
    ]) {
      await op();
      await blk.flush();
    }
    expect(flushed).toBe(5);
    // A failed flush covers nothing: the next one goes to disk again.
    await blk.write(0, Buffer.alloc(512, 2));
    fail = true;
    await expect(blk.flush()).rejects.toThrow(/Input\/output error/);
    fail = false;
    await blk.flush();
    expect(flushed).toBe(7);
    // A write that finishes while a flush runs is not covered by it.
    let release!: () => void;
    n.driver = {
      ...n.driver,
      flushToDisk: async (x) => {
        flushed++;
        await new Promise<void>((r) => (release = r));
        await orig(x);
      },
    };
    await blk.write(0, Buffer.alloc(512, 3));
    const slow = blk.flush();
    await new Promise((r) => setImmediate(r));
    await blk.write(512, Buffer.alloc(512, 3));
    release();
    await slow;
    const again = blk.flush();
    await new Promise((r) => setImmediate(r));
    release();
    await again;
    expect(flushed).toBe(9);
    await g.closeAll();
  });
});

describe('checks that touch nothing', () => {
  it('refuses out-of-range requests', async () => {
    const { blk, s } = await memBackend({ size: 65536 });
    await expectBlockError(
      blk.write(65000, Buffer.alloc(1000)),
      /past the end of the image \(length 65536\)/,
    );
    await expectBlockError(blk.read(70000, 1), /past the end/);
    await expectBlockError(blk.read(-1, 1), /Invalid request/);
    await expectBlockError(blk.writeZeroes(0, 70000), /past the end/);
    expect(s.log).toEqual([]);
  });

  it('refuses writes to read-only nodes and without the write permission', async () => {
    const g = testGraph();
    const n = await g.open({ driver: 'test-mem', 'read-only': true });
    const ro = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    ro.attach(n);
    await expectBlockError(ro.write(0, Buffer.alloc(1)), /Node '#block\d+' is read-only/);
    const m = await g.open({ driver: 'test-mem', 'node-name': 'w' });
    const reader = new BlockBackend(g, { perm: Perm.CONSISTENT_READ, name: 'reader' });
    reader.attach(m);
    const e = await expectBlockError(reader.write(0, Buffer.alloc(1)), /without the 'write' permission/);
    expect(e.message).toContain("block device 'reader'");
    await expectBlockError(reader.truncate(4096), /without the 'resize' permission/);
    expect(memState(m).log).toEqual([]);
  });

  it('fails requests on a detached backend and on closed nodes', async () => {
    const { g, blk } = await memBackend();
    await blk.detach();
    await expectBlockError(blk.read(0, 1), /No medium found/);
    expect(g.getNode('m')).toBeDefined();
  });
});

describe('tracking, drain and serialisation', () => {
  it('drain waits for in-flight requests and holds new ones until it ends', async () => {
    const { g, node, blk, s } = await memBackend();
    let open!: () => void;
    s.gate = new Promise((r) => (open = r));
    const inflight = blk.write(0, Buffer.alloc(512, 1));
    await new Promise((r) => setImmediate(r));
    expect(node.inFlight).toBe(1);
    let drained = false;
    const d = g.drainBegin(node).then(() => (drained = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(drained).toBe(false);
    s.gate = null;
    open();
    await inflight;
    await d;
    expect(drained).toBe(true);
    // A new request waits while drained.
    let done = false;
    const held = blk.read(0, 512).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(done).toBe(false);
    expect(s.log.filter((l) => l[0] === 'read')).toHaveLength(0);
    g.drainEnd(node);
    await held;
    expect(done).toBe(true);
  });

  it('tells the backend owner when a drain begins and ends', async () => {
    const { g, node, blk } = await memBackend();
    const seen: string[] = [];
    blk.dev = { drainedBegin: () => seen.push('begin'), drainedEnd: () => seen.push('end') };
    await g.drained(node, async () => {
      await g.drained(node, () => {});
    });
    expect(seen).toEqual(['begin', 'end']);
  });

  it('serialises an unaligned write against overlapping requests', async () => {
    const { blk, s } = await memBackend({ align: 4096 });
    let open!: () => void;
    s.gate = new Promise((r) => (open = r));
    const a = blk.write(100, Buffer.alloc(10, 0xaa)); // RMW of block 0, held at its read
    const b = blk.write(0, Buffer.alloc(4096, 0xbb)); // aligned, overlapping: must wait for a
    await new Promise((r) => setTimeout(r, 10));
    expect(s.log).toEqual([['read', 0, 4096]]);
    s.gate = null;
    open();
    await Promise.all([a, b]);
    expect(s.log.map((l) => l[0])).toEqual(['read', 'write', 'write']);
    expect(s.data.subarray(0, 4096).every((x) => x === 0xbb)).toBe(true);
  });
});

describe('serialising on demand', () => {
  it('a SERIALISING request waits for earlier overlapping ones and later ones wait for it', async () => {
    const { blk, s } = await memBackend();
    let open!: () => void;
    s.gate = new Promise((r) => (open = r));
    const first = blk.write(0, Buffer.alloc(4096, 1));
    const ser = blk.write(2048, Buffer.alloc(4096, 2), ReqFlags.SERIALISING);
    const after = blk.read(4096, 10);
    const apart = blk.read(65536, 10);
    await new Promise((r) => setTimeout(r, 10));
    // Only the first write and the non-overlapping read got to the driver.
    expect(s.log).toEqual([
      ['write', 0, 4096],
      ['read', 65536, 10],
    ]);
    s.gate = null;
    open();
    await Promise.all([first, ser, after, apart]);
    expect(s.log.map((l) => l[0])).toEqual(['write', 'read', 'write', 'read']);
    expect(s.data[2048]).toBe(2);
  });
});

describe('length, truncate, makeEmpty', () => {
  it('a failed write does not grow the node but still marks bitmaps dirty', async () => {
    const g = testGraph();
    const n = await g.open({ driver: 'test-mem', size: 4096 });
    const { addDirtyBitmap } = await import('../src/index');
    const bm = addDirtyBitmap(n, { granularity: 512 });
    n.driver = {
      ...n.driver,
      write: async () => {
        throw Object.assign(new Error('disk on fire'), { code: 'EIO' });
      },
    };
    const blk = new BlockBackend(g, { perm: RW, allowBeyondEof: true });
    blk.attach(n);
    await expectBlockError(blk.write(4096, Buffer.alloc(512)), /disk on fire/);
    expect(n.length).toBe(4096);
    expect(bm.count()).toBe(0); // beyond the bitmap's length: nothing to mark
    const e = await expectBlockError(blk.write(0, Buffer.alloc(512)), /disk on fire/);
    expect(e.errno).toBe('EIO');
    expect(bm.count()).toBe(512);
  });

  it('grows the length on writes past the end of a protocol node and truncates with RESIZE', async () => {
    const f = makeTempDir().file('d.img');
    writeFileSync(f, Buffer.alloc(4096));
    const g = createGraph();
    const n = await g.open({ driver: 'file', filename: f });
    const blk = new BlockBackend(g, { perm: RW | Perm.RESIZE, allowBeyondEof: true });
    blk.attach(n);
    await blk.write(8192, Buffer.alloc(512, 1));
    expect(n.length).toBe(8704);
    let resized = 0;
    blk.dev = { resized: () => resized++ };
    await blk.truncate(1 << 20);
    expect(n.length).toBe(1 << 20);
    expect(statSync(f).size).toBe(1 << 20);
    expect(resized).toBe(1);
    await expectBlockError(blk.truncate(-1), /Image size cannot be negative/);
  });

  it('rounds file lengths up to 512 like QEMU and reads the tail as zeroes', async () => {
    const f = makeTempDir().file('odd.img');
    writeFileSync(f, Buffer.alloc(1000, 9));
    const g = createGraph();
    const n = await g.open({ driver: 'file', filename: f, 'read-only': true });
    expect(n.length).toBe(1024);
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    blk.attach(n);
    const b = await blk.read(990, 34);
    expect([...b.subarray(0, 10)]).toEqual(Array(10).fill(9));
    expect(b.subarray(10).every((x) => x === 0)).toBe(true);
  });

  it('makeEmpty needs driver support', async () => {
    const { blk } = await memBackend();
    await expectBlockError(blk.makeEmpty(), /does not support emptying images/);
    const g = testGraph();
    const c = await g.open({ driver: 'test-cow' });
    const cb = new BlockBackend(g, { perm: RW, shared: PERM_ALL });
    cb.attach(c);
    await cb.write(0, Buffer.alloc(4096, 5));
    await cb.makeEmpty();
    expect((await cb.read(0, 4096)).every((x) => x === 0)).toBe(true);
  });
});

describe('drain across graph changes', () => {
  it('releases the backends it held even after they moved to another node', async () => {
    const g = testGraph();
    const a = await g.open({ driver: 'test-mem', 'node-name': 'a' });
    const b = await g.open({ driver: 'test-mem', 'node-name': 'b' });
    const blk = new BlockBackend(g, { perm: RW });
    blk.attach(a);
    await g.drainBegin(a);
    await g.replaceNode(a, b);
    let done = false;
    const held = blk.read(0, 1).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(done).toBe(false);
    g.drainEnd(a);
    await held;
    expect(done).toBe(true);
  });
});

describe('RangeLock', () => {
  it('a waiter for several earlier locks gets through when they end in any order', async () => {
    const { RangeLock } = await import('../src/index');
    const lock = new RangeLock();
    const a = await lock.lock(0, 10);
    const b = await lock.lock(20, 10);
    let got = false;
    const c = lock.lock(0, 30).then((u) => {
      got = true;
      return u;
    });
    b(); // the second one ends first, before the waiter looks at it
    await new Promise((r) => setTimeout(r, 5));
    expect(got).toBe(false);
    a();
    (await c)();
    expect(got).toBe(true);
  });
});
