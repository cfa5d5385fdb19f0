import { describe, expect, it } from 'vitest';
import { BufferPool } from '../src/buffer-pool';
import { ByteQueue } from '../src/byte-queue';
import { parseNbdUri } from '../src/index';
import { errnoToNbd, NbdErr, nbdToErrno } from '../src/protocol';

describe('ByteQueue', () => {
  it('hands out views inside a chunk and joins only across chunks', () => {
    const q = new ByteQueue();
    const a = Buffer.from('abcdef');
    q.push(a);
    q.push(Buffer.from('ghij'));
    const v = q.take(3);
    expect(v.toString()).toBe('abc');
    expect(v.buffer).toBe(a.buffer); // a view, not a copy
    expect(q.peekUInt32BE()).toBe(Buffer.from('defg').readUInt32BE(0));
    expect(q.take(5).toString()).toBe('defgh');
    expect(q.length).toBe(2);
    q.push(Buffer.from('klmn'));
    const iov = q.takeIov(4);
    expect(iov.map((b) => b.toString())).toEqual(['ij', 'kl']);
    expect(q.skip(10)).toBe(2);
    expect(q.length).toBe(0);
  });

  it('read() waits for enough bytes and fails when the connection ends', async () => {
    const q = new ByteQueue();
    const p = q.read(4);
    q.push(Buffer.from('ab'));
    q.push(Buffer.from('cd'));
    expect((await p).toString()).toBe('abcd');
    const waiting = q.read(1);
    q.fail();
    await expect(waiting).rejects.toThrow(/closed/);
    await expect(q.read(1)).rejects.toThrow(/closed/);
  });
});

describe('helpers', () => {
  it('parses NBD URIs as QEMU writes them', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10809/disk0')).toEqual({
      server: { type: 'inet', host: '127.0.0.1', port: '10809' },
      export: 'disk0',
    });
    expect(parseNbdUri('nbd://localhost')).toEqual({
      server: { type: 'inet', host: 'localhost', port: '10809' },
      export: '',
    });
    expect(parseNbdUri('nbd+unix:///e?socket=/run/x.sock')).toEqual({
      server: { type: 'unix', path: '/run/x.sock' },
      export: 'e',
    });
    expect(() => parseNbdUri('nbd+unix:///e')).toThrow(/socket/);
    expect(() => parseNbdUri('http://x/')).toThrow(/scheme/);
  });

  it('maps errnos both ways onto the values the spec allows', () => {
    expect(errnoToNbd('ENOSPC')).toBe(NbdErr.ENOSPC);
    expect(errnoToNbd('EACCES')).toBe(NbdErr.EPERM);
    expect(errnoToNbd('ENOMEDIUM')).toBe(NbdErr.ESHUTDOWN);
    expect(errnoToNbd('EBUSY')).toBe(NbdErr.EIO);
    expect(nbdToErrno(NbdErr.ENOTSUP)).toBe('ENOTSUP');
    expect(nbdToErrno(12345)).toBe('EIO');
  });

  it('BufferPool reuses released buffers of the same size, within its budget', () => {
    const pool = new BufferPool(8192, 4);
    const a = pool.get(4096);
    pool.release(a);
    expect(pool.get(4096)).toBe(a);
    const big = pool.get(16384);
    pool.release(big);
    expect(pool.get(16384)).not.toBe(big); // over the budget: not kept
  });
});
