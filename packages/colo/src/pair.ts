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
  /** A primary replicating to this host (by name): its peer is protecting it. */
  protects?: string;
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
  /** Secondary or fenced side: stop following, set up to be resynced and protect again. */
  rejoin(): Promise<void>;
}

export interface ColoPairOptions {
  /** This side's name (the lease holder's name). */
  name: string;
  /** The peer's name, for the sentences before it is first heard. */
  peerName?: string;
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
  /**
   * Whether this secondary protects the primary (replicating, with a checkpoint); only then may
   * it take over. Default: yes.
   */
  isProtecting?: () => boolean;
  /** Called on every role change, before the cycle's sentence is returned. */
  onRoleChange?: (role: ColoRole, previous: ColoRole, reason: string) => void;
}

export class ColoPair {
  readonly name: string;
  private roleValue: ColoRole;
  private epochValue = 0;
  /** This side may acknowledge guest writes until then (its clock). */
  private leaseValidUntil = Number.NEGATIVE_INFINITY;
  /** The arbiter call of the cycle in flight (stepDown releases only after it). */
  private leaseOp: Promise<unknown> = Promise.resolve();
  private peer: PeerState | null = null;
  private peerSeenAt = Number.NEGATIVE_INFINITY;
  private lastCheckpoint: number;
  /** A fenced side has set itself up to be resynced. */
  private rejoined = false;
  /** Why the peer counts as gone when it did not fall silent (a failover on request). */
  private lostWhy: string | null = null;
  /** The replication link failed a write: the secondary missed it, whatever its heartbeat says. */
  private linkFailure: string | null = null;
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

  private setRole(role: ColoRole, reason: string): void {
    const prev = this.roleValue;
    if (prev === role) return;
    this.roleValue = role;
    this.opts.onRoleChange?.(role, prev, reason);
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

  /** The role and epoch a restarted side had (no role-change callback). */
  restore(role: ColoRole, epoch: number): void {
    this.roleValue = role;
    this.epochValue = epoch;
    // A fenced side comes back set up to be resynced.
    this.rejoined = role === 'fenced';
  }

  /**
   * The peer asked this side for a checkpoint: it replicates here now, whatever its last
   * heartbeat said. The channel keeps order, so that heartbeat was sent before the request,
   * perhaps before the peer's replication started; acted on, it would look like a primary that
   * goes on without this side.
   */
  peerReplicatesHere(): void {
    if (this.peer) this.peer = { ...this.peer, protects: this.name };
  }

  /** A heartbeat from the peer. */
  peerHeard(state: PeerState): void {
    this.peer = state;
    this.peerSeenAt = this.now();
    this.lostWhy = null;
    if (this.roleValue === 'secondary' && state.epoch > this.epochValue) this.epochValue = state.epoch;
  }

  /** A secondary again (after the primary re-protected this side). */
  becameSecondary(epoch: number): void {
    this.leaseValidUntil = Number.NEGATIVE_INFINITY;
    this.epochValue = Math.max(this.epochValue, epoch);
    // What the primary said before it re-protected this side is stale now.
    if (this.peer) this.peer = { ...this.peer, role: 'primary', ready: false, epoch: this.epochValue };
    this.setRole('secondary', `protecting the primary of epoch ${this.epochValue}`);
  }

  /**
   * A primary hands over on request: it stops acknowledging guest writes and gives the lease
   * back, so that its secondary can take it at once.
   */
  async stepDown(): Promise<void> {
    if (this.roleValue !== 'primary' && this.roleValue !== 'standalone') return;
    this.fence('stepped down on request');
    // A cycle renewing the lease right now finishes first: released before that renewal lands,
    // the lease would be taken again (a new epoch) by the side that just stepped down.
    await this.leaseOp.catch(() => {});
    await this.opts.arbiter.release(this.name).catch(() => {});
  }

  /** A primary's replication link failed a guest write: the next cycle drops the secondary. */
  replicationFailed(why: string): void {
    if (this.roleValue === 'primary') this.linkFailure ??= why;
  }

  /** A secondary told that its primary is gone (a manual failover): the next cycle takes over. */
  peerLost(why: string): void {
    this.peerSeenAt = Number.NEGATIVE_INFINITY;
    this.lostWhy = why;
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
        if (!this.rejoined) {
          await this.opts.actions.rejoin();
          this.rejoined = true;
          return `fenced in epoch ${this.epochValue}: set up to be resynced by ${this.peerName()}`;
        }
        return `fenced since epoch ${this.epochValue}: not acknowledging guest writes, waiting to be made a secondary`;
    }
  }

  private peerAlive(): boolean {
    return this.now() - this.peerSeenAt < this.opts.heartbeatTimeout;
  }

  private silentFor(): string {
    if (this.lostWhy) return this.lostWhy;
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
    return this.peer?.name ?? this.opts.peerName ?? 'the peer';
  }

  /** Asks for the lease (remembered as the arbiter call in flight, which stepDown waits for). */
  private holdLease(): ReturnType<ColoPair['askLease']> {
    const op = this.askLease();
    this.leaseOp = op;
    return op;
  }

  /** Asks for the lease; updates the local validity. Returns the outcome for the caller's sentence. */
  private async askLease(): Promise<
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
    // Stepped down while the arbiter answered: stepDown gives the lease back after this.
    if (this.roleValue === 'fenced') return 'stepped down while renewing the lease';
    if (lease.kind === 'taken') {
      const why = `fenced: ${lease.by} holds the lease; stopped acknowledging guest writes`;
      this.fence(why);
      return why;
    }
    if (lease.kind === 'unreachable') {
      if (!this.canAcknowledgeWrites()) {
        const why = `fenced: the arbiter is unreachable and the lease ran out (${lease.why})`;
        this.fence(why);
        return why;
      }
      const left = Math.round(this.leaseValidUntil - this.now());
      return `arbiter unreachable (${lease.why}); acknowledging guest writes for ${left} ms more`;
    }
    const renewed = lease.fresh
      ? `took the lease in epoch ${this.epochValue}`
      : `lease renewed (epoch ${this.epochValue})`;
    const waiting = this.peerAlive() ? this.peerWaitsForProtection() : null;
    if (this.roleValue === 'primary' && (!this.peerAlive() || waiting || this.linkFailure)) {
      // Silent, back from a restart and no longer following, or its link failed a write: either
      // way it misses writes now.
      const why = this.linkFailure ?? (waiting ? 'came back unprotected' : this.silentFor());
      this.linkFailure = null;
      await this.opts.actions.dropSecondary();
      const what = `dropped secondary ${this.peerName()} (${why}); recording what it misses; ${renewed}`;
      this.setRole('standalone', what);
      return what;
    }
    if (this.roleValue === 'standalone' && waiting) {
      await this.opts.actions.reprotect(waiting);
      // What it said before the resync is stale now: it follows this side.
      this.peer = { ...waiting, role: 'secondary', ready: false, epoch: this.epochValue };
      this.lastCheckpoint = this.now();
      const what = `re-protected by ${waiting.name}: resynced what it missed; ${renewed}`;
      this.setRole('primary', what);
      return what;
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
    const protecting = this.opts.isProtecting?.() ?? true;
    // A primary that fenced itself (stepped down, or lost the arbiter) is as good as gone.
    const stepped = this.peerAlive() && this.peer?.role === 'fenced';
    if (this.peerAlive() && !stepped) {
      if (this.peer?.role === 'standalone' && this.peer.protects !== this.name && protecting) {
        await this.opts.actions.rejoin();
        return `primary ${this.peerName()} goes on without this side: set up to be resynced`;
      }
      return `secondary following ${this.peerName()} (epoch ${this.epochValue})`;
    }
    const gone = stepped ? 'fenced itself' : this.silentFor();
    if (!protecting) {
      return `primary ${this.peerName()} ${gone}, but this side is not protecting it yet: not promoting`;
    }
    const lease = await this.holdLease();
    if (lease.kind === 'unreachable') {
      return `primary ${this.peerName()} ${gone}, but the arbiter is unreachable: not promoting (${lease.why})`;
    }
    if (lease.kind === 'taken') {
      return `primary ${this.peerName()} ${gone}, but ${lease.by} holds the lease: waiting`;
    }
    await this.opts.actions.promote(this.epochValue);
    const what = `promoted self to primary in epoch ${this.epochValue}: primary ${this.peerName()} ${gone}`;
    this.setRole('standalone', what);
    return what;
  }

  /** A checkpoint now (on the timer, or asked for by the VM-level COLO framework). */
  async checkpoint(): Promise<void> {
    await this.opts.actions.checkpoint();
    this.lastCheckpoint = this.now();
  }

  private fence(why: string): void {
    this.leaseValidUntil = Number.NEGATIVE_INFINITY;
    this.rejoined = false;
    this.setRole('fenced', why);
  }
}
