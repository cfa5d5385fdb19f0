import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import {
  type BlockChild,
  type BlockDriver,
  BlockError,
  type BlockNode,
  type BlockStatus,
  ChildRole,
  opt,
  ReqFlags,
  toBlockError,
  zeroBuffer,
} from '@blockrep/block';
import { loadBitmaps, MAX_BITMAPS, markBitmapsInUse, storeBitmaps } from './bitmaps';
import {
  ClusterType,
  lookup,
  preallocateRange,
  readRange,
  unmapRange,
  writeCompressed,
  writeRange,
  zeroOrDiscard,
} from './cluster';
import { QCOW2_MAGIC } from './header';
import { type BackingReader, makeImageEmpty, Qcow2Image } from './image';
import { formatSpecificData } from './info';
import { childStorage } from './storage';

/* The qcow2 BlockDriver: option parsing, children, and the request entry points. */

const img = (node: BlockNode) => node.opaque as Qcow2Image;

/** The backing file named in the header, as child options (relative names resolve next to the image). */
function headerBackingOptions(image: Qcow2Image, file: BlockChild): Record<string, unknown> | undefined {
  const name = image.header.backingFile;
  if (!name) return undefined;
  const base = file.node.filename;
  const path = isAbsolute(name) || !base ? name : join(dirname(base), name);
  const format = image.header.backingFormat ?? probeFormat(path);
  return { driver: format, file: { driver: 'file', filename: path } };
}

/**
 * A backing file that is already being opened further up the chain (an image naming itself, or
 * a -> b -> a) would be opened again and again: refused.
 */
function refuseLoop(opening: readonly BlockNode[], ref: Record<string, unknown>): void {
  const f = ref.file as Record<string, unknown> | undefined;
  const name = typeof f?.filename === 'string' ? f.filename : undefined;
  if (!name) return;
  const id = fileId(name);
  if (!id) return;
  for (const n of opening) {
    if (n.driver.protocol) continue;
    const other = n.filename ? fileId(n.filename) : null;
    if (other === id)
      throw new BlockError(`Backing file '${name}' creates an infinite loop.`, { errno: 'ELOOP' });
  }
}

/** Device and inode of a file (null when it cannot be seen). */
function fileId(path: string): string | null {
  try {
    const st = statSync(path);
    return `${st.dev}:${st.ino}`;
  } catch {
    return null;
  }
}

/** qcow2 or raw, by the magic (images without a backing format extension). */
function probeFormat(path: string): string {
  try {
    const fd = openSync(path, 'r');
    try {
      const b = Buffer.alloc(4);
      readSync(fd, b, 0, 4, 0);
      return b.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
    } finally {
      closeSync(fd);
    }
  } catch {
    return 'raw';
  }
}

const alignUp = (v: number, a: number) => Math.ceil(v / a) * a;
const alignDown = (v: number, a: number) => Math.floor(v / a) * a;

const preallocDetected = new WeakMap<Qcow2Image, Promise<boolean>>();
/** The answers already in (block status is a hot path: no await once it is known). */
const preallocKnown = new WeakMap<Qcow2Image, boolean>();

/**
 * Whether an image looks preallocated with metadata (QEMU's heuristic, decided once per open):
 * more clusters in use than a ninth above what the file really has allocated (at least two
 * more). False when the file cannot tell its allocation.
 */
function metadataPreallocated(node: BlockNode): Promise<boolean> {
  const image = img(node);
  let p = preallocDetected.get(image);
  if (!p) {
    p = (async () => {
      const file = node.file!.node;
      const real = await file.driver.allocatedSize?.(file).catch(() => undefined);
      if (real === undefined) return false;
      const realClusters = Math.floor(real / image.cs);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const used = await image.refcounts.countInUse(Math.ceil(file.length / image.cs), threshold);
      return used > threshold;
    })()
      .catch(() => false)
      .then((known) => {
        preallocKnown.set(image, known);
        return known;
      });
    preallocDetected.set(image, p);
  }
  return p;
}

export const qcow2Driver: BlockDriver = {
  name: 'qcow2',
  supportsBacking: true,
  supportedWriteFlags: ReqFlags.WRITE_COMPRESSED,
  options: {
    file: opt.child('The node holding the image', { required: true }),
    backing: opt.child('The backing (COW) node; null for none; default: the one named in the header', {
      nullable: true,
    }),
    'l2-cache-size': opt.size(
      'Maximum bytes of L2 tables to cache (default: the whole image, at most 32 MiB)',
    ),
    'cache-size': opt.size('Maximum metadata cache size (used as the L2 cache size when that is not given)'),
    'refcount-cache-size': opt.size('Accepted for compatibility (refcount blocks are always cached)'),
    'lazy-refcounts': opt.bool('Accepted for compatibility (refcounts are always kept up to date)'),
    'pass-discard-request': opt.bool(
      'Punch the clusters a guest discard frees out of the file (default: on with discard=unmap)',
    ),
    'cache-clean-interval': opt.int('Accepted for compatibility', { min: 0 }),
  },

  async open(node, opts, ctx) {
    const file = (await ctx.openChild(
      'file',
      opts.file,
      ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY,
    ))!;
    const l2CacheSize = (opts['l2-cache-size'] ?? opts['cache-size']) as number | undefined;
    let image: Qcow2Image;
    try {
      image = await Qcow2Image.open(childStorage(file), { readOnly: node.readOnly, l2CacheSize });
    } catch (e) {
      if (!node.readOnly && node.autoReadOnly && e instanceof BlockError && e.errno === 'EACCES') {
        node.readOnly = true;
        image = await Qcow2Image.open(childStorage(file), { readOnly: true, l2CacheSize });
      } else throw e;
    }
    node.opaque = image;
    image.passDiscards = (opts['pass-discard-request'] as boolean | undefined) ?? node.discardUnmap;
    // Persistent bitmaps live on the node from now on; a writer marks them in use on disk.
    node.dirtyBitmaps.push(...(await loadBitmaps(image)));
    if (!node.readOnly) await markBitmapsInUse(image);
    const ref = opts.backing === undefined ? headerBackingOptions(image, file) : opts.backing;
    if (opts.backing !== undefined) node.autoBackingFile = image.header.backingFile ?? '';
    try {
      if (ref && typeof ref === 'object') refuseLoop(ctx.opening, ref as Record<string, unknown>);
      await ctx.openChild('backing', ref, ChildRole.COW, { optional: true });
    } catch (e) {
      // As QEMU's bdrv_open_backing_file (a reference to an existing node is not opened here).
      if (typeof ref === 'string') throw e;
      const be = toBlockError(e);
      throw new BlockError(`Could not open backing file: ${be.message}`, { errno: be.errno, hint: be.hint });
    }
    // Whatever the graph makes the backing child later (blockdev-snapshot attaches one, stream
    // and commit replace or drop it), reads go to the node's backing child of the moment.
    let reader: { child: BlockChild; reader: BackingReader } | null = null;
    image.backingSource = () => {
      const b = node.backing;
      if (!b) return null;
      if (reader?.child !== b) {
        reader = {
          child: b,
          reader: { readv: (offset, bytes, iov) => b.readv(offset, bytes, iov), length: () => b.getLength() },
        };
      }
      return reader.reader;
    };
  },

  async close(node) {
    const image = img(node);
    if (!image) return;
    await storeNodeBitmaps(node);
    await image.close();
  },

  canStoreBitmap(node, name) {
    const image = img(node);
    const fail = (why: string) =>
      new BlockError(`Can't make bitmap '${name}' persistent in '${node.nodeName}': ${why}`);
    if (!image.v3) throw fail('Cannot store dirty bitmaps in qcow2 v2 files');
    if (Buffer.byteLength(name) > 1023) throw fail('Name length exceeds maximum (1023 characters)');
    if (node.dirtyBitmaps.filter((b) => b.persistent).length >= MAX_BITMAPS) {
      throw fail(`Maximum number of persistent bitmaps is already reached`);
    }
  },

  async removePersistentBitmap(node) {
    // The directory is written again without it (QEMU removes it from the image at once).
    await storeNodeBitmaps(node);
  },

  limits: (node) => {
    const cs = img(node).cs;
    return {
      requestAlignment: 1,
      maxTransfer: Math.max(cs, 4 << 20),
      optimalTransfer: cs,
      pdiscardAlignment: cs,
    };
  },

  getLength: (node) => img(node).size,

  async changeBackingFile(node, filename, format) {
    await img(node).changeBackingFile(filename, format);
    node.autoBackingFile = filename ?? '';
  },
  read: (node, offset, bytes, iov) => readRange(img(node), offset, bytes, iov),

  write: (node, offset, bytes, iov, flags) =>
    flags & ReqFlags.WRITE_COMPRESSED
      ? writeCompressed(img(node), offset, bytes, iov)
      : writeRange(img(node), offset, bytes, iov),

  async writeZeroes(node, offset, bytes, flags) {
    const image = img(node);
    if (!image.v3) throw new BlockError('qcow2 v2 has no zero clusters', { errno: 'ENOTSUP' });
    const cs = image.cs;
    // Partial clusters at either end are written as data; whole clusters get the zero flag.
    const start = alignUp(offset, cs);
    const end = alignDown(offset + bytes, cs);
    const dataZeroes = async (from: number, to: number) => {
      if (flags & ReqFlags.NO_FALLBACK) throw new BlockError('Unaligned zero write', { errno: 'ENOTSUP' });
      await writeRange(image, from, to - from, [zeroBuffer(to - from)]);
    };
    if (end <= start) return dataZeroes(offset, offset + bytes);
    if (start > offset) await dataZeroes(offset, start);
    await zeroOrDiscard(image, start, end - start, 'zero', !(flags & ReqFlags.MAY_UNMAP));
    if (offset + bytes > end) await dataZeroes(end, offset + bytes);
  },

  async discard(node, offset, bytes) {
    const image = img(node);
    const cs = image.cs;
    const start = alignUp(offset, cs);
    const end = Math.min(alignDown(offset + bytes, cs), alignUp(image.size, cs));
    if (end > start) await zeroOrDiscard(image, start, end - start, 'discard', false);
  },

  flushToOs: (node) => img(node).flushMetadata(),

  async blockStatus(node, offset, bytes): Promise<BlockStatus> {
    const image = img(node);
    const r = await lookup(image, offset, bytes);
    switch (r.type) {
      case ClusterType.NORMAL:
        return {
          bytes: r.bytes,
          data: true,
          zero: false,
          allocated: true,
          offset: r.host,
          file: node.file!.node,
          // Metadata-preallocated images keep their data clusters in holes of the file: the
          // file tells which of them read as zeroes (QEMU asks it only for such images).
          recurseZero: preallocKnown.get(image) ?? (await metadataPreallocated(node)),
        };
      case ClusterType.COMPRESSED:
        return { bytes: r.bytes, data: true, zero: false, allocated: true };
      case ClusterType.ZERO_ALLOC:
        // Preallocated zeroes keep their host clusters: the offset is valid, as QEMU reports it.
        return {
          bytes: r.bytes,
          data: false,
          zero: true,
          allocated: true,
          offset: r.host,
          file: node.file!.node,
        };
      case ClusterType.ZERO_PLAIN:
        return { bytes: r.bytes, data: false, zero: true, allocated: true };
      default:
        return { bytes: r.bytes, data: false, zero: false, allocated: false };
    }
  },

  async truncate(node, length, opts) {
    const image = img(node);
    if (!['off', 'metadata', 'falloc', 'full'].includes(opts.prealloc)) {
      throw new BlockError(`Unsupported preallocation mode '${opts.prealloc}'`, { errno: 'ENOTSUP' });
    }
    if (!image.v3 && image.header.nbSnapshots && length !== image.size)
      throw new BlockError("Can't resize a v2 image which has snapshots", { errno: 'ENOTSUP' });
    if (length < image.size) {
      if (opts.prealloc !== 'off')
        throw new BlockError('Preallocation can only be used for growing images', { errno: 'ENOTSUP' });
      await image.shrink(
        length,
        (offset, bytes) => writeRange(image, offset, bytes, [Buffer.alloc(bytes)]),
        (offset, bytes) => unmapRange(image, offset, bytes),
      );
      return;
    }
    const old = image.size;
    if (length > old) await image.grow(length);
    if (opts.prealloc !== 'off' && length > old) {
      // The new clusters are mapped first; then the file covers them: sparse (metadata),
      // reserved (falloc) or written out as zeroes (full).
      await preallocateRange(image, old, length);
      await image.flushMetadata();
      const file = node.file!;
      if (image.fileEnd > file.node.length) {
        await file.truncate(image.fileEnd, {
          exact: false,
          prealloc: opts.prealloc === 'metadata' ? 'off' : opts.prealloc,
        });
      }
    }
  },

  makeEmpty: (node) => makeImageEmpty(img(node)),

  async reopenPrepare(state) {
    const image = img(state.node);
    if (state.readOnly && !state.node.readOnly) {
      await storeNodeBitmaps(state.node);
      await image.close();
    }
    if (!state.readOnly && state.node.readOnly) {
      if (image.corrupt)
        throw new BlockError('qcow2: Image is corrupt; cannot be opened read/write', { errno: 'EACCES' });
      state.opaque = true;
    }
  },

  reopenCommit(state) {
    const image = img(state.node);
    image.readOnly = state.readOnly;
    // A writer again: the bitmaps are in use until stored (errors surface at the next store).
    if (!state.readOnly) markBitmapsInUse(image).catch(() => {});
  },

  info(node) {
    return qcow2FormatSpecific(img(node));
  },
};

/** The "format-specific" data of `qemu-img info` for an open image. */
export function qcow2FormatSpecific(image: Qcow2Image): Record<string, unknown> {
  return formatSpecificData(image.header, image.corrupt, image.bitmapDir);
}

/**
 * Stores the node's persistent bitmaps (writable, uncorrupted images): those the image held in
 * its order, then new ones newest first, as QEMU lists them.
 */
async function storeNodeBitmaps(node: BlockNode): Promise<void> {
  const image = img(node);
  if (image.readOnly || image.corrupt) return;
  const persistent = node.dirtyBitmaps.filter((b) => b.persistent);
  if (!persistent.length && !image.bitmapDir.length) return;
  const ordered = [
    ...image.bitmapDir.map((e) => persistent.find((b) => b.name === e.name)).filter((b) => b !== undefined),
    ...[...persistent].reverse().filter((b) => !image.bitmapDir.some((e) => e.name === b.name)),
  ];
  await storeBitmaps(image, ordered);
}
