import type { ColoStatus } from '@blockrep/qmp';
import { outputFormat } from '../args';
import { CliFailure } from '../failure';
import { connectQmp, executeQmp } from './qmp';

const mib = (n: number) => `${(n / 1048576).toFixed(1)} MiB`;

/** query-colo as a few lines for a person. */
export function formatColoStatus(s: ColoStatus): string {
  const p = s.peer;
  const peer = p.alive
    ? `alive, ${p.role ?? '?'} (epoch ${p.epoch ?? '?'})${p.ready ? ', waiting to be resynced' : ''}`
    : 'not heard';
  const lines = [
    `pair ${s.pair}, host ${s.name}: ${s.role} (epoch ${s.epoch}), ${s.stage}`,
    `peer ${p.name}: ${peer}`,
    `lease: ${s['lease-valid'] ? 'held' : 'not held'}; guest writes acknowledged ${s['writes-acknowledged']}, refused ${s['writes-refused']}`,
    `checkpoints: ${s.checkpoints}${s['last-checkpoint'] ? `, last at ${s['last-checkpoint'].time} (${s['last-checkpoint']['duration-ms']} ms)` : ''}`,
    `peer may be missing: ${s['peer-missing-bytes']} bytes (bitmap ${s['bitmap-trusted'] ? 'trusted' : 'not trusted: next resync is full'})`,
  ];
  if (s.resync) lines.push(`resync: ${mib(s.resync.offset)} of ${mib(s.resync.len)}`);
  const r = s['last-resync'];
  if (r)
    lines.push(
      `last resync: ${r.peer}, ${r.bytes} bytes${r.full ? ' (full)' : ''} in ${r['duration-ms']} ms`,
    );
  lines.push(`last cycle: ${s['last-cycle']}`);
  return `${lines.join('\n')}\n`;
}

/** blockrep colo status|checkpoint|failover --socket PATH [--output=human|json]. */
export async function coloCommand(args: string[]): Promise<number> {
  const { p, client } = await connectQmp(args, 'colo', { short: ':h', long: { output: { arg: true } } });
  try {
    const [verb, ...extra] = p.positional;
    if (extra.length) throw new CliFailure(`Unexpected argument '${extra[0]}'`);
    switch (verb) {
      case 'status': {
        const out = outputFormat(p);
        const s = (await executeQmp(client, 'query-colo')) as ColoStatus;
        process.stdout.write(out === 'json' ? `${JSON.stringify(s, null, 2)}\n` : formatColoStatus(s));
        return 0;
      }
      case 'checkpoint':
        await executeQmp(client, 'colo-checkpoint');
        return 0;
      case 'failover':
        process.stdout.write(`${(await executeQmp(client, 'colo-failover')) as string}\n`);
        return 0;
      default:
        throw new CliFailure(
          verb
            ? `Unknown colo command '${verb}' (status, checkpoint, failover)`
            : 'Expecting status, checkpoint or failover',
        );
    }
  } finally {
    await client.close();
  }
}
