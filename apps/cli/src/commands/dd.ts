import { FORCE_SHARE, HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, forceShare, IMAGE_FORMATS, imageGraph, openImage } from '../image';
import { sizeArg } from '../options';
import { createImage } from './create';

const INT_MAX = 2 ** 31 - 1;
/** Bytes copied per request (whole blocks of bs, at least one). */
const CHUNK = 1 << 20;

/**
 * blockrep dd [-f fmt] [-O fmt] [-U] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT: a new image
 * (raw unless -O) holding the input from block `skip` on, as qemu-img dd makes it: its size is
 * min(input size, count * bs) - skip * bs (count counts from the start of the input, skipped
 * blocks included), every byte written (zeroes too).
 */
export async function ddCommand(args: string[]): Promise<number> {
  const p = parseArgs(args, { short: ':hf:O:U', long: { ...HELP, ...IMAGE_OPTS, ...FORCE_SHARE } }, 'dd');
  refuseUnsupported(p);
  let bs = 512;
  let count: number | undefined;
  let skip = 0;
  let input: string | undefined;
  let output: string | undefined;
  for (const operand of p.positional) {
    const eq = operand.indexOf('=');
    const key = eq < 0 ? operand : operand.slice(0, eq);
    const value = eq < 0 ? '' : operand.slice(eq + 1);
    switch (eq < 0 ? '' : key) {
      case 'bs':
        bs = sizeArg(value, 'bs');
        if (bs < 1 || bs > INT_MAX)
          throw new CliFailure(`Invalid bs specified. Must be between 1 and ${INT_MAX}.`);
        break;
      case 'count':
        count = sizeArg(value, 'count');
        break;
      case 'skip':
        skip = sizeArg(value, 'skip');
        break;
      case 'if':
        input = value;
        break;
      case 'of':
        output = value;
        break;
      default:
        throw new CliFailure(`unrecognized operand ${key}`);
    }
  }
  if (input === undefined || output === undefined)
    throw new CliFailure('Must specify both input and output files');
  const outFmt = optString(p, '-O') ?? 'raw';

  const g = imageGraph();
  try {
    const src = await openImage(g, input, {
      format: optString(p, '-f'),
      forceShare: forceShare(p),
      imageOpts: p.opts.has('--image-opts'),
    });
    // Checked once the input is open, and named without the format (qemu-img dd's text).
    if (!(IMAGE_FORMATS as readonly string[]).includes(outFmt)) throw new CliFailure('Unknown file format');
    let size = src.length;
    if (count !== undefined && count * bs < size) size = count * bs;
    const start = Math.min(skip * bs, size);
    size -= start;
    await createImage(output, outFmt, size, new Map());
    const dst = await openImage(g, output, { format: outFmt, readOnly: false });
    const from = attachBackend(g, src, false);
    const to = attachBackend(g, dst, true);
    const chunk = Math.max(bs, Math.floor(CHUNK / bs) * bs);
    const buf = Buffer.alloc(Math.min(chunk, Math.max(size, 1)));
    for (let done = 0; done < size; ) {
      const n = Math.min(buf.length, size - done);
      const part = buf.subarray(0, n);
      await from.readv(start + done, [part]);
      await to.write(done, part);
      done += n;
    }
    await to.flush();
  } finally {
    await g.closeAll();
  }
  return 0;
}
