import { closeSync, openSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { BlockBackend, type BlockError, type BlockGraph, createGraph, Perm } from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { filterDrivers } from '../src/index';

const SIZE = 1 << 20;
const RW = Perm.CONSISTENT_READ | Perm.WRITE;

function files(n: number): string[] {
  const d = makeTempDir();
  return Array.from({ length: n }, (_, i) => {
    const f = d.file(`c${i}.img`);
    writeFileSync(f, '');
    truncateSync(f, SIZE); // sparse: reads as zeroes, reports holes
    return f;
  });
}

/** A graph with children c0..c(n-1) as raw-over-file nodes, and a way to write one directly. */
async function setup(n: number) {
  const g = createGraph(filterDrivers);
  const events: [string, Record<string, unknown>][] = [];
  g.onEvent((name, data) => events.push([name, data]));
  const paths = files(n);
  for (let i = 0; i < n; i++) {
    await g.blockdevAdd({
      driver: 'raw',
      'node-name': `c${i}`,
      file: { driver: 'file', filename: paths[i]! },
    });
  }
  // Corruption from outside the graph: straight into the child's file.
  const direct = async (i: number, offset: number, data: Buffer) => {
    const fd = openSync(paths[i]!, 'r+');
    writeSync(fd, data, 0, data.length, offset);
    closeSync(fd);
  };
  return { g, events, direct, paths };
}

async function openQuorum(g: BlockGraph, opts: Record<string, unknown>) {
  const q = await g.blockdevAdd({ driver: 'quorum', 'node-name': 'q', ...opts });
  const blk = new BlockBackend(g, { perm: RW });
  blk.attach(q);
  return { q, blk };
}

async function err(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    return e as BlockError;
  }
  throw new Error('expected an error');
}

describe('quorum options', () => {
  it('validates children, threshold, blkverify and rewrite-corrupted with QEMU texts', async () => {
    const { g } = await setup(3);
    const c = ['c0', 'c1', 'c2'];
    expect((await err(g.open({ driver: 'quorum', children: [], 'vote-threshold': 1 }))).message).toBe(
      'Number of provided children must be 1 or more',
    );
    expect((await err(g.open({ driver: 'quorum', children: c, 'vote-threshold': 0 }))).message).toBe(
      "Parameter 'vote-threshold' expects a value >= 1",
    );
    expect((await err(g.open({ driver: 'quorum', children: c, 'vote-threshold': 4 }))).message).toBe(
      'threshold may not exceed children count',
    );
    expect(
      (await err(g.open({ driver: 'quorum', children: c, 'vote-threshold': 2, blkverify: true }))).message,
    ).toBe('blkverify=on can only be set if there are exactly two files and vote-threshold is 2');
    expect(
      (
        await err(
          g.open({
            driver: 'quorum',
            children: ['c0', 'c1'],
            'vote-threshold': 2,
            blkverify: true,
            'rewrite-corrupted': true,
          }),
        )
      ).message,
    ).toBe('rewrite-corrupted=on cannot be used with blkverify=on');
    expect((await err(g.open({ driver: 'quorum', children: c }))).message).toBe(
      "Parameter 'vote-threshold' is missing",
    );
    expect(
      (await err(g.open({ driver: 'quorum', children: c, 'vote-threshold': 1, 'read-pattern': 'x' })))
        .message,
    ).toBe("Parameter 'read-pattern' does not accept value 'x'");
    // Nothing was left attached by the failed opens.
    expect(g.findNode('c0').parents).toHaveLength(0);
  });
});

describe('quorum I/O', () => {
  it('writes to every child and reads the majority version, reporting the odd one out', async () => {
    const { g, events, direct } = await setup(3);
    const { blk } = await openQuorum(g, { children: ['c0', 'c1', 'c2'], 'vote-threshold': 2 });
    await blk.write(4096, Buffer.alloc(4096, 0x11));
    for (const i of [0, 1, 2]) {
      const b = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
      b.attach(g.findNode(`c${i}`));
      expect((await b.read(4096, 4096)).every((x) => x === 0x11)).toBe(true);
      await b.detach();
    }
    await direct(0, 4096, Buffer.alloc(4096, 0x66)); // corrupt the first child
    expect((await blk.read(4096, 4096)).every((x) => x === 0x11)).toBe(true);
    expect(events).toContainEqual([
      'QUORUM_REPORT_BAD',
      { type: 'read', 'node-name': 'c0', 'sector-num': 8, 'sectors-count': 8 },
    ]);
  });

  it('fails a read with EIO and QUORUM_FAILURE when no version has enough votes', async () => {
    const { g, events, direct } = await setup(3);
    const { blk } = await openQuorum(g, { children: ['c0', 'c1', 'c2'], 'vote-threshold': 2 });
    await direct(0, 0, Buffer.alloc(512, 1));
    await direct(1, 0, Buffer.alloc(512, 2));
    await direct(2, 0, Buffer.alloc(512, 3));
    const e = await err(blk.read(0, 512));
    expect(e.errno).toBe('EIO');
    expect(events).toContainEqual([
      'QUORUM_FAILURE',
      { reference: 'q', 'sector-num': 0, 'sectors-count': 1 },
    ]);
  });

  it('rewrite-corrupted repairs the children that lost the vote', async () => {
    const { g, direct } = await setup(3);
    const { blk } = await openQuorum(g, {
      children: ['c0', 'c1', 'c2'],
      'vote-threshold': 2,
      'rewrite-corrupted': true,
    });
    await blk.write(0, Buffer.alloc(1024, 7));
    await direct(2, 0, Buffer.alloc(1024, 9));
    expect((await blk.read(0, 1024)).every((x) => x === 7)).toBe(true);
    const b = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    b.attach(g.findNode('c2'));
    expect((await b.read(0, 1024)).every((x) => x === 7)).toBe(true);
  });

  it('blkverify fails reads whose contents differ', async () => {
    const { g, direct } = await setup(2);
    const { blk } = await openQuorum(g, { children: ['c0', 'c1'], 'vote-threshold': 2, blkverify: true });
    await direct(1, 100, Buffer.from([5]));
    const e = await err(blk.read(0, 512));
    expect(e.message).toBe('quorum: offset=0 bytes=512 contents mismatch at offset 100');
  });

  it('writes succeed while threshold children succeed, and fail with the voted error below it', async () => {
    const { g, events, paths } = await setup(2);
    await g.blockdevAdd({
      driver: 'blkdebug',
      'node-name': 'bad',
      image: { driver: 'raw', file: { driver: 'file', filename: paths[1]! } },
      'inject-error': [{ event: 'write_aio', errno: 28 }],
    });
    const { blk } = await openQuorum(g, { children: ['c0', 'bad'], 'vote-threshold': 1 });
    await blk.write(0, Buffer.alloc(512, 1));
    expect(events).toContainEqual([
      'QUORUM_REPORT_BAD',
      {
        type: 'write',
        error: 'No space left on device',
        'node-name': 'bad',
        'sector-num': 0,
        'sectors-count': 1,
      },
    ]);
    const g2 = await setup(2);
    await g2.g.blockdevAdd({
      driver: 'blkdebug',
      'node-name': 'bad',
      image: 'c1',
      'inject-error': [{ event: 'write_aio', errno: 28 }],
    });
    const { blk: b2 } = await openQuorum(g2.g, { children: ['c0', 'bad'], 'vote-threshold': 2 });
    const e = await err(b2.write(0, Buffer.alloc(512, 1)));
    expect(e.errno).toBe('ENOSPC');
    expect(g2.events.some(([n]) => n === 'QUORUM_FAILURE')).toBe(true);
  });

  it('fifo reads the first child and falls through on error', async () => {
    const { g, events, direct } = await setup(2);
    await g.blockdevAdd({
      driver: 'blkdebug',
      'node-name': 'bad',
      image: 'c0',
      'inject-error': [{ event: 'read_aio' }],
    });
    await direct(1, 0, Buffer.alloc(512, 4));
    const { blk } = await openQuorum(g, {
      children: ['bad', 'c1'],
      'vote-threshold': 1,
      'read-pattern': 'fifo',
    });
    expect((await blk.read(0, 512)).every((x) => x === 4)).toBe(true);
    expect(events[0]).toEqual([
      'QUORUM_REPORT_BAD',
      { type: 'read', error: 'Input/output error', 'node-name': 'bad', 'sector-num': 0, 'sectors-count': 1 },
    ]);
  });

  it('reports zeroes only where every child reads zeroes', async () => {
    const { g, direct } = await setup(2);
    const { blk } = await openQuorum(g, { children: ['c0', 'c1'], 'vote-threshold': 1 });
    await direct(1, 65536, Buffer.alloc(4096, 1));
    expect(await blk.blockStatus(65536, 4096)).toMatchObject({ data: true, zero: false });
    expect(await blk.blockStatus(0, 65536)).toMatchObject({ data: false, zero: true, bytes: 65536 });
  });
});

describe('x-blockdev-change', () => {
  it('adds a child as children.N and removes it again, with QEMU errors', async () => {
    const { g } = await setup(3);
    const { q, blk } = await openQuorum(g, { children: ['c0'], 'vote-threshold': 1, 'read-pattern': 'fifo' });
    g.addDriverChild(q, g.findNode('c1'));
    expect(q.children.map((c) => c.name)).toEqual(['children.0', 'children.1']);
    expect(() => g.addDriverChild(q, g.findNode('c1'))).toThrow('The node c1 already has a parent');
    expect(() => g.addDriverChild(g.findNode('c2'), g.findNode('c0'))).toThrow(
      'The node c2 does not support adding a child',
    );
    await blk.write(0, Buffer.alloc(512, 3));
    const b = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    b.attach(g.findNode('c1'));
    expect((await b.read(0, 512)).every((x) => x === 3)).toBe(true);
    await g.delDriverChild(q, q.child('children.1')!);
    expect(q.children.map((c) => c.name)).toEqual(['children.0']);
    await expect(g.delDriverChild(q, q.child('children.0')!)).rejects.toThrow(
      'The number of children cannot be lower than the vote threshold 1',
    );
    // The index is reused after the last child went away.
    g.addDriverChild(q, g.findNode('c2'));
    expect(q.children.map((c) => c.name)).toEqual(['children.0', 'children.1']);
  });
});
