import type { BlockGraph } from '@blockrep/block';
import type { JobEvent, JobManager } from '@blockrep/jobs';
import { registerBitmapCommands } from './commands/bitmaps';
import { registerBlockCommands } from './commands/block';
import { registerBlockstatsCommand } from './commands/blockstats';
import { registerChainCommands } from './commands/chain';
import { BlockdevCreators, fileCreator, registerCreateCommand } from './commands/create';
import { registerJobCommands } from './commands/jobs';
import { registerSnapshotCommands } from './commands/snapshots';
import { CommandRegistry } from './registry';
import { QmpServer, type QmpServerOptions } from './server';

export interface BlockQmpServerOptions extends Omit<QmpServerOptions, 'registry'> {
  graph: BlockGraph;
  jobs: JobManager;
}

/**
 * A QMP server with every command this package implements on a graph and a job manager, job
 * events forwarded to the monitors, and blockdev-create's creators (file built in; drivers add
 * theirs through `creators.register`).
 */
export function createBlockQmpServer(opts: BlockQmpServerOptions): {
  server: QmpServer;
  creators: BlockdevCreators;
} {
  const registry = new CommandRegistry();
  const server = new QmpServer({ ...opts, registry });
  const creators = new BlockdevCreators();
  creators.register(fileCreator);
  registerBlockCommands(registry, opts.graph, opts.jobs);
  registerBitmapCommands(registry, opts.graph);
  registerSnapshotCommands(registry, opts.graph);
  registerChainCommands(registry, opts.graph);
  registerBlockstatsCommand(registry, opts.graph);
  registerJobCommands(registry, opts.jobs);
  registerCreateCommand(registry, { graph: opts.graph, jobs: opts.jobs, creators });
  const forward = (e: JobEvent) => server.emitEvent(e.event, e.data);
  opts.jobs.on('event', forward);
  server.once('close', () => opts.jobs.off('event', forward));
  return { server, creators };
}
