import { dirname, isAbsolute, join } from 'node:path';
import type { BitmapDirEntry } from './bitmaps';
import { Compat, Incompat, parseHeader, type Qcow2Header } from './header';
import { FileStorage, readBuf } from './storage';

/* `qemu-img info` for a qcow2 file, without a block graph (for the CLI). */

/** The `format-specific` data of `qemu-img info --output=json`. */
export function formatSpecificData(
  h: Qcow2Header,
  corrupt: boolean,
  bitmaps: BitmapDirEntry[] = [],
): Record<string, unknown> {
  if (h.version === 2) return { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
  const data: Record<string, unknown> = {
    compat: '1.1',
    'compression-type': 'zlib',
    'lazy-refcounts': (h.compatible & Compat.LAZY_REFCOUNTS) !== 0n,
  };
  // The image's persistent bitmaps, as QEMU lists them (between lazy refcounts and refcount bits).
  if (bitmaps.length) {
    data.bitmaps = bitmaps.map((e) => ({
      flags: [...(e.flags & 1 ? ['in-use'] : []), ...(e.flags & 2 ? ['auto'] : [])],
      name: e.name,
      granularity: 2 ** e.granularityBits,
    }));
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  data.corrupt = corrupt;
  data['extended-l2'] = false;
  return data;
}

export interface Qcow2Info {
  'virtual-size': number;
  filename: string;
  'cluster-size': number;
  format: 'qcow2';
  'actual-size'?: number;
  'dirty-flag': boolean;
  'format-specific': { type: 'qcow2'; data: Record<string, unknown> };
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
}

/** What `qemu-img info --output=json` says about a qcow2 file (the image itself, not its chain). */
export async function qcow2ImageInfo(path: string): Promise<Qcow2Info> {
  const s = await FileStorage.open(path, 'r');
  try {
    const len = await s.length();
    let h = parseHeader(await readBuf(s, 0, Math.min(len, 65536)), len);
    if (2 ** h.clusterBits > 65536)
      h = parseHeader(await readBuf(s, 0, Math.min(len, 2 ** h.clusterBits)), len);
    const info: Qcow2Info = {
      'virtual-size': h.size,
      filename: path,
      'cluster-size': 2 ** h.clusterBits,
      format: 'qcow2',
      'dirty-flag': (h.incompatible & Incompat.DIRTY) !== 0n,
      'format-specific': {
        type: 'qcow2',
        data: formatSpecificData(h, (h.incompatible & Incompat.CORRUPT) !== 0n),
      },
    };
    if (h.backingFile) {
      info['backing-filename'] = h.backingFile;
      info['full-backing-filename'] = isAbsolute(h.backingFile)
        ? h.backingFile
        : join(dirname(path), h.backingFile);
      if (h.backingFormat) info['backing-filename-format'] = h.backingFormat;
    }
    return info;
  } finally {
    await s.close();
  }
}
