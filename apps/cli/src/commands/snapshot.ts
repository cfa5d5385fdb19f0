import { applySnapshot, createSnapshot, deleteSnapshot } from '@blockrep/qcow2';
import { FORCE_SHARE, HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { forceShare, imageGraph, openImage, qcow2Of } from '../image';
import { readSnapshotTable, snapshotTable } from '../snapshots';
import { humanSize } from './info';

const ACTIONS = ['-l', '-a', '-c', '-d'];

/**
 * blockrep snapshot [-q] [-U] [-f fmt] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE: lists,
 * applies, creates or deletes an internal snapshot of a qcow2 image (qemu-img snapshot). -a and
 * -d take an id or, failing that, a name.
 */
export async function snapshotCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    { short: ':la:c:d:f:hqU', long: { ...HELP, ...IMAGE_OPTS, ...FORCE_SHARE } },
    'snapshot',
  );
  refuseUnsupported(p);
  const given = p.order.filter(([k]) => ACTIONS.includes(k));
  if (new Set(given.map(([k]) => k)).size > 1) throw usageError("Cannot mix '-l', '-a', '-c', '-d'");
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const [action, arg] = given[given.length - 1] ?? [null, null];
  const g = imageGraph();
  try {
    const node = await openImage(g, file, {
      format: optString(p, '-f'),
      readOnly: action === '-l' || action === null,
      backing: null,
      forceShare: action === '-l' && forceShare(p),
      imageOpts: p.opts.has('--image-opts'),
    });
    const img = qcow2Of(node);
    const verb = { '-a': 'apply', '-c': 'create', '-d': 'delete' }[action as '-a' | '-c' | '-d'];
    const fail = (e: unknown) =>
      new CliFailure(`Could not ${verb} snapshot '${arg}': ${(e as Error).message}`);
    if (action === '-l') {
      if (img?.header.nbSnapshots) {
        const list = await readSnapshotTable(
          node.file!.node.filename,
          img.header.snapshotsOffset,
          img.header.nbSnapshots,
        );
        process.stdout.write(`${snapshotTable(list, humanSize).join('\n')}\n`);
      }
    } else if (action) {
      const name = arg as string;
      try {
        if (!img) throw new Error('Operation not supported');
        if (action === '-a' && node.dirtyBitmaps.length) throw new Error('Device has active dirty bitmaps');
        if (action === '-c') await createSnapshot(img, name);
        else if (action === '-a') await applySnapshot(img, name);
        else await deleteSnapshot(img, name);
      } catch (e) {
        throw fail(e);
      }
    }
  } finally {
    await g.closeAll();
  }
  return 0;
}
