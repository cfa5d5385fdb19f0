import type { Arbiter } from './arbiter/arbiter';

/*
 * The pair's loop (Patroni's run_cycle): each cycle observes this side's role, the lease and what
 * the peer last said, decides one action, does it, and returns one sentence saying what it did and
 * why. The actions on disks and exports are behind `ColoActions`, so the loop is tested with a fake
 * clock and fake actions as well as with real daemons.
 *
 * Roles: a `primary` is protected by a secondary; a `standalone` primary has lost (or not yet got)
 * its secondary and records what the peer misses; a `secondary` follows the primary; a `fenced`
 * side stopped acknowledging guest writes because it could not hold the lease, and waits to be
 * made a secondary again.
 *
 * No split brain: a side acknowledges guest writes only while it holds the lease by its own clock
 * (`canAcknowledgeWrites`): until the moment it asked for the lease plus the lease's time-to-live,
 * less a margin. The arbiter hands the lease to the other side only after it expired there, which
 * is later, so the two windows never overlap.
 */

export type ColoRole = 'primary' | 'standalone' | 'secondary' | 'fenced';

/** What the peer says of itself in each heartbeat. */
export interface PeerState {
  name: string;
  role: ColoRole;
  epoch: number;
  /** A secondary (or fenced side) whose disks are set up to be resynced and protected. */
  ready: boolean;
}

/** What the loop does to the graph; each resolves once done. */
export interface ColoActions {
  /** Primary: stop forwarding to the secondary and record what it misses (QEMU's primary failover). */
  dropSecondary(): Promise<void>;
  /** Secondary: fail over (replication stop with failover) and serve the guest disk. */
  promote(epoch: number): Promise<void>;
  /** Primary: resync the ready secondary from what it missed, then protect the guest with it again. */
  reprotect(peer: PeerState): Promise<void>;
  checkpoint(): Promise<void>;
}

export interface ColoPairOptions {
  /** This side's name (the lease holder's name). */
  name: string;
  role: ColoRole;
  arbiter: Arbiter;
  actions: ColoActions;
  /** The peer counts as gone after this long without a heartbeat (ms). */
  heartbeatTimeout: number;
  /** Milliseconds between checkpoints (0: only on demand). */
  checkpointInterval?: number;
  /** Subtracted from the lease on this side's clock (default: a tenth of it). */
  leaseMargin?: number;
  /** A monotonic clock in milliseconds. */
  now?: () => number;
}

export class ColoPair {
  readonly name: string;
  private roleValue: ColoRole;
  private epochValue = 0;
  /** This side may acknowledge guest writes until then (its clock). */
  private leaseValidUntil = Number.NEGATIVE_INFINITY;
  private peer: PeerState | null = null;
  private peerSeenAt = Number.NEGATIVE_INFINITY;
  private lastCheckpoint: number;
  private readonly opts: ColoPairOptions;
  private readonly now: () => number;

  constructor(opts: ColoPairOptions) {
    this.opts = opts;
    this.name = opts.name;
    this.roleValue = opts.role;
    this.now = opts.now ?? (() => performance.now());
    this.lastCheckpoint = this.now();
  }

  get role(): ColoRole {
    return this.roleValue;
  }

  /** The epoch of the lease this side last held or followed. */
  get epoch(): number {
    return this.epochValue;
  }

  /** The peer as last heard, and whether it counts as alive. */
  get peerState(): { state: PeerState | null; alive: boolean } {
    return { state: this.peer, alive: this.peerAlive() };
  }

  /**
   * Whether a guest write may be acknowledged now: only a primary holding the lease on its own
   * clock. Checked on every guest write, so fencing does not wait for the next cycle.
   */
  canAcknowledgeWrites(): boolean {
    const r = this.roleValue;
    return (r === 'primary' || r === 'standalone') && this.now() < this.leaseValidUntil;
  }

  /** A heartbeat from the peer. */
  peerHeard(state: PeerState): void {
    this.peer = state;
    this.peerSeenAt = this.now();
    if (this.roleValue === 'secondary' && state.epoch > this.epochValue) this.epochValue = state.epoch;
  }

  /** A secondary again (after the primary re-protected this side). */
  becameSecondary(epoch: number): void {
    this.roleValue = 'secondary';
    this.leaseValidUntil = Number.NEGATIVE_INFINITY;
    this.epochValue = Math.max(this.epochValue, epoch);
  }

  /** One cycle: observe, decide one action, act. Returns what it did and why. */
  async runCycle(): Promise<string> {
    switch (this.roleValue) {
      case 'primary':
      case 'standalone':
        return this.primaryCycle();
      case 'secondary':
        return this.secondaryCycle();
      case 'fenced':
        return `fenced since epoch ${this.epochValue}: not acknowledging guest writes, waiting to be made a secondary`;
    }
  }

  private peerAlive(): boolean {
    return this.now() - this.peerSeenAt < this.opts.heartbeatTimeout;
  }

  private silentFor(): string {
    return this.peerSeenAt === Number.NEGATIVE_INFINITY
      ? 'never heard'
      : `silent for ${Math.round(this.now() - this.peerSeenAt)} ms`;
  }

  /** A peer (a secondary, or a side back from a crash or a fence) ready to be resynced. */
  private peerWaitsForProtection(): PeerState | null {
    const p = this.peer;
    return p?.ready && (p.role === 'secondary' || p.role === 'fenced') ? p : null;
  }

  private peerName(): string {
    return this.peer?.name ?? 'the peer';
  }

  /** Asks for the lease; updates the local validity. Returns the outcome for the caller's sentence. */
  private async holdLease(): Promise<
    { kind: 'held'; fresh: boolean } | { kind: 'taken'; by: string } | { kind: 'unreachable'; why: string }
  > {
    const askedAt = this.now();
    let lease: Awaited<ReturnType<Arbiter['acquire']>>;
    try {
      lease = await this.opts.arbiter.acquire(this.name);
    } catch (e) {
      return { kind: 'unreachable', why: (e as Error).message };
    }
    if (!lease) {
      const other = await this.opts.arbiter.read().catch(() => null);
      return { kind: 'taken', by: other ? `${other.holder} (epoch ${other.epoch})` : 'another side' };
    }
    const margin = this.opts.leaseMargin ?? lease.ttl / 10;
    this.leaseValidUntil = askedAt + lease.ttl - margin;
    const fresh = lease.epoch !== this.epochValue;
    this.epochValue = lease.epoch;
    return { kind: 'held', fresh };
  }

  private async primaryCycle(): Promise<string> {
    const lease = await this.holdLease();
    if (lease.kind === 'taken') {
      this.fence();
      return `fenced: ${lease.by} holds the lease; stopped acknowledging guest writes`;
    }
    if (lease.kind === 'unreachable') {
      if (!this.canAcknowledgeWrites()) {
        this.fence();
        return `fenced: the arbiter is unreachable and the lease ran out (${lease.why})`;
      }
      const left = Math.round(this.leaseValidUntil - this.now());
      return `arbiter unreachable (${lease.why}); acknowledging guest writes for ${left} ms more`;
    }
    const renewed = lease.fresh
      ? `took the lease in epoch ${this.epochValue}`
      : `lease renewed (epoch ${this.epochValue})`;
    if (this.roleValue === 'primary' && !this.peerAlive()) {
      await this.opts.actions.dropSecondary();
      this.roleValue = 'standalone';
      return `dropped secondary ${this.peerName()} (${this.silentFor()}); recording what it misses; ${renewed}`;
    }
    const waiting = this.peerWaitsForProtection();
    if (this.roleValue === 'standalone' && this.peerAlive() && waiting) {
      await this.opts.actions.reprotect(waiting);
      this.roleValue = 'primary';
      this.lastCheckpoint = this.now();
      return `re-protected by ${waiting.name}: resynced what it missed; ${renewed}`;
    }
    const interval = this.opts.checkpointInterval ?? 0;
    if (this.roleValue === 'primary' && interval > 0 && this.now() - this.lastCheckpoint >= interval) {
      await this.checkpoint();
      return `checkpoint with ${this.peerName()}; ${renewed}`;
    }
    return this.roleValue === 'primary'
      ? `primary protected by ${this.peerName()}; ${renewed}`
      : `primary without a secondary (${this.peerName()} ${this.peerAlive() ? 'not ready' : this.silentFor()}); ${renewed}`;
  }

  private async secondaryCycle(): Promise<string> {
    if (this.peerAlive()) return `secondary following ${this.peerName()} (epoch ${this.epochValue})`;
    const lease = await this.holdLease();
    if (lease.kind === 'unreachable') {
      return `primary ${this.peerName()} ${this.silentFor()}, but the arbiter is unreachable: not promoting (${lease.why})`;
    }
    if (lease.kind === 'taken') {
      return `primary ${this.peerName()} ${this.silentFor()}, but ${lease.by} holds the lease: waiting`;
    }
    await this.opts.actions.promote(this.epochValue);
    this.roleValue = 'standalone';
    return `promoted self to primary in epoch ${this.epochValue}: primary ${this.peerName()} ${this.silentFor()}`;
  }

  /** A checkpoint now (on the timer, or asked for by the VM-level COLO framework). */
  async checkpoint(): Promise<void> {
    await this.opts.actions.checkpoint();
    this.lastCheckpoint = this.now();
  }

  private fence(): void {
    this.roleValue = 'fenced';
    this.leaseValidUntil = Number.NEGATIVE_INFINITY;
  }
}
