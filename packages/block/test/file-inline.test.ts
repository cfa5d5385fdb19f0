import { execFileSync } from 'node:child_process';
import {
  closeSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  writeFileSync,
} from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { makeTempDir, waitFor } from '@blockrep/test-kit';
import { describe, expect, it, vi } from 'vitest';
import { fileWriteCounts, InlineWriteGate, writeGate } from '../src/drivers/file/file';
import { sparse } from '../src/drivers/file/sparse';
import { iovIsZero, ReqFlags } from '../src/index';
import { fileBackend } from './helpers';

// BLOCKREP_INLINE_WRITES=0 (read when a file node opens) sends every write to the thread pool;
// the last block uses it to test that path.

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

/** Drops a file's clean pages from the page cache (python3's posix_fadvise). */
function dropCache(file: string): void {
  execFileSync('python3', [
    '-c',
    'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)',
    file,
  ]);
}

// Small requests run inline (reads from the page cache without waiting, writes while quick);
// large ones and aio=threads go through the thread pool. Every path must give the same bytes.
describe.each([{ aio: undefined }, { aio: 'threads' }])('file I/O with aio=$aio', ({ aio }) => {
  it('writes and reads small, vectored and large requests', async () => {
    const f = makeTempDir().file('d.img');
    writeFileSync(f, Buffer.alloc(4 << 20));
    const { g, blk } = await fileBackend(f, aio);
    const small = pattern(4096, 1);
    const vec = [pattern(1000, 2), pattern(3096, 3), pattern(4096, 4)];
    const large = pattern(1 << 20, 5);
    await blk.write(8192, small);
    await blk.write(65536, vec);
    await blk.write(1 << 20, large);
    expect((await blk.read(8192, 4096)).equals(small)).toBe(true);
    const back = [Buffer.alloc(5000, 0xff), Buffer.alloc(3192, 0xff)];
    await blk.readv(65536, back);
    expect(Buffer.concat(back).equals(Buffer.concat(vec))).toBe(true);
    expect((await blk.read(1 << 20, 1 << 20)).equals(large)).toBe(true);
    await g.closeAll();
    const disk = readFileSync(f);
    expect(disk.subarray(8192, 12288).equals(small)).toBe(true);
    expect(disk.subarray(65536, 65536 + 8192).equals(Buffer.concat(vec))).toBe(true);
    expect(disk.subarray(1 << 20, 2 << 20).equals(large)).toBe(true);
  });

  it('small writes alongside large ones in the thread pool all land', async () => {
    const f = makeTempDir().file('mix.img');
    writeFileSync(f, Buffer.alloc(8 << 20));
    const { g, blk } = await fileBackend(f, aio);
    const large = Array.from({ length: 4 }, (_, i) => pattern(1 << 20, 20 + i));
    const small = Array.from({ length: 64 }, (_, i) => pattern(4096, 40 + i));
    await Promise.all([
      ...large.map((b, i) => blk.write(i << 20, b)),
      ...small.map((b, i) => blk.write((4 << 20) + i * 8192, b)),
    ]);
    await g.closeAll();
    const disk = readFileSync(f);
    large.forEach((b, i) => {
      expect(disk.subarray(i << 20, (i + 1) << 20).equals(b)).toBe(true);
    });
    small.forEach((b, i) => {
      const at = (4 << 20) + i * 8192;
      expect(disk.subarray(at, at + 4096).equals(b)).toBe(true);
    });
  });

  it('reads zeroes past the end of a file whose length is not sector aligned', async () => {
    const f = makeTempDir().file('short.img');
    writeFileSync(f, pattern(6000, 9));
    const { g, blk } = await fileBackend(f, aio);
    const got = Buffer.alloc(2048, 0xff);
    await blk.readv(4096, [got]);
    expect(got.subarray(0, 1904).equals(pattern(6000, 9).subarray(4096))).toBe(true);
    expect(got.subarray(1904).every((x) => x === 0)).toBe(true);
    await g.closeAll();
  });

  it('reads data the page cache no longer holds', async () => {
    const f = makeTempDir().file('cold.img');
    const data = pattern(256 << 10, 11);
    writeFileSync(f, data);
    dropCache(f);
    const { g, blk } = await fileBackend(f, aio);
    for (let off = 0; off < data.length; off += 16384) {
      expect((await blk.read(off, 16384)).equals(data.subarray(off, off + 16384))).toBe(true);
    }
    await g.closeAll();
  });
});

describe.runIf(sparse.available)('readCached', () => {
  it('returns what the page cache holds, short at the end of the file, -1 for bad buffers', () => {
    const f = makeTempDir().file('c.img');
    writeFileSync(f, pattern(6000, 3));
    const fd = openSync(f, 'r');
    try {
      const b = Buffer.alloc(4096);
      expect(sparse.readCached(fd, b, 0)).toBe(4096);
      expect(b.equals(pattern(6000, 3).subarray(0, 4096))).toBe(true);
      const v = [Buffer.alloc(1000), Buffer.alloc(3000)];
      expect(sparse.readCached(fd, v, 4096)).toBe(1904);
      expect(Buffer.concat(v).subarray(0, 1904).equals(pattern(6000, 3).subarray(4096))).toBe(true);
      expect(sparse.readCached(fd, [1 as unknown as Buffer], 0)).toBe(-1);
    } finally {
      closeSync(fd);
    }
  });
});

describe('InlineWriteGate', () => {
  it('closes for the back-off period after a slow write, not after quick ones', () => {
    const gate = new InlineWriteGate(1, 200);
    gate.took(0, 0.5);
    expect(gate.open(1)).toBe(true);
    gate.took(10, 12);
    expect(gate.open(12)).toBe(false);
    expect(gate.open(211)).toBe(false);
    expect(gate.open(212)).toBe(true);
  });
});

describe('inline writes after a back-off', () => {
  it('go inline again once it ends, though small writes are still in the thread pool', async () => {
    const f = makeTempDir().file('backoff.img');
    writeFileSync(f, Buffer.alloc(8 << 20));
    const { g, blk, node } = await fileBackend(f);
    // The gate's clock (performance.now) is faked: the back-off ends when the test moves it on,
    // however slow the machine, and no write is slow on it (which would start another back-off).
    vi.useFakeTimers({ toFake: ['performance'] });
    try {
      // A write just took 5 ms: writes go to the thread pool for the next 200 ms.
      const t = performance.now();
      writeGate.took(t - 5, t);
      let stop = false;
      const buf = Buffer.alloc(4096, 7);
      const loops = Array.from({ length: 16 }, async (_, k) => {
        for (let i = 0; !stop; i++) {
          await blk.write(((i * 16 + k) % 2048) * 4096, buf);
          // An inline write ends without the event loop: let it run (and the test see the counts).
          await new Promise((r) => setImmediate(r));
        }
      });
      await waitFor(() => fileWriteCounts(node).pool >= 32, { what: 'writes in the thread pool' });
      const during = fileWriteCounts(node);
      expect(during.inline).toBe(0);
      expect(during.pool).toBeGreaterThan(0);
      vi.advanceTimersByTime(200);
      await waitFor(() => fileWriteCounts(node).inline > 0, { what: 'an inline write after the back-off' });
      stop = true;
      await Promise.all(loops);
      expect(fileWriteCounts(node).inline).toBeGreaterThan(0);
    } finally {
      vi.useRealTimers();
    }
    await g.closeAll();
  });
});

describe('with BLOCKREP_INLINE_WRITES=0', () => {
  it('small writes go through the thread pool (reads may still run inline)', async () => {
    process.env.BLOCKREP_INLINE_WRITES = '0';
    const f = makeTempDir().file('default.img');
    writeFileSync(f, Buffer.alloc(1 << 20));
    const { g, blk, node } = await fileBackend(f);
    await Promise.all(Array.from({ length: 8 }, (_, i) => blk.write(i * 4096, Buffer.alloc(4096, i))));
    expect(fileWriteCounts(node)).toEqual({ inline: 0, pool: 8, thread: 0 });
    expect((await blk.read(4096, 4096))[0]).toBe(1);
    await g.closeAll();
  });

  it('overlapping writes land in the order they were issued', async () => {
    process.env.BLOCKREP_INLINE_WRITES = '0';
    const f = makeTempDir().file('order.img');
    writeFileSync(f, Buffer.alloc(4 << 20));
    const { g, blk } = await fileBackend(f);
    // Many writes to the same 64 KiB, all in flight at once: the last one issued must win.
    await Promise.all(Array.from({ length: 32 }, (_, i) => blk.write(0, Buffer.alloc(65536, i + 1))));
    expect((await blk.read(0, 65536)).every((x) => x === 32)).toBe(true);
    await g.closeAll();
    expect(
      readFileSync(f)
        .subarray(0, 65536)
        .every((x) => x === 32),
    ).toBe(true);
  });
});

describe('requests waiting for an earlier one keep their place', () => {
  // A waits in the thread pool; B overlaps A and waits for it; C overlaps only B, and must not
  // overtake it (C is issued last, so C's data must be what stays).
  it.each(['write', 'discard'] as const)('a write after a waiting %s lands after it', async (op) => {
    const f = makeTempDir().file(`chain-${op}.img`);
    writeFileSync(f, Buffer.alloc(16 << 20));
    const { g, blk } = await fileBackend(f, undefined, { discard: 'unmap' });
    const M = 8 << 20;
    for (let round = 0; round < 4; round++) {
      const a = blk.write(0, Buffer.alloc(M, 0x10 + round));
      await new Promise((r) => setImmediate(r));
      const b =
        op === 'write' ? blk.write(M - 4096, Buffer.alloc(8192, 0xbb)) : blk.discard(M - (1 << 20), 2 << 20);
      const c = blk.write(M, Buffer.alloc(4096, 0xcc));
      await Promise.all([a, b, c]);
      const back = await blk.read(M, 4096);
      expect(
        back.every((x) => x === 0xcc),
        `round ${round}`,
      ).toBe(true);
    }
    await g.closeAll();
    expect(
      readFileSync(f)
        .subarray(M, M + 4096)
        .every((x) => x === 0xcc),
    ).toBe(true);
  });
});

describe('zero writes and discards after a write still in the thread pool', () => {
  it.each(['writeZeroes', 'discard'] as const)('%s lands last, as issued', async (op) => {
    const f = makeTempDir().file(`${op}.img`);
    writeFileSync(f, Buffer.alloc(16 << 20));
    const { g, blk } = await fileBackend(f, undefined, { discard: 'unmap' });
    for (let round = 0; round < 4; round++) {
      // 8 MiB go to the thread pool; the zeroing, issued while they are copied, must win.
      const big = blk.write(0, Buffer.alloc(8 << 20, round + 1));
      await new Promise((r) => setImmediate(r));
      const zero =
        op === 'writeZeroes' ? blk.writeZeroes(0, 8 << 20, ReqFlags.MAY_UNMAP) : blk.discard(0, 8 << 20);
      await Promise.all([big, zero]);
      const back = await blk.read(0, 8 << 20);
      expect(iovIsZero([back]), `round ${round}`).toBe(true);
    }
    await g.closeAll();
  });
});

/** This process's descriptors open on `file`, with their open flags (octal, from fdinfo). */
function descriptorsOf(file: string): number[] {
  const out: number[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    let target = '';
    try {
      target = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    if (target !== file && target !== `${file} (deleted)`) continue;
    const flags = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!;
    out.push(Number.parseInt(flags, 8));
  }
  return out;
}

const O_DSYNC = 0o10000;

describe('FUA writes', () => {
  it('go through an O_DSYNC descriptor instead of a flush of the whole file, and it closes with the node', async () => {
    const dir = makeTempDir();
    const f = dir.file('fua.img');
    writeFileSync(f, Buffer.alloc(1 << 20));
    const { g, blk, node } = await fileBackend(f);
    let flushes = 0;
    const orig = node.driver.flushToDisk!;
    node.driver = {
      ...node.driver,
      flushToDisk: (n) => {
        flushes++;
        return orig(n);
      },
    };
    expect(descriptorsOf(f).filter((fl) => fl & O_DSYNC)).toEqual([]);
    await blk.write(4096, pattern(65536, 3), ReqFlags.FUA);
    expect(flushes).toBe(0);
    expect(descriptorsOf(f).filter((fl) => fl & O_DSYNC)).toHaveLength(1);
    expect(
      readFileSync(f)
        .subarray(4096, 4096 + 65536)
        .equals(pattern(65536, 3)),
    ).toBe(true);
    // A plain write after it lands after it (same range, issue order) and stays in the page cache.
    await Promise.all([blk.write(0, pattern(8192, 4), ReqFlags.FUA), blk.write(4096, pattern(4096, 5))]);
    const now = readFileSync(f);
    expect(now.subarray(0, 4096).equals(pattern(8192, 4).subarray(0, 4096))).toBe(true);
    expect(now.subarray(4096, 8192).equals(pattern(4096, 5))).toBe(true);
    await blk.detach();
    await g.closeAll();
    expect(descriptorsOf(f)).toEqual([]);
  });

  it('reach the same file after it was renamed, and a reopen drops the descriptor', async () => {
    const dir = makeTempDir();
    const f = dir.file('a.img');
    writeFileSync(f, Buffer.alloc(65536));
    const { g, blk, node } = await fileBackend(f);
    await blk.write(0, pattern(4096, 1), ReqFlags.FUA);
    renameSync(f, dir.file('b.img'));
    await blk.write(4096, pattern(4096, 2), ReqFlags.FUA);
    const b = readFileSync(dir.file('b.img'));
    expect(b.subarray(0, 8192).equals(Buffer.concat([pattern(4096, 1), pattern(4096, 2)]))).toBe(true);
    await blk.detach();
    // A reopen opens the file by its name again, as QEMU's does.
    renameSync(dir.file('b.img'), f);
    expect(descriptorsOf(f).filter((fl) => fl & O_DSYNC)).toHaveLength(1);
    await g.reopenMultiple([{ node, readOnly: true }]);
    await waitFor(() => descriptorsOf(f).every((fl) => !(fl & O_DSYNC)), {
      what: 'the O_DSYNC descriptor to close',
    });
    await g.closeAll();
  });

  it('fall back to a write and an fdatasync where the O_DSYNC descriptor cannot be opened', async () => {
    const f = makeTempDir().file('noproc.img');
    writeFileSync(f, Buffer.alloc(65536));
    const { g, blk } = await fileBackend(f);
    const syncs: number[] = [];
    // The CommonJS object behind node:fs: what is set on it reaches the driver's import of it.
    const fs = createRequire(import.meta.url)('node:fs') as typeof import('node:fs');
    const open = fs.open;
    const fdatasync = fs.fdatasync;
    // As without /proc: the reopen through /proc/self/fd fails.
    (fs as { open: unknown }).open = (path: string, ...rest: unknown[]) =>
      (open as (...a: unknown[]) => void)(
        String(path).startsWith('/proc/self/fd/') ? '/nonexistent/x' : path,
        ...rest,
      );
    (fs as { fdatasync: unknown }).fdatasync = (fd: number, cb: (e: Error | null) => void) => {
      syncs.push(fd);
      fdatasync(fd, cb);
    };
    syncBuiltinESMExports();
    try {
      await blk.write(0, pattern(4096, 9), ReqFlags.FUA);
      expect(syncs).toHaveLength(1);
      expect(descriptorsOf(f).filter((fl) => fl & O_DSYNC)).toEqual([]);
      expect(readFileSync(f).subarray(0, 4096).equals(pattern(4096, 9))).toBe(true);
    } finally {
      (fs as { open: unknown }).open = open;
      (fs as { fdatasync: unknown }).fdatasync = fdatasync;
      syncBuiltinESMExports();
    }
    await blk.detach();
    await g.closeAll();
  });
});
