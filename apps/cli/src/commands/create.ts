import { open } from 'node:fs/promises';
import { parseSize } from '@blockrep/block';
import { parseArgs } from '../args';

/** blockrep create [-f raw] FILE SIZE */
export async function createCommand(args: string[]): Promise<number> {
  const { opts, positional } = parseArgs(args, ['-f', '-o']);
  const fmt = (opts.get('-f') as string | undefined) ?? 'raw';
  const [file, sizeText] = positional;
  if (!file) throw new Error('Expecting image file name');
  if (fmt !== 'raw') throw new Error(`Unknown file format '${fmt}'`);
  const size = sizeText === undefined ? undefined : parseSize(sizeText);
  if (size === undefined) {
    throw new Error(
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  if (!opts.has('-q')) process.stdout.write(`Formatting '${file}', fmt=${fmt} size=${size}\n`);
  return 0;
}
