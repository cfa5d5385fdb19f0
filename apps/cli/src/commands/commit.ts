import { dirname, isAbsolute, join, resolve } from 'node:path';
import { type BlockNode, blockStatus } from '@blockrep/block';
import { optString, parseArgs } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, imageGraph, openImage, qcow2Of, runInFlight } from '../image';
import { ProgressBar } from '../progress';

const CHUNK = 2 << 20;

/** The overlay's own extents (allocated in it, not in its backing file). */
async function ownExtents(node: BlockNode): Promise<{ offset: number; bytes: number; zero: boolean }[]> {
  const out: { offset: number; bytes: number; zero: boolean }[] = [];
  for (let off = 0; off < node.length; ) {
    const st = await blockStatus(node, off, node.length - off);
    const n = Math.max(1, st.bytes);
    if (st.allocated) {
      for (let o = off; o < off + n; o += CHUNK)
        out.push({ offset: o, bytes: Math.min(CHUNK, off + n - o), zero: st.zero && !st.data });
    }
    off += n;
  }
  return out;
}

/**
 * blockrep commit [-f fmt] [-b base] [-d] [-p] [-q] FILE: writes the overlay's data into its
 * backing file, then empties the overlay (unless -d), as qemu-img commit does.
 */
export async function commitCommand(args: string[]): Promise<number> {
  const p = parseArgs(args, ['-f', '-b', '-t', '-r']);
  const file = p.positional[0];
  if (!file) throw new CliFailure('Expecting one image file name');
  const g = imageGraph();
  let base: string;
  try {
    // The overlay alone (its own data), and the backing file opened writable beside it.
    const top = await openImage(g, file, { format: optString(p, '-f'), backing: null });
    const image = qcow2Of(top);
    const backingName = image?.header.backingFile;
    if (!image || !backingName) throw new CliFailure(`${file}: Image does not have a backing file`);
    base = isAbsolute(backingName) ? backingName : join(dirname(file), backingName);
    const wanted = optString(p, '-b');
    if (wanted !== undefined && resolve(wanted) !== resolve(base))
      throw new CliFailure(`${file}: only the image's own backing file can be the base ('${base}')`);
    const baseNode = await openImage(g, base, { format: image.header.backingFormat, readOnly: false });
    const from = attachBackend(g, top, false);
    const to = attachBackend(g, baseNode, true);
    if (baseNode.length < top.length) await to.truncate(top.length, { exact: false, prealloc: 'off' });
    const extents = await ownExtents(top);
    const total = extents.reduce((s, e) => s + e.bytes, 0);
    const bar = new ProgressBar(total, p.opts.has('-p') || !p.opts.has('-q'));
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
    await g.closeAll();
  }
  if (!p.opts.has('-d')) {
    const g2 = imageGraph();
    try {
      const top = await openImage(g2, file, { format: optString(p, '-f'), backing: null, readOnly: false });
      await attachBackend(g2, top, true).makeEmpty();
    } finally {
      await g2.closeAll();
    }
  }
  if (!p.opts.has('-q')) process.stdout.write('Image committed.\n');
  return 0;
}
