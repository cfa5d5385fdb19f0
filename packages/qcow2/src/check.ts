import { BlockError, ChildRole, ImageLocks, PERM_ALL, Perm, storageChildPerm } from '@blockrep/block';
import { ClusterType, compressedClusters, entryOffset, entryType } from './cluster';
import { Ext, parseHeader, type Qcow2Header, readU64 } from './header';
import { refGet, refMax, refSet, tableEntryOffset } from './refcount';
import { FileStorage, type Qcow2Storage, readBuf } from './storage';

/*
 * Consistency check and repair (qemu-img check): recount every reference from the metadata
 * (header, L1/L2 of the active image and of each snapshot, refcount structures, bitmaps) and
 * compare with the stored refcounts. Stored > counted is a leak; stored < counted is corruption.
 */

export interface Qcow2CheckOptions {
  /** Fix leaks ('leaks') or also refcounts that are too low ('all'). */
  repair?: 'leaks' | 'all';
  /** Check an image another process may be writing (no image locks, as qemu-img check -U). */
  forceShare?: boolean;
}

/** Shaped like `qemu-img check --output=json` (fields that are zero are left out as QEMU does). */
export interface Qcow2CheckResult {
  'image-end-offset': number;
  'total-clusters': number;
  'check-errors': number;
  leaks?: number;
  'leaks-fixed'?: number;
  corruptions?: number;
  'corruptions-fixed'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  filename: string;
  format: 'qcow2';
  /** What was found, one line each, as qemu-img check prints it. */
  messages: string[];
}

const COPIED = 0x80000000;

/** References per host cluster, in a typed array that grows (no per-cluster objects). */
class ClusterCounts {
  private a: Uint32Array;
  /** One past the highest cluster counted. */
  end = 0;

  constructor(clusters: number) {
    this.a = new Uint32Array(Math.max(16, clusters));
  }

  inc(c: number): void {
    if (c >= this.a.length) {
      const n = new Uint32Array(Math.max(c + 1, this.a.length * 2));
      n.set(this.a);
      this.a = n;
    }
    this.a[c]!++;
    if (c >= this.end) this.end = c + 1;
  }

  get(c: number): number {
    return c < this.a.length ? this.a[c]! : 0;
  }
}

interface Counter {
  refs: ClusterCounts;
  corruptions: number;
  messages: string[];
}

/** Checks (and optionally repairs) the qcow2 image at path. */
export async function checkQcow2Image(path: string, opts: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const s = await FileStorage.open(path, opts.repair ? 'r+' : 'r');
  try {
    if (!opts.forceShare) {
      // The image locks of the file under a qcow2 reader (or repairer, which writes metadata).
      const role = ChildRole.DATA | ChildRole.METADATA;
      const [perm, shared] = storageChildPerm(role, Perm.CONSISTENT_READ, PERM_ALL, !opts.repair);
      new ImageLocks(s.fd, path).apply(perm, shared);
    }
    return await checkStorage(s, opts);
  } finally {
    await s.close();
  }
}

export async function checkStorage(s: Qcow2Storage, opts: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const fileLength = await s.length();
  let h = parseHeader(await readBuf(s, 0, Math.min(fileLength, 65536)), fileLength);
  const cs = 2 ** h.clusterBits;
  if (cs > 65536) h = parseHeader(await readBuf(s, 0, Math.min(fileLength, cs)), fileLength);
  const nbClusters = Math.ceil(fileLength / cs);
  const ctr: Counter = { refs: new ClusterCounts(nbClusters), corruptions: 0, messages: [] };
  const err = (msg: string) => {
    ctr.corruptions++;
    ctr.messages.push(`ERROR ${msg}`);
  };
  const inc = (off: number, bytes: number) => {
    for (let c = Math.floor(off / cs); c * cs < off + bytes; c++) ctr.refs.inc(c);
  };
  const stats = { allocated: 0, fragmented: 0, compressed: 0 };

  inc(0, cs);
  const l1Tables: { off: number; size: number; active: boolean }[] = [
    { off: h.l1TableOffset, size: h.l1Size, active: true },
  ];
  if (h.nbSnapshots) {
    const snaps = await readSnapshots(s, h);
    inc(h.snapshotsOffset, snaps.tableBytes);
    for (const sn of snaps.l1s) l1Tables.push({ ...sn, active: false });
  }
  const l2Seen = new Map<number, Buffer>();
  for (const t of l1Tables) {
    if (t.size === 0) continue;
    if (t.off % cs || t.off + t.size * 8 > fileLength) {
      err(`L1 table at ${t.off} is invalid`);
      continue;
    }
    inc(t.off, t.size * 8);
    const l1 = await readBuf(s, t.off, t.size * 8);
    for (let i = 0; i < t.size; i++) {
      const l2off = tableEntryOffset(l1, i);
      if (!l2off) continue;
      // As qemu-img counts it: contiguity within one L2 table; compressed clusters are fragmented.
      let prevHost = -1;
      if (l2off % cs) {
        err(`l2_offset=${l2off.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        continue;
      }
      inc(l2off, cs);
      if (l2off + cs > nbClusters * cs) {
        err(`l2_offset=${l2off.toString(16)}: Table is beyond the end of the image file`);
        continue;
      }
      let l2 = l2Seen.get(l2off);
      if (!l2) {
        l2 = await readBuf(s, l2off, cs);
        l2Seen.set(l2off, l2);
      }
      for (let k = 0; k < cs / 8; k++) {
        const hi = l2.readUInt32BE(k * 8);
        const lo = l2.readUInt32BE(k * 8 + 4);
        const type = entryType(hi, lo);
        if (type === ClusterType.COMPRESSED) {
          const [first, n] = compressedClusters(hi, lo, { clusterBits: h.clusterBits, cs });
          inc(first, n * cs);
          if (t.active) {
            stats.allocated++;
            stats.compressed++;
            stats.fragmented++;
          }
        } else if (type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC) {
          const host = entryOffset(hi, lo);
          if (host % cs) {
            err(`offset=${host.toString(16)}: Cluster is not properly aligned; L2 entry corrupted`);
            continue;
          }
          inc(host, cs);
          if (t.active) {
            stats.allocated++;
            if (prevHost >= 0 && host !== prevHost + cs) stats.fragmented++;
            prevHost = host;
          }
        }
      }
    }
  }
  await countBitmaps(s, h, inc);

  // Refcount structures.
  const order = h.refcountOrder;
  const bits = 2 ** order;
  const perBlock = (cs * 8) / bits;
  inc(h.refcountTableOffset, h.refcountTableClusters * cs);
  const table = await readBuf(s, h.refcountTableOffset, h.refcountTableClusters * cs);
  const blocks = new Map<number, { off: number; data: Buffer; dirty: boolean }>();
  for (let i = 0; i < table.length / 8; i++) {
    const off = tableEntryOffset(table, i);
    if (!off) continue;
    if (off % cs) {
      err(`refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      continue;
    }
    if (off >= nbClusters * cs) {
      err(`refcount block ${i} is outside image`);
      continue;
    }
    inc(off, cs);
    blocks.set(i, { off, data: await readBuf(s, off, cs), dirty: false });
  }
  const stored = (c: number) => {
    const b = blocks.get(Math.floor(c / perBlock));
    return b ? refGet(b.data, c % perBlock, bits) : 0;
  };

  // OFLAG_COPIED must be set exactly where the refcount is 1 (active tables only).
  const active = l1Tables[0]!;
  if (active.size && active.off % cs === 0 && active.off + active.size * 8 <= fileLength) {
    const l1 = await readBuf(s, active.off, active.size * 8);
    for (let i = 0; i < active.size; i++) {
      const l2off = tableEntryOffset(l1, i);
      if (!l2off || l2off % cs) continue;
      const copied = (l1.readUInt32BE(i * 8) & COPIED) !== 0;
      if (copied !== (stored(l2off / cs) === 1)) {
        err(
          `OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l2off.toString(16)} refcount=${stored(l2off / cs)}`,
        );
      }
      const l2 = l2Seen.get(l2off);
      if (!l2) continue;
      for (let k = 0; k < cs / 8; k++) {
        const hi = l2.readUInt32BE(k * 8);
        const lo = l2.readUInt32BE(k * 8 + 4);
        const type = entryType(hi, lo);
        if (type !== ClusterType.NORMAL && type !== ClusterType.ZERO_ALLOC) continue;
        const host = entryOffset(hi, lo);
        if (host % cs) continue;
        if (((hi & COPIED) !== 0) !== (stored(host / cs) === 1)) {
          err(`OFLAG_COPIED data cluster: l2_entry=${host.toString(16)} refcount=${stored(host / cs)}`);
        }
      }
    }
  }

  // Compare, over every cluster referenced or with a stored refcount.
  const max = refMax(bits);
  let leaks = 0;
  let leaksFixed = 0;
  let corrFixed = 0;
  // Like qemu-img: stored refcounts past the end of the file (and of every reference) are not looked at.
  const span = Math.max(nbClusters, ctr.refs.end);
  for (let c = 0; c < span; c++) {
    const want = ctr.refs.get(c);
    const have = stored(c);
    if (have === want) continue;
    const block = blocks.get(Math.floor(c / perBlock));
    if (have > want) {
      if (opts.repair && block) {
        refSet(block.data, c % perBlock, bits, want);
        block.dirty = true;
        leaksFixed++;
        ctr.messages.push(`Repairing cluster ${c} refcount=${have} reference=${want}`);
      } else {
        leaks++;
        ctr.messages.push(`Leaked cluster ${c} refcount=${have} reference=${want}`);
      }
    } else if (opts.repair === 'all' && block && want <= max) {
      refSet(block.data, c % perBlock, bits, want);
      block.dirty = true;
      corrFixed++;
      ctr.messages.push(`Repairing cluster ${c} refcount=${have} reference=${want}`);
    } else {
      err(`cluster ${c} refcount=${have} reference=${want}${want > max ? ' (refcount overflow)' : ''}`);
    }
  }
  for (const b of blocks.values()) if (b.dirty) await s.write(b.off, b.data);
  if (leaksFixed || corrFixed) await s.flush();

  const end = ctr.refs.end;
  const res: Qcow2CheckResult = {
    'image-end-offset': end * cs,
    'total-clusters': Math.ceil(h.size / cs),
    'check-errors': 0,
    filename: s.filename,
    format: 'qcow2',
    messages: ctr.messages,
  };
  if (leaks) res.leaks = leaks;
  if (leaksFixed) res['leaks-fixed'] = leaksFixed;
  if (ctr.corruptions) res.corruptions = ctr.corruptions;
  if (corrFixed) res['corruptions-fixed'] = corrFixed;
  if (stats.allocated) res['allocated-clusters'] = stats.allocated;
  if (stats.fragmented) res['fragmented-clusters'] = stats.fragmented;
  if (stats.compressed) res['compressed-clusters'] = stats.compressed;
  return res;
}

/** The snapshot table: its size in bytes and each snapshot's L1 table. */
async function readSnapshots(
  s: Qcow2Storage,
  h: Qcow2Header,
): Promise<{ tableBytes: number; l1s: { off: number; size: number }[] }> {
  const l1s: { off: number; size: number }[] = [];
  let pos = h.snapshotsOffset;
  const fileLength = await s.length();
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (pos + 40 > fileLength) throw new BlockError('qcow2: snapshot table is truncated', { errno: 'EIO' });
    const fixed = await readBuf(s, pos, 40);
    const l1off = readU64(fixed, 0);
    const l1size = fixed.readUInt32BE(8);
    const idLen = fixed.readUInt16BE(12);
    const nameLen = fixed.readUInt16BE(14);
    const extra = fixed.readUInt32BE(36);
    l1s.push({ off: l1off, size: l1size });
    pos += 40 + extra + idLen + nameLen;
    pos = Math.ceil(pos / 8) * 8;
  }
  return { tableBytes: pos - h.snapshotsOffset, l1s };
}

/** Bitmaps (when the autoclear bit says the extension is valid): directory, tables and data. */
async function countBitmaps(
  s: Qcow2Storage,
  h: Qcow2Header,
  inc: (off: number, bytes: number) => void,
): Promise<void> {
  if (!(h.autoclear & 1n)) return;
  const ext = h.extensions.find((e) => e.type === Ext.BITMAPS);
  if (!ext || ext.data.length < 24) return;
  const nb = ext.data.readUInt32BE(0);
  const dirSize = readU64(ext.data, 8);
  const dirOff = readU64(ext.data, 16);
  inc(dirOff, dirSize);
  const dir = await readBuf(s, dirOff, dirSize);
  let p = 0;
  for (let i = 0; i < nb && p + 24 <= dir.length; i++) {
    const tOff = readU64(dir, p);
    const tSize = dir.readUInt32BE(p + 8);
    const nameLen = dir.readUInt16BE(p + 18);
    const extra = dir.readUInt32BE(p + 20);
    if (tOff && tSize) {
      inc(tOff, tSize * 8);
      const t = await readBuf(s, tOff, tSize * 8);
      for (let k = 0; k < tSize; k++) {
        const off = tableEntryOffset(t, k);
        if (off) inc(off, 1);
      }
    }
    p = Math.ceil((p + 24 + extra + nameLen) / 8) * 8;
  }
}
