import { readFileSync } from 'node:fs';
import { BlockBackend, Perm } from '@blockrep/block';
import { qemuIo, waitFor } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { NbdServer } from '../src/index';
import {
  Cmd,
  CmdFlag,
  NbdErr,
  Opt,
  Rep,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TxFlag,
} from '../src/protocol';
import { newGraph, onCleanup, serveImage } from './helpers';
import { mem, memDriver } from './mem-driver';
import { RawNbd } from './raw-client';

const MiB = 1 << 20;

/** The in-memory test driver (it logs requests and can hold reads) exported as 'm'. */
async function serveMem(opts: { align?: number; maxTransfer?: number } = {}) {
  const graph = newGraph();
  graph.registerDriver(memDriver);
  const node = await graph.open({
    driver: 'test-mem',
    'node-name': 'm',
    size: MiB,
    align: opts.align ?? 1,
    'max-transfer': opts.maxTransfer ?? 1 << 30,
  });
  const server = new NbdServer(graph);
  onCleanup(() => server.close());
  const a = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  server.addExport({ node, name: 'm', writable: true });
  return { graph, node, server, port: a.type === 'inet' ? Number(a.port) : 0 };
}

/** The server still serves a well-behaved client (after whatever the last one did). */
async function stillServes(uri: string): Promise<void> {
  const r = await qemuIo(['-f', 'raw', uri], ['read 0 4k']);
  expect(r.stdout).toContain('read 4096/4096 bytes');
}

describe('protocol violations and hostile clients', () => {
  it('handshake: unknown client flags and bad option magic close the connection', async () => {
    const srv = await serveImage({ size: '1M' });
    const a = (await RawNbd.connect(srv.port)).c;
    a.clientFlags(0x80);
    await a.closed;
    const b = (await RawNbd.connect(srv.port)).c;
    b.clientFlags(3);
    b.send(Buffer.alloc(16, 0x41));
    await b.closed;
    await stillServes(srv.uri);
  });

  it('options: unknown, malformed, oversized and out-of-order options get the spec errors', async () => {
    const srv = await serveImage({ size: '1M' });
    const { c, flags } = await RawNbd.connect(srv.port);
    expect(flags & 3).toBe(3);
    c.clientFlags(3);
    c.option(99);
    expect((await c.reply()).type).toBe(Rep.ERR_UNSUP);
    c.option(Opt.LIST, Buffer.from('x'));
    expect((await c.reply()).type).toBe(Rep.ERR_INVALID);
    c.option(Opt.STARTTLS);
    expect((await c.reply()).type).toBe(Rep.ERR_POLICY);
    c.option(Opt.SET_META_CONTEXT, RawNbd.metaData('disk', ['base:allocation']));
    expect((await c.reply()).type).toBe(Rep.ERR_INVALID);
    // GO whose name length points past the option.
    const bad = RawNbd.goData('disk');
    bad.writeUInt32BE(1000, 0);
    c.option(Opt.GO, bad);
    expect((await c.reply()).type).toBe(Rep.ERR_INVALID);
    c.option(Opt.INFO, RawNbd.goData('nope'));
    const unknown = await c.reply();
    expect(unknown.type).toBe(Rep.ERR_UNKNOWN);
    expect(unknown.data.toString()).toContain('nope');
    // An option longer than the server accepts is skipped, not buffered.
    c.option(Opt.INFO, Buffer.alloc(200_000));
    expect((await c.reply()).type).toBe(Rep.ERR_TOO_BIG);
    c.option(Opt.STRUCTURED_REPLY);
    expect((await c.reply()).type).toBe(Rep.ACK);
    c.option(Opt.STRUCTURED_REPLY);
    expect((await c.reply()).type).toBe(Rep.ERR_INVALID);
    c.option(Opt.LIST_META_CONTEXT, RawNbd.metaData('disk', []));
    const listed = await c.replies();
    expect(listed.filter((r) => r.type === Rep.META_CONTEXT).map((r) => r.data.toString('utf8', 4))).toEqual([
      'base:allocation',
    ]);
    // Still usable: LIST answers after all that.
    c.option(Opt.LIST);
    const list = await c.replies();
    expect(list.map((r) => r.type)).toEqual([Rep.SERVER, Rep.ACK]);
    c.option(Opt.ABORT);
    expect((await c.reply()).type).toBe(Rep.ACK);
    await c.closed;
  });

  it('transmission: out of range, read-only, unknown commands and flags, oversized requests', async () => {
    const srv = await serveImage({ size: '1M' });
    srv.server.addExport({ node: srv.node, name: 'ro', writable: false });
    const { c } = await RawNbd.connect(srv.port);
    const { size, flags } = await c.open('disk');
    expect(size).toBe(MiB);
    expect(flags & TxFlag.SEND_FUA).toBeTruthy();
    const before = readFileSync(srv.image);
    c.request(Cmd.READ, 0, 1, MiB - 512, 1024);
    expect(await c.simple()).toEqual({ magic: SIMPLE_REPLY_MAGIC, err: NbdErr.EINVAL, handle: 1 });
    // A write past the end: ENOSPC, and its payload is consumed, not taken for a request.
    c.request(Cmd.WRITE, 0, 2, MiB - 512, 1024, Buffer.alloc(1024, 0x25));
    expect(await c.simple()).toMatchObject({ err: NbdErr.ENOSPC, handle: 2 });
    c.request(42, 0, 3, 0, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 3 });
    c.request(Cmd.READ, 0x100, 4, 0, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 4 });
    // DF needs structured replies.
    c.request(Cmd.READ, CmdFlag.DF, 5, 0, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 5 });
    c.request(Cmd.BLOCK_STATUS, 0, 6, 0, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 6 });
    c.request(Cmd.READ, 0, 7, 0, 64 * MiB);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 7 });
    // An oversized write: its 40 MiB payload is skipped as it streams in; nothing is written.
    c.request(Cmd.WRITE, 0, 8, 0, 40 * MiB, Buffer.alloc(40 * MiB, 0x66));
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 8 });
    // Offsets near 2^64.
    c.request(Cmd.READ, 0, 9, 2 ** 64 - 4096, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL, handle: 9 });
    c.request(Cmd.WRITE, CmdFlag.FUA, 10, 4096, 4, Buffer.from('okay'));
    expect(await c.simple()).toMatchObject({ err: 0, handle: 10 });
    c.request(Cmd.READ, 0, 11, 4096, 4);
    expect(await c.simple()).toMatchObject({ err: 0, handle: 11 });
    expect((await c.q.read(4)).toString()).toBe('okay');
    const after = readFileSync(srv.image);
    expect(after.subarray(0, 4096).equals(before.subarray(0, 4096))).toBe(true);
    expect(after.subarray(4100).equals(before.subarray(4100))).toBe(true);
    c.request(Cmd.DISC, 0, 12, 0, 0);
    await c.closed;

    const ro = (await RawNbd.connect(srv.port)).c;
    const info = await ro.open('ro');
    expect(info.flags & TxFlag.READ_ONLY).toBeTruthy();
    ro.request(Cmd.WRITE, 0, 1, 0, 512, Buffer.alloc(512, 1));
    expect(await ro.simple()).toMatchObject({ err: NbdErr.EPERM, handle: 1 });
    ro.request(Cmd.TRIM, 0, 2, 0, 512);
    expect(await ro.simple()).toMatchObject({ err: NbdErr.EPERM, handle: 2 });
    // A bad request magic ends the connection.
    ro.send(Buffer.alloc(28, 0x7f));
    await ro.closed;
    expect(readFileSync(srv.image).subarray(0, 512).equals(before.subarray(0, 512))).toBe(true);
    await stillServes(srv.uri);
  });

  it('structured replies: data, hole and error chunks; block status', async () => {
    const srv = await serveImage({ size: '4M' });
    await qemuIo(['-f', 'raw', srv.uri], ['write -P 9 0 512k', 'write -z 512k 3584k']);
    const { c } = await RawNbd.connect(srv.port);
    await c.open('disk', { structured: true, contexts: ['base:allocation'] });
    c.request(Cmd.READ, 0, 1, 4096, 4096);
    const d = await c.chunk();
    expect(d).toMatchObject({
      magic: STRUCTURED_REPLY_MAGIC,
      type: ReplyType.OFFSET_DATA,
      flags: 1,
      handle: 1,
    });
    expect(d.payload.length).toBe(8 + 4096);
    expect(d.payload.subarray(8).every((b) => b === 9)).toBe(true);
    // A large read across data and a hole: the hole comes as OFFSET_HOLE.
    c.request(Cmd.READ, 0, 2, 0, 2 * MiB);
    const chunks = [await c.chunk()];
    while (!(chunks[chunks.length - 1]!.flags & 1)) chunks.push(await c.chunk());
    const holes = chunks.filter((k) => k.type === ReplyType.OFFSET_HOLE);
    expect(holes.length).toBeGreaterThan(0);
    const covered = chunks.reduce(
      (n, k) => n + (k.type === ReplyType.OFFSET_HOLE ? k.payload.readUInt32BE(8) : k.payload.length - 8),
      0,
    );
    expect(covered).toBe(2 * MiB);
    // Errors are structured error chunks with a message.
    c.request(Cmd.READ, 0, 3, 4 * MiB, 512);
    const e = await c.chunk();
    expect(e).toMatchObject({ type: ReplyType.ERROR, flags: 1, handle: 3 });
    expect(e.payload.readUInt32BE(0)).toBe(NbdErr.EINVAL);
    c.request(Cmd.BLOCK_STATUS, 0, 4, 0, 4 * MiB);
    const bs = await c.chunk();
    expect(bs.type).toBe(ReplyType.BLOCK_STATUS);
    const desc: number[][] = [];
    for (let p = 4; p < bs.payload.length; p += 8)
      desc.push([bs.payload.readUInt32BE(p), bs.payload.readUInt32BE(p + 4)]);
    expect(desc[0]).toEqual([512 * 1024, 0]);
    expect(desc.reduce((n, x) => n + x[0]!, 0)).toBe(4 * MiB);
    c.request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 5, 0, 4 * MiB);
    const one = await c.chunk();
    expect(one.payload.length).toBe(12);
    c.end();
  });

  it('a client vanishing mid-write writes nothing; others keep being served', async () => {
    const srv = await serveImage({ size: '2M' });
    const before = readFileSync(srv.image);
    const { c } = await RawNbd.connect(srv.port);
    await c.open('disk');
    c.request(Cmd.WRITE, 0, 1, 0, MiB, Buffer.alloc(MiB / 2, 0xee));
    await new Promise((r) => setTimeout(r, 100));
    c.end();
    await c.closed;
    await new Promise((r) => setTimeout(r, 100));
    expect(readFileSync(srv.image).equals(before)).toBe(true);
    await stillServes(srv.uri);
  });

  it('backpressure: a client that never reads replies does not make the server buffer without bound', async () => {
    const { node, port } = await serveMem();
    const { c } = await RawNbd.connect(port);
    await c.open('m');
    c.sock.pause();
    // Every read the server started is a 1 MiB reply it holds until the client takes it (the
    // process's memory counts other tests' buffers and the GC's pace; this counts only these).
    const started = () => mem(node).log.filter(([op]) => op === 'read').length;
    const n = 400;
    for (let i = 0; i < n; i++) c.request(Cmd.READ, 0, i, 0, MiB);
    await waitFor(() => started() >= 32, { what: 'the server reading ahead' });
    // Time for a server without limits to take on (nearly) all 400.
    await new Promise((r) => setTimeout(r, 1500));
    // 400 MiB of replies were asked for; the server holds at most its limits' worth.
    expect(started()).toBeLessThan(160);
    c.sock.resume();
    let got = 0;
    for (let i = 0; i < n; i++) {
      const r = await c.simple();
      expect(r.err).toBe(0);
      c.q.skip(MiB);
      await c.q.read(0);
      got++;
    }
    expect(got).toBe(n);
    c.end();
  });

  it('limits: handshake timeout, per-export and per-listener connection limits', async () => {
    const srv = await serveImage({ size: '1M' });
    const server = new NbdServer(srv.graph, { handshakeTimeoutMs: 200 });
    onCleanup(() => server.close());
    const a = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 }, { maxConnections: 2 });
    const port = a.type === 'inet' ? Number(a.port) : 0;
    server.addExport({ node: srv.node, name: 'one', writable: false, maxConnections: 1 });
    const idle = (await RawNbd.connect(port)).c;
    await idle.closed; // never finished the handshake
    const first = (await RawNbd.connect(port)).c;
    await first.open('one');
    const second = (await RawNbd.connect(port)).c;
    second.clientFlags(3);
    second.option(Opt.GO, RawNbd.goData('one'));
    expect((await second.reply()).type).toBe(Rep.ERR_POLICY);
    // A third connection exceeds the listener's limit and is dropped at once.
    const third = net3(port);
    await third;
    first.end();
    second.end();
  });
});

/** Resolves when a TCP connection to port is closed by the server. */
function net3(port: number): Promise<void> {
  return import('node:net').then(
    (net) =>
      new Promise<void>((r) => {
        const s = net.connect(port, '127.0.0.1');
        s.on('error', () => r());
        s.on('close', () => r());
        s.resume();
      }),
  );
}

describe('export lifecycle', () => {
  it('removeExport: safe refuses while clients are connected, hard drops them; deleted events', async () => {
    const srv = await serveImage({ size: '1M' });
    const deleted: string[] = [];
    srv.server.onExportDeleted((i) => deleted.push(i.id));
    const { c } = await RawNbd.connect(srv.port);
    await c.open('disk');
    expect(srv.server.exports()).toMatchObject([
      { id: 'disk', name: 'disk', nodeName: 'disk', writable: true, clients: 1 },
    ]);
    await expect(srv.server.removeExport('disk', 'safe')).rejects.toThrow(/still in use/);
    await srv.server.removeExport('disk', 'hard');
    await c.closed;
    expect(deleted).toEqual(['disk']);
    expect(srv.server.exports()).toEqual([]);
    // The node is free again: another export of it works.
    srv.server.addExport({ node: srv.node, name: 'again', writable: true });
    const again = (await RawNbd.connect(srv.port)).c;
    await again.open('again');
    again.end();
  });

  it('an export whose node goes away closes its clients and is deleted', async () => {
    const srv = await serveImage({ size: '1M' });
    const deleted: string[] = [];
    srv.server.on('export-deleted', (i) => deleted.push(i.id));
    const { c } = await RawNbd.connect(srv.port);
    await c.open('disk');
    await srv.graph.closeAll();
    await c.closed;
    await waitFor(() => deleted.length > 0, { what: 'export-deleted' });
    expect(deleted).toEqual(['disk']);
    expect(srv.node.closed).toBe(true);
  });
});

describe('pipelining and block sizes', () => {
  it('replies leave as requests complete, not in request order', async () => {
    const { node, port } = await serveMem();
    mem(node).data.fill(0x11, 0, 4096);
    mem(node).holdOffsets.add(0);
    const { c } = await RawNbd.connect(port);
    await c.open('m');
    onCleanup(() => mem(node).held.get(0)?.());
    c.request(Cmd.READ, 0, 1, 0, 4096); // held by the driver
    c.request(Cmd.READ, 0, 2, 8192, 4096);
    c.request(Cmd.WRITE, 0, 3, 16384, 512, Buffer.alloc(512, 0x22));
    const early: number[] = [];
    for (let i = 0; i < 2; i++) {
      const r = await c.simple();
      expect(r.err).toBe(0);
      early.push(r.handle);
      if (r.handle === 2) await c.q.read(4096);
    }
    expect(early.sort()).toEqual([2, 3]);
    mem(node).held.get(0)!();
    expect(await c.simple()).toMatchObject({ handle: 1, err: 0 });
    expect((await c.q.read(4096)).every((b) => b === 0x11)).toBe(true);
    c.end();
  });

  it('advertises the node limits as block sizes; our client honours them', async () => {
    const { node, port } = await serveMem({ align: 512, maxTransfer: 65536 });
    const { c } = await RawNbd.connect(port);
    c.clientFlags(3);
    c.option(Opt.GO, RawNbd.goData('m'));
    const info = (await c.replies()).find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === 3)!;
    expect([info.data.readUInt32BE(2), info.data.readUInt32BE(6), info.data.readUInt32BE(10)]).toEqual([
      512, 4096, 65536,
    ]);
    // The client acknowledged block sizes: a misaligned request is refused.
    c.request(Cmd.READ, 0, 1, 100, 512);
    expect(await c.simple()).toMatchObject({ err: NbdErr.EINVAL });
    c.end();

    const g = newGraph();
    const remote = await g.open({
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port },
      export: 'm',
    });
    expect(remote.limits.requestAlignment).toBe(512);
    expect(remote.limits.maxTransfer).toBe(65536);
    const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
    blk.attach(remote);
    onCleanup(() => blk.detach());
    mem(node).log.length = 0;
    await blk.write(1000, Buffer.alloc(3000, 0x44)); // unaligned: read-modify-write on the client
    await blk.read(0, 256 * 1024); // above the maximum: split
    for (const [, off, len] of mem(node).log) {
      expect(off % 512).toBe(0);
      expect(len % 512).toBe(0);
      expect(len).toBeLessThanOrEqual(65536);
    }
    expect(
      mem(node)
        .data.subarray(1000, 4000)
        .every((b) => b === 0x44),
    ).toBe(true);
    expect(mem(node).data[999]).toBe(0);
  });

  it('server close answers the requests in flight before closing', async () => {
    const { node, port, server } = await serveMem();
    mem(node).data.fill(0x42, 0, 4096);
    mem(node).holdOffsets.add(0);
    const { c } = await RawNbd.connect(port);
    await c.open('m');
    c.request(Cmd.READ, 0, 1, 0, 4096);
    await waitFor(() => mem(node).held.has(0), { what: 'the read held in the driver' });
    const closing = server.close();
    await new Promise((r) => setTimeout(r, 50));
    mem(node).held.get(0)!();
    expect(await c.simple()).toMatchObject({ handle: 1, err: 0 });
    expect((await c.q.read(4096)).every((b) => b === 0x42)).toBe(true);
    await closing;
    await c.closed;
  });
});
