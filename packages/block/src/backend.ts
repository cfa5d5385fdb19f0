import { IoStats, ioDone, ioStart } from './accounting';
import type { BlockStatus, TruncateOptions } from './driver';
import { BlockError } from './errors';
import type { BlockGraph } from './graph';
import * as io from './io';
import { type IoVec, iovLength } from './iov';
import type { BlockChild, BlockNode } from './node';
import { PERM_ALL } from './perm';

/** What the user of a BlockBackend (an export, a job) is told about its node. */
export interface BackendDevOps {
  /** A drain began: stop submitting new requests (queued ones wait anyway). */
  drainedBegin?(): void;
  drainedEnd?(): void;
  /** The node's length changed. */
  resized?(): void;
}

export interface BackendOptions {
  /** Permissions taken on the root node (Perm flags). */
  perm: number;
  /** Permissions shared with the root node's other users (default: all). */
  shared?: number;
  /** A device name (unique; shares the node-name namespace). */
  name?: string;
  /** How errors name this user, e.g. "NBD export 'disk0'" (default "block device 'name'"). */
  description?: string;
  /** Requests go on during a drain (jobs that drain their own nodes). */
  allowDrainedIo?: boolean;
  /** Allow I/O past the end of the node (growing the image). */
  allowBeyondEof?: boolean;
}

/**
 * A non-node parent of a root node (QEMU's BlockBackend): an export, a job or a test holding a
 * node with its own permissions. Requests through it are range-checked and wait out drains.
 */
export class BlockBackend {
  readonly kind = 'backend' as const;
  /** Requests finished through this backend, per operation (an NBD export's figures). */
  readonly ioStats = new IoStats();
  /** The export this backend serves, if it is an export's (metrics name it so). */
  exportName: string | undefined;
  root: BlockChild | null = null;
  perm: number;
  shared: number;
  readonly name: string | undefined;
  inFlight = 0;
  dev: BackendDevOps = {};
  private quiesced = 0;
  private queued: (() => void)[] = [];
  private readonly description: string | undefined;
  private readonly allowDrainedIo: boolean;
  private readonly allowBeyondEof: boolean;

  constructor(
    readonly graph: BlockGraph,
    opts: BackendOptions,
  ) {
    if (opts.name !== undefined) graph.checkBackendName(opts.name);
    this.perm = opts.perm;
    this.shared = opts.shared ?? PERM_ALL;
    this.name = opts.name;
    this.description = opts.description;
    this.allowDrainedIo = opts.allowDrainedIo ?? false;
    this.allowBeyondEof = opts.allowBeyondEof ?? false;
    graph.backends.add(this);
  }

  describe(): string {
    if (this.description) return this.description;
    return this.name ? `block device '${this.name}'` : 'an unnamed block device';
  }

  get node(): BlockNode | null {
    return this.root?.node ?? null;
  }

  private requireNode(): BlockNode {
    const n = this.root?.node;
    if (!n) throw new BlockError('No medium found', { errno: 'ENOMEDIUM' });
    return n;
  }

  /** Attaches the backend to a node, taking its permissions (throws, changing nothing, on conflict). */
  attach(node: BlockNode): void {
    if (this.root)
      throw new BlockError(`${this.describe()} is already attached to node '${this.root.node.nodeName}'`);
    this.root = this.graph.update((tx) => {
      const c = tx.addChild(this, node, 'root', 0);
      c.perm = this.perm;
      c.shared = this.shared;
      return c;
    });
  }

  /** Detaches from the node (closing it if nothing else uses it) and forgets the backend. */
  async detach(): Promise<void> {
    const root = this.root;
    if (root) {
      await this.graph.drained(root.node, () => {});
      this.graph.update((tx) => tx.removeChild(root));
      this.root = null;
    }
    this.graph.backends.delete(this);
    await this.graph.collectGarbage();
  }

  /** Changes the permissions the backend takes and shares (transactional). */
  setPerm(perm: number, shared: number): void {
    this.graph.update((tx) => tx.setBackendPerm(this, perm, shared));
  }

  // drain hooks, called by the graph
  quiesce(): void {
    if (this.quiesced++ === 0) this.dev.drainedBegin?.();
  }

  unquiesce(): void {
    if (this.quiesced === 0) return;
    if (--this.quiesced === 0) {
      this.dev.drainedEnd?.();
      const q = this.queued;
      this.queued = [];
      for (const f of q) f();
    }
  }

  resized(): void {
    this.dev.resized?.();
  }

  getLength(): number {
    return this.requireNode().length;
  }

  private async enter(): Promise<BlockChild> {
    while (this.quiesced > 0 && !this.allowDrainedIo) {
      await new Promise<void>((r) => this.queued.push(r));
    }
    const root = this.root;
    if (!root) throw new BlockError('No medium found', { errno: 'ENOMEDIUM' });
    this.inFlight++;
    return root;
  }

  private leave(): void {
    if (--this.inFlight === 0) this.graph.notifyIdle();
  }

  /** Checked after enter(): a request held by a drain sees the length as the drain left it. */
  private checkRange(offset: number, bytes: number): void {
    const len = this.requireNode().length;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
      throw new BlockError(`Invalid request: offset ${offset}, length ${bytes}`, { errno: 'EIO' });
    }
    if (!this.allowBeyondEof && (offset > len || bytes > len - offset)) {
      throw new BlockError(
        `Request at offset ${offset} of ${bytes} bytes is past the end of the image (length ${len})`,
        { errno: 'EIO' },
      );
    }
  }

  async read(offset: number, bytes: number, flags = 0): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    await this.readv(offset, [buf], flags);
    return buf;
  }

  async readv(offset: number, iov: IoVec, flags = 0): Promise<void> {
    const bytes = iovLength(iov);
    const root = await this.enter();
    const t0 = ioStart();
    let failed = true;
    try {
      this.checkRange(offset, bytes);
      await io.readv(root, offset, bytes, iov, flags);
      failed = false;
    } finally {
      this.leave();
      ioDone(this, 'read', bytes, t0, failed);
    }
  }

  async write(offset: number, data: Buffer | IoVec, flags = 0): Promise<void> {
    const iov = Buffer.isBuffer(data) ? [data] : data;
    const bytes = iovLength(iov);
    const root = await this.enter();
    const t0 = ioStart();
    let failed = true;
    try {
      this.checkRange(offset, bytes);
      await io.writev(root, offset, bytes, iov, flags);
      failed = false;
    } finally {
      this.leave();
      ioDone(this, 'write', bytes, t0, failed);
    }
  }

  /** Copy-on-read of a range (block-stream): what the node's backing chain holds becomes the node's own. */
  async copyOnRead(offset: number, bytes: number): Promise<void> {
    const root = await this.enter();
    try {
      this.checkRange(offset, bytes);
      await io.copyOnRead(root, offset, bytes);
    } finally {
      this.leave();
    }
  }

  async writeZeroes(offset: number, bytes: number, flags = 0): Promise<void> {
    const root = await this.enter();
    const t0 = ioStart();
    let failed = true;
    try {
      this.checkRange(offset, bytes);
      await io.writeZeroes(root, offset, bytes, flags);
      failed = false;
    } finally {
      this.leave();
      ioDone(this, 'zero', bytes, t0, failed);
    }
  }

  async discard(offset: number, bytes: number): Promise<void> {
    const root = await this.enter();
    const t0 = ioStart();
    let failed = true;
    try {
      this.checkRange(offset, bytes);
      await io.discard(root, offset, bytes);
      failed = false;
    } finally {
      this.leave();
      ioDone(this, 'discard', bytes, t0, failed);
    }
  }

  async flush(): Promise<void> {
    const root = await this.enter();
    const t0 = ioStart();
    let failed = true;
    try {
      await io.flush(root.node);
      failed = false;
    } finally {
      this.leave();
      ioDone(this, 'flush', 0, t0, failed);
    }
  }

  async truncate(length: number, opts?: Partial<TruncateOptions>): Promise<void> {
    const root = await this.enter();
    try {
      await io.truncate(root, length, opts);
    } finally {
      this.leave();
    }
  }

  async makeEmpty(): Promise<void> {
    const root = await this.enter();
    try {
      await io.makeEmpty(root);
    } finally {
      this.leave();
    }
  }

  /** Content status of the image as seen through the whole chain (data / zero / hole). */
  blockStatus(offset: number, bytes: number): Promise<BlockStatus & { depth: number }> {
    return io.blockStatusAbove(this.requireNode(), null, offset, bytes);
  }
}
