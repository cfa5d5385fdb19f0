import { readFileSync, statSync } from 'node:fs';
import { waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient, QmpError, type QmpServer } from '../src/index';
import { negotiatedRaw, RawConn, startServer } from './helpers';

/** The version the server reports: @blockrep/qmp's own, from its package.json. */
const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
  version: string;
};

let server: QmpServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function start() {
  const s = await startServer();
  server = s.server;
  s.server.registry.registerCommand({
    name: 'x-nop',
    doc: 'test',
    returns: { kind: 'any' },
    handler: () => [],
  });
  return s;
}

describe('greeting and negotiation', () => {
  it('greets, refuses commands before qmp_capabilities, then serves', async () => {
    const { path } = await start();
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const c = await RawConn.open(path);
    const [greeting] = await c.waitLines(1);
    expect(greeting).toEqual({
      QMP: {
        version: { qemu: { micro: 0, minor: 2, major: 7 }, package: `blockrep ${version}` },
        capabilities: [],
      },
    });
    expect(c.lines[0]).toBe(
      `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "blockrep ${version}"}, "capabilities": []}}`,
    );
    const r = await c.exchange(
      '{"execute":"query-version"}\n',
      '{"execute":"nope","id":5}\n',
      '{"execute":"qmp_capabilities","foo":1}\n',
      '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n',
      '{"execute":"qmp_capabilities","id":{"a":1}}\n',
      '{"execute":"qmp_capabilities"}\n',
      '{"execute":"query-version","id":"v"}\n',
    );
    expect(r).toEqual([
      {
        error: {
          class: 'CommandNotFound',
          desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
      },
      {
        id: 5,
        error: {
          class: 'CommandNotFound',
          desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
      },
      { error: { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" } },
      { error: { class: 'GenericError', desc: "Capability 'oob' not available" } },
      { return: {}, id: { a: 1 } },
      {
        error: {
          class: 'CommandNotFound',
          desc: 'Capabilities negotiation is already complete, command ignored',
        },
      },
      { return: { qemu: { micro: 0, minor: 2, major: 7 }, package: `blockrep ${version}` }, id: 'v' },
    ]);
    c.close();
  });

  it('serves several monitors at once, each negotiating on its own', async () => {
    const { path } = await start();
    const a = await QmpClient.connect({ path });
    const b = await QmpClient.connect({ path }, { negotiate: false });
    await expect(b.execute('query-version')).rejects.toMatchObject({
      class: 'CommandNotFound',
      desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
    });
    expect((await a.execute('query-version')).qemu.major).toBe(7);
    expect(server!.monitors.size).toBe(2);
    // Events go to negotiated monitors only.
    server!.emitEvent('TEST_EVENT', { n: 1 });
    const ev = await a.waitEvent('TEST_EVENT');
    expect(ev.data).toEqual({ n: 1 });
    expect(ev.timestamp.seconds).toBeGreaterThan(1_600_000_000);
    expect(ev.timestamp.microseconds).toBeGreaterThanOrEqual(0);
    expect(ev.timestamp.microseconds).toBeLessThan(1_000_000);
    await b.execute('qmp_capabilities');
    await expect(b.waitEvent('TEST_EVENT', () => true, 200)).rejects.toThrow(/timed out/);
    await a.close();
    await b.close();
  });

  it('serves TCP too', async () => {
    const { server: s } = await start();
    const port = await s.listenTcp(0);
    const c = await QmpClient.connect({ port });
    const cmds: { name: string }[] = await c.execute('query-commands');
    expect(cmds.map((x) => x.name)).toEqual(
      expect.arrayContaining([
        'qmp_capabilities',
        'query-version',
        'query-commands',
        'query-qmp-schema',
        'quit',
      ]),
    );
    await c.close();
  });

  it('quit answers, then calls the hook', async () => {
    let quit = false;
    const s = await startServer({ onQuit: () => (quit = true) });
    server = s.server;
    const c = await QmpClient.connect({ path: s.path });
    expect(await c.execute('quit')).toEqual({});
    await waitFor(() => quit, { what: 'the quit hook' });
    expect(quit).toBe(true);
    await c.close();
  });
});

describe('framing and hostile input', () => {
  it('reads objects split across writes and several in one write', async () => {
    const { path } = await start();
    const c = await negotiatedRaw(path);
    c.send('{"exec');
    await new Promise((r) => setTimeout(r, 30));
    c.send('ute": "query-version", "id"');
    c.send(': 1}{"execute":"query-version","id":2}   {"execute":"query-version",\n"id":3}\n');
    const lines = await c.waitLines(5);
    expect(lines.slice(2).map((l) => l.id)).toEqual([1, 2, 3]);
    c.close();
  });

  it('answers malformed requests with QEMU 7.2 texts and keeps serving', async () => {
    const { path } = await start();
    const c = await negotiatedRaw(path);
    const cases: [string, unknown][] = [
      [
        'garbage\n',
        { error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'garbage'" } },
      ],
      ['{"foo":1}\n', { error: { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" } }],
      ['[1,2]\n', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
      ['"str"\n', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
      [
        '{"execute":1}\n',
        { error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } },
      ],
      [
        '{"execute":"query-version","arguments":[1]}\n',
        { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } },
      ],
      [
        '{"execute":"x-nop","arguments":null}\n',
        { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } },
      ],
      [
        '{"execute":"query-version","arguments":{"x":1}}\n',
        { error: { class: 'GenericError', desc: "Parameter 'x' is unexpected" } },
      ],
      ['{}\n', { error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
      ['{"id":1}\n', { id: 1, error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
      [
        '{"execute":"nope","id":5}\n',
        { id: 5, error: { class: 'CommandNotFound', desc: 'The command nope has not been found' } },
      ],
      [
        '{"execute":"query-version","exec-oob":"x"}\n',
        { error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } },
      ],
      ['{"a":}\n', { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } }],
      ['}\n', { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } }],
      ['{"a" 1}\n', { error: { class: 'GenericError', desc: 'JSON parse error, missing : in object pair' } }],
      [
        '{"a":1 "b":2}\n',
        { error: { class: 'GenericError', desc: 'JSON parse error, expected separator in dict' } },
      ],
      ['[1 2]\n', { error: { class: 'GenericError', desc: 'JSON parse error, expected separator in list' } }],
      [
        '{1:2}\n',
        { error: { class: 'GenericError', desc: 'JSON parse error, key is not a string in object' } },
      ],
      ['{"a":tru}\n', { error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'tru'" } }],
      [
        '{"a":"\\x"}\n',
        { error: { class: 'GenericError', desc: 'JSON parse error, invalid escape sequence in string' } },
      ],
      [
        '{"a":"\\u12"}\n',
        {
          error: { class: 'GenericError', desc: 'JSON parse error, \\u12" is not a valid Unicode character' },
        },
      ],
      ["{'execute':'x-nop','id':'sq'}\n", { return: [], id: 'sq' }],
    ];
    for (const [input, want] of cases) {
      const [got] = await c.exchange(input);
      expect(got, input).toEqual(want);
    }
    c.close();
  });

  it('formats like QEMU: separators, escapes, numbers', async () => {
    const { path } = await start();
    const c = await negotiatedRaw(path);
    await c.exchange('{"execute":"x-nop","id":"\\u00e9\\n/\\u0001\\ud83d\\ude00"}\n');
    expect(c.lines.at(-1)).toBe('{"return": [], "id": "\\u00E9\\n/\\u0001\\uD83D\\uDE00"}');
    await c.exchange('{"execute":"x-nop","id":[1.5e3, -0.0, true, null, {"b": 2}]}\n');
    expect(c.lines.at(-1)).toBe('{"return": [], "id": [1500, -0, true, null, {"b": 2}]}');
    c.close();
  });

  it('survives deep nesting, huge tokens and clients that vanish mid-command', async () => {
    const { path, server: s } = await start();
    const c = await negotiatedRaw(path);
    const [deep] = await c.exchange(`{"execute":"x-nop","id":${'['.repeat(1100)}\n`);
    expect(deep).toEqual({ error: { class: 'GenericError', desc: 'JSON nesting depth limit exceeded' } });
    c.close();

    // A 5 MB string is read (under the 64 MiB limit) and answered.
    const big = await negotiatedRaw(path);
    big.send(`{"execute":"x-nop","id":"${'x'.repeat(5 << 20)}"}\n`);
    // Generous: other packages' tests may be loading this 2-core machine at the same time.
    const [, , r] = await big.waitLines(3, 30_000);
    expect(r.id.length).toBe(5 << 20);
    big.close();

    // A slow command whose client disconnects: the server carries on.
    let release!: () => void;
    s.registry.registerCommand({
      name: 'x-test-slow',
      doc: 'test',
      handler: () => new Promise<void>((res) => (release = res)),
    });
    const gone = await negotiatedRaw(path);
    gone.send('{"execute":"x-test-slow"}\n');
    await waitFor(() => release, { what: 'x-test-slow running' });
    gone.close();
    await new Promise((res) => setTimeout(res, 30));
    release();
    const ok = await QmpClient.connect({ path });
    expect((await ok.execute('query-version')).package).toBe(`blockrep ${version}`);
    await ok.close();
  });

  it('a burst of requests in one write is answered in full and in order', async () => {
    const { path } = await start();
    const c = await negotiatedRaw(path);
    const burst = Array.from({ length: 200 }, (_, i) => `{"execute":"x-nop","id":${i}}`).join('');
    const replies = await c.exchange(burst, ...Array(199).fill(''));
    expect(replies.map((r) => r.id)).toEqual(Array.from({ length: 200 }, (_, i) => i));
    expect(replies.every((r) => Array.isArray(r.return))).toBe(true);
    c.close();
  });

  it('requests from one monitor are answered in order', async () => {
    const { path, server: s } = await start();
    s.registry.registerCommand({
      name: 'x-test-delay',
      doc: 'test',
      args: { kind: 'object', name: 'x', members: { ms: { type: { kind: 'int', width: 'int' } } } },
      handler: async (a: { ms: number }) => {
        await new Promise((r) => setTimeout(r, a.ms));
        return a.ms;
      },
    });
    const c = await QmpClient.connect({ path });
    const order: number[] = [];
    await Promise.all([40, 1, 20].map((ms) => c.execute('x-test-delay', { ms }).then((v) => order.push(v))));
    expect(order).toEqual([40, 1, 20]);
    await c.close();
  });
});

describe('QmpClient', () => {
  it('rejects with QmpError carrying class and desc', async () => {
    const { path } = await start();
    const c = await QmpClient.connect({ path });
    const err = await c.execute('nope').catch((e) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect(err.class).toBe('CommandNotFound');
    expect(err.desc).toBe('The command nope has not been found');
    await c.close();
    await expect(c.execute('query-version')).rejects.toThrow(/closed/);
  });

  it('streams events through an async iterator', async () => {
    const { path, server: s } = await start();
    const c = await QmpClient.connect({ path });
    const it = c.events();
    const first = it.next();
    s.emitEvent('A', { i: 1 });
    s.emitEvent('B', { i: 2 });
    expect((await first).value.event).toBe('A');
    expect((await it.next()).value.data).toEqual({ i: 2 });
    await it.return(undefined);
    // waitEvent finds an event that arrived before it was called.
    s.emitEvent('C', { i: 3 });
    await new Promise((r) => setTimeout(r, 20));
    expect((await c.waitEvent('C', (e) => e.data.i === 3)).data.i).toBe(3);
    await c.close();
  });
});

describe('event rate limits', () => {
  it('QUORUM_REPORT_BAD: the first per node at once, the latest of the burst when the second ends, the rest dropped', async () => {
    const { server, path } = await startServer();
    const c = await QmpClient.connect({ path });
    const got: string[] = [];
    c.on('event', (e: { event: string; data?: Record<string, unknown> }) => {
      if (e.event === 'QUORUM_REPORT_BAD') got.push(`${e.data!['node-name']}:${e.data!['sector-num']}`);
      else got.push(e.event);
    });
    // The server's own listeners see what the monitors see (the daemon's log follows it).
    const delivered: string[] = [];
    server.on('qmp-event-delivered', (e: { event: string }) => delivered.push(e.event));
    const bad = (node: string, n: number) =>
      server.emitEvent('QUORUM_REPORT_BAD', {
        type: 'read',
        'node-name': node,
        'sector-num': n,
        'sectors-count': 8,
      });
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) bad('a', i);
    bad('b', 0);
    server.emitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'created' }); // not limited
    await waitFor(() => got.length >= 4, { what: "node a's held-back event" });
    expect(got).toEqual(['a:0', 'b:0', 'JOB_STATUS_CHANGE', 'a:4']);
    expect(delivered).toEqual([
      'QUORUM_REPORT_BAD',
      'QUORUM_REPORT_BAD',
      'JOB_STATUS_CHANGE',
      'QUORUM_REPORT_BAD',
    ]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(990);
    c.close();
    await server.close();
  });
});
