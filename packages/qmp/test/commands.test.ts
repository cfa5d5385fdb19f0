import { existsSync, statSync, writeFileSync } from 'node:fs';
import { BlockBackend, type BlockGraph, createGraph, PERM_ALL, Perm } from '@blockrep/block';
import { JobManager } from '@blockrep/jobs';
import { createQcow2Image, qcow2Driver } from '@blockrep/qcow2';
import { makeTempDir, qemuImg } from '@blockrep/test-kit';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createBlockQmpServer, QmpClient, type QmpServer } from '../src/index';

let graph: BlockGraph;
let jobs: JobManager;
let server: QmpServer;
let qmp: QmpClient;
let dir: ReturnType<typeof makeTempDir>;

beforeEach(async () => {
  dir = makeTempDir('blockrep-qmp-cmd-');
  graph = createGraph();
  jobs = new JobManager();
  server = createBlockQmpServer({ graph, jobs }).server;
  const path = dir.file('qmp.sock');
  await server.listenUnix(path);
  qmp = await QmpClient.connect({ path });
});

afterEach(async () => {
  await qmp.close();
  await server.close();
  await jobs.cancelAll();
  await graph.closeAll();
});

/** The QmpError of a command that must fail. */
async function fails(cmd: string, args?: Record<string, unknown>): Promise<{ class: string; desc: string }> {
  try {
    await qmp.execute(cmd, args);
  } catch (e: any) {
    return { class: e.class, desc: e.desc };
  }
  throw new Error(`${cmd} succeeded`);
}

function image(size = 1 << 20): string {
  const p = dir.file(`img-${Math.random().toString(36).slice(2)}.raw`);
  writeFileSync(p, Buffer.alloc(0));
  writeFileSync(p, Buffer.alloc(size));
  return p;
}

describe('blockdev-add / blockdev-del / query-named-block-nodes', () => {
  it('adds raw over file and null-co, reports them as QEMU does, deletes in order', async () => {
    const f = image();
    expect(await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'f0', filename: f })).toEqual({});
    await qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'r0', file: 'f0' });
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 1048576 });
    const nodes = await qmp.execute('query-named-block-nodes');
    expect(nodes.map((n: any) => n['node-name'])).toEqual(['n0', 'r0', 'f0']);
    const [n0, r0, f0] = nodes;
    expect(n0).toMatchObject({
      drv: 'null-co',
      ro: false,
      file: 'json:{"driver": "null-co", "size": 1048576}',
      image: { 'virtual-size': 1048576, format: 'null-co', 'actual-size': 0 },
      backing_file_depth: 0,
      encrypted: false,
      detect_zeroes: 'off',
      cache: { writeback: true, direct: false, 'no-flush': false },
      write_threshold: 0,
      bps: 0,
      iops_wr: 0,
    });
    expect(n0.image['dirty-flag']).toBeUndefined();
    expect(r0).toMatchObject({
      drv: 'raw',
      file: f,
      image: { filename: f, format: 'raw', 'dirty-flag': false },
    });
    expect(f0).toMatchObject({
      drv: 'file',
      file: f,
      image: { filename: f, format: 'file', 'virtual-size': 1 << 20 },
    });
    expect(typeof f0.image['actual-size']).toBe('number');
    expect(await qmp.execute('query-named-block-nodes', { flat: true })).toEqual(nodes);

    expect(await fails('blockdev-del', { 'node-name': 'f0' })).toEqual({
      class: 'GenericError',
      desc: 'Block device f0 is in use',
    });
    expect(await fails('blockdev-del', { 'node-name': 'nope' })).toEqual({
      class: 'GenericError',
      desc: "Failed to find node with node-name='nope'",
    });
    await qmp.execute('blockdev-del', { 'node-name': 'r0' });
    await qmp.execute('blockdev-del', { 'node-name': 'f0' });
    await qmp.execute('blockdev-del', { 'node-name': 'n0' });
    expect(await qmp.execute('query-named-block-nodes')).toEqual([]);
    expect(await qmp.execute('query-block')).toEqual([]);
  });

  it('refuses bad arguments with the texts of QEMU 7.2', async () => {
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0' });
    const cases: [Record<string, unknown>, string][] = [
      [{ driver: 'null-co', 'node-name': 'n1', foo: 1 }, "Parameter 'foo' is unexpected"],
      [{ driver: 'nope', 'node-name': 'n1' }, "Parameter 'driver' does not accept value 'nope'"],
      [{ 'node-name': 'n1' }, "Parameter 'driver' is missing"],
      [{ driver: 'raw', 'node-name': 'r1' }, "Parameter 'file' is missing"],
      [
        { driver: 'raw', 'node-name': 'r1', file: { driver: 'file' } },
        "Parameter 'file.filename' is missing",
      ],
      [
        { driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: 5 } },
        "Invalid parameter type for 'file.filename', expected: string",
      ],
      [
        { driver: 'raw', 'node-name': 'r1', file: 5 },
        "Invalid parameter type for 'file', expected: BlockdevRef",
      ],
      [
        { driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: '/nonexist' } },
        "Could not open '/nonexist': No such file or directory",
      ],
      [{ driver: 'null-co', 'node-name': 'n0' }, "Duplicate nodes with node-name='n0'"],
      [{ driver: 'null-co' }, "'node-name' must be specified for the root node"],
      [{ driver: 'null-co', 'node-name': '1bad' }, "Invalid node-name: '1bad'"],
      [
        { driver: 'null-co', 'node-name': 'n2', 'read-only': 'yes' },
        "Invalid parameter type for 'read-only', expected: boolean",
      ],
      [
        { driver: 'null-co', 'node-name': 'n2', 'detect-zeroes': 'maybe' },
        "Parameter 'detect-zeroes' does not accept value 'maybe'",
      ],
      [
        { driver: 'null-co', 'node-name': 'n2', cache: { direct: 1 } },
        "Invalid parameter type for 'cache.direct', expected: boolean",
      ],
      [
        { driver: 'null-co', 'node-name': 'n2', size: 'big' },
        "Invalid parameter type for 'size', expected: integer",
      ],
      [
        { driver: 'file', 'node-name': 'n2', filename: '/tmp/x', aio: 'bogus' },
        "Parameter 'aio' does not accept value 'bogus'",
      ],
    ];
    for (const [args, desc] of cases) {
      expect(await fails('blockdev-add', args), JSON.stringify(args)).toEqual({
        class: 'GenericError',
        desc,
      });
    }
    expect(await fails('blockdev-del', {})).toEqual({
      class: 'GenericError',
      desc: "Parameter 'node-name' is missing",
    });
    expect(graph.allNodes().map((n) => n.nodeName)).toEqual(['n0']);
  });
});

describe('query-block', () => {
  it('lists named BlockBackends with their inserted node', async () => {
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 4096 });
    const unnamed = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ });
    unnamed.attach(graph.getNode('n0')!);
    const named = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ, name: 'drive0' });
    named.attach(graph.getNode('n0')!);
    const blocks = await qmp.execute('query-block');
    expect(blocks).toEqual([
      {
        device: 'drive0',
        locked: false,
        removable: false,
        type: 'unknown',
        inserted: expect.objectContaining({
          'node-name': 'n0',
          drv: 'null-co',
          image: expect.objectContaining({ 'virtual-size': 4096 }),
        }),
      },
    ]);
    expect((await fails('blockdev-del', { 'node-name': 'n0' })).desc).toBe('Node n0 is in use');
    await named.detach();
    await unnamed.detach();
  });
});

describe('blockdev-reopen', () => {
  it('switches read-only, implicit children follow, and refuses other changes', async () => {
    const f = image();
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': 'r0',
      file: { driver: 'file', filename: f },
    });
    const fileNode = graph.getNode('r0')!.file!.node;
    await qmp.execute('blockdev-reopen', {
      options: [
        { driver: 'raw', 'node-name': 'r0', 'read-only': true, file: { driver: 'file', filename: f } },
      ],
    });
    expect(graph.getNode('r0')!.readOnly).toBe(true);
    expect(fileNode.readOnly).toBe(true);
    const [info] = await qmp.execute('query-named-block-nodes');
    expect(info.ro).toBe(true);
    await qmp.execute('blockdev-reopen', {
      options: [{ driver: 'raw', 'node-name': 'r0', file: { driver: 'file', filename: f } }],
    });
    expect(graph.getNode('r0')!.readOnly).toBe(false);

    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 1048576 });
    const err = (options: unknown) => fails('blockdev-reopen', { options: options as any });
    expect(await err([{ driver: 'null-co', 'node-name': 'n0', 'read-only': true }])).toEqual({
      class: 'GenericError',
      desc: "Option 'size' cannot be reset to its default value",
    });
    expect(await err([{ driver: 'null-co', 'node-name': 'nq', 'read-only': true }])).toMatchObject({
      desc: "Failed to find node with node-name='nq'",
    });
    expect(await err([{ driver: 'null-co', 'read-only': true }])).toMatchObject({
      desc: 'node-name not specified',
    });
    expect(await err([{ driver: 'null-co', 'node-name': 'n0', size: 5 }])).toMatchObject({
      desc: "Cannot change the option 'size'",
    });
    expect(await err([{ driver: 'raw', 'node-name': 'n0' }])).toMatchObject({
      desc: "Parameter 'options[0].file' is missing",
    });
    expect(await err({})).toMatchObject({ desc: "Invalid parameter type for 'options', expected: array" });
    expect(graph.getNode('n0')!.readOnly).toBe(false);
  });

  it('replaces a child given by another node name, closing an implicit one left unused', async () => {
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n1', size: 8192 });
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': 'r1',
      file: { driver: 'null-co', size: 4096 },
    });
    const implicit = graph.getNode('r1')!.file!.node;
    const err = (o: unknown) => fails('blockdev-reopen', { options: [o] as any }).then((x) => x.desc);
    expect(await err({ driver: 'raw', 'node-name': 'r1', file: 'nonode' })).toBe(
      "Cannot find device='' nor node-name='nonode'",
    );
    expect(await err({ driver: 'raw', 'node-name': 'r1', file: 'r1' })).toBe(
      "Making 'r1' a file child of 'r1' would create a cycle",
    );
    await qmp.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'r1', file: 'n1' }] });
    const r1 = graph.getNode('r1')!;
    expect(r1.file!.node.nodeName).toBe('n1');
    expect(r1.length).toBe(8192);
    expect(implicit.closed).toBe(true);
    expect(graph.getNode(implicit.nodeName)).toBeUndefined();
    expect((await fails('blockdev-del', { 'node-name': 'n1' })).desc).toBe('Block device n1 is in use');
  });
});

describe('block_resize', () => {
  it('grows a qcow2 image and a raw node follows its file; bad sizes are refused', async () => {
    // A graph with the qcow2 driver, served on its own socket.
    await qmp.close();
    await server.close();
    graph = createGraph([qcow2Driver]);
    server = createBlockQmpServer({ graph, jobs }).server;
    await server.listenUnix(dir.file('qmp2.sock'));
    qmp = await QmpClient.connect({ path: dir.file('qmp2.sock') });
    const img = dir.file('r.qcow2');
    await createQcow2Image(img, { size: 1 << 20 });
    await qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'q0',
      file: { driver: 'file', filename: img },
    });
    await qmp.execute('block_resize', { 'node-name': 'q0', size: 4 << 20 });
    const raw = dir.file('r.raw');
    writeFileSync(raw, Buffer.alloc(65536));
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': 'r0',
      file: { driver: 'file', 'node-name': 'f0', filename: raw },
    });
    await qmp.execute('block_resize', { 'node-name': 'f0', size: 131072 });
    const sizes = Object.fromEntries(
      (await qmp.execute('query-named-block-nodes')).map((n: any) => [
        n['node-name'],
        n.image['virtual-size'],
      ]),
    );
    expect(sizes).toMatchObject({ q0: 4 << 20, r0: 131072, f0: 131072 });
    expect(statSync(raw).size).toBe(131072);
    expect((await fails('block_resize', { 'node-name': 'q0', size: -512 })).desc).toBe(
      "Parameter 'size' expects a >0 size",
    );
    await graph.closeAll();
    const info = JSON.parse((await qemuImg(['info', '--output=json', img])).stdout);
    expect(info['virtual-size']).toBe(4 << 20);
  });
});

describe('dirty bitmaps', () => {
  it('add, merge, clear, remove, with QEMU errors and info', async () => {
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 1048576 });
    const e = (cmd: string, args: Record<string, unknown>) => fails(cmd, args).then((x) => x.desc);
    const add = (args: Record<string, unknown>) =>
      e('block-dirty-bitmap-add', { node: 'n0', name: 'b0', ...args });
    expect(await add({ granularity: -1 })).toBe("Parameter 'granularity' expects uint32_t");
    expect(await add({ granularity: 1.5 })).toBe("Parameter 'granularity' expects uint64");
    expect(await add({ granularity: 'x' })).toBe("Parameter 'granularity' expects uint64");
    expect(await add({ granularity: 5000000000 })).toBe("Parameter 'granularity' expects uint32_t");
    expect(await add({ granularity: 1000 })).toBe('Granularity must be power of 2 and at least 512');
    expect(await add({ node: 'nx' })).toBe("Cannot find device='nx' nor node-name='nx'");
    expect(await add({ name: '' })).toBe('Bitmap name cannot be empty');
    expect(await add({ name: 'b1', persistent: true })).toBe(
      "Can't store persistent bitmaps to n0: Operation not supported",
    );
    await qmp.execute('block-dirty-bitmap-add', { node: 'n0', name: 'b0' });
    expect(await add({})).toBe('Bitmap already exists: b0');
    await qmp.execute('block-dirty-bitmap-add', { node: 'n0', name: 'b1', disabled: true });
    graph.getNode('n0')!.dirtyBitmaps[1]!.set(0, 65536);
    expect(await e('block-dirty-bitmap-remove', { node: 'n0', name: 'bx' })).toBe(
      "Dirty bitmap 'bx' not found",
    );
    expect(await e('block-dirty-bitmap-remove', { node: 'nx', name: 'bx' })).toBe("Node 'nx' not found");
    expect(await e('block-dirty-bitmap-clear', { node: 'n0', name: 'bx' })).toBe(
      "Dirty bitmap 'bx' not found",
    );
    const merge = (target: string, bitmaps: unknown[]) => ({ node: 'n0', target, bitmaps });
    expect(await e('block-dirty-bitmap-merge', merge('b0', ['bz']))).toBe("Dirty bitmap 'bz' not found");
    expect(await e('block-dirty-bitmap-merge', merge('bq', ['b1']))).toBe("Dirty bitmap 'bq' not found");
    expect(await e('block-dirty-bitmap-merge', merge('b0', [{ node: 'nz', name: 'b1' }]))).toBe(
      "Node 'nz' not found",
    );
    expect(await e('block-dirty-bitmap-merge', merge('b0', [5]))).toBe(
      "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
    );
    expect(await e('block-dirty-bitmap-merge', merge('b0', [{ node: 'n0' }]))).toBe(
      "Parameter 'bitmaps[0].name' is missing",
    );
    await qmp.execute('block-dirty-bitmap-merge', merge('b0', ['b1', { node: 'n0', name: 'b1' }]));
    let [info] = await qmp.execute('query-named-block-nodes');
    expect(info['dirty-bitmaps']).toEqual([
      { name: 'b1', recording: false, persistent: false, busy: false, granularity: 65536, count: 65536 },
      { name: 'b0', recording: true, persistent: false, busy: false, granularity: 65536, count: 65536 },
    ]);
    await qmp.execute('block-dirty-bitmap-clear', { node: 'n0', name: 'b1' });
    await qmp.execute('block-dirty-bitmap-remove', { node: 'n0', name: 'b0' });
    [info] = await qmp.execute('query-named-block-nodes');
    expect(info['dirty-bitmaps']).toEqual([
      { name: 'b1', recording: false, persistent: false, busy: false, granularity: 65536, count: 0 },
    ]);
    // enable/disable switch recording: a write marks only an enabled bitmap.
    await qmp.execute('block-dirty-bitmap-enable', { node: 'n0', name: 'b1' });
    [info] = await qmp.execute('query-named-block-nodes');
    expect(info['dirty-bitmaps'][0]).toMatchObject({ name: 'b1', recording: true });
    const n0 = graph.getNode('n0')!;
    const blk = new BlockBackend(graph, { perm: Perm.WRITE, shared: PERM_ALL });
    blk.attach(n0);
    await blk.write(0, Buffer.alloc(512));
    expect(n0.dirtyBitmaps[0]!.count()).toBe(65536);
    await qmp.execute('block-dirty-bitmap-disable', { node: 'n0', name: 'b1' });
    await blk.write(131072, Buffer.alloc(512));
    expect(n0.dirtyBitmaps[0]!.count()).toBe(65536);
    await blk.detach();
    expect(await e('block-dirty-bitmap-enable', { node: 'n0', name: 'bx' })).toBe(
      "Dirty bitmap 'bx' not found",
    );
    graph.getNode('n0')!.dirtyBitmaps[0]!.busy = true;
    expect(await e('block-dirty-bitmap-clear', { node: 'n0', name: 'b1' })).toBe(
      "Bitmap 'b1' is currently in use by another operation and cannot be used",
    );
    expect(await e('block-dirty-bitmap-disable', { node: 'n0', name: 'b1' })).toBe(
      "Bitmap 'b1' is currently in use by another operation and cannot be used",
    );
  });
});

describe('x-debug-query-block-graph', () => {
  it('lists nodes and edges with permissions', async () => {
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': 'r0',
      file: { driver: 'null-co', 'node-name': 'n0' },
    });
    const g = await qmp.execute('x-debug-query-block-graph');
    const byName = new Map(g.nodes.map((n: any) => [n.name, n]));
    expect(byName.get('r0')).toMatchObject({ type: 'block-driver' });
    expect(byName.get('n0')).toMatchObject({ type: 'block-driver' });
    expect(g.edges).toEqual([
      {
        parent: (byName.get('r0') as any).id,
        child: (byName.get('n0') as any).id,
        name: 'file',
        perm: expect.any(Array),
        'shared-perm': expect.arrayContaining(['consistent-read']),
      },
    ]);
  });
});

describe('jobs over QMP', () => {
  it('blockdev-create file: events, query-jobs, dismiss', async () => {
    const target = dir.file('created.raw');
    await qmp.execute('blockdev-create', {
      'job-id': 'c0',
      options: { driver: 'file', filename: target, size: 1048576 },
    });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.status === 'concluded');
    const statuses = qmp
      .takeEvents()
      .filter((ev) => ev.event === 'JOB_STATUS_CHANGE')
      .map((ev) => ev.data.status);
    expect(['created', 'running', 'waiting', 'pending'].every((s) => statuses.includes(s))).toBe(true);
    expect(statSync(target).size).toBe(1048576);
    expect(await qmp.execute('query-jobs')).toEqual([
      { 'current-progress': 1, status: 'concluded', 'total-progress': 1, type: 'create', id: 'c0' },
    ]);
    expect(await fails('job-complete', { id: 'c0' })).toEqual({
      class: 'GenericError',
      desc: "Job 'c0' in state 'concluded' cannot accept command verb 'complete'",
    });
    await qmp.execute('job-dismiss', { id: 'c0' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.status === 'null' && ev.data.id === 'c0');
    expect(await qmp.execute('query-jobs')).toEqual([]);
  });

  it('blockdev-create errors: failing job, bad options, unsupported driver', async () => {
    await qmp.execute('blockdev-create', {
      'job-id': 'c1',
      options: { driver: 'file', filename: '/nonexist/x', size: 1048576 },
    });
    await qmp.waitEvent('JOB_STATUS_CHANGE', (ev) => ev.data.status === 'concluded');
    expect(await qmp.execute('query-jobs')).toEqual([
      {
        'current-progress': 1,
        status: 'concluded',
        'total-progress': 1,
        type: 'create',
        id: 'c1',
        error: "Could not create '/nonexist/x': No such file or directory",
      },
    ]);
    expect(
      await fails('blockdev-create', {
        'job-id': 'c1',
        options: { driver: 'file', filename: '/tmp/y', size: 1 },
      }),
    ).toEqual({ class: 'GenericError', desc: "Job ID 'c1' already in use" });
    expect(
      (await fails('blockdev-create', { 'job-id': 'c2', options: { driver: 'null-co', size: 1 } })).desc,
    ).toBe("Parameter 'options.size' is unexpected");
    expect(
      (await fails('blockdev-create', { 'job-id': 'c2', options: { driver: 'file', filename: '/tmp/y' } }))
        .desc,
    ).toBe("Parameter 'options.size' is missing");
    expect((await fails('blockdev-create', { 'job-id': 'c2', options: { driver: 'null-co' } })).desc).toBe(
      'Driver does not support blockdev-create',
    );
    expect(existsSync('/tmp/y')).toBe(false);
  });

  it('job verbs: not found, wrong state, no force argument', async () => {
    for (const v of [
      'job-pause',
      'job-resume',
      'job-cancel',
      'job-complete',
      'job-finalize',
      'job-dismiss',
    ]) {
      expect(await fails(v, { id: 'x' })).toEqual({ class: 'GenericError', desc: 'Job not found' });
    }
    expect((await fails('job-cancel', { id: 'x', force: true })).desc).toBe(
      "Parameter 'force' is unexpected",
    );
    expect(await fails('block-job-set-speed', { device: 'x', speed: 1 })).toEqual({
      class: 'DeviceNotActive',
      desc: "Block job 'x' not found",
    });
    expect(await qmp.execute('query-block-jobs')).toEqual([]);
  });
});

describe('query-qmp-schema', () => {
  it('describes commands, events and types in QEMU SchemaInfo shapes', async () => {
    const schema: any[] = await qmp.execute('query-qmp-schema');
    const byName = new Map(schema.map((s) => [s.name, s]));
    const add = byName.get('blockdev-add');
    expect(add).toMatchObject({ 'meta-type': 'command', 'ret-type': expect.any(String) });
    const opts = byName.get(add['arg-type']);
    expect(opts['meta-type']).toBe('object');
    expect(opts.tag).toBe('driver');
    expect(opts.members[0]).toEqual({ name: 'driver', type: expect.any(String) });
    expect(opts.members.find((m: any) => m.name === 'node-name')).toEqual({
      name: 'node-name',
      default: null,
      type: 'str',
    });
    const cases = opts.variants.map((v: any) => v.case);
    expect(cases).toEqual(expect.arrayContaining(['file', 'null-co', 'raw']));
    const raw = byName.get(opts.variants.find((v: any) => v.case === 'raw').type);
    const fileMember = raw.members.find((m: any) => m.name === 'file');
    expect(byName.get(fileMember.type)['meta-type']).toBe('alternate');
    expect(byName.get('str')).toEqual({ name: 'str', 'meta-type': 'builtin', 'json-type': 'string' });
    expect(byName.get('JOB_STATUS_CHANGE')).toMatchObject({ 'meta-type': 'event' });
    const jobs = byName.get('query-jobs');
    expect(byName.get(jobs['ret-type'])['meta-type']).toBe('array');
    const status = schema.find((s) => s['meta-type'] === 'enum' && s.values.includes('standby'));
    expect(status.members[0]).toEqual({ name: 'undefined' });
    expect(byName.get('x-debug-query-block-graph').features).toEqual(['unstable']);
    // Every referenced type has an entry.
    for (const s of schema) {
      for (const k of ['arg-type', 'ret-type', 'element-type'])
        if (s[k]) expect(byName.has(s[k]), `${s.name}.${k}`).toBe(true);
    }
  });
});
