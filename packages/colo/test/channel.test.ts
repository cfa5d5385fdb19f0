import * as net from 'node:net';
import { makeTempDir } from '@blockrep/test-kit';
import { afterEach, describe, expect, it } from 'vitest';
import { PeerChannel } from '../src/index';

const open: PeerChannel[] = [];
afterEach(async () => {
  for (const c of open.splice(0)) await c.close();
});

function channel(dir: ReturnType<typeof makeTempDir>, notices: string[]): PeerChannel {
  const c = new PeerChannel({
    pair: 'vm1',
    name: 'a',
    peerName: 'b',
    listen: { type: 'unix', path: dir.file('a.sock') },
    peer: { type: 'unix', path: dir.file('nobody.sock') },
    interval: 20,
    heartbeat: () => ({ name: 'a', role: 'primary', epoch: 1, ready: false }),
    onHeartbeat: () => {},
    onRequest: async () => null,
    onNotice: (w) => notices.push(w),
  });
  open.push(c);
  return c;
}

/** Connects, sends `first` (if any), and resolves once the server has closed the connection. */
function closedByServer(path: string, first?: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(path, () => {
      if (first) s.write(first);
    });
    s.on('error', reject);
    s.on('close', () => resolve());
    s.resume();
  });
}

describe('peer channel', () => {
  it('drops a connection that never says hello, and a stranger of another pair or name', async () => {
    const dir = makeTempDir();
    const notices: string[] = [];
    await channel(dir, notices).start();
    await closedByServer(dir.file('a.sock'));
    await closedByServer(
      dir.file('a.sock'),
      `${JSON.stringify({ type: 'hello', pair: 'vm2', name: 'b' })}\n`,
    );
    expect(notices).toContain("refused 'b' of pair 'vm2' on the peer channel (expecting 'b')");
  });
});
