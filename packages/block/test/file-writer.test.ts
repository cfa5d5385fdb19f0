import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { makeTempDir, waitFor } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { fileDriver, fileWriteCounts } from '../src/drivers/file/file';
import { openWriter, sparse } from '../src/drivers/file/sparse';
import { fileBackend } from './helpers';

// Large writes go to a writer thread of the file's own (native/writer.c); small ones stay inline
// or in the thread pool, FUA writes in the pool (through the O_DSYNC descriptor). A full disk
// through it, end to end, is tests/src/qcow2/full-disk.test.ts (1 MiB writes on a small tmpfs).

const addonPath = fileURLToPath(
  new URL(`../prebuilds/${process.platform}-${process.arch}/node.napi.node`, import.meta.url),
);

afterEach(() => {
  delete process.env.BLOCKREP_WRITER_THREAD;
});

describe('the writer thread', () => {
  it('is there (the addon is built for this machine)', () => {
    expect(sparse.available).toBe(true);
    const w = openWriter();
    expect(w).not.toBeNull();
    w!.close();
  });

  it('takes the large writes, in the order they were issued, and they land', async () => {
    const f = makeTempDir().file('big.img');
    writeFileSync(f, Buffer.alloc(16 << 20));
    const { g, blk, node } = await fileBackend(f);
    // 16 distinct MiB, then 8 more writes of the same MiB at once: the last issued must win.
    await Promise.all(Array.from({ length: 16 }, (_, i) => blk.write(i << 20, Buffer.alloc(1 << 20, i + 1))));
    await Promise.all(
      Array.from({ length: 8 }, (_, i) => blk.write(3 << 20, Buffer.alloc(1 << 20, 0xa0 + i))),
    );
    // A vectored one, and a small one that stays off the thread.
    await blk.write(5 << 20, [Buffer.alloc(300_000, 0x51), Buffer.alloc(1 << 19, 0x52)]);
    await blk.write(15 << 20, Buffer.alloc(4096, 0x77));
    expect(fileWriteCounts(node).thread).toBe(25);
    await g.closeAll();
    const disk = readFileSync(f);
    for (let i = 0; i < 16; i++) {
      const mib = disk.subarray(i << 20, (i + 1) << 20);
      const want = i === 3 ? 0xa7 : i + 1;
      if (i === 5) {
        expect(mib.subarray(0, 300_000).every((x) => x === 0x51)).toBe(true);
        expect(mib.subarray(300_000, 300_000 + (1 << 19)).every((x) => x === 0x52)).toBe(true);
      } else if (i === 15) {
        expect(mib.subarray(0, 4096).every((x) => x === 0x77)).toBe(true);
        expect(mib.subarray(4096).every((x) => x === 16)).toBe(true);
      } else
        expect(
          mib.every((x) => x === want),
          `MiB ${i}`,
        ).toBe(true);
    }
  });

  it('is left alone with BLOCKREP_WRITER_THREAD=0: the thread pool writes', async () => {
    process.env.BLOCKREP_WRITER_THREAD = '0';
    const f = makeTempDir().file('pool.img');
    writeFileSync(f, Buffer.alloc(4 << 20));
    const { g, blk, node } = await fileBackend(f);
    await Promise.all(Array.from({ length: 4 }, (_, i) => blk.write(i << 20, Buffer.alloc(1 << 20, 9))));
    expect(fileWriteCounts(node)).toMatchObject({ pool: 4, thread: 0 });
    await g.closeAll();
    expect(readFileSync(f).every((x) => x === 9)).toBe(true);
  });

  it('closing the file waits for the writes still queued for it (the descriptor stays theirs)', async () => {
    const f = makeTempDir().file('close.img');
    writeFileSync(f, Buffer.alloc(64 << 20));
    const { g, blk, node } = await fileBackend(f);
    // Eight 8 MiB writes queue for the thread; the driver's close comes while most still wait.
    const writes = Array.from({ length: 8 }, (_, i) =>
      blk.write(i * (8 << 20), Buffer.alloc(8 << 20, 0x40 + i)),
    );
    await waitFor(() => fileWriteCounts(node).thread === 8, { what: 'the writes queued for the thread' });
    await fileDriver.close!(node);
    await Promise.all(writes);
    const disk = readFileSync(f);
    for (let i = 0; i < 8; i++) {
      expect(
        disk.subarray(i * (8 << 20), (i + 1) * (8 << 20)).every((x) => x === 0x40 + i),
        `write ${i}`,
      ).toBe(true);
    }
    await g.closeAll().catch(() => {});
  });

  it("reports a write's errno as fs does (ENOSPC from /dev/full), and EBADF after close", async () => {
    const w = openWriter()!;
    const fd = openSync('/dev/full', 'r+');
    try {
      await expect(w.write(fd, Buffer.alloc(1 << 20), 0)).rejects.toMatchObject({
        code: 'ENOSPC',
        message: 'ENOSPC: no space left on device, write',
      });
      await expect(w.write(123456, [Buffer.alloc(10), Buffer.alloc(10)], 0)).rejects.toMatchObject({
        code: 'EBADF',
      });
      const f = makeTempDir().file('after-close.img');
      writeFileSync(f, Buffer.alloc(4096));
      const ok = openSync(f, 'r+');
      // Nothing to write is no error.
      await expect(w.write(ok, [Buffer.alloc(0), Buffer.alloc(0)], 0)).resolves.toBeUndefined();
      w.close();
      await expect(w.write(ok, Buffer.alloc(4096, 1), 0)).rejects.toMatchObject({ code: 'EBADF' });
      closeSync(ok);
      expect(readFileSync(f).every((x) => x === 0)).toBe(true);
    } finally {
      closeSync(fd);
    }
  });
});

/** Runs a script in a fresh node with the addon's path as ADDON; its exit status and output. */
function runNode(script: string, extraEnv: Record<string, string> = {}, flags: string[] = []) {
  const r = spawnSync(process.execPath, [...flags, '-e', script], {
    env: { ...process.env, ADDON: addonPath, ...extraEnv },
    encoding: 'utf8',
    timeout: 120_000,
  });
  return { status: r.status, signal: r.signal, out: r.stdout + r.stderr };
}

describe('the writer thread and the life of the process', () => {
  it('an idle writer does not keep the process alive; a queued write does until it lands', () => {
    expect(existsSync(addonPath)).toBe(true);
    const f = makeTempDir().file('life.img');
    const r = runNode(
      `const a = require(process.env.ADDON); const fs = require('fs');
       const fd = fs.openSync(${JSON.stringify(f)}, "w");
       const w = a.writerOpen();
       // Not awaited and never closed: the process must still write it, then exit by itself.
       a.writerPwritev(w, fd, Buffer.alloc(8 << 20, 0x3c), 0).then((n) => console.log('wrote', n));`,
    );
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain(`wrote ${8 << 20}`);
    const disk = readFileSync(f);
    expect(disk.length).toBe(8 << 20);
    expect(disk.every((x) => x === 0x3c)).toBe(true);
  });

  it('a writer whose handle is collected without a close ends its thread', () => {
    const r = runNode(
      `const a = require(process.env.ADDON); const fs = require('fs');
       const threads = () => fs.readdirSync('/proc/self/task').length;
       const base = threads();
       (() => { for (let i = 0; i < 16; i++) a.writerOpen(); })();
       const opened = threads();
       const t0 = Date.now();
       const poll = () => {
         global.gc();
         if (threads() === base) return console.log('ended', opened - base);
         if (Date.now() - t0 > 60000) return console.log('still running', threads() - base);
         setTimeout(poll, 20);
       };
       poll();`,
      {},
      ['--expose-gc'],
    );
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('ended 16');
  });

  it('exiting, or ending a worker, with writes queued does not crash the process', () => {
    const f = makeTempDir().file('exit.img');
    const r = runNode(
      `const a = require(process.env.ADDON); const fs = require('fs');
       const { Worker } = require('worker_threads');
       const fd = fs.openSync(${JSON.stringify(f)}, 'w');
       const code = 'const a = require(process.env.ADDON); const w = a.writerOpen();' +
         'for (let i = 0; i < 64; i++) a.writerPwritev(w, ' + fd + ', Buffer.alloc(1 << 20, 1), i << 20);' +
         'require("worker_threads").parentPort.postMessage("queued");';
       let ended = 0;
       const go = () => {
         const wk = new Worker(code, { eval: true });
         wk.on('message', () => wk.terminate());
         wk.on('exit', () => {
           if (++ended < 8) return go();
           const w = a.writerOpen();
           for (let i = 0; i < 64; i++) a.writerPwritev(w, fd, Buffer.alloc(1 << 20, 2), i << 20);
           console.log('exiting');
           process.exit(7);
         });
       };
       go();`,
    );
    expect(r.signal, r.out).toBeNull();
    expect(r.status, r.out).toBe(7);
    expect(r.out).toContain('exiting');
  });
});
