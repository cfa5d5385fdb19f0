import { parseSize } from '@blockrep/block';
import { changeRefcountWidthAt, downgradeToV2, upgradeToV3 } from '@blockrep/qcow2';
import { HELP, IMAGE_OPTS, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { attachBackend, imageGraph, openImage, qcow2Of } from '../image';
import { boolOption, parseOptionList } from '../options';

/** qcow2 options qemu-img amend changes, and those only creation takes. */
const AMENDABLE = [
  'compat',
  'lazy_refcounts',
  'refcount_bits',
  'size',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
];
const CREATION_ONLY = ['cluster_size', 'preallocation', 'extended_l2', 'compression_type', 'encryption'];
const SIZE_HINT =
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.';

/**
 * blockrep amend [-p] [-q] [-f fmt] [--force] -o options FILE: changes a qcow2 image's options in
 * place (qemu-img amend): `lazy_refcounts`, `size` (grow or shrink), `compat` and `refcount_bits`
 * where they already have the asked value. Creation-only options and the backing file are refused
 * with qemu-img's texts.
 */
export async function amendCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    { short: ':ho:f:t:pq', long: { ...HELP, ...IMAGE_OPTS, force: { arg: false } } },
    'amend',
  );
  refuseUnsupported(p);
  const texts = p.all.get('-o') ?? [];
  if (!texts.length) throw usageError('Must specify options (-o)');
  // (qemu-img amend prints this one without the --help line.)
  if (p.positional.length !== 1) throw new CliFailure('Expecting one image file name');
  const file = p.positional[0]!;
  const o = parseOptionList(texts);
  const g = imageGraph();
  try {
    const open = () =>
      openImage(g, file, {
        format: optString(p, '-f'),
        readOnly: false,
        backing: null,
        imageOpts: p.opts.has('--image-opts'),
      });
    let node = await open();
    let img = qcow2Of(node);
    if (!img) throw new CliFailure(`Format driver '${node.driver.name}' does not support option amendment`);
    for (const k of o.keys()) {
      if (CREATION_ONLY.includes(k))
        throw new CliFailure(`Invalid parameter '${k}'\nThis option is only supported for image creation`);
      if (!AMENDABLE.includes(k)) throw new CliFailure(`Invalid parameter '${k}'`);
    }
    const lazy = o.has('lazy_refcounts') ? boolOption('lazy_refcounts', o.get('lazy_refcounts')!) : undefined;
    let size: number | undefined;
    if (o.has('size')) {
      size = parseSize(o.get('size')!);
      if (size === undefined)
        throw new CliFailure(`Parameter 'size' expects a non-negative number below 2^64\n${SIZE_HINT}`);
    }
    const compat = o.get('compat');
    let toV3: boolean | undefined;
    if (compat !== undefined) {
      toV3 = ['1.1', 'v3'].includes(compat);
      if (!toV3 && !['0.10', 'v2'].includes(compat))
        throw new CliFailure(`Unknown compatibility level ${compat}`);
      if (toV3 === img.v3) toV3 = undefined;
    }
    const bits = o.get('refcount_bits');
    let newBits: number | undefined;
    if (bits !== undefined) {
      const n = Number(bits);
      if (!Number.isInteger(Math.log2(n)) || n < 1 || n > 64)
        throw new CliFailure('Refcount width must be a power of two and may not exceed 64 bits');
      if (n !== img.refcounts.bits) newBits = n;
    }
    // A downgrade keeps the width unless refcount_bits says otherwise (then the check below speaks).
    if (toV3 === false && bits === undefined && img.refcounts.bits !== 16)
      throw new CliFailure('compat=0.10 requires refcount_bits=16');
    if (toV3 === false && lazy)
      throw new CliFailure(
        'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)',
      );
    const v3After = toV3 ?? img.v3;
    if (newBits !== undefined && newBits !== 16 && !v3After)
      throw new CliFailure(
        'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
      );
    if (o.has('backing_file') || o.has('backing_fmt')) {
      const same =
        (o.get('backing_file') ?? img.header.backingFile) === img.header.backingFile &&
        (o.get('backing_fmt') ?? img.header.backingFormat) === img.header.backingFormat;
      if (!same)
        throw new CliFailure("Cannot amend the backing file\nYou can use 'blockrep rebase' instead.");
    }
    if (o.has('data_file') || o.has('data_file_raw'))
      throw new CliFailure('data-file can only be set for images that use an external data file');
    // As QEMU orders it: an upgrade before the other changes, a downgrade after them.
    if (toV3 === true) await upgradeToV3(img);
    if (newBits !== undefined) {
      // New refcount structures are written with the image closed (nothing else holds it
      // meanwhile); then the image is opened again for the rest.
      const path = img.storage.filename;
      await g.closeAll();
      await changeRefcountWidthAt(path, newBits);
      node = await open();
      img = qcow2Of(node)!;
    }
    if (lazy !== undefined) await img.setLazyRefcounts(lazy);
    if (size !== undefined && size !== node.length) {
      const blk = attachBackend(g, node, true);
      await blk.truncate(size, { exact: false, prealloc: 'off' });
      await blk.flush();
    }
    if (toV3 === false) await downgradeToV2(img);
  } catch (e) {
    if (e instanceof CliFailure) throw e;
    throw new CliFailure((e as Error).message);
  } finally {
    await g.closeAll();
  }
  return 0;
}
