import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  addDirtyBitmap,
  BlockError,
  type BlockGraph,
  type BlockNode,
  type DirtyBitmap,
  findDirtyBitmap,
  removeDirtyBitmap,
} from '@blockrep/block';
import { type JobManager, type MirrorJob, startMirror } from '@blockrep/jobs';
import {
  NbdServer,
  NbdTlsCreds,
  nbdBreakConnection,
  registerTlsCreds,
  unregisterTlsCreds,
} from '@blockrep/nbd';
import { createQcow2Image } from '@blockrep/qcow2';
import {
  coloPrimaryChildOptions,
  coloQuorumOptions,
  coloSecondaryOptions,
  type ReplicationManager,
} from '@blockrep/replication';
import type { Arbiter } from './arbiter/arbiter';
import { EtcdArbiter } from './arbiter/etcd';
import { LockFileArbiter } from './arbiter/lock-file';
import { type Heartbeat, PeerChannel } from './channel';
import type { ColoAddress, ColoConfig } from './config';
import { coloFenceDriver, fenceCounters, setFenceCheck } from './fence';
import { type ColoActions, ColoPair, type ColoRole, type PeerState } from './pair';

/*
 * One host of a COLO pair, on a daemon's graph: opens the disk, runs the pair's loop and carries
 * out its decisions on the graph (the same nodes and steps as QEMU's COLO procedure):
 *
 *   primary:   guest export -> colo-fence -> colo-disk (quorum) -> parent0 (the disk)
 *                                                              \-> replication0 -> nbd (peer's parent0)
 *   secondary: parent0 exported for the peer; colo-disk -> childs0 (replication) -> active -> hidden -> parent0
 *
 * `colo-peer`, a persistent dirty bitmap on parent0, records every write since the last
 * checkpoint: what a lost peer may lack. A checkpoint clears it (drained); a resync copies what it
 * marks plus what the peer says it wrote on its own; an unclean stop leaves it inconsistent and the
 * next resync copies everything.
 */

export const COLO_NODES = {
  disk: 'parent0',
  guest: 'colo-disk',
  fence: 'colo-fence',
  secondary: 'childs0',
  replication: 'replication0',
  resync: 'colo-resync',
} as const;
const BITMAP = 'colo-peer';
const PEER_EXPORT = 'parent0';
const TLS_CLIENT_ID = 'colo-tls-client';

/** What survives a restart (state-dir/state.json). */
interface PersistedState {
  role: ColoRole;
  epoch: number;
  /** The peer's disk is known to equal ours except for what the bitmaps mark. */
  peerSynced: boolean;
}

export interface ColoStatus {
  pair: string;
  name: string;
  role: ColoRole;
  epoch: number;
  stage: string;
  peer: { name: string; alive: boolean; role?: ColoRole; epoch?: number; ready?: boolean };
  'lease-valid': boolean;
  'last-checkpoint'?: { time: string; 'duration-ms': number };
  checkpoints: number;
  'peer-missing-bytes': number;
  'bitmap-trusted': boolean;
  resync?: { offset: number; len: number };
  'last-resync'?: { peer: string; bytes: number; full: boolean; 'duration-ms': number };
  'writes-acknowledged': number;
  'writes-refused': number;
  'last-cycle': string;
}

export interface ColoServiceOptions {
  config: ColoConfig;
  graph: BlockGraph;
  jobs: JobManager;
  replication: ReplicationManager;
  /** Default: the arbiter the config names. */
  arbiter?: Arbiter;
  log?: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
  /** COLO_ROLE_CHANGE and friends. */
  emitEvent?: (name: string, data: Record<string, unknown>) => void;
}

function nbdServerOpt(a: ColoAddress): Record<string, unknown> {
  return a.type === 'unix'
    ? { type: 'unix', path: a.path }
    : { type: 'inet', host: a.host, port: String(a.port) };
}

/** The extents a bitmap marks, as [offset, length] pairs. */
function extents(bm: DirtyBitmap): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let off = bm.nextDirty(0); off >= 0 && off < bm.length; ) {
    let end = bm.nextClean(off);
    if (end < 0) end = bm.length;
    out.push([off, end - off]);
    off = bm.nextDirty(end);
  }
  return out;
}

export class ColoService {
  readonly config: ColoConfig;
  readonly pair: ColoPair;
  private readonly graph: BlockGraph;
  private readonly jobs: JobManager;
  private readonly repl: ReplicationManager;
  private readonly arbiter: Arbiter;
  private readonly channel: PeerChannel;
  private readonly peerNbd: NbdServer;
  private readonly guestNbd: NbdServer;
  private disk!: BlockNode;
  private state: PersistedState;
  private protecting = false;
  private ready = false;
  private stage = 'starting';
  private lastCycle = '';
  private loop: NodeJS.Timeout | null = null;
  private unsubscribe: (() => void) | null = null;
  private cycling: Promise<void> | null = null;
  private stopped = false;
  private lastCheckpoint: { at: number; ms: number } | null = null;
  private checkpoints = 0;
  private resyncJob: MirrorJob | null = null;
  /** Told each checkpoint's duration, ms (the metrics endpoint's histogram). */
  onCheckpoint: ((ms: number) => void) | null = null;
  private lastResync: ColoStatus['last-resync'] | undefined;
  /** Heartbeats numbered below this were sent before the peer's last answer (stale). */
  private minPeerSeq = { boot: '', seq: 0 };
  private readonly log: NonNullable<ColoServiceOptions['log']>;
  private readonly emit: NonNullable<ColoServiceOptions['emitEvent']>;
  /** Serialises the graph changes of the loop and of requests from the peer and the monitor. */
  private busy: Promise<unknown> = Promise.resolve();

  constructor(opts: ColoServiceOptions) {
    const c = opts.config;
    this.config = c;
    this.graph = opts.graph;
    this.jobs = opts.jobs;
    this.repl = opts.replication;
    this.log = opts.log ?? (() => {});
    this.emit = opts.emitEvent ?? (() => {});
    this.peerNbd = new NbdServer(opts.graph);
    this.guestNbd = new NbdServer(opts.graph);
    if (!opts.graph.driver(coloFenceDriver.name)) opts.graph.registerDriver(coloFenceDriver);
    this.arbiter =
      opts.arbiter ??
      (c.arbiter.type === 'lock-file'
        ? new LockFileArbiter({ path: c.arbiter.path, leaseTtl: c.arbiter.leaseTtl })
        : new EtcdArbiter({
            endpoints: c.arbiter.endpoints,
            pair: c.pair,
            prefix: c.arbiter.prefix,
            leaseTtl: c.arbiter.leaseTtl,
          }));
    this.state = this.readState() ?? { role: 'secondary', epoch: 0, peerSynced: false };
    const actions: ColoActions = {
      dropSecondary: () => this.serial(() => this.dropSecondary()),
      promote: () => this.serial(() => this.promote()),
      reprotect: (peer) => this.serial(() => this.reprotect(peer)),
      checkpoint: () => this.serial(() => this.doCheckpoint()),
      rejoin: () => this.serial(() => this.rejoin()),
    };
    this.pair = new ColoPair({
      name: c.host.name,
      peerName: c.peer.name,
      role: this.state.role,
      arbiter: this.arbiter,
      actions,
      heartbeatTimeout: c.heartbeat.timeout,
      checkpointInterval: c.checkpointInterval,
      isProtecting: () => this.protecting,
      onRoleChange: (role, previous, reason) => this.roleChanged(role, previous, reason),
    });
    this.channel = new PeerChannel({
      pair: c.pair,
      name: c.host.name,
      peerName: c.peer.name,
      listen: c.host.channel,
      peer: c.peer.channel,
      tlsDir: c.tls?.dir,
      interval: c.heartbeat.interval,
      heartbeat: () => this.heartbeat(),
      onHeartbeat: (h) => this.peerHeartbeat(h),
      onRequest: (op, args) => this.peerRequest(op, args),
      onNotice: (what) => this.log('warn', what),
    });
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.busy.then(fn, fn);
    this.busy = run.catch(() => {});
    return run;
  }

  // ---- persistence ----

  private get stateFile(): string {
    return join(this.config.stateDir, 'state.json');
  }

  private readState(): PersistedState | null {
    if (!existsSync(this.stateFile)) return null;
    try {
      const s = JSON.parse(readFileSync(this.stateFile, 'utf8')) as PersistedState;
      if (!['primary', 'standalone', 'secondary', 'fenced'].includes(s.role) || !Number.isInteger(s.epoch))
        throw new Error('bad fields');
      return s;
    } catch (e) {
      throw new BlockError(`COLO state file '${this.stateFile}' is damaged: ${(e as Error).message}`);
    }
  }

  private saveState(): void {
    this.state.role = this.pair.role;
    this.state.epoch = this.pair.epoch;
    mkdirSync(this.config.stateDir, { recursive: true });
    const tmp = `${this.stateFile}.tmp`;
    writeFileSync(tmp, `${JSON.stringify(this.state)}\n`);
    renameSync(tmp, this.stateFile);
  }

  // ---- bring-up ----

  async start(): Promise<void> {
    const c = this.config;
    const fresh = !existsSync(this.stateFile);
    this.disk = await this.graph.blockdevAdd({
      driver: 'qcow2',
      'node-name': COLO_NODES.disk,
      file: { driver: 'file', filename: c.disk },
    });
    for (const f of [c.active, c.hidden]) {
      if (!existsSync(f)) await createQcow2Image(f, { size: this.disk.length });
    }
    await this.openBitmap();
    if (c.tls) {
      registerTlsCreds(new NbdTlsCreds({ id: TLS_CLIENT_ID, endpoint: 'client', dir: c.tls.dir }));
    }
    const serverCreds = c.tls ? new NbdTlsCreds({ endpoint: 'server', dir: c.tls.dir }) : undefined;
    await this.peerNbd.listen(c.host.replication, { tlsCreds: serverCreds });
    await this.guestNbd.listen(c.guest.address);

    let role = this.state.role;
    if (fresh) {
      // First bring-up: whoever gets the lease serves the guest; the other is resynced in full.
      const lease = await this.arbiter.acquire(c.host.name).catch(() => null);
      role = lease ? 'standalone' : 'secondary';
      this.state = { role, epoch: lease?.epoch ?? 0, peerSynced: false };
    } else if (role === 'primary') role = 'standalone';
    if (role === 'standalone') await this.setUpPrimary();
    else await this.setUpSecondary();
    this.pair.restore(role, this.state.epoch);
    this.saveState();
    this.log('info', 'COLO host up', { pair: c.pair, host: c.host.name, role, epoch: this.state.epoch });
    this.unsubscribe = this.graph.onEvent((name, data) => this.graphEvent(name, data));
    await this.channel.start();
    this.loop = setInterval(() => this.cycle(), c.heartbeat.interval);
    this.cycle();
  }

  private cycle(): void {
    if (this.cycling || this.stopped) return;
    this.cycling = (async () => {
      try {
        const said = await this.pair.runCycle();
        if (this.newSentence(said)) this.log('info', said, { role: this.pair.role, epoch: this.pair.epoch });
      } catch (e) {
        const said = `cycle failed: ${(e as Error).message}`;
        if (this.newSentence(said)) this.log('error', said, { role: this.pair.role });
      } finally {
        this.cycling = null;
      }
    })();
  }

  /** Replication errors go to the log; a failed write on the replication link drops the peer. */
  private graphEvent(name: string, data: Record<string, unknown>): void {
    if (name === 'REPLICATION_ERROR') this.log('warn', 'replication error', data);
    if (
      name === 'QUORUM_REPORT_BAD' &&
      data['node-name'] === COLO_NODES.replication &&
      data.type !== 'read'
    ) {
      this.log('warn', 'the replication link failed a guest write', data);
      this.pair.replicationFailed(`its replication link failed a ${data.type}: ${data.error ?? 'error'}`);
      this.cycle();
    }
  }

  /** Whether a cycle's sentence says something new (not just a later time than the last one). */
  private newSentence(said: string): boolean {
    const shape = (x: string) => x.replace(/\d+ ms/g, 'N ms');
    const fresh = shape(said) !== shape(this.lastCycle);
    this.lastCycle = said;
    return fresh;
  }

  /** The persistent bitmap of what the peer may lack; inconsistent after an unclean stop. */
  private async openBitmap(): Promise<void> {
    let bm = findDirtyBitmap(this.disk, BITMAP);
    if (bm?.inconsistent) {
      this.log('warn', `bitmap '${BITMAP}' was not stored cleanly: the next resync copies the whole disk`);
      removeDirtyBitmap(this.disk, bm);
      await this.disk.driver.removePersistentBitmap?.(this.disk, BITMAP);
      bm = undefined;
      this.state.peerSynced = false;
    }
    if (!bm) {
      this.disk.driver.canStoreBitmap?.(this.disk, BITMAP, 65536);
      bm = addDirtyBitmap(this.disk, { name: BITMAP, granularity: 65536 });
      bm.persistent = !!this.disk.driver.canStoreBitmap;
      this.state.peerSynced = false;
    }
    bm.enabled = true;
  }

  private get bitmap(): DirtyBitmap {
    return findDirtyBitmap(this.disk, BITMAP)!;
  }

  // ---- graph shapes ----

  private async delNode(name: string): Promise<void> {
    const n = this.graph.getNode(name);
    if (n) await this.graph.blockdevDel(name);
  }

  /** Removes every COLO node above the disk (guest export, fence, quorum, replication, resync). */
  private async tearDown(): Promise<void> {
    if (this.resyncJob) {
      await this.resyncJob.cancel(true).catch(() => {});
      await this.resyncJob.whenConcluded().catch(() => {});
      this.resyncJob = null;
    }
    for (const e of this.guestNbd.exports()) await this.guestNbd.removeExport(e.id, 'hard');
    for (const e of this.peerNbd.exports()) await this.peerNbd.removeExport(e.id, 'hard');
    for (const s of this.repl.all()) {
      if (s.stage === 'running') await this.repl.stop(s, false).catch(() => {});
      await this.repl.waitFailover(s).catch(() => {});
    }
    this.breakReplicationLink();
    for (const n of [
      COLO_NODES.fence,
      COLO_NODES.guest,
      COLO_NODES.replication,
      COLO_NODES.secondary,
      COLO_NODES.resync,
    ])
      await this.delNode(n);
    this.protecting = false;
    this.ready = false;
  }

  private breakReplicationLink(): void {
    const r = this.graph.getNode(COLO_NODES.replication);
    const nbd = r?.file?.node;
    if (nbd?.driver.name === 'nbd') nbdBreakConnection(nbd);
  }

  /** The guest disk and its export, writes fenced by the lease. */
  private async setUpPrimary(): Promise<void> {
    if (!this.graph.getNode(COLO_NODES.guest)) {
      await this.graph.blockdevAdd(
        coloQuorumOptions({ nodeName: COLO_NODES.guest, localDisk: COLO_NODES.disk }),
      );
    }
    await this.exportGuest();
    this.stage = 'primary';
  }

  private async exportGuest(): Promise<void> {
    const fence = await this.graph.blockdevAdd({
      driver: coloFenceDriver.name,
      'node-name': COLO_NODES.fence,
      file: COLO_NODES.guest,
    });
    setFenceCheck(fence, () => this.pair.canAcknowledgeWrites());
    this.guestNbd.addExport({
      id: 'colo-guest',
      node: fence,
      name: this.config.guest.export,
      writable: true,
    });
  }

  /** Set up to be resynced and then protect a primary: the disk exported for the peer. */
  private async setUpSecondary(): Promise<void> {
    const c = this.config;
    this.peerNbd.addExport({ id: 'colo-peer-disk', node: this.disk, name: PEER_EXPORT, writable: true });
    await this.graph.blockdevAdd(
      coloSecondaryOptions({
        nodeName: COLO_NODES.secondary,
        activeFile: c.active,
        hiddenFile: c.hidden,
        secondaryDisk: COLO_NODES.disk,
        topId: COLO_NODES.guest,
      }),
    );
    await this.graph.blockdevAdd(
      coloQuorumOptions({ nodeName: COLO_NODES.guest, localDisk: COLO_NODES.secondary }),
    );
    this.ready = true;
    this.protecting = false;
    this.stage = 'waiting for resync';
  }

  // ---- the pair's actions ----

  private async dropSecondary(): Promise<void> {
    this.stage = 'dropping secondary';
    const s = this.repl.all().find((x) => x.node.nodeName === COLO_NODES.replication);
    this.breakReplicationLink();
    if (s) await this.repl.stop(s, true).catch(() => {});
    const quorum = this.graph.getNode(COLO_NODES.guest);
    const child = quorum?.children.find((ch) => ch.node.nodeName === COLO_NODES.replication);
    if (quorum && child) await this.graph.delDriverChild(quorum, child);
    await this.delNode(COLO_NODES.replication);
    this.stage = 'primary without secondary';
  }

  private async promote(): Promise<void> {
    this.stage = 'failover';
    const s = this.repl.all().find((x) => x.node.nodeName === COLO_NODES.secondary);
    if (s) {
      await this.repl.stop(s, true);
      await this.repl.waitFailover(s);
      if (s.stage !== 'done') throw new BlockError(`failover did not finish (stage ${s.stage})`);
    }
    // Nobody may write the disk behind the guest's back any more (COLO-FT: nbd-server-stop).
    for (const e of this.peerNbd.exports()) await this.peerNbd.removeExport(e.id, 'hard');
    this.protecting = false;
    this.ready = false;
    this.state.peerSynced = true;
    await this.exportGuest();
    this.stage = 'primary without secondary';
  }

  private async reprotect(peer: PeerState): Promise<void> {
    const c = this.config;
    const missing = (peer as Heartbeat).missing ?? 'all';
    const work = this.bitmap.copy();
    const full = !this.state.peerSynced || missing === 'all';
    if (full) work.setAll();
    else for (const [off, len] of missing) work.set(off, len);
    this.stage = 'resync';
    const bytes = work.count();
    const t0 = performance.now();
    this.log('info', `resyncing ${peer.name}`, { bytes, full });
    const tls = c.tls ? { 'tls-creds': TLS_CLIENT_ID } : {};
    const target = await this.graph.blockdevAdd({
      driver: 'nbd',
      'node-name': COLO_NODES.resync,
      server: nbdServerOpt(c.peer.replication),
      export: PEER_EXPORT,
      ...tls,
    });
    try {
      const quorum = this.graph.lookup(COLO_NODES.guest);
      const job = await startMirror(this.jobs, {
        source: quorum,
        target,
        sync: 'full',
        bitmap: work,
        copyMode: 'write-blocking',
        zeroTarget: false,
        autoDismiss: true,
        internal: true,
      });
      this.resyncJob = job;
      await job.whenReady();
      // From here every guest write reaches the peer before it is acknowledged.
      const answer = (await this.channel.request('start-secondary', { epoch: this.pair.epoch })) as {
        seq: number;
        boot: string;
      };
      this.minPeerSeq = { boot: answer.boot, seq: answer.seq };
      const child = coloPrimaryChildOptions({
        nodeName: COLO_NODES.replication,
        server: { type: 'unix', path: '' },
        exportName: PEER_EXPORT,
      });
      const r = await this.graph.blockdevAdd({
        ...child,
        file: { ...(child.file as object), server: nbdServerOpt(c.peer.replication), ...tls },
      });
      this.graph.addDriverChild(quorum, r);
      const s = this.repl.all().find((x) => x.node === r)!;
      await this.repl.start(s, 'primary');
      await job.cancel(false);
      await job.whenConcluded();
      this.resyncJob = null;
    } catch (e) {
      await this.dropSecondary().catch(() => {});
      throw e;
    } finally {
      if (this.resyncJob) {
        await this.resyncJob.cancel(true).catch(() => {});
        await this.resyncJob.whenConcluded().catch(() => {});
        this.resyncJob = null;
      }
      await this.delNode(COLO_NODES.resync);
    }
    try {
      this.state.peerSynced = true;
      await this.doCheckpoint();
    } catch (e) {
      // Not protected after all: back to standalone with the replication child gone; the
      // bitmap still marks everything since the last checkpoint.
      await this.dropSecondary();
      throw e;
    }
    this.lastResync = { peer: peer.name, bytes, full, 'duration-ms': Math.round(performance.now() - t0) };
    this.stage = 'protected';
  }

  private async doCheckpoint(): Promise<void> {
    const t0 = performance.now();
    if (this.pair.role !== 'primary' && this.stage !== 'resync') {
      throw new BlockError(`COLO checkpoint: this side is ${this.pair.role}, not a protected primary`);
    }
    // No guest write in flight (as QEMU's COLO stops the VM): the secondary's checkpoint and
    // the bitmap's clear see the same moment.
    const quorum = this.graph.lookup(COLO_NODES.guest);
    await this.graph.drained(quorum, async () => {
      await this.repl.checkpointAll();
      // Guest writes wait meanwhile: a peer that does not answer soon is given up on.
      const limit = Math.max(5000, 2 * this.config.heartbeat.timeout);
      await this.channel.request('checkpoint', { epoch: this.pair.epoch }, limit);
      this.bitmap.clear();
    });
    this.lastCheckpoint = { at: Date.now(), ms: performance.now() - t0 };
    this.checkpoints++;
    this.onCheckpoint?.(this.lastCheckpoint.ms);
  }

  private async rejoin(): Promise<void> {
    await this.tearDown();
    await this.setUpSecondary();
    this.saveState();
  }

  // ---- the peer channel ----

  private heartbeat(): Heartbeat {
    const h: Heartbeat = {
      name: this.config.host.name,
      role: this.pair.role,
      epoch: this.pair.epoch,
      ready: this.ready,
    };
    if (this.ready) h.missing = this.bitmapTrusted() ? extents(this.bitmap) : 'all';
    const r = this.repl.all().find((x) => x.node.nodeName === COLO_NODES.replication);
    if (r?.stage === 'running') h.protects = this.config.peer.name;
    return h;
  }

  private bitmapTrusted(): boolean {
    const bm = findDirtyBitmap(this.disk, BITMAP);
    return !!bm && !bm.inconsistent && this.state.peerSynced;
  }

  private peerHeartbeat(h: Heartbeat): void {
    if (h.name !== this.config.peer.name) return;
    // Sent before the peer answered a request that changed it: stale.
    if (h.boot === this.minPeerSeq.boot && (h.seq ?? 0) < this.minPeerSeq.seq) return;
    this.pair.peerHeard(h);
  }

  private async peerRequest(op: string, args: unknown): Promise<unknown> {
    const a = (args ?? {}) as { epoch?: number };
    switch (op) {
      case 'start-secondary':
        return this.serial(async () => {
          if (!this.ready) throw new BlockError(`${this.config.host.name} is not waiting to be resynced`);
          const s = this.repl.all().find((x) => x.node.nodeName === COLO_NODES.secondary);
          if (!s) throw new BlockError('no secondary replication node');
          await this.repl.start(s, 'secondary');
          this.ready = false;
          this.pair.becameSecondary(a.epoch ?? 0);
          this.state.peerSynced = true;
          this.stage = 'secondary';
          this.saveState();
          return { seq: this.channel.heartbeatSeq, boot: this.channel.boot };
        });
      case 'checkpoint':
        return this.serial(async () => {
          const t0 = performance.now();
          if (this.pair.role !== 'secondary')
            throw new BlockError(`${this.config.host.name} is not a secondary`);
          // The primary is drained: no replicated write is in flight.
          await this.repl.checkpointAll();
          this.bitmap.clear();
          this.protecting = true;
          this.pair.peerReplicatesHere();
          this.lastCheckpoint = { at: Date.now(), ms: performance.now() - t0 };
          this.checkpoints++;
          this.onCheckpoint?.(this.lastCheckpoint.ms);
        });
      case 'take-over':
        this.pair.peerLost(`${this.config.peer.name} stepped down`);
        this.cycle();
        return null;
      case 'step-down':
        await this.pair.stepDown();
        this.channel.beat();
        return null;
      default:
        throw new BlockError(`unknown peer request '${op}'`);
    }
  }

  private roleChanged(role: ColoRole, previous: ColoRole, reason: string): void {
    this.saveState();
    this.log('info', `role ${previous} -> ${role}`, { epoch: this.pair.epoch, reason });
    this.emit('COLO_ROLE_CHANGE', {
      pair: this.config.pair,
      host: this.config.host.name,
      role,
      previous,
      epoch: this.pair.epoch,
      reason,
    });
    this.channel.beat();
  }

  // ---- the monitor ----

  /** A checkpoint now (`colo-checkpoint`): the primary and its secondary in step. */
  checkpoint(): Promise<void> {
    return this.pair.checkpoint();
  }

  /**
   * A failover on request (`colo-failover`): a primary steps down and tells its secondary to take
   * over; a secondary asks its primary to step down, or takes over if the primary is gone.
   */
  async failover(): Promise<string> {
    const role = this.pair.role;
    if (role === 'primary') {
      await this.pair.stepDown();
      await this.channel.request('take-over').catch(() => {});
      return 'stepped down; the secondary takes over';
    }
    if (role === 'secondary') {
      if (!this.protecting)
        throw new BlockError('COLO failover: this secondary is not protecting a primary yet');
      const asked = await this.channel.request('step-down').then(
        () => true,
        () => false,
      );
      this.pair.peerLost(asked ? `${this.config.peer.name} stepped down` : 'failover on request');
      this.cycle();
      return 'taking over';
    }
    throw new BlockError(`COLO failover: nothing to fail over to from a ${role} side`);
  }

  status(): ColoStatus {
    const p = this.pair.peerState;
    const fence = this.graph.getNode(COLO_NODES.fence);
    const counters = fence ? fenceCounters(fence) : { acked: 0, refused: 0 };
    const job = this.resyncJob;
    const out: ColoStatus = {
      pair: this.config.pair,
      name: this.config.host.name,
      role: this.pair.role,
      epoch: this.pair.epoch,
      stage: this.stage,
      peer: {
        name: this.config.peer.name,
        alive: p.alive,
        ...(p.state ? { role: p.state.role, epoch: p.state.epoch, ready: p.state.ready } : {}),
      },
      'lease-valid': this.pair.canAcknowledgeWrites(),
      checkpoints: this.checkpoints,
      'peer-missing-bytes': this.bitmap?.count() ?? 0,
      'bitmap-trusted': this.bitmapTrusted(),
      'writes-acknowledged': counters.acked,
      'writes-refused': counters.refused,
      'last-cycle': this.lastCycle,
    };
    if (this.lastResync) out['last-resync'] = this.lastResync;
    if (this.lastCheckpoint) {
      out['last-checkpoint'] = {
        time: new Date(this.lastCheckpoint.at).toISOString(),
        'duration-ms': Math.round(this.lastCheckpoint.ms * 10) / 10,
      };
    }
    if (job) {
      const i = job.info();
      out.resync = { offset: i['current-progress'], len: i['total-progress'] };
    }
    return out;
  }

  /** Stops the loop and the channel, keeps the graph for the daemon's own shutdown. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.loop) clearInterval(this.loop);
    this.unsubscribe?.();
    await this.cycling;
    await this.channel.close();
    await this.tearDown().catch(() => {});
    await this.peerNbd.close();
    await this.guestNbd.close();
    if (this.config.tls) unregisterTlsCreds(TLS_CLIENT_ID);
    await this.arbiter.close();
  }
}
