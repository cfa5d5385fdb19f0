/**
 * The secondary's replication node owns its edges to the hidden and secondary disks (children
 * "hidden disk" and "secondary disk", as QEMU attaches them on start): a checkpoint empties the
 * hidden disk through its edge, and a failover that collapsed the chain drops them.
 */
import type { BlockBackend } from '@blockrep/block';
import { afterEach, describe, expect, it } from 'vitest';
import { type Env, makeEnv, namedBackend, startSecondary, writePattern } from './helpers';

let env: Env;
afterEach(async () => {
  await env.graph.closeAll();
});

const childNames = (env: Env) =>
  env.repl
    .all()[0]!
    .node.children.map((c) => c.name)
    .sort();

describe('replication node edges', () => {
  it('start attaches the hidden and secondary disks; a failover that collapsed the chain drops them', async () => {
    env = makeEnv();
    const { localBlk } = await startSecondary(env);
    const s = env.repl.all()[0]!;
    const disk = localBlk.node;
    expect(childNames(env)).toEqual(['file']);
    await env.repl.startAll('secondary');
    expect(childNames(env)).toEqual(['file', 'hidden disk', 'secondary disk']);
    const hidden = s.node.file!.node.backing!.node;
    expect(s.hiddenDisk!.node).toBe(hidden);
    // The backup's copy-before-write filter took the secondary disk's place for all its parents,
    // this edge too (as bdrv_replace_node does); below it is the disk.
    expect(s.secondaryDisk!.node.driver.name).toBe('copy-before-write');
    expect(s.secondaryDisk!.node.filtered!.node).toBe(disk);
    await env.repl.stopAll(true);
    await env.repl.waitFailover(s);
    expect(s.stage).toBe('done');
    // As soon as it is done: no error left from the backup job's cancel.
    expect(env.repl.query()).toEqual([{ 'node-name': s.node.nodeName, mode: 'secondary', stage: 'done' }]);
    expect(childNames(env)).toEqual(['file']);
    expect(s.node.file!.node).toBe(disk);
  });

  it('a checkpoint empties the hidden disk through its edge, with no BlockBackend of its own', async () => {
    env = makeEnv();
    const { topBlk, localBlk } = await startSecondary(env);
    await env.repl.startAll('secondary');
    await writePattern(localBlk, 0x22, 0, 1 << 20);
    const hidden = env.repl.all()[0]!.hiddenDisk!.node;
    expect(hidden.driver.name).toBe('qcow2');
    const added: BlockBackend[] = [];
    const add = env.graph.backends.add.bind(env.graph.backends);
    env.graph.backends.add = (b: BlockBackend) => {
      added.push(b);
      return add(b);
    };
    await env.repl.checkpointAll();
    expect(added).toEqual([]);
    // The hidden disk is empty again: the secondary VM now sees the primary's write.
    const buf = await topBlk.read(0, 1 << 20);
    expect(buf.equals(Buffer.alloc(1 << 20, 0x22))).toBe(true);
    await env.repl.stopAll(true);
    await env.repl.waitFailover(env.repl.all()[0]!);
  });

  it('a start that fails leaves no edge behind, and a later start works', async () => {
    env = makeEnv();
    await startSecondary(env, { topId: 'later-top' });
    const s = env.repl.all()[0]!;
    const hidden = s.node.file!.node.backing!.node;
    const readOnlyBefore = hidden.readOnly;
    await expect(env.repl.startAll('secondary')).rejects.toThrow('No top_bs or it is invalid');
    expect(childNames(env)).toEqual(['file']);
    expect(hidden.readOnly).toBe(readOnlyBefore);
    expect(s.stage).toBe('none');
    // The top comes into being; replication starts.
    namedBackend(env.graph, 'later-top', s.node);
    await env.repl.startAll('secondary');
    expect(childNames(env)).toEqual(['file', 'hidden disk', 'secondary disk']);
    expect(s.stage).toBe('running');
    await env.repl.stopAll(true);
    await env.repl.waitFailover(s);
  });
});
