import { createRequire } from 'node:module';
import { noop } from 'cockatiel';
import type { Etcd3, IDuplexStream, ILeaseKeepAliveRequest, ILeaseKeepAliveResponse } from 'etcd3';
import { withDeadline } from '../deadline';
import { type Arbiter, type ArbiterLease, ArbiterUnavailable } from './arbiter';

/*
 * The etcd arbiter (across hosts; Patroni's etcd DCS reduced to one key): the leader key
 * `<prefix><pair>/leader` is bound to an etcd lease of `ttl` seconds, so it vanishes on its own
 * when its holder stops renewing; `<prefix><pair>/epoch` counts the holders. Taking the key and
 * bumping the epoch is one transaction that succeeds only if the key is absent and the epoch
 * unchanged, so two sides can never both take it. Every call has a deadline: an arbiter that
 * does not answer in time is unavailable, and then nobody may act as if they held the lease.
 */

/**
 * etcd3 (with gRPC and protobufjs under it) is loaded when the first etcd arbiter is made, not
 * when the package is: measured, loading it took 137 ms and 23.5 MiB of resident memory, which
 * every blockrepd paid at start-up whether or not its pair uses etcd.
 */
const loadEtcd3 = () => createRequire(import.meta.url)('etcd3') as typeof import('etcd3');

export interface EtcdArbiterOptions {
  endpoints: string[];
  /** The pair's name: its keys live under `<prefix><pair>/`. */
  pair: string;
  prefix?: string;
  /** Lease time-to-live in milliseconds (etcd counts whole seconds: rounded up). */
  leaseTtl: number;
  /** Deadline of each call to etcd (default: a third of the lease, at most 2 s). */
  callTimeout?: number;
}

interface LeaderValue {
  holder: string;
  epoch: number;
}

export class EtcdArbiter implements Arbiter {
  readonly kind = 'etcd';
  private readonly client: Etcd3;
  private readonly leaderKey: string;
  private readonly epochKey: string;
  private readonly ttlSeconds: number;
  private readonly ttl: number;
  private readonly callTimeout: number;
  /** The etcd lease this process holds the leader key with, while it thinks it does. */
  private held: { leaseId: string; holder: string; epoch: number } | null = null;
  /** One keepalive stream, reused for every renewal (answers come in order). */
  private keepaliveStream: KeepaliveStream | null = null;

  constructor(opts: EtcdArbiterOptions) {
    const prefix = opts.prefix ?? '/blockrep/colo/';
    this.leaderKey = `${prefix}${opts.pair}/leader`;
    this.epochKey = `${prefix}${opts.pair}/epoch`;
    this.ttlSeconds = Math.max(1, Math.ceil(opts.leaseTtl / 1000));
    this.ttl = this.ttlSeconds * 1000;
    this.callTimeout = opts.callTimeout ?? Math.min(2000, Math.floor(this.ttl / 3));
    this.client = new (loadEtcd3().Etcd3)({
      hosts: opts.endpoints,
      dialTimeout: this.callTimeout,
      defaultCallOptions: () => ({ deadline: Date.now() + this.callTimeout }),
      // The pair retries every heartbeat on its own: no client-side retries, and no circuit
      // breaker that would keep a restarted etcd unused for seconds (past a lease).
      faultHandling: { host: () => noop, global: noop },
      grpcOptions: { 'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 500 },
    });
  }

  acquire(holder: string): Promise<ArbiterLease | null> {
    return this.call('acquire', async () => {
      if (this.held?.holder === holder) {
        const renewed = await this.renew(this.held);
        if (renewed) return renewed;
        this.held = null;
      }
      return this.take(holder);
    });
  }

  read(): Promise<ArbiterLease | null> {
    return this.call('read', async () => {
      const v = await this.readLeader();
      return v ? { holder: v.holder, epoch: v.epoch, ttl: this.ttl } : null;
    });
  }

  release(holder: string): Promise<void> {
    return this.call('release', async () => {
      const h = this.held;
      if (h?.holder !== holder) return;
      this.held = null;
      const value = JSON.stringify({ holder, epoch: h.epoch } satisfies LeaderValue);
      await this.client
        .if(this.leaderKey, 'Value', '==', value)
        .then(this.client.delete().key(this.leaderKey))
        .commit();
      await this.client.leaseClient.leaseRevoke({ ID: h.leaseId }).catch(() => {});
    });
  }

  async close(): Promise<void> {
    this.keepaliveStream?.close();
    this.keepaliveStream = null;
    this.client.close();
  }

  /**
   * Keeps the held lease alive. Null when etcd says the lease is gone (expired, revoked) or the
   * key is no longer ours; an etcd that cannot be reached throws, and the lease is kept for the
   * next try: it may well still be valid there.
   */
  private async renew(h: NonNullable<EtcdArbiter['held']>): Promise<ArbiterLease | null> {
    if (!this.keepaliveStream?.open) {
      this.keepaliveStream = new KeepaliveStream(await this.client.leaseClient.leaseKeepAlive());
    }
    const ttl = await this.keepaliveStream.keepalive(h.leaseId, this.callTimeout);
    if (ttl <= 0) return null;
    const cur = await this.readLeader();
    if (cur?.holder !== h.holder || cur.epoch !== h.epoch) return null;
    return { holder: h.holder, epoch: h.epoch, ttl: this.ttl };
  }

  /** Takes the leader key if nobody holds it, with the next epoch. */
  private async take(holder: string): Promise<ArbiterLease | null> {
    if (await this.readLeader()) return null;
    const epochText = await this.client.get(this.epochKey).string();
    const epoch = Number(epochText ?? 0) + 1;
    const id = (await this.client.leaseClient.leaseGrant({ TTL: this.ttlSeconds, ID: 0 })).ID;
    const value = JSON.stringify({ holder, epoch } satisfies LeaderValue);
    let txn = this.client.if(this.leaderKey, 'Create', '==', 0);
    txn =
      epochText === null
        ? txn.and(this.epochKey, 'Create', '==', 0)
        : txn.and(this.epochKey, 'Value', '==', epochText);
    const res = await txn
      .then(
        this.client.put(this.leaderKey).value(value).lease(id),
        this.client.put(this.epochKey).value(String(epoch)),
      )
      .commit();
    if (!res.succeeded) {
      await this.client.leaseClient.leaseRevoke({ ID: id }).catch(() => {});
      return null;
    }
    this.held = { leaseId: id, holder, epoch };
    return { holder, epoch, ttl: this.ttl };
  }

  private async readLeader(): Promise<LeaderValue | null> {
    const text = await this.client.get(this.leaderKey).string();
    if (text === null) return null;
    try {
      const v = JSON.parse(text) as LeaderValue;
      if (typeof v.holder === 'string' && typeof v.epoch === 'number') return v;
    } catch {
      // fall through
    }
    throw new ArbiterUnavailable(this.kind, `${this.leaderKey} holds something else: ${text.slice(0, 80)}`);
  }

  /** Runs one arbiter operation within the call deadline; any failure means unavailable. */
  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      // Several etcd calls make one operation: the whole of it gets twice one call's deadline.
      timer = setTimeout(
        () =>
          reject(
            new ArbiterUnavailable(this.kind, `${what} got no answer within ${2 * this.callTimeout} ms`),
          ),
        2 * this.callTimeout,
      );
    });
    try {
      return await Promise.race([fn(), deadline]);
    } catch (e) {
      if (e instanceof ArbiterUnavailable) throw e;
      throw new ArbiterUnavailable(this.kind, `${what}: ${(e as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** An etcd LeaseKeepAlive stream: each request's answer is the lease's remaining TTL in seconds. */
class KeepaliveStream {
  open = true;
  private readonly waiters: { resolve: (ttl: number) => void; reject: (e: Error) => void }[] = [];

  constructor(private readonly stream: IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>) {
    stream.on('data', (res) => this.waiters.shift()?.resolve(Number(res.TTL)));
    stream.on('error', (e: Error) => this.fail(e));
    stream.on('end', () => this.fail(new Error('keepalive stream ended')));
  }

  /** The lease's remaining TTL; a stream that does not answer within `timeout` is done for. */
  keepalive(leaseId: string, timeout: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => this.fail(new Error(`no keepalive answer within ${timeout} ms`)),
        timeout,
      );
      this.waiters.push(withDeadline(timer, resolve, reject));
      this.stream.write({ ID: leaseId });
    });
  }

  /** Every waiting renewal fails, and the stream is not used again (answers could be out of step). */
  private fail(e: Error): void {
    if (this.open) this.close();
    for (const w of this.waiters.splice(0)) w.reject(e);
  }

  close(): void {
    this.open = false;
    try {
      this.stream.end();
    } catch {
      // already broken
    }
  }
}
