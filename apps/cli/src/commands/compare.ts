import { type BlockBackend, type BlockNode, type BlockStatus, blockStatusAbove } from '@blockrep/block';
import { FORCE_SHARE, HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, forceShare, imageGraph, isZero, openImage } from '../image';

/** qemu-img compare's exit codes. */
const EXIT = { identical: 0, differ: 1, error: 2 } as const;
const SECTOR = 512;
const CHUNK = 4 << 20;

/** Offset of the first 512-byte sector where a and b differ, or -1. */
function firstMismatch(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  for (let i = 0; i < a.length; i += SECTOR) {
    const end = Math.min(i + SECTOR, a.length);
    if (a.compare(b, i, end, i, end) !== 0) return i;
  }
  return -1;
}

function firstNonZero(buf: Buffer): number {
  for (let i = 0; i < buf.length; i += SECTOR) {
    if (!isZero(buf.subarray(i, Math.min(i + SECTOR, buf.length)))) return i;
  }
  return -1;
}

interface Side {
  node: BlockNode;
  blk: BlockBackend;
}

/**
 * The block status as qemu-img compare -s compares it: the whole status word, so an extent that
 * reaches the end of one image and not of the other differs too.
 */
function statusWord(node: BlockNode, off: number, st: BlockStatus): string {
  const eof = off + st.bytes >= node.length;
  return [st.allocated, st.data, st.zero, st.offset !== undefined, eof].join();
}

/** Where (if anywhere) the two images differ in [0, length); strict also compares block status. */
async function compareRange(a: Side, b: Side, length: number, strict: boolean): Promise<string | null> {
  for (let off = 0; off < length; ) {
    const [sa, sb] = await Promise.all([
      blockStatusAbove(a.node, null, off, length - off),
      blockStatusAbove(b.node, null, off, length - off),
    ]);
    if (strict && statusWord(a.node, off, sa) !== statusWord(b.node, off, sb))
      return `Strict mode: Offset ${off} block status mismatch!`;
    const end = off + Math.max(1, Math.min(sa.bytes, sb.bytes));
    if (!(sa.zero && sb.zero)) {
      for (let at = off; at < end; at += CHUNK) {
        const n = Math.min(CHUNK, end - at);
        const [ba, bb] = await Promise.all([a.blk.read(at, n), b.blk.read(at, n)]);
        const bad = firstMismatch(ba, bb);
        if (bad >= 0) return `Content mismatch at offset ${at + bad}!`;
      }
    }
    off = end;
  }
  return null;
}

/** The part of the longer image past the shorter one must read as zeroes. */
async function checkTail(side: Side, from: number): Promise<string | null> {
  const length = side.node.length;
  for (let off = from; off < length; ) {
    const st = await blockStatusAbove(side.node, null, off, Math.min(CHUNK, length - off));
    const n = Math.max(1, st.bytes);
    if (!st.zero) {
      const at = firstNonZero(await side.blk.read(off, n));
      if (at >= 0) return `Content mismatch at offset ${off + at}!`;
    }
    off += n;
  }
  return null;
}

/** blockrep compare [-f fmt] [-F fmt] [-s] [-q] FILE1 FILE2 */
export async function compareCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    { short: ':hf:F:T:pqsU', long: { ...HELP, ...IMAGE_OPTS, ...FORCE_SHARE } },
    'compare',
  );
  refuseUnsupported(p);
  if (p.positional.length !== 2) throw usageError('Expecting two image file names');
  const [file1, file2] = p.positional as [string, string];
  const strict = p.opts.has('-s');
  const say = (text: string) => {
    if (!p.opts.has('-q')) process.stdout.write(`${text}\n`);
  };
  const g = imageGraph();
  try {
    let a: Side;
    let b: Side;
    try {
      const fmt1 = optString(p, '-f');
      const n1 = await openImage(g, file1, {
        format: fmt1,
        forceShare: forceShare(p),
        imageOpts: p.opts.has('--image-opts'),
      });
      const n2 = await openImage(g, file2, {
        format: optString(p, '-F') ?? fmt1,
        forceShare: forceShare(p),
        imageOpts: p.opts.has('--image-opts'),
      });
      a = { node: n1, blk: attachBackend(g, n1, false) };
      b = { node: n2, blk: attachBackend(g, n2, false) };
    } catch (e) {
      throw new CliFailure((e as Error).message, EXIT.error);
    }
    const common = Math.min(a.node.length, b.node.length);
    if (strict && a.node.length !== b.node.length) {
      say('Strict mode: Image size mismatch!');
      return EXIT.differ;
    }
    let diff = await compareRange(a, b, common, strict);
    if (!diff && a.node.length !== b.node.length) {
      say('Warning: Image size mismatch!');
      diff = await checkTail(a.node.length > common ? a : b, common);
    }
    if (diff) {
      say(diff);
      return EXIT.differ;
    }
    say('Images are identical.');
    return EXIT.identical;
  } catch (e) {
    if (e instanceof CliFailure) throw e;
    throw new CliFailure((e as Error).message, EXIT.error);
  } finally {
    await g.closeAll();
  }
}
