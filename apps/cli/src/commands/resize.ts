import { HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, imageGraph, openImage } from '../image';
import { sizeArg } from '../options';

/** blockrep resize [-f fmt] [--shrink] [-q] FILE [+|-]SIZE */
export async function resizeCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    {
      short: ':f:hq',
      long: { ...HELP, ...IMAGE_OPTS, preallocation: { arg: true }, shrink: { arg: false } },
    },
    'resize',
  );
  refuseUnsupported(p);
  if (p.positional.length < 2) throw usageError('Not enough arguments');
  if (p.positional.length > 2) throw usageError('Expecting image file name and size');
  const [file, sizeText] = p.positional as [string, string];
  const prealloc = optString(p, '--preallocation') ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc))
    throw new CliFailure(`Invalid preallocation mode '${prealloc}'`);
  const sign = sizeText[0] === '+' ? 1 : sizeText[0] === '-' ? -1 : 0;
  const amount = sizeArg(sign ? sizeText.slice(1) : sizeText);
  const g = imageGraph();
  try {
    const node = await openImage(g, file, {
      format: optString(p, '-f'),
      readOnly: false,
      imageOpts: p.opts.has('--image-opts'),
    });
    const current = node.length;
    const size = sign ? current + sign * amount : amount;
    if (size < 0) throw new CliFailure('New image size must be positive');
    if (size < current && prealloc !== 'off')
      throw new CliFailure('Preallocation can only be used for growing images');
    if (size < current && !p.opts.has('--shrink')) {
      throw new CliFailure(
        "Use the --shrink option to perform a shrink operation.\nblockrep: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    const blk = attachBackend(g, node, true);
    try {
      // The block layer zeroes what a longer backing file would show in the new area.
      await blk.truncate(size, {
        exact: false,
        prealloc: prealloc as 'off' | 'metadata' | 'falloc' | 'full',
      });
      await blk.flush();
    } catch (e) {
      throw new CliFailure((e as Error).message);
    }
  } finally {
    await g.closeAll();
  }
  if (!p.opts.has('-q')) process.stdout.write('Image resized.\n');
  return 0;
}
