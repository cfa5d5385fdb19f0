import { BlockError } from '@blockrep/block';
import { createQcow2Image } from '@blockrep/qcow2';
import { opt, req, t } from '../schema';
import type { BlockdevCreator } from './create';

/** blockdev-create's qcow2 part: the image is written into an opened file node (by name). */
export const qcow2Creator: BlockdevCreator = {
  driver: 'qcow2',
  options: {
    file: req(t.str, 'The file node to write the image into'),
    size: req(t.size, 'Virtual size in bytes'),
    version: opt(
      t.enum('BlockdevQcow2Version', ['v2', 'v3']),
      'v3 (compat 1.1, default) or v2 (compat 0.10)',
    ),
    'backing-file': opt(t.str, 'Backing file name written into the header'),
    'backing-fmt': opt(t.str, 'Format of the backing file'),
    'cluster-size': opt(t.size, 'Cluster size (512 B to 2 MiB, default 64 KiB)'),
    preallocation: opt(
      t.enum('PreallocMode', ['off', 'metadata', 'falloc', 'full']),
      'off (default), metadata, falloc (data clusters reserved) or full (written as zeroes)',
    ),
    'lazy-refcounts': opt(t.bool, 'Set the lazy refcounts feature (v3 only; default false)'),
    'refcount-bits': opt(t.int, 'Refcount width (default 16)'),
  },
  async create(o, { graph }) {
    const fileNode = graph.lookup(o.file as string);
    if (fileNode.driver.name !== 'file') throw new BlockError(`'${o.file}' is not a file node`);
    const prealloc = (o.preallocation as string | undefined) ?? 'off';
    await createQcow2Image(fileNode.filename, {
      size: o.size as number,
      compat: (o.version as 'v2' | 'v3' | undefined) ?? 'v3',
      backingFile: o['backing-file'] as string | undefined,
      backingFormat: o['backing-fmt'] as string | undefined,
      clusterSize: o['cluster-size'] as number | undefined,
      preallocation: prealloc as 'off' | 'metadata' | 'falloc' | 'full',
      lazyRefcounts: o['lazy-refcounts'] as boolean | undefined,
      refcountBits: o['refcount-bits'] as number | undefined,
    });
    // The node's cached length is stale now that its file was rewritten underneath it.
    fileNode.length = Math.ceil((await import('node:fs')).statSync(fileNode.filename).size / 512) * 512;
  },
};
