import { writeFileSync } from 'node:fs';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import {
  BlockBackend,
  BlockOp,
  blockAllOps,
  blockOp,
  ChildRole,
  createGraph,
  opBlocked,
  Perm,
  unblockAllOps,
} from '../src/index';
import { expectBlockError } from './helpers';

function file(): string {
  const f = makeTempDir().file('d.img');
  writeFileSync(f, Buffer.alloc(65536));
  return f;
}

describe('reopen', () => {
  it('switches several nodes read-only -> read-write at once, then back', async () => {
    const g = createGraph();
    const a = await g.open({ driver: 'raw', 'read-only': true, file: { driver: 'file', filename: file() } });
    const b = await g.open({ driver: 'raw', 'read-only': true, file: { driver: 'file', filename: file() } });
    // The file children inherited read-only from their parents, so they follow them.
    await g.reopenMultiple([
      { node: a, readOnly: false },
      { node: b, readOnly: false },
    ]);
    expect([a.readOnly, b.readOnly, a.file!.node.readOnly]).toEqual([false, false, false]);
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(a);
    await blk.write(0, Buffer.from('now writable'));
    expect((await blk.read(0, 12)).toString()).toBe('now writable');
    // Going read-only while a user writes fails and leaves everything as it was.
    await expectBlockError(g.reopenMultiple([{ node: a, readOnly: true }]), /Block node is read-only/);
    expect(a.readOnly).toBe(false);
    await blk.write(0, Buffer.from('still'));
    await blk.detach();
    await g.reopenMultiple([{ node: b, readOnly: true }]);
    expect(b.readOnly).toBe(true);
  });

  it('fails as a whole when one file cannot be reopened writable', async () => {
    const g = createGraph();
    const f = file();
    const a = await g.open({ driver: 'file', filename: f, 'read-only': true });
    const b = await g.open({ driver: 'file', filename: file(), 'read-only': true });
    (b.opaque as { filename: string }).filename = '/nonexistent/file';
    await expectBlockError(
      g.reopenMultiple([
        { node: a, readOnly: false },
        { node: b, readOnly: false },
      ]),
      /Could not open '\/nonexistent\/file'/,
    );
    expect([a.readOnly, b.readOnly]).toEqual([true, true]);
  });

  it('is not an operation op blockers stop (QEMU reopens busy backing files writable)', async () => {
    const g = createGraph();
    const a = await g.open({ driver: 'null-co', 'node-name': 'a', 'read-only': true });
    blockOp(a, BlockOp.CHANGE, new Error('Block device is in use by internal backup job'));
    await g.reopenMultiple([{ node: a, readOnly: false }]);
    expect(a.readOnly).toBe(false);
  });
});

describe('op blockers', () => {
  it('block with a reason, stack reasons, and unblock', async () => {
    const g = createGraph();
    const n = await g.blockdevAdd({ driver: 'null-co', 'node-name': 'top' });
    const r1 = new Error('Block device is in use by internal backup job');
    blockAllOps(n, r1);
    expect(opBlocked(n, BlockOp.DATAPLANE)?.message).toBe(
      "Node 'top' is busy: Block device is in use by internal backup job",
    );
    await expectBlockError(g.blockdevDel('top'), /Node 'top' is busy/);
    unblockAllOps(n, r1);
    expect(opBlocked(n, BlockOp.DRIVE_DEL)).toBeNull();
    await g.blockdevDel('top');
  });
});

describe('the backing blocker', () => {
  it('makes a backing file busy for all but commit into it, stream and backup; the newest reason is told', async () => {
    const g = createGraph();
    const top = await g.blockdevAdd({ driver: 'null-co', 'node-name': 'top' });
    const base = await g.blockdevAdd({ driver: 'null-co', 'node-name': 'base' });
    const edge = g.attachChild(top, base, 'backing', ChildRole.COW);
    expect(opBlocked(base, BlockOp.RESIZE)?.message).toBe(
      "Node 'base' is busy: node is used as backing hd of 'top'",
    );
    expect(opBlocked(base, BlockOp.EXTERNAL_SNAPSHOT)).not.toBeNull();
    for (const op of [BlockOp.COMMIT_TARGET, BlockOp.STREAM, BlockOp.BACKUP_SOURCE, BlockOp.BACKUP_TARGET])
      expect(opBlocked(base, op)).toBeNull();
    expect(opBlocked(top, BlockOp.RESIZE)).toBeNull();
    blockAllOps(base, new Error('block device is in use by block job: commit'));
    expect(opBlocked(base, BlockOp.RESIZE)?.message).toBe(
      "Node 'base' is busy: block device is in use by block job: commit",
    );
    await g.detachChild(edge);
    expect(opBlocked(base, BlockOp.STREAM)?.message).toMatch(/block job: commit/);
    expect(opBlocked(base, BlockOp.EXTERNAL_SNAPSHOT)?.message).not.toMatch(/backing hd/);
  });
});
