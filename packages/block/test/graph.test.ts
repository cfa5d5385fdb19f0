import { writeFileSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { BlockBackend, BlockError, ChildRole, createGraph, PERM_ALL, Perm } from '../src/index';
import { expectBlockError, memDriver, testGraph } from './helpers';

function rawFile(size = 1 << 20): string {
  const f = makeTempDir().file('disk.img');
  writeFileSync(f, Buffer.alloc(size));
  return f;
}

describe('node names', () => {
  it('gives unnamed nodes #block<N> names and keeps given ones', async () => {
    const g = createGraph();
    const a = await g.open({ driver: 'null-co' });
    const b = await g.open({ driver: 'null-co', 'node-name': 'disk-0.a_b' });
    expect(a.nodeName).toMatch(/^#block\d+$/);
    expect(a.autoNamed).toBe(true);
    expect(b.nodeName).toBe('disk-0.a_b');
    expect(g.getNode('disk-0.a_b')).toBe(b);
  });

  it('refuses bad, long and duplicate names with QEMU texts', async () => {
    const g = createGraph();
    await g.open({ driver: 'null-co', 'node-name': 'n0' });
    await expectBlockError(g.open({ driver: 'null-co', 'node-name': '0abc' }), /^Invalid node-name: '0abc'$/);
    await expectBlockError(g.open({ driver: 'null-co', 'node-name': 'a b' }), /Invalid node-name/);
    await expectBlockError(
      g.open({ driver: 'null-co', 'node-name': `a${'b'.repeat(31)}` }),
      /^Node name too long$/,
    );
    expect(await g.open({ driver: 'null-co', 'node-name': `a${'b'.repeat(30)}` })).toBeTruthy();
    await expectBlockError(
      g.open({ driver: 'null-co', 'node-name': 'n0' }),
      /^Duplicate nodes with node-name='n0'$/,
    );
  });

  it('requires node-name for blockdev-add', async () => {
    await expectBlockError(createGraph().blockdevAdd({ driver: 'null-co' }), /'node-name' must be specified/);
  });
});

describe('opening from options', () => {
  it('opens nested options, references and key=value text alike', async () => {
    const f = rawFile();
    const g = createGraph();
    const nested = await g.open({
      driver: 'raw',
      'node-name': 'r1',
      file: { driver: 'file', filename: f, 'node-name': 'f1' },
    });
    expect(nested.file!.node.nodeName).toBe('f1');
    expect(nested.file!.role & ChildRole.FILTERED).toBeTruthy();
    const f2 = await g.open({ driver: 'file', filename: f, 'node-name': 'f2', 'read-only': true });
    const ref = await g.open({ driver: 'raw', 'node-name': 'r2', file: 'f2', 'read-only': true });
    expect(ref.file!.node).toBe(f2);
    const comma = makeTempDir().file('a,b.img');
    writeFileSync(comma, Buffer.alloc(4096));
    const kv = await g.open(
      `driver=raw,node-name=r3,file.driver=file,file.filename=${comma.replace(/,/g, ',,')}`,
    );
    expect(kv.file!.node.filename).toBe(comma);
    expect(kv.length).toBe(4096);
    // A bare filename means the file protocol, as in QEMU's -drive options.
    const bare = await g.open(`driver=raw,file.filename=${f}`);
    expect(bare.file!.node.driver.name).toBe('file');
  });

  it('names unknown options, unknown drivers and missing files', async () => {
    const g = createGraph();
    const f = rawFile();
    await expectBlockError(
      g.open({ driver: 'raw', foo: 1, file: { driver: 'file', filename: f } }),
      /^Block format 'raw' does not support the option 'foo'$/,
    );
    await expectBlockError(
      g.open({ driver: 'raw', file: { driver: 'file', filename: f, bar: 'x' } }),
      /^Block protocol 'file' doesn't support the option 'bar'$/,
    );
    await expectBlockError(g.open({ driver: 'nope' }), /^Parameter 'driver' does not accept value 'nope'$/);
    await expectBlockError(g.open({ driver: 'file' }), /^Parameter 'filename' is missing$/);
    await expectBlockError(
      g.open({ driver: 'file', filename: '/nonexistent/x' }),
      /^Could not open '\/nonexistent\/x': No such file or directory$/,
    );
    await expectBlockError(
      g.open({ driver: 'raw', file: 'missing' }),
      /^Cannot find device='missing' nor node-name='missing'$/,
    );
    await expectBlockError(
      g.open({ driver: 'null-co', size: 'big' }),
      /^Parameter 'size' expects a non-negative number/,
    );
    // A failed open leaves nothing behind.
    expect(g.allNodes()).toHaveLength(0);
  });

  it('inherits read-only into nested children and checks raw windows', async () => {
    const g = createGraph();
    const f = rawFile(8192);
    const r = await g.open({ driver: 'raw', 'read-only': true, file: { driver: 'file', filename: f } });
    expect(r.file!.node.readOnly).toBe(true);
    await expectBlockError(
      g.open({ driver: 'raw', size: 8192, offset: 512, file: { driver: 'file', filename: f } }),
      /The sum of offset \(512\) and size \(8192\) has to be smaller or equal/,
    );
    const w = await g.open({ driver: 'raw', size: 4096, offset: 512, file: { driver: 'file', filename: f } });
    expect(w.length).toBe(4096);
  });
});

describe('permissions', () => {
  it('a conflicting backend is refused with both users named, and nothing changes', async () => {
    const g = createGraph();
    const n = await g.open({ driver: 'null-co', 'node-name': 'disk' });
    const a = new BlockBackend(g, {
      name: 'a',
      perm: Perm.CONSISTENT_READ | Perm.WRITE,
      shared: Perm.CONSISTENT_READ,
    });
    a.attach(n);
    const b = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: PERM_ALL });
    const e = await expectBlockError(() => b.attach(n), /Permission conflict on node 'disk'/);
    expect(e.message).toBe(
      "Permission conflict on node 'disk': permissions 'write' are both required by an unnamed block device (uses node 'disk' as 'root' child) and unshared by block device 'a' (uses node 'disk' as 'root' child).",
    );
    expect(b.root).toBeNull();
    expect(n.parents).toHaveLength(1);
    // A reader that shares everything is fine.
    const c = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    c.attach(n);
    expect(n.parents).toHaveLength(2);
  });

  it('a format takes write on its file only when writable, and no one else may write under it', async () => {
    const g = testGraph();
    const f = await g.open({ driver: 'test-mem', 'node-name': 'f' });
    const fmt = await g.open({ driver: 'raw', 'node-name': 'fmt', file: 'f' });
    const blk = new BlockBackend(g, {
      perm: Perm.CONSISTENT_READ | Perm.WRITE,
      shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
    });
    blk.attach(fmt);
    expect(fmt.file!.perm & Perm.WRITE).toBeTruthy();
    const other = new BlockBackend(g, { perm: Perm.WRITE });
    await expectBlockError(
      () => other.attach(f),
      /permissions 'write' are both required by an unnamed block device .* and unshared by node 'fmt'/,
    );
    expect(f.parents).toHaveLength(1);
  });

  it('a failed graph change restores every edge and permission exactly', async () => {
    const g = testGraph();
    const base = await g.open({ driver: 'test-mem', 'node-name': 'base' });
    const top = await g.open({ driver: 'test-cow', 'node-name': 'top', backing: 'base' });
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: PERM_ALL });
    blk.attach(top);
    // The overlay's user copes with changing data, so the backing file may have another writer.
    const writer = new BlockBackend(g, { perm: Perm.WRITE, shared: PERM_ALL });
    writer.attach(base);
    const snapshot = () => [
      top.backing!.perm,
      top.backing!.shared,
      blk.root!.perm,
      blk.root!.shared,
      base.parents.length,
    ];
    const before = snapshot();
    // No longer sharing write on top makes the backing edge unshare write: conflict two levels down.
    await expectBlockError(
      () => blk.setPerm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ),
      /Permission conflict on node 'base': permissions 'write' are both required by an unnamed block device .* and unshared by node 'top' \(uses node 'base' as 'backing' child\)/,
    );
    expect(snapshot()).toEqual(before);
    expect(blk.shared).toBe(PERM_ALL);
  });

  it('a change recomputes only the nodes it touched and those below them', async () => {
    const g = testGraph();
    const applied: string[] = [];
    g.registerDriver({ ...memDriver, name: 'test-seen', applyPerm: (n) => void applied.push(n.nodeName) });
    for (const n of ['a', 'b']) await g.open({ driver: 'test-seen', 'node-name': n });
    const fa = await g.open({ driver: 'raw', 'node-name': 'fa', file: 'a' });
    await g.open({ driver: 'raw', 'node-name': 'fb', file: 'b' });
    applied.length = 0;
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(fa);
    expect(applied).toEqual(['a']);
    expect(g.lookup('a').cumulativePerm()[0] & Perm.WRITE).toBe(Perm.WRITE);
    expect(g.lookup('b').cumulativePerm()[0] & Perm.WRITE).toBe(0);
    applied.length = 0;
    blk.setPerm(Perm.CONSISTENT_READ, PERM_ALL);
    expect(applied).toEqual(['a']);
    expect(g.lookup('a').cumulativePerm()[0] & Perm.WRITE).toBe(0);
  });

  it('refuses cycles and write perms on read-only nodes', async () => {
    const g = testGraph();
    const a = await g.open({ driver: 'test-cow', 'node-name': 'a' });
    const b = await g.open({ driver: 'test-cow', 'node-name': 'b', backing: 'a' });
    expect(() => g.attachChild(a, b, 'backing', ChildRole.COW)).toThrow(
      "Making 'b' a child of 'a' would create a cycle",
    );
    const ro = await g.open({ driver: 'null-co', 'node-name': 'ro', 'read-only': true });
    const w = new BlockBackend(g, { perm: Perm.WRITE });
    expect(() => w.attach(ro)).toThrow(/Block node is read-only/);
  });

  it('force-share requires read-only', async () => {
    await expectBlockError(
      createGraph().open({ driver: 'null-co', 'force-share': true }),
      /force-share=on can only be used with read-only/,
    );
  });
});

describe('replacing nodes', () => {
  it('moves every parent to the new node, or none on conflict', async () => {
    const g = testGraph();
    const a = await g.open({ driver: 'test-mem', 'node-name': 'a' });
    const b = await g.open({ driver: 'test-mem', 'node-name': 'b' });
    const top = await g.open({ driver: 'raw', 'node-name': 'top', file: 'a' });
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: PERM_ALL });
    blk.attach(a);
    await g.replaceNode(a, b);
    expect(top.file!.node).toBe(b);
    expect(blk.node).toBe(b);
    expect(a.parents).toHaveLength(0);
    // A user of c that shares nothing makes moving b's parents onto c fail as a whole.
    const c = await g.open({ driver: 'test-mem', 'node-name': 'c' });
    const excl = new BlockBackend(g, {
      perm: Perm.CONSISTENT_READ | Perm.WRITE,
      shared: Perm.CONSISTENT_READ,
    });
    excl.attach(c);
    await expectBlockError(g.replaceNode(b, c), /Permission conflict on node 'c'/);
    expect(top.file!.node).toBe(b);
    expect(blk.node).toBe(b);
    expect(c.parents).toHaveLength(1);
    // A filter opened above b keeps its own edge to b when it takes b's place.
    const f = await g.open({ driver: 'raw', 'node-name': 'filt', file: 'b' });
    await g.replaceNode(b, f);
    expect(f.file!.node).toBe(b);
    expect(blk.node).toBe(f);
    await g.replaceNode(f, b);
    expect(blk.node).toBe(b);
    // except keeps chosen parents where they are.
    await excl.detach();
    await g.replaceNode(b, c, [blk.root!]);
    expect(top.file!.node).toBe(c);
    expect(blk.node).toBe(b);
  });
});

describe('lifetime', () => {
  it('blockdev-del refuses nodes in use and closes unused ones with their implicit children', async () => {
    const g = createGraph();
    const f = rawFile();
    await g.blockdevAdd({
      driver: 'raw',
      'node-name': 'disk',
      file: { driver: 'file', filename: f, 'node-name': 'proto' },
    });
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ });
    blk.attach(g.findNode('disk'));
    await expectBlockError(g.blockdevDel('disk'), /^Node disk is in use$/);
    await expectBlockError(g.blockdevDel('proto'), /^Node proto is not owned by the monitor$/);
    await expectBlockError(g.blockdevDel('nosuch'), /^Failed to find node with node-name='nosuch'$/);
    await blk.detach();
    await g.blockdevDel('disk');
    expect(g.getNode('disk')).toBeUndefined();
    expect(g.getNode('proto')).toBeUndefined();
  });

  it('a node referenced by another stays open until its user goes', async () => {
    const g = createGraph();
    await g.blockdevAdd({ driver: 'null-co', 'node-name': 'base' });
    await g.blockdevAdd({ driver: 'raw', 'node-name': 'top', file: 'base' });
    await expectBlockError(g.blockdevDel('base'), /^Block device base is in use$/);
    await g.blockdevDel('top');
    expect(g.getNode('base')).toBeDefined();
    await g.blockdevDel('base');
    expect(g.allNodes()).toHaveLength(0);
  });

  it('BlockBackend names are unique and share the node namespace', async () => {
    const g = createGraph();
    await g.open({ driver: 'null-co', 'node-name': 'n' });
    new BlockBackend(g, { name: 'dev', perm: 0 });
    expect(() => new BlockBackend(g, { name: 'dev', perm: 0 })).toThrow(BlockError);
    expect(() => new BlockBackend(g, { name: 'n', perm: 0 })).toThrow(/conflicts with an existing node name/);
    await expectBlockError(
      g.open({ driver: 'null-co', 'node-name': 'dev' }),
      /node-name=dev is conflicting with a device id/,
    );
  });
});
