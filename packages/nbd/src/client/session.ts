import { BlockError } from '@blockrep/block';
import {
  NbdClientConnection,
  NbdConnectionLost,
  type NbdConnectOptions,
  type NbdExportDetails,
} from './connection';

export interface NbdSessionOptions extends NbdConnectOptions {
  /** Seconds requests wait for a reconnection before failing (QEMU's reconnect-delay). */
  reconnectDelay?: number;
  /** Seconds the first connection keeps being retried (QEMU's open-timeout). */
  openTimeout?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

/**
 * A client's connection to one export that survives the connection breaking: requests made
 * while it is down wait up to reconnect-delay seconds for a new one (and are resent on it), or
 * fail with EIO at once when reconnect-delay is 0.
 */
export class NbdClientSession {
  private conn: NbdClientConnection | null = null;
  details!: NbdExportDetails;
  private closing = false;
  private reconnecting: Promise<void> | null = null;
  /** When requests stop waiting for the reconnection (ms since epoch). */
  private waitUntil = 0;
  private connWaiters: (() => void)[] = [];
  private lastError: BlockError | null = null;

  constructor(readonly opts: NbdSessionOptions) {}

  /** The first connection, retried for open-timeout seconds. */
  async open(): Promise<void> {
    const deadline = Date.now() + (this.opts.openTimeout ?? 0) * 1000;
    for (;;) {
      try {
        this.adopt(await NbdClientConnection.connect(this.opts));
        this.details = this.conn!.details;
        return;
      } catch (e) {
        if (Date.now() >= deadline) throw e;
        await sleep(Math.min(1000, Math.max(10, deadline - Date.now())));
      }
    }
  }

  private adopt(c: NbdClientConnection): void {
    this.conn = c;
    c.onConnectionLost = (e) => this.connectionLost(c, e);
  }

  private connectionLost(c: NbdClientConnection, e: BlockError): void {
    if (this.conn !== c || this.closing) return;
    this.conn = null;
    this.lastError = e;
    this.waitUntil = Date.now() + (this.opts.reconnectDelay ?? 0) * 1000;
    this.reconnecting ??= this.reconnectLoop().finally(() => {
      this.reconnecting = null;
    });
  }

  private async reconnectLoop(): Promise<void> {
    let delay = 100;
    while (!this.closing && !this.conn) {
      try {
        const c = await NbdClientConnection.connect(this.opts);
        if (this.closing) {
          await c.disconnect();
          return;
        }
        if (c.details.size !== this.details.size) {
          await c.disconnect();
          throw new BlockError('NBD export size changed across the reconnection', { errno: 'EIO' });
        }
        this.adopt(c);
        const w = this.connWaiters.splice(0);
        for (const f of w) f();
        return;
      } catch (e) {
        this.lastError = e instanceof BlockError ? e : new BlockError(String(e), { errno: 'EIO' });
        // Requests that reached their deadline while we were trying fail now.
        this.wakeExpired();
        await sleep(delay);
        delay = Math.min(delay * 2, 4000);
      }
    }
  }

  private wakeExpired(): void {
    if (Date.now() >= this.waitUntil) for (const f of this.connWaiters.splice(0)) f();
  }

  /** The live connection, waiting for a reconnection within reconnect-delay. */
  private async connection(): Promise<NbdClientConnection> {
    for (;;) {
      if (this.conn?.alive) return this.conn;
      if (this.closing) throw new BlockError('NBD client is closed', { errno: 'EIO' });
      const left = this.waitUntil - Date.now();
      if (left <= 0) {
        throw new BlockError(`NBD server unreachable: ${this.lastError?.message ?? 'connection closed'}`, {
          errno: 'EIO',
        });
      }
      await new Promise<void>((r) => {
        this.connWaiters.push(r);
        setTimeout(r, left).unref();
      });
    }
  }

  /** Runs a request, resending it on a new connection if the connection breaks under it. */
  async run<T>(fn: (c: NbdClientConnection) => Promise<T>): Promise<T> {
    const c = this.conn;
    // The common case: connected; no extra promise layers.
    if (c?.alive) {
      try {
        return await fn(c);
      } catch (e) {
        if (!(e instanceof NbdConnectionLost) || this.closing) throw e;
      }
    }
    for (;;) {
      const conn = await this.connection();
      try {
        return await fn(conn);
      } catch (e) {
        if (!(e instanceof NbdConnectionLost) || this.closing) throw e;
      }
    }
  }

  /** Disconnects (soft when possible) and stops reconnecting. */
  async close(): Promise<void> {
    this.closing = true;
    for (const f of this.connWaiters.splice(0)) f();
    const c = this.conn;
    this.conn = null;
    await c?.disconnect();
  }

  /** Drops the current connection as if the network failed (tests). */
  breakConnection(): void {
    this.conn?.destroy();
  }
}
