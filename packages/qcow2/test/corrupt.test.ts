import { statSync, writeFileSync } from 'node:fs';
import { BlockError } from '@blockrep/block';
import { makeTempDir } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import { createQcow2Image } from '../src/index';
import { openQcow2, patch, peek, qemu } from './helpers';

/* Corrupt input: a clear error or the image marked corrupt; never a crash, never a stray write. */

async function openError(
  path: string,
  readOnly = false,
  extra: Record<string, unknown> = {},
): Promise<string> {
  try {
    const h = await openQcow2(path, extra, readOnly);
    await h.close();
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return (e as Error).message;
  }
  throw new Error('open succeeded');
}

async function freshImage(name = 'img.qcow2', size = 8 << 20): Promise<string> {
  const f = makeTempDir().file(name);
  await createQcow2Image(f, { size });
  const h = await openQcow2(f);
  await h.blk.write(0, Buffer.alloc(128 << 10, 0x61));
  await h.close();
  return f;
}

const u64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};

describe('corrupt headers', () => {
  it('truncated headers and foreign files', async () => {
    const d = makeTempDir();
    const f = await freshImage();
    const short = d.file('short.qcow2');
    writeFileSync(short, peek(f, 0, 40));
    expect(await openError(short, true)).toMatch(/header is truncated|header too short/);
    const v3short = d.file('v3short.qcow2');
    writeFileSync(v3short, peek(f, 0, 90));
    expect(await openError(v3short, true)).toMatch(/header is truncated|header too short/);
    const empty = d.file('empty.qcow2');
    writeFileSync(empty, Buffer.alloc(0));
    expect(await openError(empty, true)).toMatch(/not in qcow2 format/);
    const raw = d.file('raw.img');
    writeFileSync(raw, Buffer.alloc(65536, 0x41));
    expect(await openError(raw, true)).toMatch(/not in qcow2 format/);
  });

  it("absurd sizes and fields are refused with QEMU's texts", async () => {
    // QEMU 7.2's texts (qemu-img info says the same: "Could not open 'x': <text>").
    const cases: [number, Buffer, RegExp][] = [
      [4, u32(4), /^Unsupported qcow2 version 4$/],
      [20, u32(30), /^Unsupported cluster size: 2\^30$/],
      [20, u32(8), /^Unsupported cluster size: 2\^8$/],
      [24, u64(2 ** 60), /^Image is too big$/],
      [24, u64(2 ** 40), /^L1 table is too small$/],
      [36, u32(0x10000000), /^Active L1 table too large$/],
      [40, u64(12345), /^Active L1 table offset invalid$/],
      [48, u64(0x10008), /^Reference count table offset invalid$/],
      [56, u32(0x7fffffff), /^Reference count table too large$/],
      [56, u32(0), /^Image does not contain a reference count table$/],
      [96, u32(7), /may not exceed 64 bits/],
      [100, u32(0x20000), /^qcow2 header exceeds cluster size$/],
      [16, u32(5000), /^Backing file name too long$/],
      [32, u32(1), /^Parameter 'encrypt.key-secret' is required for cipher$/],
      [32, u32(3), /^Unsupported encryption method 3$/],
    ];
    for (const [off, data, re] of cases) {
      const f = await freshImage();
      if (off === 16) patch(f, 8, u64(512));
      patch(f, off, data);
      expect([off, await openError(f, true)]).toEqual([off, expect.stringMatching(re)]);
    }
  });

  it('unknown incompatible features are refused by name; the corrupt bit allows read-only use only', async () => {
    const f = await freshImage();
    patch(f, 72, u64(1 << 5));
    expect(await openError(f, true)).toBe('Unsupported qcow2 feature(s): Unknown incompatible feature: 20');
    patch(f, 72, u64(1 << 4));
    expect(await openError(f, true)).toMatch(/Unsupported qcow2 feature\(s\): extended L2 entries/);
    patch(f, 72, u64(2));
    expect(await openError(f)).toMatch(/Image is corrupt; cannot be opened read\/write/);
    const ro = await openQcow2(f, {}, true);
    expect((await ro.blk.read(0, 1))[0]).toBe(0x61);
    await ro.close();
    const auto = await openQcow2(f, { 'auto-read-only': true }, true);
    expect(auto.node.readOnly).toBe(true);
    await auto.close();
  });
});

describe('features we do not implement', () => {
  it('are refused at open with their names', async () => {
    const d = makeTempDir();
    const ext = d.file('extl2.qcow2');
    await qemu(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', ext, '1M']);
    expect(await openError(ext, true)).toMatch(/Unsupported qcow2 feature\(s\): extended L2 entries/);
    const df = d.file('datafile.qcow2');
    await qemu(['create', '-q', '-f', 'qcow2', '-o', `data_file=${d.file('data.raw')}`, df, '1M']);
    expect(await openError(df, true)).toBe("'data-file' is required for this image");
  });
});

describe('corrupt tables', () => {
  it('tables past the end of the file read as zeroes, as in QEMU; check reports them', async () => {
    for (const [off, value, guestByte] of [
      [3 * 65536, 2 ** 40, 0], // an L1 entry: its L2 table reads as zeroes, so does the data
      [40, 2 ** 40, 0], // the L1 table itself
      [48, 2 ** 44, 0x61], // the refcount table: the data is still there
    ] as const) {
      const f = await freshImage();
      patch(f, off, u64(value));
      const h = await openQcow2(f, {}, true);
      expect([off, (await h.blk.read(0, 4096)).every((b) => b === guestByte)]).toEqual([off, true]);
      await h.close();
      const q = await qemu(['check', '--output=json', f], [0, 2, 3]);
      expect(JSON.parse(q.stdout).corruptions).toBeGreaterThan(0);
    }
  });

  it('a zero flag in a v2 image: reading it is a corruption (EIO), as in QEMU', async () => {
    const f = makeTempDir().file('v2.qcow2');
    await qemu(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '8M']);
    const w = await openQcow2(f);
    await w.blk.write(0, Buffer.alloc(128 << 10, 0x55));
    await w.close();
    const l2 = peek(f, 3 * 65536, 8).readUInt32BE(4);
    const e = peek(f, l2, 8);
    e.writeUInt32BE(e.readUInt32BE(4) | 1, 4);
    patch(f, l2, e);
    const ro = await openQcow2(f, {}, true);
    await expect(ro.blk.read(0, 512)).rejects.toThrow(
      'qcow2: Image is corrupt: Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0); further non-fatal corruption events will be suppressed',
    );
    await ro.close();
    const rw = await openQcow2(f);
    await expect(rw.blk.read(0, 512)).rejects.toThrow(
      'qcow2: Marking image as corrupt: Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0); further corruption events will be suppressed',
    );
    // Unusable from then on, as QEMU drops the driver.
    await expect(rw.blk.read(65536, 512)).rejects.toThrow('No medium found');
    await rw.close();
  });

  it('an unaligned L2 table offset is found at open and marks the image corrupt', async () => {
    const f = await freshImage();
    const l1 = peek(f, 3 * 65536, 8);
    l1.writeUInt32BE(l1.readUInt32BE(4) + 4096, 4);
    patch(f, 3 * 65536, l1);
    const h = await openQcow2(f, {}, true);
    await expect(h.blk.read(0, 512)).rejects.toThrow(/unaligned/);
    await h.close();
  });

  it('L2 entries pointing past the end of the file or into metadata: no write into metadata', async () => {
    const f = await freshImage();
    const l2 = peek(f, 3 * 65536, 8).readUInt32BE(4);
    const size = statSync(f).size;
    // Guest cluster 0 -> far past the end; guest cluster 1 -> the refcount table (cluster 1).
    patch(f, l2, u64(2 ** 36));
    const entry = u64(65536);
    entry[0] = 0x80;
    patch(f, l2 + 8, entry);
    const reftable = peek(f, 65536, 65536);
    const h = await openQcow2(f);
    // Past the end reads as zeroes (QEMU too); a write into metadata is refused.
    expect((await h.blk.read(0, 512)).every((b) => b === 0)).toBe(true);
    await expect(h.blk.write(65536, Buffer.alloc(4096, 0xee))).rejects.toThrow(/corrupt/);
    await h.close();
    expect(peek(f, 65536, 65536).equals(reftable)).toBe(true);
    expect(statSync(f).size).toBe(size);

    const g = await freshImage('g.qcow2');
    const l2g = peek(g, 3 * 65536, 8).readUInt32BE(4);
    const e2 = u64(65536);
    e2[0] = 0x80;
    patch(g, l2g + 8, e2);
    const before = peek(g, 65536, 65536);
    const h2 = await openQcow2(g);
    await expect(h2.blk.write(65536 + 100, Buffer.alloc(100, 0xee))).rejects.toThrow(
      /Preventing invalid write on metadata/,
    );
    await h2.close();
    expect(peek(g, 65536, 65536).equals(before)).toBe(true);
  });

  it('a refcount table entry pointing past the end of the file: allocation stops at metadata', async () => {
    const f = await freshImage();
    patch(f, 65536, u64(2 ** 40));
    const h = await openQcow2(f);
    // Every refcount reads as zero: the first allocation lands on metadata and is refused.
    await expect(h.blk.write(4 << 20, Buffer.alloc(4096, 1))).rejects.toThrow(/Marking image as corrupt/);
    await h.close().catch(() => {});
  });

  it('garbage compressed data is an I/O error, not a crash', async () => {
    const f = await freshImage();
    const l2 = peek(f, 3 * 65536, 8).readUInt32BE(4);
    // A compressed entry (bit 62) over the L1 table: 64 KiB clusters keep the offset in bits 0-53
    // and the extra sector count in bits 54-61 (here 1).
    const e = Buffer.alloc(8);
    e.writeUInt32BE((0x40000000 | (1 << 22)) >>> 0, 0);
    e.writeUInt32BE(0x30000 + 100, 4);
    patch(f, l2, e);
    const h = await openQcow2(f, {}, true);
    await expect(h.blk.read(0, 4096)).rejects.toThrow(BlockError);
    await h.close();
  });
});

describe('writes to damaged images change what QEMU would', () => {
  it('a data cluster whose refcount was forced to 0: a write goes in place (COPIED), no metadata changes', async () => {
    const f = makeTempDir().file('rc0.qcow2');
    await qemu(['create', '-q', '-f', 'qcow2', f, '8M']);
    const w = await openQcow2(f);
    await w.blk.write(0, Buffer.alloc(128 << 10, 0x55));
    await w.close();
    // The refcount block is at cluster 2 (16-bit entries); the first data cluster is cluster 5.
    patch(f, 2 * 65536 + 5 * 2, Buffer.from([0, 0]));
    const before = await qemu(['check', f], [2]);
    const meta = (b: Buffer) => Buffer.concat([b.subarray(0, 5 * 65536), b.subarray(6 * 65536)]);
    const { readFileSync } = await import('node:fs');
    const metaBefore = meta(readFileSync(f));
    const h = await openQcow2(f);
    await h.blk.write(0, Buffer.alloc(4096, 1));
    await h.close();
    // Only the data cluster changed; qemu-img check says exactly what it said before.
    expect(meta(readFileSync(f)).equals(metaBefore)).toBe(true);
    const after = await qemu(['check', f], [2]);
    expect(after.stdout).toBe(before.stdout);
    expect(after.stderr).toBe(before.stderr);
  });
});
