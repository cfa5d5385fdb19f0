import { resolve } from 'node:path';
import { type BlockNode, blockStatusAbove } from '@blockrep/block';
import { HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, backingChain, imageGraph, openImage, runInFlight } from '../image';
import { ProgressBar } from '../progress';

const CHUNK = 2 << 20;

interface Extent {
  offset: number;
  bytes: number;
  zero: boolean;
}

/** What the images above base provide (data or zeroes), in chunks of at most CHUNK. */
async function extentsAbove(top: BlockNode, base: BlockNode): Promise<Extent[]> {
  const out: Extent[] = [];
  for (let off = 0; off < top.length; ) {
    const st = await blockStatusAbove(top, base, off, top.length - off);
    const n = Math.max(1, st.bytes);
    if (st.allocated || st.zero) {
      const zero = st.zero && !st.data;
      for (let o = off; o < off + n; o += CHUNK)
        out.push({ offset: o, bytes: Math.min(CHUNK, off + n - o), zero });
    }
    off += n;
  }
  return out;
}

/**
 * blockrep commit [-f fmt] [-b base] [-d] [-p] [-q] FILE: writes what the images above base
 * (default: FILE's backing file) hold into base. FILE is then emptied unless -d or -b is given,
 * as qemu-img commit does.
 */
export async function commitCommand(args: string[]): Promise<number> {
  const p = parseArgs(args, { short: ':f:ht:b:dpqr:', long: { ...HELP, ...IMAGE_OPTS } }, 'commit');
  refuseUnsupported(p, ['-r']);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const wanted = optString(p, '-b');
  // One graph: the base is reopened read-write in place (a second open of its file would be
  // refused by the image locks, as QEMU refuses it).
  const reader = imageGraph();
  try {
    const top = await openImage(reader, file, {
      format: optString(p, '-f'),
      imageOpts: p.opts.has('--image-opts'),
    });
    const chain = backingChain(top);
    if (chain.length < 2) throw new CliFailure('Image does not have a backing file');
    const base =
      wanted === undefined ? chain[1]! : chain.find((n) => resolve(n.filename) === resolve(wanted));
    if (!base || base === top)
      throw new CliFailure(`Did not find '${wanted}' in the backing chain of '${file}'`);
    if (base.readOnly) await reader.reopenMultiple([{ node: base, readOnly: false }]);
    const target = base;
    const from = attachBackend(reader, top, false);
    const to = attachBackend(reader, target, true);
    if (target.length < top.length) await to.truncate(top.length, { exact: false, prealloc: 'off' });
    const extents = await extentsAbove(top, base);
    const bar = new ProgressBar(
      extents.reduce((s, e) => s + e.bytes, 0),
      !p.opts.has('-q'),
    );
    let done = 0;
    let next = 0;
    await runInFlight(8, () => {
      const e = extents[next++];
      if (!e) return null;
      return async () => {
        if (e.zero) await to.writeZeroes(e.offset, e.bytes);
        else await to.write(e.offset, await from.read(e.offset, e.bytes));
        done += e.bytes;
        bar.update(done);
      };
    });
    await to.flush();
    bar.finish();
  } finally {
    await reader.closeAll();
  }
  if (!p.opts.has('-d') && wanted === undefined) {
    const g = imageGraph();
    try {
      const top = await openImage(g, file, {
        format: optString(p, '-f'),
        backing: null,
        readOnly: false,
        imageOpts: p.opts.has('--image-opts'),
      });
      await attachBackend(g, top, true).makeEmpty();
    } finally {
      await g.closeAll();
    }
  }
  if (!p.opts.has('-q')) process.stdout.write('Image committed.\n');
  return 0;
}
