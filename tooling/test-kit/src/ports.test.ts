import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { unixAccepts } from './ports';
import { makeTempDir } from './temp';

describe('unixAccepts', () => {
  it('is false without a listener and true once one listens', async () => {
    const sock = makeTempDir().file('s.sock');
    expect(await unixAccepts(sock)).toBe(false);
    const srv = createServer((c) => c.destroy());
    await new Promise<void>((r) => srv.listen(sock, r));
    try {
      expect(await unixAccepts(sock)).toBe(true);
    } finally {
      await new Promise((r) => srv.close(r));
    }
    expect(await unixAccepts(sock)).toBe(false);
  });
});
