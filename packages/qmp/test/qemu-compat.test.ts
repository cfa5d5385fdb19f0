import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { createGraph } from '@blockrep/block';
import { JobManager } from '@blockrep/jobs';
import { hasPeer, makeTempDir, waitFor, waitForPidFile } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { createBlockQmpServer, QmpClient } from '../src/index';

type Outcome = { return: unknown } | { error: { class: string; desc: string } };

async function run(c: QmpClient, cmd: string, args?: Record<string, unknown>): Promise<Outcome> {
  try {
    return { return: await c.execute(cmd, args) };
  } catch (e: any) {
    return { error: { class: e.class, desc: e.desc } };
  }
}

/** Keeps only what both sides report: objects reduced to their common keys, recursively. */
function common(a: unknown, b: unknown): [unknown, unknown] {
  if (Array.isArray(a) && Array.isArray(b)) {
    const pairs = a.map((x, i) => common(x, b[i]));
    return [pairs.map((p) => p[0]), b.map((_, i) => (i < pairs.length ? pairs[i]![1] : b[i]))];
  }
  if (a && b && typeof a === 'object' && typeof b === 'object') {
    const oa: Record<string, unknown> = {};
    const ob: Record<string, unknown> = {};
    for (const k of Object.keys(a)) {
      if (!(k in b)) continue;
      [oa[k], ob[k]] = common((a as any)[k], (b as any)[k]);
    }
    return [oa, ob];
  }
  return [a, b];
}

async function startQsd(sock: string): Promise<ChildProcess> {
  const p = spawn(
    'qemu-storage-daemon',
    [
      '--chardev',
      `socket,path=${sock},server=on,wait=off,id=c`,
      '--monitor',
      'chardev=c',
      '--pidfile',
      `${sock}.pid`,
    ],
    { stdio: ['ignore', 'ignore', 'ignore'] },
  );
  await waitForPidFile(`${sock}.pid`, p);
  return p;
}

describe.skipIf(!hasPeer('qemu-storage-daemon'))(
  'same QMP session against qemu-storage-daemon 7.2 and blockrep',
  () => {
    it('returns and errors agree field by field', async () => {
      const dir = makeTempDir('blockrep-qmp-compat-');
      const img = dir.file('a.img');
      writeFileSync(img, Buffer.alloc(1 << 20));

      const qsd = await startQsd(dir.file('qsd.sock'));
      const graph = createGraph();
      const jobs = new JobManager();
      const { server } = createBlockQmpServer({ graph, jobs });
      await server.listenUnix(dir.file('ours.sock'));
      const theirs = await QmpClient.connect({ path: dir.file('qsd.sock') });
      const ours = await QmpClient.connect({ path: dir.file('ours.sock') });

      const session: [string, Record<string, unknown>?][] = [
        ['blockdev-add', { driver: 'file', 'node-name': 'f0', filename: img }],
        ['blockdev-add', { driver: 'raw', 'node-name': 'r0', file: 'f0' }],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: 1048576 }],
        ['query-named-block-nodes'],
        ['query-named-block-nodes', { flat: true }],
        ['blockdev-del', { 'node-name': 'f0' }],
        ['blockdev-del', { 'node-name': 'nope' }],
        ['blockdev-del', {}],
        ['blockdev-del', { 'node-name': 5 }],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n1', foo: 1 }],
        ['blockdev-add', { driver: 'nope', 'node-name': 'n1' }],
        ['blockdev-add', { 'node-name': 'n1' }],
        ['blockdev-add', { driver: 'raw', 'node-name': 'r1' }],
        ['blockdev-add', { driver: 'raw', 'node-name': 'r1', file: { driver: 'file' } }],
        ['blockdev-add', { driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: 5 } }],
        ['blockdev-add', { driver: 'raw', 'node-name': 'r1', file: 5 }],
        [
          'blockdev-add',
          { driver: 'raw', 'node-name': 'r1', file: { driver: 'file', filename: '/nonexist' } },
        ],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n0' }],
        ['blockdev-add', { driver: 'null-co' }],
        ['blockdev-add', { driver: 'null-co', 'node-name': '1bad' }],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n2', 'read-only': 'yes' }],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n2', 'detect-zeroes': 'maybe' }],
        ['blockdev-add', { driver: 'null-co', 'node-name': 'n2', cache: { direct: 1 } }],
        ['blockdev-add', { driver: 'file', 'node-name': 'n2', filename: img, aio: 'bogus' }],
        ['block-dirty-bitmap-add', { node: 'n0', name: 'b0', granularity: -1 }],
        ['block-dirty-bitmap-add', { node: 'n0', name: 'b0', granularity: 1000 }],
        ['block-dirty-bitmap-add', { node: 'nx', name: 'b0' }],
        ['block-dirty-bitmap-add', { node: 'n0', name: 'b0' }],
        ['block-dirty-bitmap-add', { node: 'n0', name: 'b0' }],
        ['block-dirty-bitmap-merge', { node: 'n0', target: 'b0', bitmaps: [5] }],
        ['block-dirty-bitmap-disable', { node: 'n0', name: 'b0' }],
        ['query-named-block-nodes'],
        ['block-dirty-bitmap-enable', { node: 'n0', name: 'b0' }],
        ['block-dirty-bitmap-enable', { node: 'n0', name: 'zz' }],
        ['block-dirty-bitmap-disable', { node: 'nz', name: 'b0' }],
        ['query-named-block-nodes'],
        ['block-dirty-bitmap-remove', { node: 'n0', name: 'b0' }],
        ['query-jobs'],
        ['job-pause', { id: 'x' }],
        ['job-cancel', { id: 'x', force: true }],
        ['block-job-pause', { device: 'x' }],
        ['block-job-resume', { device: 'x' }],
        ['block-job-complete', { device: 'x' }],
        ['block-job-finalize', { id: 'x' }],
        ['block-job-dismiss', { id: 'x' }],
        ['block-job-pause', {}],
        ['block-job-finalize', { device: 'x' }],
        ['block_resize', { 'node-name': 'f0', size: 2097152 }],
        ['block_resize', { 'node-name': 'f0', size: -1 }],
        ['block_resize', { 'node-name': 'nx', size: 1 }],
        ['block_resize', { device: 'nx', size: 1 }],
        ['block_resize', { size: 1 }],
        ['block_resize', { device: 'f0', size: 1 }],
        ['block_resize', { 'node-name': 'n0', size: 4096 }],
        ['block_resize', { 'node-name': 'f0' }],
        ['query-named-block-nodes'],
        ['block_resize', { 'node-name': 'f0', size: 1000 }],
        ['query-named-block-nodes'],
        ['no-such-command'],
        ['query-version', { x: 1 }],
        ['blockdev-del', { 'node-name': 'r0' }],
        ['blockdev-del', { 'node-name': 'f0' }],
        ['blockdev-del', { 'node-name': 'n0' }],
        ['query-named-block-nodes'],
        ['query-block'],
      ];

      try {
        for (const [cmd, args] of session) {
          const a = await run(ours, cmd, args);
          const b = await run(theirs, cmd, args);
          const what = `${cmd} ${JSON.stringify(args ?? {})}`;
          expect('error' in a, `${what}: ours ${JSON.stringify(a)} vs QEMU ${JSON.stringify(b)}`).toBe(
            'error' in b,
          );
          if ('error' in a && 'error' in b) {
            expect(a.error, what).toEqual(b.error);
          } else {
            const [x, y] = common((a as any).return, (b as any).return);
            expect(x, what).toEqual(y);
            if (Array.isArray((b as any).return))
              expect((a as any).return.length, what).toBe((b as any).return.length);
          }
        }
      } finally {
        await ours.close();
        await theirs.close();
        qsd.kill();
        await server.close();
        await graph.closeAll();
      }
    });
  },
);

/** Reads CRLF-terminated lines from a raw connection. */
function lineReader(sock: Socket) {
  const lines: string[] = [];
  let buf = '';
  sock.setEncoding('utf8');
  sock.on('data', (d: string) => {
    buf += d;
    for (let i = buf.indexOf('\r\n'); i >= 0; i = buf.indexOf('\r\n')) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 2);
    }
  });
  sock.on('error', () => {});
  return lines;
}

/** Whether every job the lines report on has reached concluded or null: it sends nothing more by itself. */
function jobsSettled(lines: string[]): boolean {
  const last = new Map<string, string>();
  for (const l of lines) {
    if (!l.includes('"JOB_STATUS_CHANGE"')) continue;
    const { data } = JSON.parse(l);
    last.set(data.id, data.status);
  }
  return [...last.values()].every((s) => s === 'concluded' || s === 'null');
}

/**
 * What may differ: event timestamps, and automatic node names (QEMU numbers them with a counter
 * shared by all its ids, as #block012; ours count nodes, as #block1).
 */
function normalize(line: string): string {
  return line
    .replace(/#block\d+/g, '#block')
    .replace(/"timestamp": \{"seconds": \d+, "microseconds": \d+\}/g, '"timestamp": T');
}

describe.skipIf(!hasPeer('qemu-storage-daemon'))('byte for byte against qemu-storage-daemon 7.2', () => {
  it('answers the same bytes to the same raw input, malformed or not', async () => {
    const dir = makeTempDir('blockrep-qmp-raw-');
    const img = dir.file('a.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const qsd = await startQsd(dir.file('qsd.sock'));
    const graph = createGraph();
    const { server } = createBlockQmpServer({ graph, jobs: new JobManager() });
    await server.listenUnix(dir.file('ours.sock'));
    const theirs = connect(dir.file('qsd.sock'));
    const ours = connect(dir.file('ours.sock'));
    const tl = lineReader(theirs);
    const ol = lineReader(ours);
    const inputs = [
      '{"execute":"query-version"}\n',
      '{"execute":"qmp_capabilities","foo":1}\n',
      '{"execute":"qmp_capabilities","id":{"z":1,"a":[]}}\n',
      '{"execute":"qmp_capabilities"}\n',
      'garbage\n',
      '{}\n',
      '{"id":1}\n',
      '[1]\n',
      '{"a":}\n',
      '{"a" 1}\n',
      '{"a":1 "b":2}\n',
      '[1 2]\n',
      '{1:2}\n',
      '{"a":"\\u12"}\n',
      '{"a":-}\n',
      '{"a":01}\n',
      '{"a":"x\n"}\n',
      '{"a":%d}\n',
      '{"a":"\\ud800"}\n',
      '\u00e9\n',
      '{"execute":"query-block"} x\n',
      '{"exec',
      'ute":"query-block","id":1e400}{"execute":"query-block","id":-0.0}\n',
      '{"execute":"query-block","id":"\\u0000\\/\\u00e9\\ud83d\\ude00\\t"}\n',
      "{'execute':'query-block','id':'sq'}\n",
      '{"execute":"query-block","arguments":{"a":1},"id":4}\n',
      '{"execute":"query-block","exec-oob":"x","id":4}\n',
      '{"arguments":{},"execute":5}\n',
      '{"execute":"nope","id":[1,{"b":2,"a":1}]}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}\n',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0"}}\n',
      '{"execute":"query-named-block-nodes"}\n',
      '{"execute":"x-debug-query-block-graph"}\n',
      '{"execute":"query-jobs"}\n',
      '{"execute":"blockdev-del","arguments":{"node-name":"n0"}}\n',
      `{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f0","filename":"${img}"}}\n`,
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"f0"}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1"}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n2","size":1048576}}\n',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n2","name":"b2","granularity":4096}}\n',
      '{"execute":"x-debug-query-block-graph"}\n',
      '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0","file":"f0","read-only":true}]}}\n',
      '{"execute":"query-named-block-nodes","arguments":{"flat":true}}\n',
      '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0","file":"f0"}]}}\n',
      '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0"}]}}\n',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"r0","name":"b0","granularity":512}}\n',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n1","name":"b1","granularity":1024}}\n',
      '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"r0","target":"b0","bitmaps":[{"node":"n1","name":"b1"},"b0"]}}\n',
      '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"r0","target":"b0","bitmaps":[{"node":"n2","name":"b2"},"b0"]}}\n',
      `{"execute":"block-dirty-bitmap-add","arguments":{"node":"r0","name":"${'x'.repeat(1100)}"}}\n`,
      '{"execute":"query-named-block-nodes"}\n',
      '{"execute":"blockdev-create","arguments":{"job-id":"1c","options":{"driver":"file","filename":"/x","size":1}}}\n',
      '{"execute":"blockdev-create","arguments":{"job-id":"c","options":{"driver":"null-co"}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n6","force-share":true}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n6","detect-zeroes":"unmap"}}\n',
      '{"execute":"query-block"}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","cache":5}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"file","filename":"x","aio":5}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"nope"}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"file","filename":"x","aio":"bad"}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"filename":"x"}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"null-co","x":1}}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":null}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":"nonode"}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"null-co"},"offset":-1}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"null-co","size":4096},"size":8192}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","size":1.5}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","node-name":"m"}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":""}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"abcdefghijabcdefghijabcdefghijab"}}\n',
      '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","discard":"unmap","detect-zeroes":"unmap"}}\n',
      '{"execute":"query-named-block-nodes"}\n',
      '{"execute":"blockdev-reopen","arguments":{"options":[5]}}\n',
      '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"null-co","node-name":"n","discard":"unmap","detect-zeroes":"unmap","read-only":true}]}}\n',
      '{"execute":"query-named-block-nodes"}\n',
      '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n","name":"b"}}\n',
      '{"execute":"block-dirty-bitmap-clear","arguments":{"node":"n","name":"b"}}\n',
      '{"execute":"job-pause","arguments":{"id":null}}\n',
      '{"execute":"query-named-block-nodes","arguments":{"flat":"yes"}}\n',
      '{"execute":"query-commands","arguments":{"x":null}}\n',
      `{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"g0","filename":"${img}"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"m1","size":4096}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"s0","file":"g0"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"s1","file":{"driver":"null-co","size":4096}}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"s0","file":"nonode"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"s0","file":"s0"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"s1","file":"m1"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"s0","file":"m1"}]}}\n`,
      `{"execute":"query-named-block-nodes","arguments":{"flat":true}}\n`,
      `{"execute":"blockdev-del","arguments":{"node-name":"g0"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"s2","file":"m1","size":1024}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"g1","filename":"${img}"}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"s2","file":"g1","size":1024}]}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"h0","filename":"${img}"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"t0","file":"h0"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"t1","file":{"driver":"null-co","size":4096}}}\n`,
      `{"execute":"query-named-block-nodes"}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"t0","file":"h0","read-only":true}]}}\n`,
      `{"execute":"query-named-block-nodes","arguments":{"flat":true}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"t0","file":"h0"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"t0","file":"t1"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"t0"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"file","node-name":"t0","filename":"/x"}]}}\n`,
      `{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"file","node-name":"h0","filename":"${img}","read-only":true}]}}\n`,
      `{"execute":"block-dirty-bitmap-add","arguments":{"node":"t0","name":"c0","granularity":512}}\n`,
      `{"execute":"block-dirty-bitmap-add","arguments":{"node":"t1","name":"c1","granularity":1024}}\n`,
      `{"execute":"block-dirty-bitmap-merge","arguments":{"node":"t0","target":"c0","bitmaps":[{"node":"t1","name":"c1"}]}}\n`,
      `{"execute":"block-dirty-bitmap-clear","arguments":{"node":"t0","name":"c0"}}\n`,
      `{"execute":"block-dirty-bitmap-remove","arguments":{"node":"t0","name":"c0"}}\n`,
      `{"execute":"block-dirty-bitmap-add","arguments":{"node":"t0","name":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}\n`,
      `{"execute":"blockdev-create","arguments":{"job-id":"1cj","options":{"driver":"file","filename":"${dir.file('c2.img')}","size":1024}}}\n`,
      `{"execute":"blockdev-create","arguments":{"job-id":"cj","options":{"driver":"null-co"}}}\n`,
      `{"execute":"blockdev-create","arguments":{"job-id":"cj","options":{"driver":"file","filename":"${dir.file('c2.img')}","size":1024,"preallocation":"metadata"}}}\n`,
      `{"execute":"query-jobs"}\n`,
      `{"execute":"job-dismiss","arguments":{"id":"cj"}}\n`,
      `{"execute":"blockdev-del","arguments":{"node-name":"t1"}}\n`,
      `{"execute":"query-named-block-nodes"}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"k5","read-only":true,"force-share":true,"detect-zeroes":"unmap"}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"k5","read-only":true,"force-share":true}}\n`,
      `{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"k6","force-share":true}}\n`,
      `{"execute":"query-named-block-nodes"}\n`,
      `{"execute":"query-block"}\n`,
    ];
    try {
      await waitFor(() => tl.length > 0 && ol.length > 0, { what: 'both greetings' });
      expect(tl.length).toBe(1);
      expect(ol.length).toBe(1);
      for (const input of inputs) {
        const [t0, o0] = [tl.length, ol.length];
        theirs.write(input);
        ours.write(input);
        // Answered: QEMU said something (to a whole line: a part of one gets no answer), we said
        // as many lines, and every job has sent its last event (no late one lands in the next
        // input's answer). Answers that never match fall through to the comparison below.
        await waitFor(
          () =>
            (tl.length > t0 || !input.endsWith('\n')) &&
            ol.length - o0 === tl.length - t0 &&
            jobsSettled(tl) &&
            jobsSettled(ol),
          { what: `the answers to ${JSON.stringify(input)}` },
        ).catch(() => {});
        expect(ol.slice(o0).map(normalize), JSON.stringify(input)).toEqual(tl.slice(t0).map(normalize));
      }
    } finally {
      theirs.destroy();
      ours.destroy();
      qsd.kill();
      await server.close();
      await graph.closeAll();
    }
  });
});

/** A SchemaInfo type as a comparable string: members with optionality, down to a few levels. */
function shape(schema: Map<string, any>, name: string, depth = 0): string {
  const e = schema.get(name);
  if (!e) return `?${name}`;
  if (depth > 2) return '...';
  switch (e['meta-type']) {
    case 'builtin':
      return e.name;
    case 'enum':
      return `enum(${[...e.values].sort().join(',')})`;
    case 'array':
      return `[${shape(schema, e['element-type'], depth + 1)}]`;
    case 'alternate':
      return `alt(${e.members.map((m: any) => shape(schema, m.type, depth + 1)).join('|')})`;
    default:
      return `{${e.members
        .map((m: any) => `${m.name}${m.default === null ? '?' : ''}:${shape(schema, m.type, depth + 1)}`)
        .sort()
        .join(', ')}${e.tag ? ` tag=${e.tag}` : ''}}`;
  }
}

describe.skipIf(!hasPeer('qemu-storage-daemon'))('query-qmp-schema against qemu-storage-daemon 7.2', () => {
  it('describes the arguments of the commands and events both have alike', async () => {
    const dir = makeTempDir('blockrep-qmp-schema-');
    const qsd = await startQsd(dir.file('qsd.sock'));
    const { server } = createBlockQmpServer({ graph: createGraph(), jobs: new JobManager() });
    await server.listenUnix(dir.file('ours.sock'));
    const theirs = await QmpClient.connect({ path: dir.file('qsd.sock') });
    const ours = await QmpClient.connect({ path: dir.file('ours.sock') });
    try {
      const q = new Map<string, any>((await theirs.execute('query-qmp-schema')).map((s: any) => [s.name, s]));
      const o = new Map<string, any>((await ours.execute('query-qmp-schema')).map((s: any) => [s.name, s]));
      let compared = 0;
      for (const [name, e] of o) {
        if (e['meta-type'] !== 'command' && e['meta-type'] !== 'event') continue;
        const qe = q.get(name);
        // These take a BlockdevDriver: ours lists the drivers blockrep has, QEMU's some forty.
        const byDriver = ['blockdev-add', 'blockdev-reopen', 'blockdev-create', 'x-blockdev-amend'];
        if (!qe || byDriver.includes(name)) continue;
        expect(shape(o, e['arg-type']), name).toBe(shape(q, qe['arg-type']));
        compared++;
      }
      expect(compared).toBeGreaterThan(20);
      // BlockdevOptions: the common members, and the members of the drivers both have.
      const variants = (m: Map<string, any>) => m.get(m.get('blockdev-add')['arg-type']);
      const [ov, qv] = [variants(o), variants(q)];
      expect(ov.members.map((x: any) => x.name)).toEqual(qv.members.map((x: any) => x.name));
      for (const drv of ['file', 'raw', 'null-co']) {
        const ot = ov.variants.find((v: any) => v.case === drv).type;
        const qt = qv.variants.find((v: any) => v.case === drv).type;
        expect(shape(o, ot), drv).toBe(shape(q, qt));
      }
    } finally {
      await ours.close();
      await theirs.close();
      qsd.kill();
      await server.close();
    }
  });
});

describe.skipIf(!hasPeer('qemu-storage-daemon'))('blockdev-create against qemu-storage-daemon 7.2', () => {
  it('emits the same job states and leaves the same query-jobs, for success and failure', async () => {
    const dir = makeTempDir('blockrep-qmp-create-');
    const qsd = await startQsd(dir.file('qsd.sock'));
    const graph = createGraph();
    const jobs = new JobManager();
    const { server } = createBlockQmpServer({ graph, jobs });
    await server.listenUnix(dir.file('ours.sock'));
    const clients = {
      qemu: await QmpClient.connect({ path: dir.file('qsd.sock') }),
      ours: await QmpClient.connect({ path: dir.file('ours.sock') }),
    };
    const result: Record<string, unknown> = {};
    try {
      for (const [side, c] of Object.entries(clients)) {
        const seen: unknown[] = [];
        for (const [id, filename] of [
          ['ok', dir.file(`${side}.img`)],
          ['bad', '/nonexistent/dir/x.img'],
        ]) {
          await c.execute('blockdev-create', {
            'job-id': id,
            options: { driver: 'file', filename, size: 65536 },
          });
          await c.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.id === id && e.data.status === 'concluded');
          seen.push(await c.execute('query-jobs'));
          await c.execute('job-dismiss', { id });
          await c.waitEvent('JOB_STATUS_CHANGE', (e) => e.data.id === id && e.data.status === 'null');
        }
        seen.push(c.takeEvents().map((e) => [e.event, e.data]));
        result[side] = seen;
      }
      expect(result.ours).toEqual(result.qemu);
      expect(JSON.stringify(result.ours)).toContain('"aborting"');
    } finally {
      await clients.ours.close();
      await clients.qemu.close();
      qsd.kill();
      await server.close();
      await graph.closeAll();
    }
  });
});
