import { spawn } from 'node:child_process';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { hasPeer, MissingPeerError, peersRequired, waitForPidFile } from './peers';
import { makeTempDir } from './temp';

// A tool no machine has: what a CI image without qemu-utils looks like to a test.
const NOWHERE = 'blockrep-no-such-peer-tool';

afterEach(() => {
  vi.unstubAllEnvs();
});

describe('peersRequired', () => {
  it('is on when CI is set to anything but empty, 0 or false', () => {
    expect(peersRequired({})).toBe(false);
    for (const off of ['', '0', 'false', 'FALSE', ' false '])
      expect(peersRequired({ CI: off }), off).toBe(false);
    for (const on of ['true', '1', 'yes', 'woodpecker']) expect(peersRequired({ CI: on }), on).toBe(true);
  });
});

describe('hasPeer', () => {
  it('is true for tools on PATH, under CI or not', () => {
    vi.stubEnv('CI', '');
    expect(hasPeer('sh')).toBe(true);
    vi.stubEnv('CI', 'true');
    expect(hasPeer('sh', 'env')).toBe(true);
  });

  it('without CI a missing tool skips: false', () => {
    vi.stubEnv('CI', '');
    expect(hasPeer(NOWHERE)).toBe(false);
    expect(hasPeer('sh', NOWHERE)).toBe(false);
  });

  it('under CI a missing tool throws, naming every missing tool, so its tests fail', () => {
    vi.stubEnv('CI', 'true');
    let err: unknown;
    try {
      hasPeer('sh', NOWHERE, `${NOWHERE}-2`);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(MissingPeerError);
    expect((err as MissingPeerError).tools).toEqual([NOWHERE, `${NOWHERE}-2`]);
    expect((err as Error).message).toMatch(
      new RegExp(`^peer tools not on PATH: ${NOWHERE}, ${NOWHERE}-2 \\(CI is set`),
    );
  });

  // What a test file does with it: describe.runIf(hasPeer(...)) at collection.
  it('under CI a gated describe throws at collection instead of registering a skipped suite', () => {
    vi.stubEnv('CI', '1');
    expect(() => describe.runIf(hasPeer(NOWHERE))('needs the tool', () => {})).toThrow(MissingPeerError);
  });
});

describe('waitForPidFile', () => {
  it('resolves with the pid once the daemon wrote it (an empty file is not written yet)', async () => {
    const pid = makeTempDir().file('d.pid');
    const d = spawn('sh', ['-c', `: > ${pid}; sleep 0.2; echo $$ > ${pid}; exec sleep 30`]);
    try {
      expect(await waitForPidFile(pid, d)).toBe(d.pid);
    } finally {
      d.kill('SIGKILL');
    }
  });

  it('rejects as soon as the daemon exits without writing it', async () => {
    const d = spawn('sh', ['-c', 'exit 3']);
    await expect(waitForPidFile(makeTempDir().file('d.pid'), d)).rejects.toThrow(
      /^sh -c exit 3 exited \(3\)/,
    );
  });
});
