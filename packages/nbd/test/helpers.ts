import { type BlockGraph, type BlockNode, createGraph } from '@blockrep/block';
import { makeTempDir, qemuImg, type TempDir } from '@blockrep/test-kit';
import { afterEach } from 'vitest';
import { NbdServer, nbdDriver } from '../src/index';

export interface ServedImage {
  graph: BlockGraph;
  server: NbdServer;
  node: BlockNode;
  dir: TempDir;
  image: string;
  port: number;
  uri: string;
}

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

/** Runs fn after the current test (servers, graphs, child processes). */
export function onCleanup(fn: () => Promise<void> | void): void {
  cleanups.push(async () => fn());
}

/** A raw image of the given size served by our server on 127.0.0.1 (port chosen by the OS). */
export async function serveImage(
  opts: { size?: string; writable?: boolean; name?: string; description?: string; format?: 'raw' } = {},
): Promise<ServedImage> {
  const dir = makeTempDir('blockrep-nbd-');
  const image = dir.file('disk.img');
  await qemuImg(['create', '-q', '-f', 'raw', image, opts.size ?? '16M']);
  const graph = createGraph([nbdDriver]);
  const node = await graph.open({
    driver: 'raw',
    'node-name': 'disk',
    file: { driver: 'file', filename: image },
  });
  const server = new NbdServer(graph);
  const addr = await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  const port = addr.type === 'inet' ? Number(addr.port) : 0;
  const name = opts.name ?? 'disk';
  server.addExport({ node, name, writable: opts.writable ?? true, description: opts.description });
  onCleanup(async () => {
    await server.close();
    await graph.closeAll();
  });
  return { graph, server, node, dir, image, port, uri: `nbd://127.0.0.1:${port}/${name}` };
}

export function newGraph(): BlockGraph {
  const g = createGraph([nbdDriver]);
  onCleanup(() => g.closeAll());
  return g;
}
