import { type CommandContext, CommandRegistry, registerBitmapCommands } from '@blockrep/qmp';
import { HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported } from '../args';
import { CliFailure } from '../failure';
import { checkFormat, imageGraph, openImage } from '../image';
import { sizeArg } from '../options';

const ACTIONS = ['--add', '--remove', '--clear', '--enable', '--disable', '--merge'];

/**
 * blockrep bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)...
 * [-g granularity] [-b source_file [-F source_fmt]] [-f fmt] FILE BITMAP: changes a persistent
 * bitmap of a qcow2 image, the actions in the order given, each as its QMP command does it
 * (block-dirty-bitmap-add with persistent on, -remove, -clear, -enable, -disable, -merge; the
 * merge source from the same image or from -b's).
 */
export async function bitmapCommand(args: string[]): Promise<number> {
  const long = { ...HELP, ...IMAGE_OPTS, merge: { arg: true } } as Record<
    string,
    { arg: boolean; as?: string }
  >;
  for (const a of ACTIONS.slice(0, 5)) long[a.slice(2)] = { arg: false };
  const p = parseArgs(args, { short: ':b:f:F:g:h', long }, 'bitmap');
  refuseUnsupported(p);
  const actions = p.order.filter(([k]) => ACTIONS.includes(k));
  if (!actions.length)
    throw new CliFailure('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  const granularityText = optString(p, '-g');
  if (granularityText !== undefined && !p.opts.has('--add'))
    throw new CliFailure('granularity only supported with --add');
  const sourceFile = optString(p, '-b');
  const sourceFmt = optString(p, '-F');
  if (sourceFile !== undefined && !p.opts.has('--merge'))
    throw new CliFailure('Merge bitmap source file only supported with --merge');
  if (sourceFmt !== undefined && sourceFile === undefined) throw new CliFailure('-F only supported with -b');
  if (p.positional.length !== 2) throw new CliFailure('Expecting filename and bitmap name');
  const [file, bitmap] = p.positional as [string, string];
  const granularity = granularityText === undefined ? undefined : sizeArg(granularityText, 'granularity');
  if (sourceFmt !== undefined) checkFormat(sourceFmt);

  const g = imageGraph();
  const qmp = new CommandRegistry();
  registerBitmapCommands(qmp, g);
  try {
    const node = await openImage(g, file, {
      format: optString(p, '-f'),
      readOnly: false,
      nodeName: 'image',
      imageOpts: p.opts.has('--image-opts'),
    });
    const source = sourceFile
      ? await openImage(g, sourceFile, { format: sourceFmt, nodeName: 'source' })
      : node;
    for (const [k, v] of actions) {
      const op = k.slice(2);
      // The bitmap commands use nothing of a QMP session.
      const run = (name: string, a: Record<string, unknown>) =>
        qmp.require(name).handler(a, {} as CommandContext);
      try {
        if (op === 'add') {
          await run('block-dirty-bitmap-add', {
            node: node.nodeName,
            name: bitmap,
            persistent: true,
            ...(granularity === undefined ? {} : { granularity }),
          });
        } else if (op === 'merge') {
          await run('block-dirty-bitmap-merge', {
            node: node.nodeName,
            target: bitmap,
            bitmaps: [{ node: source.nodeName, name: v as string }],
          });
        } else await run(`block-dirty-bitmap-${op}`, { node: node.nodeName, name: bitmap });
      } catch (e) {
        if (e instanceof CliFailure) throw e;
        throw new CliFailure(`Operation ${op} on bitmap ${bitmap} failed: ${(e as Error).message}`);
      }
    }
  } finally {
    await g.closeAll();
  }
  return 0;
}
