/**
 * Image locks across processes, over QMP: blockrepd and qemu-storage-daemon refuse the same
 * blockdev-add with the same error while the other writes the image, and accept it once it stops.
 */
import { type QmpClient, QmpError } from '@blockrep/qmp';
import { hasPeer, makeTempDir, qemuImg } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, startDaemon } from '../daemon';
import { startQsd } from '../qsd';

afterEach(() => killAll());

const add = (f: string, name: string) => ({
  driver: 'qcow2',
  'node-name': name,
  file: { driver: 'file', filename: f },
});

/** The error class and text of a refused blockdev-add (null: it was accepted). */
async function refusal(qmp: QmpClient, args: Record<string, unknown>) {
  try {
    await qmp.execute('blockdev-add', args);
  } catch (e) {
    if (!(e instanceof QmpError)) throw e;
    return { cls: e.errorClass, desc: e.desc };
  }
  return null;
}

describe.runIf(hasPeer('qemu-storage-daemon'))('image locks between blockrepd and QEMU', () => {
  it('each refuses an image the other writes, with the same QMP error', async () => {
    const d = makeTempDir();
    const a = d.file('a.qcow2');
    const b = d.file('b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', b, '1M']);
    const ours = await startDaemon(d.file('ours.sock'));
    const qsd = await startQsd(d.file('qsd.sock'));
    // Each holds one image writable.
    await ours.qmp.execute('blockdev-add', add(a, 'a'));
    await qsd.qmp.execute('blockdev-add', add(b, 'b'));
    const oursRefused = await refusal(ours.qmp, add(b, 'b2'));
    const qsdRefused = await refusal(qsd.qmp, add(a, 'a2'));
    expect(oursRefused).not.toBeNull();
    expect(oursRefused).toEqual(qsdRefused);
    expect(oursRefused!.desc).toContain('lock');
    // Read-only with force-share is allowed on both sides.
    const ro = (f: string, n: string) => ({ ...add(f, n), 'read-only': true, 'force-share': true });
    await ours.qmp.execute('blockdev-add', ro(b, 'b3'));
    await qsd.qmp.execute('blockdev-add', ro(a, 'a3'));
    // Once the holder lets go, the image can be opened for writing.
    await qsd.qmp.execute('blockdev-del', { 'node-name': 'b' });
    await ours.qmp.execute('blockdev-del', { 'node-name': 'b3' });
    await ours.qmp.execute('blockdev-add', add(b, 'b4'));
    await qsd.stop();
    await ours.stop();
  });
});
