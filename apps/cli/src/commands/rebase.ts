import { dirname, isAbsolute, join } from 'node:path';
import { type BlockBackend, type BlockNode, isAllocatedAbove } from '@blockrep/block';
import { FORCE_SHARE, HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, forceShare, IMAGE_FORMATS, imageArg, imageGraph, openImage, qcow2Of } from '../image';
import { ProgressBar } from '../progress';

/** qemu-img's unit of work: 2 MiB at a time, compared in 512-byte sectors. */
const CHUNK = 2 << 20;
const SECTOR = 512;
const CACHE_MODES = ['none', 'writeback', 'unsafe', 'directsync', 'writethrough'];

/**
 * The runs of [0, n) where a and b differ or agree, in whole sectors (the last may be shorter):
 * qemu-img writes the old backing file's data only where the two differ.
 */
function* differingRuns(a: Buffer, b: Buffer, n: number): Generator<[number, number]> {
  let start = -1;
  for (let off = 0; off < n; off += SECTOR) {
    const end = Math.min(n, off + SECTOR);
    const differ = a.compare(b, off, end, off, end) !== 0;
    if (differ && start < 0) start = off;
    if (!differ && start >= 0) {
      yield [start, off - start];
      start = -1;
    }
  }
  if (start >= 0) yield [start, n - start];
}

/** Reads [offset, offset+n) of a backing file, zeroes past its end. */
async function readBacking(
  blk: BlockBackend | null,
  length: number,
  offset: number,
  n: number,
): Promise<Buffer> {
  const buf = Buffer.alloc(n);
  if (blk && offset < length) {
    const m = Math.min(n, length - offset);
    await blk.readv(offset, [buf.subarray(0, m)]);
  }
  return buf;
}

/**
 * blockrep rebase [-f fmt] [-u] [-p] [-q] [-U] -b BACKING [-F fmt] FILE: makes BACKING the
 * backing file of FILE. In safe mode (the default) every range FILE does not hold itself, where
 * the old backing chain and the new one read differently, is first written into FILE, so what
 * FILE reads does not change; `-b ""` takes the backing file away (FILE then holds everything).
 * `-u` (unsafe) only rewrites the header, as qemu-img rebase -u does.
 */
export async function rebaseCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    { short: ':hf:F:b:upt:T:qU', long: { ...HELP, ...IMAGE_OPTS, ...FORCE_SHARE } },
    'rebase',
  );
  refuseUnsupported(p);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const unsafe = p.opts.has('-u');
  const backing = optString(p, '-b');
  const backingFmt = optString(p, '-F');
  if (!unsafe && backing === undefined)
    throw usageError('Must specify backing file (-b) or use unsafe mode (-u)');
  for (const k of ['-t', '-T']) {
    const mode = optString(p, k);
    if (mode !== undefined && !CACHE_MODES.includes(mode))
      throw new CliFailure(`Invalid cache option: ${mode}`);
  }
  if (backingFmt !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(backingFmt))
    throw new CliFailure(`Invalid format name: '${backingFmt}'`);
  const newName = backing || undefined;
  // qcow2 records a backing file only with its format (qemu-img: "backing format must be specified").
  const refuseChange = (why: string) =>
    new CliFailure(`Could not change the backing file to '${backing}': ${why}`);
  if (newName && backingFmt === undefined) throw refuseChange('backing format must be specified');

  const g = imageGraph();
  try {
    const imageOpts = p.opts.has('--image-opts');
    const top = await openImage(g, file, {
      format: optString(p, '-f'),
      readOnly: false,
      imageOpts,
      // Unsafe mode never reads the old chain: it may be missing.
      ...(unsafe ? { backing: null } : {}),
    });
    const image = qcow2Of(top);
    if (!image) throw refuseChange('Operation not supported');
    if (!unsafe) {
      const dir = dirname(imageArg(file, { imageOpts }).path || file);
      let fresh: BlockNode | null = null;
      if (newName) {
        const path = isAbsolute(newName) ? newName : join(dir, newName);
        try {
          fresh = await openImage(g, path, { format: backingFmt, forceShare: forceShare(p) });
        } catch (e) {
          throw new CliFailure(
            `Could not open new backing file '${newName}': ${(e as Error).message.replace(/^Could not open '[^']*': /, '')}`,
          );
        }
      }
      await copyDifferences(top, top.backing?.node ?? null, fresh, !p.opts.has('-q') && p.opts.has('-p'));
    }
    await image.changeBackingFile(newName, newName ? backingFmt : undefined);
  } finally {
    await g.closeAll();
  }
  return 0;
}

/**
 * Safe mode's copy: for every range top does not hold itself, the old backing chain's data
 * where it reads differently from the new one (zeroes past the old chain's end).
 */
async function copyDifferences(
  top: BlockNode,
  oldBacking: BlockNode | null,
  fresh: BlockNode | null,
  progress: boolean,
): Promise<void> {
  const g = top.graph;
  const to = attachBackend(g, top, true);
  const oldBlk = oldBacking ? attachBackend(g, oldBacking, false) : null;
  const newBlk = fresh ? attachBackend(g, fresh, false) : null;
  const oldLen = oldBacking?.length ?? 0;
  const newLen = fresh?.length ?? 0;
  const size = top.length;
  const bar = new ProgressBar(size, progress);
  for (let offset = 0; offset < size; ) {
    const st = await isAllocatedAbove(
      top,
      top.backing?.node ?? null,
      false,
      offset,
      Math.min(CHUNK, size - offset),
    );
    const n = Math.max(1, st.bytes);
    if (!st.allocated) {
      const oldData = await readBacking(oldBlk, oldLen, offset, n);
      const newData = await readBacking(newBlk, newLen, offset, n);
      if (!oldData.equals(newData)) {
        for (const [at, len] of differingRuns(oldData, newData, n)) {
          // Past the old chain's end it reads as zeroes: a zero write, as qemu-img does.
          if (offset + at >= oldLen) await to.writeZeroes(offset + at, len);
          else await to.write(offset + at, oldData.subarray(at, at + len));
        }
      }
    }
    offset += n;
    bar.update(offset);
  }
  await to.flush();
  bar.finish();
}
