import { readFileSync, writeFileSync } from 'node:fs';
import { addDirtyBitmap } from '@blockrep/block';
import { hasPeer, makeCerts, qemuImg, qemuIo, runPeer } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { NbdTlsCreds } from '../src/index';
import { serveImage } from './helpers';

describe('our server with QEMU and libnbd tools', () => {
  it('qemu-io over TCP and a Unix socket: write, read back, zero, discard', async () => {
    const srv = await serveImage({ size: '8M' });
    const sock = srv.dir.file('nbd.sock');
    await srv.server.listen({ type: 'unix', path: sock });
    await qemuIo(
      ['-f', 'raw', srv.uri],
      ['write -P 0xa5 0 1M', 'write -P 0x5a -f 1M 64k', 'write -z 2M 1M', 'discard 3M 1M', 'flush'],
    );
    const r = await qemuIo(
      ['-f', 'raw', `nbd+unix:///disk?socket=${sock}`],
      ['read -P 0xa5 0 1M', 'read -P 0x5a 1M 64k', 'read -P 0 2M 1M'],
    );
    expect(r.stdout).toContain('read 1048576/1048576 bytes at offset 0');
    // The data reached the file (read directly, not through NBD).
    const f = readFileSync(srv.image);
    expect(f.subarray(0, 1 << 20).every((b) => b === 0xa5)).toBe(true);
    expect(f.subarray(1 << 20, (1 << 20) + 65536).every((b) => b === 0x5a)).toBe(true);
  });

  it('qemu-img convert to and from an export, and compare', async () => {
    const srv = await serveImage({ size: '4M' });
    const src = srv.dir.file('src.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', src, '4M']);
    await qemuIo(['-f', 'qcow2', src], ['write -P 0x33 0 512k', 'write -P 0x44 3M 256k']);
    await qemuImg(['convert', '-n', '-f', 'qcow2', '-O', 'raw', src, srv.uri]);
    await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', src, srv.uri]);
    const back = srv.dir.file('back.qcow2');
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', srv.uri, back]);
    await qemuImg(['compare', back, src]);
    // A difference is noticed.
    await qemuIo(['-f', 'raw', srv.uri], ['write -P 0x99 1M 4k']);
    const diff = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', src, srv.uri], { okCodes: [1] });
    expect(diff.stdout).toMatch(/Content mismatch at offset 1048576/);
  });

  it('nbdinfo --list and --map; qemu:dirty-bitmap context', async () => {
    const srv = await serveImage({ size: '4M', description: 'the test disk' });
    const bm = addDirtyBitmap(srv.node, { name: 'b0', granularity: 65536 });
    srv.server.addExport({
      node: srv.node,
      name: 'ro',
      writable: false,
      bitmaps: ['b0'],
      allocationDepth: true,
    });
    await qemuIo(['-f', 'raw', srv.uri], ['write -P 1 1M 128k']);
    expect(bm.count()).toBe(128 << 10);
    const list = await runPeer('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`]);
    const j = JSON.parse(list.stdout);
    const names = j.exports.map((e: any) => e['export-name']).sort();
    expect(names).toEqual(['disk', 'ro']);
    const disk = j.exports.find((e: any) => e['export-name'] === 'disk');
    expect(disk.description).toBe('the test disk');
    expect(disk['export-size']).toBe(4 << 20);
    const ro = j.exports.find((e: any) => e['export-name'] === 'ro');
    expect(ro.is_read_only).toBe(true);
    expect(ro.contexts).toContain('qemu:dirty-bitmap:b0');
    const map = await runPeer('nbdinfo', ['--map', '--json', srv.uri]);
    const extents = JSON.parse(map.stdout) as { offset: number; length: number; type: number }[];
    // qemu-img create allocates the first 4k of a raw file; then the write; the rest is a hole.
    expect(extents.filter((e) => e.offset > 4096)).toEqual([
      { offset: 1 << 20, length: 128 << 10, type: 0, description: 'data' },
      { offset: (1 << 20) + (128 << 10), length: (3 << 20) - (128 << 10), type: 3, description: 'hole,zero' },
    ]);
    const dirty = await runPeer('nbdinfo', [
      '--map=qemu:dirty-bitmap:b0',
      '--json',
      `nbd://127.0.0.1:${srv.port}/ro`,
    ]);
    const d = JSON.parse(dirty.stdout) as { offset: number; length: number; type: number }[];
    expect(d.filter((e) => e.type === 1)).toEqual([
      { offset: 1 << 20, length: 128 << 10, type: 1, description: 'dirty' },
    ]);
    expect(ro.contexts).toContain('qemu:allocation-depth');
    const depth = await runPeer('nbdinfo', [
      '--map=qemu:allocation-depth',
      '--json',
      `nbd://127.0.0.1:${srv.port}/ro`,
    ]);
    // A raw file holds all of its data itself: depth 1 ("local") throughout.
    expect(JSON.parse(depth.stdout)).toEqual([{ offset: 0, length: 4 << 20, type: 1, description: 'local' }]);
    // Writes to the read-only export are refused.
    const w = await qemuIo(['-f', 'raw', `nbd://127.0.0.1:${srv.port}/ro`], ['write 0 4k'], {
      okCodes: [0, 1],
    });
    expect(w.stdout + w.stderr).toMatch(/read-only|Operation not permitted|Permission denied/);
  });

  it('nbdcopy both ways', async () => {
    const srv = await serveImage({ size: '8M' });
    const local = srv.dir.file('local.img');
    writeFileSync(
      local,
      Buffer.concat([Buffer.alloc(2 << 20, 0x61), Buffer.alloc(4 << 20), Buffer.alloc(2 << 20, 0x62)]),
    );
    await runPeer('nbdcopy', [local, srv.uri]);
    const out = srv.dir.file('out.img');
    await runPeer('nbdcopy', [srv.uri, out]);
    expect(readFileSync(out).equals(readFileSync(local))).toBe(true);
    expect(readFileSync(srv.image).equals(readFileSync(local))).toBe(true);
  });

  it.skipIf(!hasPeer('fio'))('fio nbd engine: verified random writes at depth 16', async () => {
    const srv = await serveImage({ size: '16M' });
    const r = await runPeer('fio', [
      '--name=v',
      '--ioengine=nbd',
      `--uri=${srv.uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=4M',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_state_save=0',
      '--output-format=json',
    ]);
    const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
    expect(j.jobs[0].error).toBe(0);
    expect(j.jobs[0].write.io_bytes).toBe(4 << 20);
  });

  it('TLS: qemu-img reaches a TLS-only listener with x509 credentials; plain clients are refused', async () => {
    const srv = await serveImage({ size: '1M' });
    const dir = srv.dir.file('pki');
    makeCerts(dir);
    const tlsAddr = await srv.server.listen(
      { type: 'inet', host: '127.0.0.1', port: 0 },
      { tlsCreds: new NbdTlsCreds({ endpoint: 'server', dir }) },
    );
    const port = tlsAddr.type === 'inet' ? tlsAddr.port : 0;
    const obj = `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}`;
    const img = `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`;
    await qemuIo(['--object', obj, '--image-opts', img], ['write -P 0x77 0 64k']);
    const info = await qemuImg(['info', '--object', obj, '--image-opts', img]);
    expect(info.stdout).toContain('virtual size: 1 MiB');
    expect(
      readFileSync(srv.image)
        .subarray(0, 65536)
        .every((b) => b === 0x77),
    ).toBe(true);
    const plain = await qemuIo(['-f', 'raw', `nbd://127.0.0.1:${port}/disk`], ['read 0 4k'], {
      okCodes: [0, 1],
    });
    expect(plain.code).toBe(1);
    expect(plain.stderr).toMatch(/TLS/);
  });
});
