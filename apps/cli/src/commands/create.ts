import { open } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { createQcow2Image, type Qcow2CreateOptions } from '@blockrep/qcow2';
import { HELP, optString, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { checkFormat, imageGraph, openImage, probeFormat } from '../image';
import { boolOption, parseOptionList, sizeArg } from '../options';

/** blockrep create [-q] [-f fmt] [-b backing [-F fmt]] [-o options] FILE [SIZE] */
export async function createCommand(args: string[]): Promise<number> {
  const p = parseArgs(args, { short: ':F:b:f:ho:qu', long: { ...HELP, object: { arg: true } } }, 'create');
  refuseUnsupported(p);
  const fmt = optString(p, '-f') ?? 'raw';
  checkFormat(fmt);
  const o = parseOptionList(p.all.get('-o') ?? []);
  const [file, sizeText, extra] = p.positional;
  if (!file) throw usageError('Expecting image file name');
  if (extra !== undefined) throw usageError(`Unexpected argument: ${extra}`);
  const sizeValue = sizeText ?? o.get('size');
  const size = sizeValue === undefined ? undefined : sizeArg(sizeValue);
  const line = await createImage(file, fmt, size, o, optString(p, '-b'), optString(p, '-F'));
  if (!p.opts.has('-q')) process.stdout.write(`${line}\n`);
  return 0;
}

/**
 * Creates an image file of format fmt from qemu-img's -o options (plus -b/-F); returns the
 * "Formatting ..." line qemu-img prints.
 */
export async function createImage(
  file: string,
  fmt: string,
  size: number | undefined,
  o: Map<string, string>,
  backingArg?: string,
  backingFmtArg?: string,
): Promise<string> {
  const backingFile = backingArg ?? o.get('backing_file');
  const backingFormat = backingFmtArg ?? o.get('backing_fmt');
  if (fmt === 'raw') {
    if (backingFile) throw new CliFailure(`${file}: Backing file not supported for file format 'raw'`);
    if (size === undefined) throw new CliFailure(`${file}: Image creation needs a size parameter`);
    const prealloc = o.get('preallocation') ?? 'off';
    if (!['off', 'falloc', 'full'].includes(prealloc))
      throw new CliFailure(`${file}: Invalid parameter '${prealloc}'`);
    await createRaw(file, sectors(size), prealloc !== 'off');
    return `Formatting '${file}', fmt=raw size=${size}${o.has('preallocation') ? ` preallocation=${prealloc}` : ''}`;
  }

  const backingPath =
    backingFile && (isAbsolute(backingFile) ? backingFile : join(dirname(file), backingFile));
  if (backingPath && !backingFormat) {
    throw new CliFailure(
      `${file}: Backing file specified without backing format\nDetected format of ${probeFormat(backingPath)}.`,
    );
  }
  if (size === undefined && !backingFile)
    throw new CliFailure(`${file}: Image creation needs a size parameter`);
  const opts: Qcow2CreateOptions = {
    size: size === undefined ? undefined : sectors(size),
    backingFile,
    backingFormat,
  };
  const clusterSize = o.get('cluster_size');
  if (clusterSize !== undefined) opts.clusterSize = sizeArg(clusterSize, 'cluster size');
  const compat = o.get('compat');
  if (compat !== undefined) {
    if (!['0.10', '1.1', 'v2', 'v3'].includes(compat))
      throw new CliFailure(`${file}: Parameter 'version' does not accept value '${compat}'`);
    opts.compat = compat as Qcow2CreateOptions['compat'];
  }
  const prealloc = o.get('preallocation') ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc))
    throw new CliFailure(`${file}: Parameter 'preallocation' does not accept value '${prealloc}'`);
  opts.preallocation = prealloc as Qcow2CreateOptions['preallocation'];
  if (o.has('lazy_refcounts')) opts.lazyRefcounts = boolOption('lazy_refcounts', o.get('lazy_refcounts')!);
  if (o.has('refcount_bits')) opts.refcountBits = Number(o.get('refcount_bits'));
  // Checked here for qemu-img's wording of the hint.
  const v2 = opts.compat === '0.10' || opts.compat === 'v2';
  if (v2 && opts.lazyRefcounts)
    throw new CliFailure(
      `${file}: Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)`,
    );
  if (v2 && opts.refcountBits !== undefined && opts.refcountBits !== 16)
    throw new CliFailure(
      `${file}: Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)`,
    );
  try {
    await createQcow2Image(file, opts);
  } catch (e) {
    throw new CliFailure(`${file}: ${(e as Error).message}`);
  }
  // qemu-img's order; preallocation and compat only when they were given.
  const shown = [
    `Formatting '${file}', fmt=qcow2 cluster_size=${opts.clusterSize ?? 65536}`,
    'extended_l2=off',
    o.has('preallocation') ? `preallocation=${prealloc}` : '',
    'compression_type=zlib',
    `size=${size ?? (await backingSize(backingPath!, backingFormat!))}`,
    compat !== undefined ? `compat=${compat}` : '',
    backingFile ? `backing_file=${backingFile}` : '',
    backingFormat ? `backing_fmt=${backingFormat}` : '',
    `lazy_refcounts=${opts.lazyRefcounts ? 'on' : 'off'}`,
    `refcount_bits=${opts.refcountBits ?? 16}`,
  ];
  return shown.filter(Boolean).join(' ');
}

/** Images are whole 512-byte sectors: sizes round up (the line printed keeps the size given). */
const sectors = (size: number) => Math.ceil(size / 512) * 512;

/** The virtual size of the backing file. */
async function backingSize(path: string, format: string): Promise<number> {
  const g = imageGraph();
  try {
    return (await openImage(g, path, { format })).length;
  } catch {
    return 0;
  } finally {
    await g.closeAll();
  }
}

/** A raw image: a sparse file of the size, or zeroes written out (preallocation=full/falloc). */
async function createRaw(file: string, size: number, prealloc: boolean): Promise<void> {
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
    if (prealloc) {
      const chunk = Buffer.alloc(Math.min(size, 1 << 20));
      for (let off = 0; off < size; off += chunk.length) {
        await fh.write(chunk, 0, Math.min(chunk.length, size - off), off);
      }
    }
  } finally {
    await fh.close();
  }
}
