import { type BlockNode, blockStatusAbove } from '@blockrep/block';
import { bitmapsSize, fullyAllocatedSize, type Qcow2MeasureOptions } from '@blockrep/qcow2';
import {
  FORCE_SHARE,
  HELP,
  IMAGE_OPTS,
  optString,
  outputFormat,
  parseArgs,
  refuseUnsupported,
} from '../args';
import { CliFailure } from '../failure';
import { checkFormat, forceShare, imageGraph, openImage } from '../image';
import { qemuJson } from '../json';
import { boolOption, parseOptionList, sizeArg } from '../options';

/** The -o options measure takes for each output format (others: "Invalid parameter"). */
const QCOW2_OPTS = [
  'size',
  'compat',
  'backing_file',
  'backing_fmt',
  'encryption',
  'cluster_size',
  'preallocation',
  'lazy_refcounts',
  'refcount_bits',
  'compression_type',
  'extended_l2',
];
const RAW_OPTS = ['size', 'preallocation'];
const PREALLOC = ['off', 'metadata', 'falloc', 'full'];

/**
 * Bytes of data a conversion of `top` (its whole chain) writes into clusters of cs bytes: every
 * cluster some data extent touches; zeroes and holes cost nothing (qemu-img's count).
 */
async function dataClusters(top: BlockNode, cs: number): Promise<number> {
  let required = 0;
  for (let offset = 0; offset < top.length; ) {
    const st = await blockStatusAbove(top, null, offset, top.length - offset);
    let n = Math.max(1, st.bytes);
    if (!st.zero && st.data && st.allocated) {
      n = Math.ceil((offset + n) / cs) * cs - offset;
      required += (offset % cs) + n;
    }
    offset += n;
  }
  return required;
}

/**
 * blockrep measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt] [-U] FILE]:
 * the size a new image of format fmt takes, for N bytes of virtual size or for FILE's content
 * (qemu-img measure's figures: required, fully allocated, and the persistent bitmaps' room).
 */
export async function measureCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':hf:O:o:l:U',
      long: { ...HELP, ...IMAGE_OPTS, ...FORCE_SHARE, output: { arg: true }, size: { arg: true } },
    },
    'measure',
  );
  refuseUnsupported(p);
  const output = outputFormat(p);
  const sizeText = optString(p, '--size');
  const size = sizeText === undefined ? undefined : sizeArg(sizeText);
  const file = p.positional[0];
  if (p.positional.length > 1) throw new CliFailure('At most one filename argument is allowed.');
  if (size === undefined && file === undefined)
    throw new CliFailure('Either --size N or one filename must be specified.');
  if (size !== undefined && file !== undefined)
    throw new CliFailure('--size N cannot be used together with a filename.');
  if (optString(p, '-l') !== undefined)
    throw new CliFailure('Failed to load snapshot: blockrep does not read internal snapshots yet');
  const outFmt = optString(p, '-O') ?? 'raw';
  checkFormat(outFmt);
  const o = parseOptionList(p.all.get('-o') ?? []);
  for (const k of o.keys()) {
    if (!(outFmt === 'qcow2' ? QCOW2_OPTS : RAW_OPTS).includes(k))
      throw new CliFailure(`Invalid parameter '${k}'\nblockrep: Invalid options for file format '${outFmt}'`);
  }
  const prealloc = o.get('preallocation') ?? 'off';
  if (!(outFmt === 'qcow2' ? PREALLOC : PREALLOC.filter((m) => m !== 'metadata')).includes(prealloc))
    throw new CliFailure(`invalid parameter value: ${prealloc}`);
  const opts = qcow2Options(o);

  const g = imageGraph();
  try {
    const top = file
      ? await openImage(g, file, {
          format: optString(p, '-f'),
          forceShare: forceShare(p),
          imageOpts: p.opts.has('--image-opts'),
        })
      : null;
    const virtualSize = Math.ceil((top ? top.length : size!) / 512) * 512;
    const result: Record<string, number> = {};
    if (outFmt === 'raw') {
      result.required = top ? top.length : virtualSize;
      result['fully-allocated'] = result.required;
    } else {
      const cs = opts.clusterSize ?? 65536;
      // In whole clusters, as qemu-img counts (a 1000000-byte source is 1 MiB of clusters).
      const clustered = Math.ceil(virtualSize / cs) * cs;
      const full = fullyAllocatedSize(clustered, opts);
      const data =
        prealloc === 'full' || prealloc === 'falloc' ? clustered : top ? await dataClusters(top, cs) : 0;
      // Bitmaps are counted when both the source and a v3 target can hold them.
      const v3 = !['0.10', 'v2'].includes(o.get('compat') ?? '1.1');
      if (top && v3 && top.driver.name === 'qcow2') {
        result.bitmaps = bitmapsSize(
          top.dirtyBitmaps
            .filter((b) => b.persistent)
            .map((b) => ({ name: b.name ?? '', granularity: b.granularity, length: b.length })),
          cs,
        );
      }
      result.required = full - clustered + data;
      result['fully-allocated'] = full;
    }
    if (output === 'json') process.stdout.write(`${await qemuJson(result)}\n`);
    else {
      const lines = [
        `required size: ${result.required}`,
        `fully allocated size: ${result['fully-allocated']}`,
      ];
      if (result.bitmaps !== undefined) lines.push(`bitmaps size: ${result.bitmaps}`);
      process.stdout.write(`${lines.join('\n')}\n`);
    }
  } finally {
    await g.closeAll();
  }
  return 0;
}

/** The -o values that shape a qcow2 image's metadata, checked as qemu-img checks them. */
function qcow2Options(o: Map<string, string>): Qcow2MeasureOptions {
  const opts: Qcow2MeasureOptions = {};
  const cs = o.get('cluster_size');
  if (cs !== undefined) {
    const v = sizeArg(cs, 'cluster size');
    if (!Number.isInteger(Math.log2(v)) || v < 512 || v > 2 << 20)
      throw new CliFailure('Cluster size must be a power of two between 512 and 2048k');
    opts.clusterSize = v;
  }
  const rb = o.get('refcount_bits');
  if (rb !== undefined) {
    const v = Number(rb);
    if (!Number.isInteger(Math.log2(v)) || v < 1 || v > 64)
      throw new CliFailure('Refcount width must be a power of two and may not exceed 64 bits');
    opts.refcountBits = v;
  }
  if (o.has('extended_l2')) opts.extendedL2 = boolOption('extended_l2', o.get('extended_l2')!);
  if (opts.extendedL2 && (opts.clusterSize ?? 65536) < 16384)
    throw new CliFailure('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  return opts;
}
