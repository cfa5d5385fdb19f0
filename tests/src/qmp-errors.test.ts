/**
 * The same bad QMP commands to qemu-storage-daemon 7.2 and blockrepd: the schema's answer (error
 * class and text) must be the same, before any driver gets to speak.
 */
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from './daemon';
import { startQsd } from './qsd';

afterEach(() => killAll());

const BAD: [string, Record<string, unknown>][] = [
  ['blockdev-add', { driver: 'replication', 'node-name': 'r', file: 'n0' }],
  ['blockdev-add', { driver: 'replication', 'node-name': 'r', file: 'n0', mode: 'tertiary' }],
  ['blockdev-add', { driver: 'replication', 'node-name': 'r', mode: 'primary' }],
  ['blockdev-add', { driver: 'quorum', 'node-name': 'q', children: ['n0'], 'read-pattern': 'odd' }],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'z', bogus: 1 }],
];

async function answers(qmp: QmpClient): Promise<string[]> {
  await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'n0' });
  const out: string[] = [];
  for (const [cmd, args] of BAD) {
    try {
      await qmp.execute(cmd, args);
      out.push(`${cmd}: accepted`);
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push(`${e.errorClass}: ${e.desc}`);
    }
  }
  return out;
}

describe.runIf(hasPeer('qemu-storage-daemon'))('QMP errors: qemu-storage-daemon 7.2 vs blockrepd', () => {
  it('missing and bad members get the schema’s class and text', async () => {
    const dq = makeTempDir();
    const qsd = await startQsd(dq.file('qmp.sock'));
    const theirs = await answers(qsd.qmp);
    await qsd.stop();
    const ours = await startDaemon(makeTempDir().file('qmp.sock'));
    const mine = await answers(ours.qmp);
    expect(await ours.stop()).toBe(0);
    expect(mine).toEqual(theirs);
  });
});
