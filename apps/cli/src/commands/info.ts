import { stat } from 'node:fs/promises';
import { createGraph } from '@blockrep/block';
import { parseArgs } from '../args';

function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${Number.isInteger(v) ? v : v.toFixed(2).replace(/\.?0+$/, '')} ${units[u]}`;
}

/** blockrep info [-f fmt] [--output=json] FILE: qemu-img info's shape (raw for now). */
export async function infoCommand(args: string[]): Promise<number> {
  const { opts, positional } = parseArgs(args, ['-f', '--output']);
  const file = positional[0];
  if (!file) throw new Error('Expecting one image file name');
  const fmt = (opts.get('-f') as string | undefined) ?? 'raw';
  const g = createGraph();
  const node = await g.open({ driver: fmt, 'read-only': true, file: { driver: 'file', filename: file } });
  const st = await stat(file);
  const info = {
    'virtual-size': node.length,
    filename: file,
    format: node.driver.name,
    'actual-size': st.blocks * 512,
    'dirty-flag': false,
  };
  await g.closeAll();
  if (opts.get('--output') === 'json') {
    process.stdout.write(`${JSON.stringify(info, null, 4)}\n`);
  } else {
    process.stdout.write(
      `image: ${file}\nfile format: ${info.format}\nvirtual size: ${human(info['virtual-size'])} (${info['virtual-size']} bytes)\ndisk size: ${human(info['actual-size'])}\n`,
    );
  }
  return 0;
}
