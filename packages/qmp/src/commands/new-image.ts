import { open } from 'node:fs/promises';
import {
  BlockBackend,
  BlockError,
  type BlockGraph,
  type BlockNode,
  type Errno,
  errnoText,
  Perm,
} from '@blockrep/block';
import { createQcow2Image } from '@blockrep/qcow2';
import { displayFilename } from './node-info';

/*
 * The images drive-mirror, drive-backup and blockdev-snapshot-sync make or open by file name.
 */

export const NBD_URL = /^nbd(\+tcp|\+unix)?:\/\//;

/** A file system error as QEMU words it: "Could not create 'f': No such file or directory". */
export function fsError(verb: 'create' | 'open', filename: string, e: unknown): unknown {
  const code = (e as NodeJS.ErrnoException).code;
  if (!code || !/^E[A-Z]+$/.test(code)) return e;
  return new BlockError(`Could not ${verb} '${filename}': ${errnoText(code as Errno)}`, { cause: e });
}

/** Reads the first bytes of a node: qcow2 by its magic, raw otherwise (qemu-img's probe). */
async function probeFormat(graph: BlockGraph, node: BlockNode): Promise<string> {
  const blk = new BlockBackend(graph, { perm: Perm.CONSISTENT_READ });
  blk.attach(node);
  try {
    if (node.length < 4) return 'raw';
    const magic = await blk.read(0, 4);
    return magic.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  } finally {
    await blk.detach();
  }
}

/**
 * Opens an image by file name or NBD URL, as QEMU's bdrv_open(filename, {driver: format}); the
 * format is probed when not given. `noBacking` leaves a format's backing file closed (the caller
 * attaches the right node).
 */
export async function openByFilename(
  graph: BlockGraph,
  filename: string,
  format: string | undefined,
  opts: { nodeName?: string; noBacking?: boolean } = {},
): Promise<BlockNode> {
  const proto = await graph.open(
    NBD_URL.test(filename) ? { driver: 'nbd', filename } : { driver: 'file', filename },
  );
  try {
    const driver = format ?? (await probeFormat(graph, proto));
    return await graph.open({
      driver,
      file: proto.nodeName,
      ...(opts.nodeName !== undefined ? { 'node-name': opts.nodeName } : {}),
      ...(opts.noBacking && graph.driver(driver)?.supportsBacking ? { backing: null } : {}),
    });
  } finally {
    await graph.close(proto);
  }
}

/** A new image (mode absolute-paths) of the given size, naming `backing` as its backing file or not. */
export async function createTargetImage(
  filename: string,
  format: string,
  size: number,
  backing: BlockNode | null,
): Promise<void> {
  if (format === 'qcow2') {
    await createQcow2Image(filename, {
      size,
      ...(backing ? { backingFile: displayFilename(backing), backingFormat: backing.driver.name } : {}),
    }).catch((e: unknown) => {
      throw fsError('create', filename, e);
    });
    return;
  }
  if (format !== 'raw') throw new BlockError(`Unknown file format '${format}'`);
  // A raw image on an NBD server is the export itself: nothing to create.
  if (NBD_URL.test(filename)) return;
  const fh = await open(filename, 'w', 0o644).catch((e: unknown) => {
    throw fsError('create', filename, e);
  });
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}
