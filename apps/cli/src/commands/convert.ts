import { type BlockBackend, type BlockNode, blockStatus, blockStatusAbove, ReqFlags } from '@blockrep/block';
import { FORCE_SHARE, HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported } from '../args';
import { CliFailure } from '../failure';
import {
  attachBackend,
  checkFormat,
  forceShare,
  imageGraph,
  isZero,
  openImage,
  qcow2Of,
  runInFlight,
} from '../image';
import { parseOptionList, sizeArg } from '../options';
import { ProgressBar } from '../progress';
import { createImage } from './create';

const CHUNK = 2 << 20;

interface Extent {
  /** Where in the target (sources are concatenated). */
  offset: number;
  bytes: number;
  /** Reads as zeroes on the source: nothing to copy. */
  zero: boolean;
  source: Source;
}

interface Source {
  node: BlockNode;
  blk: BlockBackend;
  /** Offset of this source in the target. */
  base: number;
}

const SPARSE_GRAIN = 4096;

/** buf (read at offset) cut at multiples of grain into alternating runs of zeroes and data. */
function zeroRuns(
  buf: Buffer,
  offset: number,
  grain: number,
): { start: number; end: number; zero: boolean }[] {
  const runs: { start: number; end: number; zero: boolean }[] = [];
  for (let pos = 0; pos < buf.length; ) {
    const end = Math.min(buf.length, (Math.floor((offset + pos) / grain) + 1) * grain - offset);
    const zero = isZero(buf.subarray(pos, end));
    const last = runs[runs.length - 1];
    if (last && last.zero === zero) last.end = end;
    else runs.push({ start: pos, end, zero });
    pos = end;
  }
  return runs;
}

/** Reads target bytes [offset, offset+n) from the concatenated sources. */
async function readSources(sources: Source[], offset: number, n: number): Promise<Buffer> {
  const buf = Buffer.alloc(n);
  for (const s of sources) {
    const from = Math.max(offset, s.base);
    const to = Math.min(offset + n, s.base + s.node.length);
    if (from < to) await s.blk.readv(from - s.base, [buf.subarray(from - offset, to - offset)]);
  }
  return buf;
}

/**
 * convert -c: every target cluster some data extent touches is read whole and written as one
 * compressed cluster (the qcow2 driver stores it plainly when deflate saves nothing); clusters
 * of zeroes are skipped on a new target and zeroed on an existing one.
 */
async function writeCompressedClusters(
  sources: Source[],
  extents: Extent[],
  to: BlockBackend,
  cs: number,
  size: number,
  depth: number,
  mustZero: boolean,
  bar: ProgressBar,
): Promise<void> {
  const clusters: number[] = [];
  for (const e of extents) {
    if (e.zero) continue;
    const first = Math.floor(e.offset / cs);
    const last = Math.floor((e.offset + e.bytes - 1) / cs);
    for (let c = Math.max(first, (clusters[clusters.length - 1] ?? -1) + 1); c <= last; c++) clusters.push(c);
  }
  let next = 0;
  let done = 0;
  await runInFlight(depth, () => {
    const c = clusters[next++];
    if (c === undefined) return null;
    return async () => {
      const n = Math.min(cs, size - c * cs);
      const buf = await readSources(sources, c * cs, n);
      if (!isZero(buf)) await to.write(c * cs, buf, ReqFlags.WRITE_COMPRESSED);
      else if (mustZero) await to.writeZeroes(c * cs, n);
      done += n;
      bar.update(done);
    };
  });
}

/**
 * A source's extents (its whole chain flattened), data split into chunks of at most CHUNK. With
 * `ownOnly` (convert -B) what the source's backing chain provides is left out: the target's
 * backing file provides it.
 */
async function sourceExtents(source: Source, ownOnly: boolean): Promise<Extent[]> {
  const { node, base } = source;
  const out: Extent[] = [];
  for (let off = 0; off < node.length; ) {
    const st = ownOnly
      ? await blockStatus(node, off, node.length - off)
      : await blockStatusAbove(node, null, off, node.length - off);
    const n = Math.max(1, st.bytes);
    if (ownOnly && !st.allocated) {
      off += n;
      continue;
    }
    if (st.zero) out.push({ offset: base + off, bytes: n, zero: true, source });
    else
      for (let o = off; o < off + n; o += CHUNK)
        out.push({ offset: base + o, bytes: Math.min(CHUNK, off + n - o), zero: false, source });
    off += n;
  }
  return out;
}

/**
 * blockrep convert [-f fmt] [-O fmt] [-B backing -F fmt] [-o options] [-n] [-p] [-q] [-m N] [-S size]
 * SOURCE... TARGET (sources concatenated)
 */
export async function convertCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:',
      long: {
        ...HELP,
        ...IMAGE_OPTS,
        'target-image-opts': { arg: false },
        'target-is-zero': { arg: false },
        salvage: { arg: false },
        bitmaps: { arg: false },
        'skip-broken-bitmaps': { arg: false },
        ...FORCE_SHARE,
      },
    },
    'convert',
  );
  refuseUnsupported(p, [
    '--target-image-opts',
    '--target-is-zero',
    '--salvage',
    '--bitmaps',
    '--skip-broken-bitmaps',
    '-l',
    '-C',
    '-W',
    '-r',
  ]);
  const compress = p.opts.has('-c');
  const backing = optString(p, '-B');
  if (backing !== undefined && optString(p, '-F') === undefined)
    throw new CliFailure('Use of backing file requires explicit backing format');
  const files = p.positional.slice(0, -1);
  const target = p.positional[p.positional.length - 1];
  if (!files.length || !target) throw new CliFailure('Must specify image file name');
  const outFmt = optString(p, '-O') ?? 'raw';
  checkFormat(outFmt);
  if (compress && outFmt !== 'qcow2') throw new CliFailure('Compression not supported for this file format');
  const depth = Number(optString(p, '-m') ?? 8);
  if (!Number.isInteger(depth) || depth < 1 || depth > 16)
    throw new CliFailure('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
  const existing = p.opts.has('-n');
  // Zeroes must be written where the target does not already read as zeroes.
  const mustZero = existing || backing !== undefined;

  const g = imageGraph();
  try {
    const sources: Source[] = [];
    let size = 0;
    for (const file of files) {
      const node = await openImage(g, file, {
        format: optString(p, '-f'),
        forceShare: forceShare(p),
        imageOpts: p.opts.has('--image-opts'),
      });
      sources.push({ node, blk: attachBackend(g, node, false), base: size });
      size += node.length;
    }
    if (!existing) {
      // qcow2 sizes are whole sectors; the tail of an odd-sized raw source reads as zeroes.
      const targetSize = outFmt === 'qcow2' ? Math.ceil(size / 512) * 512 : size;
      await createImage(
        target,
        outFmt,
        targetSize,
        parseOptionList(p.all.get('-o') ?? []),
        backing,
        optString(p, '-F'),
      );
    }
    const dst = await openImage(g, target, { format: outFmt, readOnly: false });
    if (dst.length < size) throw new CliFailure(`${target}: target image is smaller than the source`);
    const to = attachBackend(g, dst, true);
    const extents = (
      await Promise.all(sources.map((src) => sourceExtents(src, backing !== undefined)))
    ).flat();
    // Zeroes in the data are not written either, in units the target allocates, or -S bytes (0: write all).
    const sparse = optString(p, '-S');
    const grain = sparse === undefined ? (qcow2Of(dst)?.cs ?? SPARSE_GRAIN) : sizeArg(sparse, 'sparse size');
    const bar = new ProgressBar(size, !p.opts.has('-q'));
    if (compress) {
      await writeCompressedClusters(sources, extents, to, qcow2Of(dst)!.cs, size, depth, mustZero, bar);
      await to.flush();
      bar.finish();
      return 0;
    }
    let done = 0;
    let next = 0;
    await runInFlight(depth, () => {
      const e = extents[next++];
      if (!e) return null;
      return async () => {
        if (e.zero) {
          // A new target already reads as zeroes there; an existing one (-n) or one with a backing
          // file (-B) must be zeroed.
          if (mustZero) await to.writeZeroes(e.offset, e.bytes);
        } else {
          const buf = await e.source.blk.read(e.offset - e.source.base, e.bytes);
          const runs = grain ? zeroRuns(buf, e.offset, grain) : [{ start: 0, end: buf.length, zero: false }];
          for (const run of runs) {
            if (!run.zero) await to.write(e.offset + run.start, buf.subarray(run.start, run.end));
            else if (mustZero) await to.writeZeroes(e.offset + run.start, run.end - run.start);
          }
        }
        done += e.bytes;
        bar.update(done);
      };
    });
    await to.flush();
    bar.finish();
  } finally {
    await g.closeAll();
  }
  return 0;
}
