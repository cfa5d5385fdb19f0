import { stat } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import type { BlockNode } from '@blockrep/block';
import { INSPECT_OPTS, optString, outputFormat, parseArgs, refuseUnsupported, usageError } from '../args';
import { CliFailure } from '../failure';
import { forceShare, imageArg, imageGraph, openImage, printWarnings, qcow2Of } from '../image';
import { qemuJson } from '../json';
import { readSnapshotTable, type SnapshotInfo, snapshotTable } from '../snapshots';

/**
 * QEMU's size_to_str: the binary unit that keeps the number below 1000 (so 1000 KiB is
 * "0.977 MiB"), printed as printf's %0.3g does: three significant digits, ties to even (192.5
 * KiB is "192 KiB"), no trailing zeros.
 */
export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let u = 0;
  while (u < units.length - 1 && bytes / 1024 ** u >= 1000) u++;
  return `${g3(bytes / 1024 ** u)} ${units[u]}`;
}

/** printf's %.3g for 0 and values in [0.001, 1000). */
function g3(v: number): string {
  if (v === 0) return '0';
  const decimals = 2 - Math.floor(Math.log10(v));
  const scaled = v * 10 ** decimals;
  let r = Math.round(scaled);
  if (scaled - Math.floor(scaled) === 0.5 && Math.floor(scaled) % 2 === 0) r = Math.floor(scaled);
  if (r >= 1000) return v.toPrecision(3).replace(/\.?0+e\+?/, 'e+0');
  const text = decimals > 0 ? (r / 10 ** decimals).toFixed(decimals) : String(r * 10 ** -decimals);
  return text.includes('.') ? text.replace(/\.?0+$/, '') : text;
}

/** The fields of `qemu-img info --output=json` for one open image. */
export async function imageInfo(node: BlockNode, filename: string): Promise<Record<string, unknown>> {
  const info: Record<string, unknown> = {
    'virtual-size': node.length,
    filename,
    format: node.driver.name,
  };
  const st = await stat(node.file?.node.filename ?? filename);
  info['actual-size'] = st.blocks * 512;
  const image = qcow2Of(node);
  info['dirty-flag'] = image ? (image.header.incompatible & 1n) !== 0n : false;
  if (image) {
    info['cluster-size'] = image.cs;
    info['format-specific'] = { type: 'qcow2', data: node.driver.info?.(node) };
    if (image.header.nbSnapshots) {
      const file = node.file?.node.filename ?? filename;
      info.snapshots = await readSnapshotTable(file, image.header.snapshotsOffset, image.header.nbSnapshots);
    }
    const backing = image.header.backingFile;
    if (backing) {
      info['backing-filename'] = backing;
      info['full-backing-filename'] = isAbsolute(backing) ? backing : join(dirname(filename), backing);
      if (image.header.backingFormat) info['backing-filename-format'] = image.header.backingFormat;
    }
  }
  return info;
}

/**
 * Nested data as qemu-img prints it (QEMU's dump_qobject): a key per line with '-' shown as ' ',
 * four spaces per level, list items as "[i]:", objects and lists on the lines below their key.
 */
function dumpValue(v: Record<string, unknown> | unknown[], level: number, lines: string[]): void {
  const pad = '    '.repeat(level);
  const entries: [string, unknown][] = Array.isArray(v)
    ? v.map((x, i) => [`[${i}]`, x])
    : Object.entries(v).map(([k, x]) => [k.replace(/-/g, ' '), x]);
  for (const [k, x] of entries) {
    if (x !== null && typeof x === 'object') {
      lines.push(`${pad}${k}:`);
      dumpValue(x as Record<string, unknown> | unknown[], level + 1, lines);
    } else lines.push(`${pad}${k}: ${x}`);
  }
}

function humanInfo(info: Record<string, unknown>): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'] as number)} (${info['virtual-size']} bytes)`,
    `disk size: ${humanSize(info['actual-size'] as number)}`,
  ];
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  const backing = info['backing-filename'];
  if (backing !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${backing}${full !== backing ? ` (actual path: ${full})` : ''}`);
    if (info['backing-filename-format'])
      lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  const snapshots = info.snapshots as SnapshotInfo[] | undefined;
  if (snapshots?.length) lines.push(...snapshotTable(snapshots, humanSize));
  const fs = info['format-specific'] as { data: Record<string, unknown> } | undefined;
  if (fs) {
    lines.push('Format specific information:');
    dumpValue(fs.data, 1, lines);
  }
  return `${lines.join('\n')}\n`;
}

/** blockrep info [-f fmt] [--output=human|json] [--backing-chain] FILE */
export async function infoCommand(args: string[]): Promise<number> {
  const p = parseArgs(
    args,
    { short: ':f:hU', long: { ...INSPECT_OPTS, 'backing-chain': { arg: false } } },
    'info',
  );
  refuseUnsupported(p);
  if (p.positional.length !== 1) throw usageError('Expecting one image file name');
  const file = p.positional[0]!;
  const output = outputFormat(p);
  const g = imageGraph();
  const chain = p.opts.has('--backing-chain');
  try {
    // Each image is opened on its own, without its backing file, as qemu-img info does; the
    // chain is walked by name, and a name seen before is a loop.
    const infos: Record<string, unknown>[] = [];
    const seen = new Set<string>();
    let name: string | undefined = file;
    let format = optString(p, '-f');
    while (name) {
      if (seen.has(name)) throw new CliFailure(`Backing file '${name}' creates an infinite loop.`);
      seen.add(name);
      const node = await openImage(g, name, {
        format,
        forceShare: forceShare(p),
        backing: null,
        imageOpts: name === file && p.opts.has('--image-opts'),
      });
      printWarnings(node);
      // A json: filename or option list is shown as the file it opened (as qemu-img).
      const shown =
        name === file && imageArg(name, { imageOpts: p.opts.has('--image-opts') }).options
          ? node.filename
          : name;
      const info = await imageInfo(node, shown);
      infos.push(info);
      if (!chain) break;
      name = info['full-backing-filename'] as string | undefined;
      format = info['backing-filename-format'] as string | undefined;
    }
    if (output === 'json') {
      const out = chain ? infos : infos[0];
      process.stdout.write(`${await qemuJson(out)}\n`);
    } else {
      process.stdout.write(infos.map(humanInfo).join('\n'));
    }
  } finally {
    await g.closeAll();
  }
  return 0;
}
