import { BlockError, type IoVec, iovMemset, iovSlice, zeroBuffer } from '@blockrep/block';
import { deflateCluster, inflateCluster } from './compress';
import { writeU64 } from './header';
import { hex, type Qcow2Image } from './image';

/*
 * L1/L2 mapping (QEMU's qcow2-cluster.c): guest offset -> cluster type and host offset, reads,
 * allocating writes with copy-on-write of partial clusters, zero and discard. Order on disk:
 * refcount (at allocation) -> data -> L2 (cache write-back) -> L1 (write-through when a table is
 * new), and for frees the reverse: L2 on disk first, refcount decrement after.
 */

export const ClusterType = {
  UNALLOCATED: 0,
  ZERO_PLAIN: 1,
  ZERO_ALLOC: 2,
  NORMAL: 3,
  COMPRESSED: 4,
} as const;
export type ClusterType = (typeof ClusterType)[keyof typeof ClusterType];

const COPIED = 0x80000000;
const COMPRESSED = 0x40000000;

export interface Run {
  type: ClusterType;
  /** Host offset of the first byte (NORMAL, ZERO_ALLOC), or of the compressed data. */
  host: number;
  bytes: number;
  copied: boolean;
  /** Raw entry (compressed clusters). */
  hi: number;
  lo: number;
}

/**
 * An L2 entry's type, as QEMU reads it whatever the version: a zero flag in a v2 image is a zero
 * type too, and reading it is a corruption (v2 has no zero clusters).
 */
export function entryType(hi: number, lo: number): ClusterType {
  if (hi & COMPRESSED) return ClusterType.COMPRESSED;
  const off = (hi & 0xffffff) * 0x100000000 + (lo - (lo & 0x1ff));
  if (lo & 1) return off ? ClusterType.ZERO_ALLOC : ClusterType.ZERO_PLAIN;
  return off ? ClusterType.NORMAL : ClusterType.UNALLOCATED;
}

export function entryOffset(hi: number, lo: number): number {
  return (hi & 0xffffff) * 0x100000000 + (lo - (lo & 0x1ff));
}

/** Host offset and byte length of a compressed cluster's data. */
export function compressedExtent(
  hi: number,
  lo: number,
  clusterBits: number,
): { offset: number; bytes: number } {
  const v = (BigInt(hi) << 32n) | BigInt(lo);
  const x = BigInt(70 - clusterBits);
  const offset = Number(v & ((1n << x) - 1n));
  const sectors = Number((v >> x) & ((1n << (62n - x)) - 1n));
  return { offset, bytes: (sectors + 1) * 512 - (offset % 512) };
}

/** The host clusters a compressed cluster's data touches. */
export function compressedClusters(
  hi: number,
  lo: number,
  img: { clusterBits: number; cs: number },
): [number, number] {
  const { offset, bytes } = compressedExtent(hi, lo, img.clusterBits);
  const first = Math.floor(offset / img.cs);
  const last = Math.floor((offset + bytes - 1) / img.cs);
  return [first * img.cs, last - first + 1];
}

/**
 * The mapping of [offset, offset+maxBytes) up to the first change of type (or host
 * discontinuity), never crossing an L2 table.
 */
export async function lookup(img: Qcow2Image, offset: number, maxBytes: number): Promise<Run> {
  const r = lookupCached(img, offset, maxBytes);
  if (r) return r;
  const l2off = img.l2Offset(Math.floor(offset / img.cs / img.l2Entries));
  const e = await img.cache.get(l2off);
  try {
    return scanTable(img, e.table, l2off, offset, maxBytes);
  } finally {
    img.cache.unpin(e);
  }
}

/** lookup() without waiting when the L2 table is cached (the hot path); null when it is not. */
export function lookupCached(img: Qcow2Image, offset: number, maxBytes: number): Run | null {
  const cluster = Math.floor(offset / img.cs);
  const l1i = Math.floor(cluster / img.l2Entries);
  const l2off = img.l2Offset(l1i);
  if (!l2off) {
    const limit = Math.min(
      maxBytes,
      (img.l2Entries - (cluster % img.l2Entries)) * img.cs - (offset - cluster * img.cs),
    );
    return { type: ClusterType.UNALLOCATED, host: 0, bytes: limit, copied: false, hi: 0, lo: 0 };
  }
  const e = img.cache.peek(l2off);
  return e ? scanTable(img, e.table, l2off, offset, maxBytes) : null;
}

function scanTable(img: Qcow2Image, t: Buffer, l2off: number, offset: number, maxBytes: number): Run {
  const cs = img.cs;
  const cluster = Math.floor(offset / cs);
  const l2i = cluster % img.l2Entries;
  const inCluster = offset - cluster * cs;
  const limit = Math.min(maxBytes, (img.l2Entries - l2i) * cs - inCluster);
  const hi = t.readUInt32BE(l2i * 8);
  const lo = t.readUInt32BE(l2i * 8 + 4);
  const type = entryType(hi, lo);
  const copied = (hi & COPIED) !== 0;
  const host = type === ClusterType.COMPRESSED ? 0 : entryOffset(hi, lo);
  if ((type === ClusterType.ZERO_PLAIN || type === ClusterType.ZERO_ALLOC) && !img.v3) {
    img.corruptEvent(
      `Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2off)}, L2 index: ${hex(l2i)})`,
    );
  }
  if ((type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC) && lo & ~0x1ff & (cs - 1)) {
    img.corruptEvent(
      `Cluster allocation offset ${hex(host)} unaligned (L2 offset: ${hex(l2off)}, L2 index: ${hex(l2i)})`,
    );
  }
  let n = 1;
  if (type !== ClusterType.COMPRESSED) {
    const need = Math.ceil((inCluster + limit) / cs);
    const contiguous = type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC;
    while (n < need) {
      const h2 = t.readUInt32BE((l2i + n) * 8);
      const l2 = t.readUInt32BE((l2i + n) * 8 + 4);
      if (entryType(h2, l2) !== type || ((h2 & COPIED) !== 0) !== copied) break;
      if (contiguous && entryOffset(h2, l2) !== host + n * cs) break;
      n++;
    }
  }
  return {
    type,
    host: host ? host + inCluster : 0,
    bytes: Math.min(limit, n * cs - inCluster),
    copied,
    hi,
    lo,
  };
}

/** Reads guest [offset, offset+bytes) into iov. */
export async function readRange(img: Qcow2Image, offset: number, bytes: number, iov: IoVec): Promise<void> {
  img.checkUsable();
  for (let done = 0; done < bytes; ) {
    const r =
      lookupCached(img, offset + done, bytes - done) ?? (await lookup(img, offset + done, bytes - done));
    const dst = iovSlice(iov, done, r.bytes);
    switch (r.type) {
      case ClusterType.NORMAL:
        await img.storage.readv(r.host, r.bytes, dst);
        break;
      case ClusterType.UNALLOCATED:
        if (img.backing && offset + done < img.backing.length())
          await img.backing.readv(offset + done, r.bytes, dst);
        else iovMemset(dst, 0, r.bytes);
        break;
      case ClusterType.COMPRESSED: {
        const data = await inflateCluster(img, r.hi, r.lo);
        const from = (offset + done) % img.cs;
        let pos = from;
        for (const b of dst) {
          data.copy(b, 0, pos, pos + b.length);
          pos += b.length;
        }
        break;
      }
      default:
        iovMemset(dst, 0, r.bytes);
    }
    done += r.bytes;
  }
}

/** Whether the current content of a guest range is known to be zeroes without reading it. */
function readsAsZero(img: Qcow2Image, r: Run, offset: number): boolean {
  if (r.type === ClusterType.ZERO_PLAIN || r.type === ClusterType.ZERO_ALLOC) return true;
  return r.type === ClusterType.UNALLOCATED && (!img.backing || offset >= img.backing.length());
}

/** Writes guest [offset, offset+bytes) from iov. */
export async function writeRange(img: Qcow2Image, offset: number, bytes: number, iov: IoVec): Promise<void> {
  img.checkWritable();
  for (let done = 0; done < bytes; ) {
    const r =
      lookupCached(img, offset + done, bytes - done) ?? (await lookup(img, offset + done, bytes - done));
    if (r.type === ClusterType.NORMAL && r.copied) {
      if (img.overlapsMetadata(r.host, r.bytes)) {
        img.corruptEvent(`Preventing invalid write on metadata (overlaps with host ${hex(r.host)})`);
      }
      // Tracked so that a cluster freed meanwhile (a racing discard) is not reused under it.
      const p = img.storage.write(r.host, iovSlice(iov, done, r.bytes));
      img.dataWrites.add(p);
      try {
        await p;
      } finally {
        img.dataWrites.delete(p);
      }
      done += r.bytes;
    } else {
      done += await allocateAndWrite(img, offset + done, r.bytes, iovSlice(iov, done, r.bytes));
    }
  }
}

/**
 * Writes guest [offset, offset+bytes) (inside one L2 table) into newly allocated clusters, with
 * the rest of the first and last cluster copied from their old content. Returns the bytes done
 * (fewer when the mapping changed while waiting for the lock; the caller looks up again).
 */
async function allocateAndWrite(img: Qcow2Image, offset: number, bytes: number, iov: IoVec): Promise<number> {
  const cs = img.cs;
  const cStart = Math.floor(offset / cs) * cs;
  const release = await img.allocLock.lock(cStart, Math.ceil((offset + bytes) / cs) * cs - cStart);
  try {
    const r = lookupCached(img, offset, bytes) ?? (await lookup(img, offset, bytes));
    if (r.type === ClusterType.NORMAL && r.copied) return 0;
    if (r.bytes < bytes) {
      bytes = r.bytes;
      iov = iovSlice(iov, 0, bytes);
    }
    const cEnd = Math.ceil((offset + bytes) / cs) * cs;
    const n = (cEnd - cStart) / cs;
    await prepareL2(img, cStart);
    const { offset: host, fresh } = await img.allocator.allocateRun(n);
    try {
      await writeNewClusters(img, offset, bytes, iov, host, fresh, n);
    } catch (e) {
      // Never referenced: the clusters go back (a full disk, say, leaks nothing).
      await img.refcounts.free(host, n).catch(() => {});
      throw e;
    }
    await setEntries(img, cStart, n, (k) => [host + k * cs, true, false]);
    return bytes;
  } finally {
    release();
  }
}

/** Writes a new run of n clusters at host: the data, and what its clusters keep around it. */
async function writeNewClusters(
  img: Qcow2Image,
  offset: number,
  bytes: number,
  iov: IoVec,
  host: number,
  fresh: boolean,
  n: number,
): Promise<void> {
  const cs = img.cs;
  const cStart = Math.floor(offset / cs) * cs;
  const cEnd = Math.ceil((offset + bytes) / cs) * cs;
  if (img.overlapsMetadata(host, n * cs))
    img.corruptEvent(`Allocated cluster ${hex(host)} overlaps metadata`);
  const head = offset - cStart;
  const tail = cEnd - (offset + bytes);
  const parts: Buffer[] = [];
  let writeAt = host;
  if (head) {
    const first = lookupCached(img, cStart, head) ?? (await lookup(img, cStart, head));
    if (readsAsZero(img, first, cStart) && first.bytes >= head) {
      if (fresh) writeAt += head;
      else parts.push(zeroBuffer(head));
    } else {
      const hb = Buffer.allocUnsafe(head);
      await readRange(img, cStart, head, [hb]);
      parts.push(hb);
    }
  }
  parts.push(...iov);
  if (tail) {
    const last = lookupCached(img, offset + bytes, tail) ?? (await lookup(img, offset + bytes, tail));
    // Zeroes need no write into fresh clusters (they read as zeroes until written).
    if (!(readsAsZero(img, last, offset + bytes) && last.bytes >= tail)) {
      const tb = Buffer.allocUnsafe(tail);
      await readRange(img, offset + bytes, tail, [tb]);
      parts.push(tb);
    } else if (!fresh) parts.push(zeroBuffer(tail));
  }
  await img.storage.write(writeAt, parts);
}

/**
 * Writes whole guest clusters compressed (qemu-img convert -c): each is deflated and, when that
 * saves room, its bytes are packed after the previous compressed cluster's; otherwise it is written
 * as a normal cluster. The last cluster of an image may be short (padded with zeroes). As in
 * QEMU, only clusters not allocated yet can be written this way.
 */
export async function writeCompressed(
  img: Qcow2Image,
  offset: number,
  bytes: number,
  iov: IoVec,
): Promise<void> {
  img.checkWritable();
  const cs = img.cs;
  if (offset % cs)
    throw new BlockError('Compressed writes must start at a cluster boundary', { errno: 'EINVAL' });
  for (let done = 0; done < bytes; done += cs) {
    const n = Math.min(cs, bytes - done);
    const guest = offset + done;
    if (n < cs && guest + n !== img.size)
      throw new BlockError('Compressed writes must cover whole clusters', { errno: 'EINVAL' });
    const data = Buffer.alloc(cs);
    let at = 0;
    for (const b of iovSlice(iov, done, n)) {
      b.copy(data, at);
      at += b.length;
    }
    const packed = await deflateCluster(data);
    if (packed.length >= cs) {
      await writeRange(img, guest, n, [data.subarray(0, n)]);
      continue;
    }
    const release = await img.allocLock.lock(guest, cs);
    try {
      const r = lookupCached(img, guest, cs) ?? (await lookup(img, guest, cs));
      if (r.type !== ClusterType.UNALLOCATED)
        throw new BlockError('Input/output error: compressed writes need unallocated clusters', {
          errno: 'EIO',
        });
      await prepareL2(img, guest);
      const host = await img.allocator.allocateBytes(packed.length);
      if (img.overlapsMetadata(host, packed.length))
        img.corruptEvent(`Compressed cluster at ${hex(host)} overlaps metadata`);
      await img.storage.write(host, packed);
      const sectors = Math.floor((host + packed.length - 1) / 512) - Math.floor(host / 512);
      const v = BigInt(host) | (BigInt(sectors) << BigInt(70 - img.clusterBits)) | (1n << 62n);
      const e = await l2ForWrite(img, Math.floor(guest / cs / img.l2Entries));
      try {
        const p = ((guest / cs) % img.l2Entries) * 8;
        e.table.writeUInt32BE(Number(v >> 32n), p);
        e.table.writeUInt32BE(Number(v & 0xffffffffn), p + 4);
        img.cache.markDirty(e);
      } finally {
        img.cache.unpin(e);
      }
    } finally {
      release();
    }
  }
}

/**
 * Gives every unallocated cluster of guest [start, end) a host cluster of its own (preallocation
 * when an image grows): L2 entries point at new clusters, runs of them contiguous, the data not
 * written (a new cluster reads as whatever the file holds there: zeroes, as it is past the old end).
 */
export async function preallocateRange(img: Qcow2Image, start: number, end: number): Promise<void> {
  const cs = img.cs;
  const stop = Math.min(end, img.size);
  for (let off = Math.floor(start / cs) * cs; off < stop; ) {
    const tableEnd = (Math.floor(off / cs / img.l2Entries) + 1) * img.l2Entries * cs;
    const chunkEnd = Math.min(stop, tableEnd);
    const release = await img.allocLock.lock(off, Math.ceil(chunkEnd / cs) * cs - off);
    try {
      for (let o = off; o < chunkEnd; ) {
        const r = await lookup(img, o, chunkEnd - o);
        const n = Math.ceil(r.bytes / cs);
        if (r.type === ClusterType.UNALLOCATED) {
          await prepareL2(img, o);
          const { offset: host } = await img.allocator.allocateRun(n);
          await setEntries(img, o, n, (k) => [host + k * cs, true, false]);
        }
        o += n * cs;
      }
    } finally {
      release();
    }
    off = chunkEnd;
  }
}

/**
 * Makes the L2 table of a guest offset exist and be writable before any data is written for it
 * (measured when allocating a table flushed the file: 8 writers of 1 MiB stalled 10-15 ms on a
 * fresh image waiting for their own data to be written out).
 */
async function prepareL2(img: Qcow2Image, guestOffset: number): Promise<void> {
  img.cache.unpin(await l2ForWrite(img, Math.floor(guestOffset / img.cs / img.l2Entries)));
}

/**
 * Sets the L2 entries of n clusters from guestStart (inside one L2 table) to what `entry(k)`
 * returns: [host offset or 0, COPIED, zero flag]. Old clusters no longer referenced are queued to
 * be freed once the table is on disk.
 */
async function setEntries(
  img: Qcow2Image,
  guestStart: number,
  n: number,
  entry: (k: number, oldType: ClusterType, oldHost: number, oldCopied: boolean) => [number, boolean, boolean],
  /** The clusters this frees come from a guest discard: punch them out of the file (passDiscards). */
  punch = false,
): Promise<void> {
  const cluster = guestStart / img.cs;
  const l1i = Math.floor(cluster / img.l2Entries);
  const l2i = cluster % img.l2Entries;
  const e = await l2ForWrite(img, l1i);
  try {
    const t = e.table;
    for (let k = 0; k < n; k++) {
      const p = (l2i + k) * 8;
      const hi = t.readUInt32BE(p);
      const lo = t.readUInt32BE(p + 4);
      const oldType = entryType(hi, lo);
      const oldHost = oldType === ClusterType.COMPRESSED ? 0 : entryOffset(hi, lo);
      const [host, copied, zero] = entry(k, oldType, oldHost, (hi & COPIED) !== 0);
      writeU64(t, p, host);
      if (copied) t.writeUInt32BE((t.readUInt32BE(p) | COPIED) >>> 0, p);
      if (zero) t.writeUInt32BE((t.readUInt32BE(p + 4) | 1) >>> 0, p + 4);
      if (oldType === ClusterType.COMPRESSED) {
        img.pendingFree.push([...compressedClusters(hi, lo, img), punch]);
      } else if (oldHost && oldHost !== host) {
        img.pendingFree.push([oldHost, 1, punch]);
      }
    }
    img.cache.markDirty(e);
  } finally {
    img.cache.unpin(e);
  }
}

/**
 * The L2 table for L1 index i, pinned and owned by the active L1 alone (refcount 1): allocated
 * (zeroed) when missing, copied when shared with a snapshot.
 */
async function l2ForWrite(img: Qcow2Image, l1i: number) {
  const cached = img.l1Copied(l1i) ? img.cache.peek(img.l2Offset(l1i)) : null;
  if (cached) {
    cached.pins++;
    return cached;
  }
  for (;;) {
    const off = img.l2Offset(l1i);
    if (off && img.l1Copied(l1i)) return img.cache.get(off);
    const pending = img.l2Allocs.get(l1i);
    if (pending) {
      await pending;
      continue;
    }
    const p = (async () => {
      const cs = img.cs;
      const newOff = await img.allocator.allocate(1);
      let table: Buffer;
      try {
        if (off) {
          const old = await img.cache.get(off);
          table = Buffer.from(old.table);
          img.cache.unpin(old);
        } else table = Buffer.alloc(cs);
        // The table and its refcount must be on disk before the L1 entry that points to it.
        await img.storage.write(newOff, table, true);
        await img.syncRefcounts();
      } catch (e) {
        await img.refcounts.free(newOff, 1).catch(() => {});
        throw e;
      }
      const entry = Buffer.alloc(8);
      writeU64(entry, 0, newOff);
      entry.writeUInt32BE((entry.readUInt32BE(0) | COPIED) >>> 0, 0);
      const e = img.cache.insert(newOff, table, false);
      img.cache.unpin(e);
      await img.setL1(l1i, entry);
      if (off) {
        img.cache.drop(off);
        await img.refcounts.free(off, 1);
      }
    })();
    img.l2Allocs.set(l1i, p);
    try {
      await p;
    } finally {
      img.l2Allocs.delete(l1i);
    }
  }
}

/**
 * Unmaps the whole clusters of [offset, offset+bytes) outright (no zero flag: a shrink drops
 * them); the clusters are freed once the tables are written back.
 */
export async function unmapRange(img: Qcow2Image, offset: number, bytes: number): Promise<void> {
  const cs = img.cs;
  const tableBytes = img.l2Entries * cs;
  for (let pos = offset; pos < offset + bytes; ) {
    const end = Math.min(offset + bytes, (Math.floor(pos / tableBytes) + 1) * tableBytes);
    const release = await img.allocLock.lock(pos, end - pos);
    try {
      if (img.l2Offset(Math.floor(pos / tableBytes)))
        await setEntries(img, pos, Math.ceil((end - pos) / cs), () => [0, false, false]);
    } finally {
      release();
    }
    pos = end;
  }
}

/**
 * Zeroes (v3: zero flag) or discards the whole clusters of [offset, offset+bytes). With `keep`,
 * clusters stay allocated (preallocated zero clusters).
 */
export async function zeroOrDiscard(
  img: Qcow2Image,
  offset: number,
  bytes: number,
  mode: 'zero' | 'discard',
  keep: boolean,
): Promise<void> {
  img.checkWritable();
  const cs = img.cs;
  if (mode === 'zero' && !img.v3) throw new BlockError('Zero clusters need qcow2 v3', { errno: 'ENOTSUP' });
  const tableBytes = img.l2Entries * cs;
  for (let pos = offset; pos < offset + bytes; ) {
    const end = Math.min(offset + bytes, (Math.floor(pos / tableBytes) + 1) * tableBytes);
    const release = await img.allocLock.lock(pos, end - pos);
    try {
      const l1i = Math.floor(pos / tableBytes);
      // Nothing to do where no table exists and the range already reads as zeroes / is unmapped.
      if (img.l2Offset(l1i) || (mode === 'zero' && img.backing && pos < img.backing.length())) {
        await setEntries(
          img,
          pos,
          (end - pos) / cs,
          (_k, type, host, copied) => {
            if (mode === 'discard') return img.v3 && img.backing ? [0, false, true] : [0, false, false];
            if (keep && host && copied && (type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC)) {
              return [host, true, true];
            }
            return [0, false, true];
          },
          img.passDiscards,
        );
      }
    } finally {
      release();
    }
    pos = end;
  }
}
