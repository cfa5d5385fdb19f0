/**
 * The pair's loop with a fake clock: two sides sharing a lock-file arbiter on the same clock,
 * a link that can be cut, an arbiter one side may lose, crashes and restarts. The invariant under
 * every schedule: never two sides acknowledging guest writes at the same moment, nor in the same
 * epoch.
 */
import { makeTempDir, prng } from '@blockrep/test-kit';
import { describe, expect, it } from 'vitest';
import {
  type Arbiter,
  ArbiterUnavailable,
  type ColoActions,
  ColoPair,
  type ColoRole,
  LockFileArbiter,
} from '../src/index';

const HEARTBEAT = 100;
const TIMEOUT = 500;
const TTL = 1000;

interface Side {
  name: string;
  pair: ColoPair;
  crashed: boolean;
  arbiterReachable: boolean;
  ready: boolean;
  log: string[];
  actions: string[];
}

class Sim {
  t = 0;
  linkUp = true;
  readonly sides: Side[];
  /** Every (side, epoch) seen acknowledging writes. */
  readonly ackEpochs = new Map<number, string>();
  private readonly dir = makeTempDir();

  constructor() {
    this.sides = [this.makeSide('a', 'primary'), this.makeSide('b', 'secondary')];
  }

  side(name: string): Side {
    return this.sides.find((s) => s.name === name)!;
  }

  private makeSide(name: string, role: ColoRole): Side {
    const now = () => this.t;
    const real = new LockFileArbiter({ path: this.dir.file('lease'), leaseTtl: TTL, now });
    const side = {
      name,
      crashed: false,
      arbiterReachable: true,
      // Set up to be resynced, not protecting anyone yet (a side back from a crash or a fence).
      ready: role === 'fenced',
      log: [],
      actions: [],
    } as unknown as Side;
    const gate = <T>(f: () => Promise<T>): Promise<T> =>
      side.arbiterReachable ? f() : Promise.reject(new ArbiterUnavailable('lock-file', 'partitioned'));
    const arbiter: Arbiter = {
      kind: 'lock-file',
      acquire: (h) => gate(() => real.acquire(h)),
      read: () => gate(() => real.read()),
      release: (h) => gate(() => real.release(h)),
      close: () => real.close(),
    };
    const actions: ColoActions = {
      dropSecondary: async () => void side.actions.push('dropSecondary'),
      promote: async (epoch) => void side.actions.push(`promote ${epoch}`),
      reprotect: async (peer) => {
        side.actions.push(`reprotect ${peer.name}`);
        const p = this.side(peer.name);
        p.pair.becameSecondary(side.pair.epoch);
        p.ready = false;
      },
      checkpoint: async () => void side.actions.push('checkpoint'),
      rejoin: async () => {
        side.actions.push('rejoin');
        side.ready = true;
      },
    };
    side.pair = new ColoPair({
      name,
      role,
      arbiter,
      actions,
      heartbeatTimeout: TIMEOUT,
      checkpointInterval: 0,
      now,
      isProtecting: () => !side.ready,
    });
    return side;
  }

  /** Restarts a side: it comes back fenced, to be made a secondary by the primary. */
  restart(name: string): void {
    const old = this.side(name);
    const i = this.sides.indexOf(old);
    const fresh = this.makeSide(name, 'fenced');
    this.sides[i] = fresh;
  }

  /** One heartbeat interval: heartbeats over the link, then each live side's cycle. */
  async step(): Promise<void> {
    this.t += HEARTBEAT;
    const [a, b] = this.sides as [Side, Side];
    if (this.linkUp && !a.crashed && !b.crashed) {
      for (const [from, to] of [
        [a, b],
        [b, a],
      ] as const) {
        to.pair.peerHeard({
          name: from.name,
          role: from.pair.role,
          epoch: from.pair.epoch,
          ready: from.ready,
        });
      }
    }
    for (const s of this.sides) {
      if (s.crashed) continue;
      s.log.push(`${this.t} ${await s.pair.runCycle()}`);
    }
    this.check();
  }

  async steps(n: number): Promise<void> {
    for (let i = 0; i < n; i++) await this.step();
  }

  /** The invariant, at this moment and across time. */
  check(): void {
    const acking = this.sides.filter((s) => !s.crashed && s.pair.canAcknowledgeWrites());
    expect(acking.length, `t=${this.t}: ${acking.map((s) => s.name)} acknowledge writes`).toBeLessThanOrEqual(
      1,
    );
    for (const s of acking) {
      const other = this.ackEpochs.get(s.pair.epoch);
      expect(other === undefined || other === s.name, `epoch ${s.pair.epoch}: ${other} and ${s.name}`).toBe(
        true,
      );
      this.ackEpochs.set(s.pair.epoch, s.name);
    }
  }
}

describe('COLO pair loop (fake clock)', () => {
  it('steady state: the primary renews, the secondary follows', async () => {
    const sim = new Sim();
    await sim.steps(20);
    const a = sim.side('a');
    const b = sim.side('b');
    expect(a.pair.role).toBe('primary');
    expect(a.pair.canAcknowledgeWrites()).toBe(true);
    expect(b.pair.role).toBe('secondary');
    expect(a.log.at(-1)).toBe('2000 primary protected by b; lease renewed (epoch 1)');
    expect(b.log.at(-1)).toBe('2000 secondary following a (epoch 1)');
  });

  it('the primary dies: the secondary promotes once the lease has expired, not before', async () => {
    const sim = new Sim();
    await sim.steps(10);
    sim.side('a').crashed = true;
    const crashedAt = sim.t;
    const b = sim.side('b');
    while (b.pair.role === 'secondary') await sim.step();
    const promotedAt = sim.t;
    // Not before the lease (1000 ms from a's last renewal) ran out; within lease + heartbeat.
    expect(promotedAt - crashedAt).toBeGreaterThanOrEqual(TTL - HEARTBEAT);
    expect(promotedAt - crashedAt).toBeLessThanOrEqual(TTL + HEARTBEAT);
    expect(b.actions).toEqual(['promote 2']);
    expect(b.log).toContain(
      `${promotedAt} promoted self to primary in epoch 2: primary a silent for ${promotedAt - crashedAt} ms`,
    );
    expect(b.log.some((l) => l.includes('but a (epoch 1) holds the lease: waiting'))).toBe(true);
    expect(b.pair.role).toBe('standalone');
    expect(b.pair.canAcknowledgeWrites()).toBe(true);
  });

  it('the secondary dies: the primary drops it, and re-protects it when it comes back', async () => {
    const sim = new Sim();
    await sim.steps(5);
    sim.side('b').crashed = true;
    await sim.steps(10);
    const a = sim.side('a');
    expect(a.pair.role).toBe('standalone');
    expect(a.actions).toEqual(['dropSecondary']);
    expect(a.pair.canAcknowledgeWrites()).toBe(true);
    sim.restart('b');
    await sim.steps(3);
    expect(a.actions).toEqual(['dropSecondary', 'reprotect b']);
    expect(a.pair.role).toBe('primary');
    expect(sim.side('b').pair.role).toBe('secondary');
    expect(
      a.log.some((l) => l.includes('re-protected by b: resynced what it missed; lease renewed (epoch 1)')),
    ).toBe(true);
  });

  it('a link cut with both sides reaching the arbiter: no promotion, the primary goes on alone', async () => {
    const sim = new Sim();
    await sim.steps(5);
    sim.linkUp = false;
    await sim.steps(40);
    expect(sim.side('a').pair.role).toBe('standalone');
    expect(sim.side('b').pair.role).toBe('secondary');
    expect(sim.side('b').actions).toEqual([]);
    sim.linkUp = true;
    await sim.steps(3);
    expect(sim.side('a').pair.role).toBe('primary');
  });

  it('the primary loses the arbiter and the link: it fences itself before the secondary promotes', async () => {
    const sim = new Sim();
    await sim.steps(5);
    const a = sim.side('a');
    a.arbiterReachable = false;
    sim.linkUp = false;
    let fencedAt = -1;
    let promotedAt = -1;
    for (let i = 0; i < 40; i++) {
      await sim.step();
      if (fencedAt < 0 && !a.pair.canAcknowledgeWrites()) fencedAt = sim.t;
      if (promotedAt < 0 && sim.side('b').pair.role === 'standalone') promotedAt = sim.t;
    }
    expect(fencedAt).toBeGreaterThan(0);
    expect(promotedAt).toBeGreaterThan(fencedAt);
    expect(a.pair.role).toBe('fenced');
    expect(a.log.some((l) => l.includes('fenced: the arbiter is unreachable and the lease ran out'))).toBe(
      true,
    );
  });

  it('a primary that steps down: its secondary takes over at the next heartbeat, not after the timeout', async () => {
    const sim = new Sim();
    await sim.steps(5);
    const a = sim.side('a');
    await a.pair.stepDown();
    expect(a.pair.canAcknowledgeWrites()).toBe(false);
    await sim.step();
    const b = sim.side('b');
    expect(b.pair.role).toBe('standalone');
    expect(b.pair.epoch).toBe(2);
    expect(
      b.log.some((l) => l.includes('promoted self to primary in epoch 2: primary a fenced itself')),
    ).toBe(true);
    await sim.steps(3);
    expect(b.pair.role).toBe('primary');
    expect(a.pair.role).toBe('secondary');
  });

  it('a step-down while a renewal is on its way to the arbiter: the lease is given back after it, no new epoch', async () => {
    const dir = makeTempDir();
    const real = new LockFileArbiter({ path: dir.file('lease'), leaseTtl: TTL });
    let hold: (() => void) | null = null;
    const arbiter: Arbiter = {
      kind: 'lock-file',
      acquire: async (h) => {
        if (hold === null) return real.acquire(h);
        // The renewal reaches the arbiter only once released (a slow arbiter under load).
        await new Promise<void>((r) => {
          hold = r;
        });
        return real.acquire(h);
      },
      read: () => real.read(),
      release: (h) => real.release(h),
      close: () => real.close(),
    };
    const noop = async () => {};
    const pair = new ColoPair({
      name: 'a',
      role: 'primary',
      arbiter,
      actions: { dropSecondary: noop, promote: noop, reprotect: noop, checkpoint: noop, rejoin: noop },
      heartbeatTimeout: TIMEOUT,
      checkpointInterval: 0,
    });
    pair.peerHeard({ name: 'b', role: 'secondary', epoch: 1, ready: false });
    await pair.runCycle();
    expect(pair.epoch).toBe(1);
    hold = () => {};
    const cycle = pair.runCycle();
    await new Promise((r) => setTimeout(r, 10));
    const stepped = pair.stepDown();
    (hold as () => void)();
    expect(await cycle).toBe('stepped down while renewing the lease');
    await stepped;
    expect(pair.role).toBe('fenced');
    // The lease is free: the other side takes it in epoch 2, the next one, not 3.
    expect((await real.acquire('b'))?.epoch).toBe(2);
  });

  it('the arbiter gone for the secondary: it never promotes, whatever the primary does', async () => {
    const sim = new Sim();
    await sim.steps(5);
    sim.side('b').arbiterReachable = false;
    sim.side('a').crashed = true;
    await sim.steps(50);
    expect(sim.side('b').pair.role).toBe('secondary');
    expect(sim.side('b').log.at(-1)).toMatch(/but the arbiter is unreachable: not promoting/);
  });

  it('seeded random schedules: never two sides acknowledging writes, never two in one epoch', async () => {
    for (let seed = 1; seed <= 12; seed++) {
      const rand = prng(seed);
      const sim = new Sim();
      for (let i = 0; i < 300; i++) {
        const r = rand();
        const s = sim.sides[rand() < 0.5 ? 0 : 1]!;
        if (r < 0.03) sim.linkUp = !sim.linkUp;
        else if (r < 0.06) s.arbiterReachable = !s.arbiterReachable;
        else if (r < 0.075 && !s.crashed) s.crashed = true;
        else if (r < 0.09 && s.crashed) sim.restart(s.name);
        await sim.step();
      }
      // Somebody was primary in more than one epoch over such a schedule (the failovers happened).
      expect(sim.ackEpochs.size, `seed ${seed}`).toBeGreaterThanOrEqual(1);
    }
  });
});

describe('COLO pair loop: what a secondary makes of a standalone primary', () => {
  /** Secondary b on a clock the test moves; its rejoins are recorded. */
  function secondaryB(isProtecting?: () => boolean) {
    const dir = makeTempDir();
    const clock = { t: 0 };
    const actions: string[] = [];
    const pair = new ColoPair({
      name: 'b',
      role: 'secondary',
      arbiter: new LockFileArbiter({ path: dir.file('lease'), leaseTtl: TTL, now: () => clock.t }),
      actions: {
        dropSecondary: async () => {},
        promote: async () => {},
        reprotect: async () => {},
        checkpoint: async () => {},
        rejoin: async () => void actions.push('rejoin'),
      },
      heartbeatTimeout: TIMEOUT,
      now: () => clock.t,
      isProtecting,
    });
    return { pair, clock, actions };
  }

  it('rejoins only when the standalone primary does not replicate to it (a heartbeat from before the re-protect)', async () => {
    const { pair, clock, actions } = secondaryB();
    pair.peerHeard({ name: 'a', role: 'standalone', epoch: 1, ready: false, protects: 'b' });
    expect(await pair.runCycle()).toBe('secondary following a (epoch 1)');
    clock.t += HEARTBEAT;
    pair.peerHeard({ name: 'a', role: 'standalone', epoch: 1, ready: false });
    expect(await pair.runCycle()).toBe('primary a goes on without this side: set up to be resynced');
    expect(actions).toEqual(['rejoin']);
  });

  it('does not rejoin on the last heartbeat before the checkpoint that made it protect', async () => {
    let protecting = false;
    const { pair, clock, actions } = secondaryB(() => protecting);
    // Sent while the primary resynced this side, before its replication child ran.
    pair.peerHeard({ name: 'a', role: 'standalone', epoch: 1, ready: false });
    expect(await pair.runCycle()).toBe('secondary following a (epoch 1)');
    // Then its first checkpoint request, before any newer heartbeat.
    protecting = true;
    pair.peerReplicatesHere();
    expect(await pair.runCycle()).toBe('secondary following a (epoch 1)');
    expect(actions).toEqual([]);
    // A heartbeat sent after that still counts: this primary dropped this side.
    clock.t += HEARTBEAT;
    pair.peerHeard({ name: 'a', role: 'standalone', epoch: 1, ready: false });
    expect(await pair.runCycle()).toBe('primary a goes on without this side: set up to be resynced');
    expect(actions).toEqual(['rejoin']);
  });
});
