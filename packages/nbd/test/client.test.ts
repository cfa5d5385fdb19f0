import { spawn } from 'node:child_process';
import { BlockBackend, BlockError, Perm } from '@blockrep/block';
import {
  freePort,
  makeCerts,
  makeTempDir,
  patternBuffer,
  qemuImg,
  qemuIo,
  tcpAccepts,
  unixAccepts,
  waitFor,
} from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { NbdTlsCreds, registerTlsCreds, unregisterTlsCreds } from '../src/index';
import { newGraph, onCleanup, serveImage } from './helpers';

/** Starts a QEMU NBD server process and waits until it accepts connections. */
async function startPeer(cmd: string, args: string[], ready: () => Promise<boolean>): Promise<void> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  onCleanup(
    () =>
      new Promise<void>((r) => {
        if (child.exitCode !== null) return r();
        child.once('exit', () => r());
        child.kill('SIGTERM');
      }),
  );
  await waitFor(
    async () => {
      if (child.exitCode !== null) throw new Error(`${cmd} exited: ${stderr}`);
      return ready();
    },
    { intervalMs: 50, what: () => `${cmd} accepting connections (stderr: ${stderr})` },
  );
}

function openBackend(
  graph: ReturnType<typeof newGraph>,
  node: Awaited<ReturnType<ReturnType<typeof newGraph>['open']>>,
) {
  const blk = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  onCleanup(() => blk.detach());
  return blk;
}

describe('nbd client driver', () => {
  it('reads and writes an export of our own server, pipelined, with block status', async () => {
    const srv = await serveImage({ size: '8M' });
    const g = newGraph();
    const node = await g.open({
      driver: 'nbd',
      'node-name': 'remote',
      server: { type: 'inet', host: '127.0.0.1', port: String(srv.port) },
      export: 'disk',
    });
    expect(node.length).toBe(8 << 20);
    const blk = openBackend(g, node);
    // 32 writes in flight at once, each a different pattern.
    await Promise.all(
      Array.from({ length: 32 }, (_, i) => blk.write(i * 65536, patternBuffer(65536, i + 1))),
    );
    const back = await Promise.all(Array.from({ length: 32 }, (_, i) => blk.read(i * 65536, 65536)));
    for (const [i, b] of back.entries()) expect(b.equals(patternBuffer(65536, i + 1))).toBe(true);
    await blk.writeZeroes(4 << 20, 1 << 20, 0);
    await blk.flush();
    const st = await blk.blockStatus(0, 8 << 20);
    expect(st.data).toBe(true);
    expect(st.bytes).toBe(2 << 20);
    const hole = await blk.blockStatus(6 << 20, 1 << 20);
    expect(hole.zero).toBe(true);
    // What the client wrote is in the image file.
    await qemuIo(['-f', 'raw', srv.image], ['read -P 5 262144 65536']);
  });

  it('reads and writes an export of qemu-nbd (unix socket, nbd+unix URI)', async () => {
    const dir = makeTempDir();
    const img = dir.file('q.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
    await qemuIo(['-f', 'qcow2', img], ['write -P 0x11 0 1M']);
    const sock = dir.file('nbd.sock');
    // Ready once it accepts: qemu-nbd creates the socket file before it listens on it.
    await startPeer('qemu-nbd', ['-f', 'qcow2', '-x', 'q', '-k', sock, '-t', '-e', '4', img], () =>
      unixAccepts(sock),
    );
    const g = newGraph();
    const node = await g.open({ driver: 'nbd', 'node-name': 'q', filename: `nbd+unix:///q?socket=${sock}` });
    const blk = openBackend(g, node);
    expect((await blk.read(0, 4096)).equals(patternBuffer(4096, 0x11))).toBe(true);
    await blk.write(2 << 20, patternBuffer(8192, 0x22), 0x1);
    expect((await blk.read(2 << 20, 8192)).equals(patternBuffer(8192, 0x22))).toBe(true);
    const st = await blk.blockStatus(3 << 20, 1 << 20);
    expect(st.data).toBe(false);
    await blk.detach();
    await g.close(node);
  });

  it('reads and writes an export of qemu-storage-daemon (TCP)', async () => {
    const dir = makeTempDir();
    const img = dir.file('s.img');
    await qemuImg(['create', '-q', '-f', 'raw', img, '2M']);
    const port = await freePort();
    await startPeer(
      'qemu-storage-daemon',
      [
        '--blockdev',
        `driver=file,filename=${img},node-name=f`,
        '--nbd-server',
        `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
        '--export',
        'type=nbd,id=e0,node-name=f,name=s,writable=on',
      ],
      () => tcpAccepts(port),
    );
    const g = newGraph();
    const node = await g.open({
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port },
      export: 's',
    });
    const blk = openBackend(g, node);
    await blk.write(4096, patternBuffer(4096 * 3, 0x5a));
    expect((await blk.read(4096, 4096 * 3)).equals(patternBuffer(4096 * 3, 0x5a))).toBe(true);
    await blk.detach();
    await g.close(node);
    await qemuIo(['-f', 'raw', '-r', '-U', img], ['read -P 0x5a 4096 12288']);
  });

  it('reports errors, not hangs, when the server is gone or the export unknown', async () => {
    const port = await freePort();
    const g = newGraph();
    await expect(
      g.open({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port }, export: 'x' }),
    ).rejects.toThrow(/Failed to connect/);
    const srv = await serveImage({ size: '1M' });
    await expect(
      g.open({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: srv.port }, export: 'nope' }),
    ).rejects.toThrow(/export not found/);
    const node = await g.open({
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port: srv.port },
      export: 'disk',
    });
    const blk = openBackend(g, node);
    await blk.read(0, 512);
    await srv.server.close();
    const err = await blk.read(0, 512).catch((e) => e);
    expect(err).toBeInstanceOf(BlockError);
    expect((err as BlockError).errno).toBe('EIO');
  });

  it('reconnect-delay: requests wait for the server to come back; open-timeout retries the first connect', async () => {
    const srv = await serveImage({ size: '1M' });
    const g = newGraph();
    const node = await g.open({
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port: srv.port },
      export: 'disk',
      'reconnect-delay': 5,
    });
    const blk = openBackend(g, node);
    await blk.write(0, patternBuffer(512, 7));
    // Server goes away, and comes back on the same port a little later.
    await srv.server.close();
    const pending = blk.read(0, 512);
    await new Promise((r) => setTimeout(r, 300));
    const { NbdServer } = await import('../src/index');
    const again = new NbdServer(srv.graph);
    onCleanup(() => again.close());
    await again.listen({ type: 'inet', host: '127.0.0.1', port: srv.port });
    const srcNode = srv.graph.lookup('disk');
    again.addExport({ node: srcNode, name: 'disk', writable: true });
    expect((await pending).equals(patternBuffer(512, 7))).toBe(true);

    // open-timeout: the server starts listening only after the open began.
    const port = await freePort();
    const opening = g.open({
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port },
      export: 'disk',
      'open-timeout': 5,
    });
    await new Promise((r) => setTimeout(r, 400));
    await again.listen({ type: 'inet', host: '127.0.0.1', port });
    const late = await opening;
    expect(late.length).toBe(1 << 20);
    // Closed while the server is up: the final flush must not wait out the reconnect-delay.
    await blk.detach();
    await g.closeAll();
  });

  it('TLS: tls-creds negotiates STARTTLS with a TLS-only server; without it the error says TLS is required', async () => {
    const srv = await serveImage({ size: '1M' });
    const pki = srv.dir.file('pki');
    makeCerts(pki);
    const addr = await srv.server.listen(
      { type: 'inet', host: '127.0.0.1', port: 0 },
      { tlsCreds: new NbdTlsCreds({ endpoint: 'server', dir: pki }) },
    );
    const port = addr.type === 'inet' ? addr.port : 0;
    registerTlsCreds(new NbdTlsCreds({ id: 'tls-test', endpoint: 'client', dir: pki }));
    onCleanup(() => unregisterTlsCreds('tls-test'));
    const g = newGraph();
    /** The export on this server, with these TLS options. */
    const openTls = (tls: Record<string, string>) =>
      g.open({ driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port }, export: 'disk', ...tls });
    await expect(openTls({})).rejects.toThrow(/requires TLS/);
    const node = await openTls({ 'tls-creds': 'tls-test' });
    const blk = openBackend(g, node);
    await blk.write(0, patternBuffer(65536, 0x3c));
    expect((await blk.read(0, 65536)).equals(patternBuffer(65536, 0x3c))).toBe(true);
    // The certificate names 127.0.0.1 and localhost, not this.
    await expect(openTls({ 'tls-creds': 'tls-test', 'tls-hostname': 'elsewhere.example' })).rejects.toThrow(
      /TLS handshake failed/,
    );
    // Credentials of the wrong end, with QEMU's text, on either side.
    await expect(
      srv.server.listen(
        { type: 'inet', host: '127.0.0.1', port: 0 },
        { tlsCreds: new NbdTlsCreds({ endpoint: 'client', dir: pki }) },
      ),
    ).rejects.toThrow(/^Expected TLS credentials for a server endpoint$/);
    registerTlsCreds(new NbdTlsCreds({ id: 'tls-srv', endpoint: 'server', dir: pki }));
    onCleanup(() => unregisterTlsCreds('tls-srv'));
    await expect(openTls({ 'tls-creds': 'tls-srv' })).rejects.toThrow(
      /Expected TLS credentials for a client endpoint/,
    );
  });
});
