import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockBackend, blockStatusAbove, createGraph, Perm } from '@blockrep/block';
import { createCommand } from './create';
import { infoCommand } from './info';

/** Creates an image, writes through the block stack, and shows its info and allocation map. */
export async function demoCommand(): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), 'blockrep-demo-'));
  const file = join(dir, 'demo.raw');
  await createCommand([file, '64M']);
  const g = createGraph();
  const node = await g.open({ driver: 'raw', file: { driver: 'file', filename: file } });
  const blk = new BlockBackend(g, { perm: Perm.CONSISTENT_READ | Perm.WRITE });
  blk.attach(node);
  await blk.write(1 << 20, Buffer.alloc(4 << 20, 0xab));
  await blk.write(32 << 20, Buffer.from('hello from blockrep'));
  await blk.flush();
  process.stdout.write(
    `wrote 4 MiB at 1 MiB and a greeting at 32 MiB; read back: "${(await blk.read(32 << 20, 19)).toString()}"\n`,
  );
  process.stdout.write('allocation map:\n');
  for (let off = 0; off < node.length; ) {
    const st = await blockStatusAbove(node, null, off, node.length - off);
    process.stdout.write(
      `  ${String(off).padStart(10)} +${String(st.bytes).padStart(10)}  ${st.data ? 'data' : 'hole'}\n`,
    );
    off += st.bytes;
  }
  await blk.detach();
  await g.closeAll();
  await infoCommand(['--output=json', file]);
  process.stdout.write(`demo image left at ${file}\n`);
  return 0;
}
