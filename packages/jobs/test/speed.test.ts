import { describe, expect, it } from 'vitest';
import { type Job, startBackup, startCommit, startMirror } from '../src/index';
import { env, qcow2Node, randomData, rawNode, rawPair, SIZE, writer } from './backup-commit-helpers';
import { waitStatus } from './helpers';

/*
 * `speed` is honoured by every block job: SIZE (4 MiB) at 1 MiB/s takes about four seconds. The
 * job sleeps about a second between its 1 MiB steps, so a timer that fires late on a loaded
 * machine costs a few percent, not the margin.
 */

const SPEED = 1 << 20;
const EXPECTED = SIZE / SPEED;

/** Seconds from start until the job has copied everything (READY, or concluded). */
async function timed(start: () => Promise<Job>, until: 'ready' | 'concluded'): Promise<number> {
  const t0 = performance.now();
  const job = await start();
  if (until === 'ready') await waitStatus(job, 'ready', 30_000);
  else await job.whenConcluded();
  const s = (performance.now() - t0) / 1000;
  expect(job.err).toBeNull();
  if (until === 'ready') {
    await job.cancel(false);
    await job.whenConcluded();
  }
  return s;
}

/** Within 20% of the time the speed implies (the data itself copies in a few milliseconds). */
function expectAsSpeedImplies(s: number): void {
  expect(s).toBeGreaterThan(0.8 * EXPECTED);
  expect(s).toBeLessThan(1.2 * EXPECTED);
}

describe('speed', () => {
  it('backup sync=full', async () => {
    const e = env();
    const { graph, manager } = e;
    await rawPair(e, 1);
    const s = await timed(
      () =>
        startBackup(manager, {
          id: 'b',
          source: graph.findNode('s0'),
          target: graph.findNode('t0'),
          sync: 'full',
          speed: SPEED,
        }),
      'concluded',
    );
    expectAsSpeedImplies(s);
  });

  it('mirror sync=full', async () => {
    const e = env();
    const { graph, manager } = e;
    await rawPair(e, 2);
    const s = await timed(
      () =>
        startMirror(manager, {
          id: 'm',
          source: graph.findNode('s0'),
          target: graph.findNode('t0'),
          sync: 'full',
          speed: SPEED,
        }),
      'ready',
    );
    expectAsSpeedImplies(s);
  });

  for (const active of [true, false]) {
    it(`commit (${active ? 'active' : 'intermediate'})`, async () => {
      const { dir, graph, manager } = env();
      await rawNode(graph, dir.file('base.raw'), 'base');
      await qcow2Node(graph, dir.file('mid.qcow2'), 'mid', {
        path: dir.file('base.raw'),
        node: 'base',
        fmt: 'raw',
      });
      const w = writer(graph, 'mid');
      await w.write(0, randomData(SIZE, 3));
      await w.detach();
      await qcow2Node(graph, dir.file('top.qcow2'), 'top', {
        path: dir.file('mid.qcow2'),
        node: 'mid',
        fmt: 'qcow2',
      });
      const s = await timed(
        () =>
          startCommit(manager, {
            id: 'c',
            // Active: everything above base (top and mid); intermediate: mid's layer.
            top: graph.findNode(active ? 'top' : 'mid'),
            base: graph.findNode('base'),
            active,
            speed: SPEED,
          }),
        active ? 'ready' : 'concluded',
      );
      expectAsSpeedImplies(s);
    });
  }
});
