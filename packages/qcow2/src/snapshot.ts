import { BlockError } from '@blockrep/block';
import { ClusterType, compressedClusters, entryOffset, entryType } from './cluster';
import { HeaderField, readU64, writeU64 } from './header';
import type { Qcow2Image } from './image';
import { readBuf } from './storage';

/*
 * Internal snapshots (qemu-img snapshot -c/-a/-d): a snapshot is a copy of the L1 table whose L2
 * tables and data clusters gain a reference each, so that the active layer copies them on write
 * (their COPIED flags clear while a cluster has more than one reference). The snapshot table
 * lists them (id, name, date, VM state size and clock, extra data with the disk size).
 */

export interface Qcow2Snapshot {
  l1Offset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNs: bigint;
  vmStateSize: number;
  /** The extra data as stored (v3: 64-bit VM state size, disk size, instruction count). */
  extra: Buffer;
}

const FIXED = 40;
const COPIED_HI = 0x80000000;
const L1_OFFSET_MASK = 0x00fffffffffffe00n;

const snapErr = (msg: string, errno: 'EINVAL' | 'ENOENT' = 'EINVAL') => new BlockError(msg, { errno });

/** The image's snapshot table. */
export async function readSnapshots(img: Qcow2Image): Promise<Qcow2Snapshot[]> {
  const out: Qcow2Snapshot[] = [];
  let pos = img.header.snapshotsOffset;
  for (let i = 0; i < img.header.nbSnapshots; i++) {
    const f = await readBuf(img.storage, pos, FIXED);
    const idLen = f.readUInt16BE(12);
    const nameLen = f.readUInt16BE(14);
    const extraLen = f.readUInt32BE(36);
    const rest = await readBuf(img.storage, pos + FIXED, extraLen + idLen + nameLen);
    out.push({
      l1Offset: readU64(f, 0),
      l1Size: f.readUInt32BE(8),
      id: rest.subarray(extraLen, extraLen + idLen).toString(),
      name: rest.subarray(extraLen + idLen).toString(),
      dateSec: f.readUInt32BE(16),
      dateNsec: f.readUInt32BE(20),
      vmClockNs: f.readBigUInt64BE(24),
      vmStateSize: f.readUInt32BE(32),
      extra: Buffer.from(rest.subarray(0, extraLen)),
    });
    pos = Math.ceil((pos + FIXED + extraLen + idLen + nameLen) / 8) * 8;
  }
  return out;
}

function serialize(list: Qcow2Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of list) {
    const id = Buffer.from(s.id);
    const name = Buffer.from(s.name);
    const f = Buffer.alloc(FIXED);
    writeU64(f, 0, s.l1Offset);
    f.writeUInt32BE(s.l1Size, 8);
    f.writeUInt16BE(id.length, 12);
    f.writeUInt16BE(name.length, 14);
    f.writeUInt32BE(s.dateSec, 16);
    f.writeUInt32BE(s.dateNsec, 20);
    f.writeBigUInt64BE(s.vmClockNs, 24);
    f.writeUInt32BE(s.vmStateSize, 32);
    f.writeUInt32BE(s.extra.length, 36);
    const len = FIXED + s.extra.length + id.length + name.length;
    parts.push(f, s.extra, id, name, Buffer.alloc(Math.ceil(len / 8) * 8 - len));
  }
  return Buffer.concat(parts);
}

/** Writes a new snapshot table, points the header at it, then frees the old one. */
async function writeSnapshots(img: Qcow2Image, list: Qcow2Snapshot[]): Promise<void> {
  const cs = img.cs;
  const table = serialize(list);
  const oldOffset = img.header.snapshotsOffset;
  const oldClusters = img.header.nbSnapshots
    ? Math.ceil(((await tableBytes(img)) + (oldOffset % cs)) / cs)
    : 0;
  let offset = 0;
  if (list.length) {
    offset = await img.allocator.allocate(Math.ceil(table.length / cs));
    await img.storage.write(offset, table);
  }
  await img.syncRefcounts();
  await img.storage.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(list.length, 0);
  writeU64(hdr, 4, offset);
  await img.storage.write(HeaderField.NB_SNAPSHOTS, hdr);
  await img.storage.flush();
  img.header.nbSnapshots = list.length;
  img.header.snapshotsOffset = offset;
  if (oldClusters) await img.refcounts.free(oldOffset - (oldOffset % cs), oldClusters);
}

async function tableBytes(img: Qcow2Image): Promise<number> {
  let pos = img.header.snapshotsOffset;
  for (let i = 0; i < img.header.nbSnapshots; i++) {
    const f = await readBuf(img.storage, pos, FIXED);
    pos = Math.ceil((pos + FIXED + f.readUInt32BE(36) + f.readUInt16BE(12) + f.readUInt16BE(14)) / 8) * 8;
  }
  return pos - img.header.snapshotsOffset;
}

/**
 * Adds delta (1, -1 or 0) to the references of every L2 table and data cluster an L1 table
 * (`l1`, `size` entries) points to, and sets the COPIED flags of those tables' entries (and of
 * `l1` itself) to whether the cluster has exactly one reference now (QEMU's
 * qcow2_update_snapshot_refcount). L2 tables left without references leave the cache.
 */
async function updateReferences(img: Qcow2Image, l1: Buffer, size: number, delta: number): Promise<void> {
  const rc = img.refcounts;
  const cs = img.cs;
  const change = (cluster: number, count: number) =>
    delta ? rc.mutex.run(() => rc.update(cluster, count, delta)) : Promise.resolve();
  for (let i = 0; i < size; i++) {
    const l2 = Number(l1.readBigUInt64BE(i * 8) & L1_OFFSET_MASK);
    if (!l2) continue;
    const e = await img.cache.get(l2);
    try {
      const t = e.table;
      let dirty = false;
      for (let k = 0; k < img.l2Entries; k++) {
        const hi = t.readUInt32BE(k * 8);
        const lo = t.readUInt32BE(k * 8 + 4);
        const type = entryType(hi, lo);
        if (type === ClusterType.COMPRESSED) {
          if (delta) {
            const [first, n] = compressedClusters(hi, lo, img);
            await change(first / cs, n);
          }
          continue;
        }
        if (type !== ClusterType.NORMAL && type !== ClusterType.ZERO_ALLOC) continue;
        const host = entryOffset(hi, lo) / cs;
        await change(host, 1);
        const copied = (await rc.get(host)) === 1;
        const flagged = (hi & COPIED_HI) !== 0;
        if (copied !== flagged) {
          t.writeUInt32BE(copied ? (hi | COPIED_HI) >>> 0 : hi & ~COPIED_HI, k * 8);
          dirty = true;
        }
      }
      if (dirty) img.cache.markDirty(e);
    } finally {
      img.cache.unpin(e);
    }
    await change(l2 / cs, 1);
    const refs = await rc.get(l2 / cs);
    if (refs === 0) img.cache.drop(l2);
    const hi = l1.readUInt32BE(i * 8);
    l1.writeUInt32BE(refs === 1 ? (hi | COPIED_HI) >>> 0 : hi & ~COPIED_HI, i * 8);
  }
}

/** Writes the active L1 table (in memory) to disk. */
async function writeActiveL1(img: Qcow2Image): Promise<void> {
  await img.flushMetadata();
  await img.syncRefcounts();
  await img.l1Lock.run(() => img.storage.write(img.l1Offset, img.l1));
  await img.storage.flush();
}

function find(list: Qcow2Snapshot[], idOrName: string): number {
  const byId = list.findIndex((s) => s.id === idOrName);
  return byId >= 0 ? byId : list.findIndex((s) => s.name === idOrName);
}

export interface CreateSnapshotOptions {
  /** The date recorded, ms since the epoch (default: now). */
  now?: number;
  /** The VM clock recorded, ns (default 0, as qemu-img records it). */
  vmClockNs?: bigint;
  /** The instruction count recorded (default 0, as qemu-img; -1: none, as a QMP snapshot). */
  icount?: bigint;
}

/** Creates a snapshot of the active layer named `name` (its id: one above the highest numeric id). */
export async function createSnapshot(
  img: Qcow2Image,
  name: string,
  opts: CreateSnapshotOptions = {},
): Promise<Qcow2Snapshot> {
  const now = opts.now ?? Date.now();
  img.checkWritable();
  if (Buffer.byteLength(name) > 65535) throw snapErr('Snapshot name too long');
  const list = await readSnapshots(img);
  const ids = list.map((s) => Number(s.id)).filter((n) => Number.isInteger(n));
  const id = String(Math.max(0, ...ids) + 1);
  await img.flushMetadata();
  await updateReferences(img, img.l1, img.header.l1Size, 1);
  await writeActiveL1(img);
  const cs = img.cs;
  const l1Bytes = img.header.l1Size * 8;
  const l1Offset = l1Bytes ? await img.allocator.allocate(Math.ceil(l1Bytes / cs)) : 0;
  if (l1Bytes) await img.storage.write(l1Offset, Buffer.from(img.l1.subarray(0, l1Bytes)));
  // The extra data: 64-bit VM state size (none), the disk size, the instruction count.
  const extra = Buffer.alloc(24);
  writeU64(extra, 8, img.size);
  extra.writeBigInt64BE(opts.icount ?? 0n, 16);
  const sn: Qcow2Snapshot = {
    l1Offset,
    l1Size: img.header.l1Size,
    id,
    name,
    dateSec: Math.floor(now / 1000),
    dateNsec: (now % 1000) * 1_000_000,
    vmClockNs: opts.vmClockNs ?? 0n,
    vmStateSize: 0,
    extra,
  };
  await writeSnapshots(img, [...list, sn]);
  return sn;
}

/** Deletes the snapshot with this id (or else this name). */
export async function deleteSnapshot(img: Qcow2Image, idOrName: string): Promise<void> {
  img.checkWritable();
  const list = await readSnapshots(img);
  const i = find(list, idOrName);
  if (i < 0) throw snapErr('snapshot not found', 'ENOENT');
  const [sn] = list.splice(i, 1) as [Qcow2Snapshot];
  await writeSnapshots(img, list);
  await img.flushMetadata();
  if (sn.l1Size) {
    const l1 = await readBuf(img.storage, sn.l1Offset, sn.l1Size * 8);
    await updateReferences(img, l1, sn.l1Size, -1);
    await img.refcounts.free(sn.l1Offset, Math.ceil((sn.l1Size * 8) / img.cs));
  }
  await updateReferences(img, img.l1, img.header.l1Size, 0);
  await writeActiveL1(img);
}

/** Makes the active layer what the snapshot with this id (or else this name) holds. */
export async function applySnapshot(img: Qcow2Image, idOrName: string): Promise<void> {
  img.checkWritable();
  const list = await readSnapshots(img);
  const i = find(list, idOrName);
  if (i < 0) throw snapErr('Failed to load snapshot: No such file or directory', 'ENOENT');
  const sn = list[i]!;
  await img.flushMetadata();
  if (sn.l1Size > img.header.l1Size) await img.ensureL1(sn.l1Size);
  const snL1 = Buffer.alloc(img.header.l1Size * 8);
  if (sn.l1Size) (await readBuf(img.storage, sn.l1Offset, sn.l1Size * 8)).copy(snL1);
  await updateReferences(img, Buffer.from(snL1), sn.l1Size, 1);
  const old = Buffer.from(img.l1.subarray(0, img.header.l1Size * 8));
  await img.l1Lock.run(async () => {
    snL1.copy(img.l1);
  });
  await writeActiveL1(img);
  await updateReferences(img, old, old.length / 8, -1);
  await updateReferences(img, img.l1, img.header.l1Size, 0);
  await writeActiveL1(img);
  const diskSize = sn.extra.length >= 16 ? readU64(sn.extra, 8) : img.size;
  if (diskSize !== img.size) await img.setSize(diskSize);
}

/**
 * Makes a read-only image read what a snapshot holds, in memory only (QEMU's
 * bdrv_snapshot_load_tmp, for qemu-img convert -l): the snapshot is found by id and name when
 * both are given, else by the one given.
 */
export async function loadSnapshotReadOnly(
  img: Qcow2Image,
  sel: { id?: string; name?: string },
): Promise<void> {
  if (!img.readOnly) throw snapErr('Can only load snapshot in read-only mode');
  const sn = (await readSnapshots(img)).find(
    (s) =>
      (sel.id !== undefined || sel.name !== undefined) &&
      (sel.id === undefined || s.id === sel.id) &&
      (sel.name === undefined || s.name === sel.name),
  );
  if (!sn) throw snapErr("Can't find snapshot", 'ENOENT');
  const l1 = sn.l1Size ? await readBuf(img.storage, sn.l1Offset, sn.l1Size * 8) : Buffer.alloc(0);
  await img.l1Lock.run(async () => {
    img.l1 = l1;
    img.l1Offset = sn.l1Offset;
    img.header.l1Size = sn.l1Size;
  });
}
