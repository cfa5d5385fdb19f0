import {
  BlockBackend,
  BlockError,
  type BlockGraph,
  type BlockNode,
  type DirtyBitmap,
  findDirtyBitmap,
  PERM_ALL,
  Perm,
} from '@blockrep/block';
import {
  CONTEXT_ALLOCATION_DEPTH,
  CONTEXT_BASE_ALLOCATION,
  CONTEXT_DIRTY_BITMAP_PREFIX,
  MAX_PAYLOAD,
  MAX_STRING,
  TxFlag,
} from '../protocol';

/** A metadata context an export offers. */
export interface ExportContext {
  name: string;
  kind: 'base' | 'depth' | 'bitmap';
  bitmap?: DirtyBitmap;
}

/** What an export is made of (QEMU's block-export-add type=nbd / nbd-server-add arguments). */
export interface NbdExportOptions {
  /** The name clients ask for (default: the node name). */
  name?: string;
  /** Export id for block-export-* (default: the name). */
  id?: string;
  /** Free-form text sent with NBD_INFO_DESCRIPTION and NBD_OPT_LIST. */
  description?: string;
  /** The node to export, or its node-name / device name. */
  node: BlockNode | string;
  /** Allow writes (default: read-only). */
  writable?: boolean;
  /** Name of a dirty bitmap of the node to export as the `qemu:dirty-bitmap:<name>` context. */
  bitmap?: string;
  /** Several bitmaps, each its own context (block-export-add's `bitmaps`). */
  bitmaps?: string[];
  /** Offer `qemu:allocation-depth` (which layer of the backing chain holds each extent). */
  allocationDepth?: boolean;
  /** Every write is forced to stable storage before its reply (as if each had FUA). */
  writethrough?: boolean;
  /** Most clients connected to this export at once (default: no limit beyond the server's). */
  maxConnections?: number;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN (default on: all connections share one backend). */
  multiConn?: boolean;
}

/** An export as query-block-exports shows it. */
export interface NbdExportInfo {
  id: string;
  name: string;
  description: string | undefined;
  nodeName: string;
  writable: boolean;
  bitmaps: string[];
  clients: number;
  /** Shutting down: no new clients; deleted once the last one is gone. */
  shuttingDown: boolean;
}

/** The minimum, preferred and maximum block sizes advertised with NBD_INFO_BLOCK_SIZE. */
export interface BlockSizeConstraints {
  min: number;
  preferred: number;
  max: number;
}

/** The connection-side view of a client of an export (for hard removal). */
export interface ExportClient {
  /** Drops the connection now; resolves when its requests have finished. */
  abort(reason: string): Promise<void>;
}

/**
 * One exported node: a BlockBackend holding the node with the permissions the export needs, the
 * metadata contexts it offers, and the clients currently connected to it.
 */
export class NbdExport {
  readonly id: string;
  readonly name: string;
  readonly description: string | undefined;
  readonly writable: boolean;
  readonly backend: BlockBackend;
  /** The metadata contexts offered besides base:allocation. */
  readonly bitmaps: { name: string; bitmap: DirtyBitmap }[] = [];
  readonly allocationDepth: boolean;
  readonly writethrough: boolean;
  readonly maxConnections: number;
  readonly multiConn: boolean;
  readonly clients = new Set<ExportClient>();
  shuttingDown = false;
  private readonly nodeName: string;

  constructor(
    readonly graph: BlockGraph,
    opts: NbdExportOptions,
    /** Told when the node under the export goes away (the server then removes the export). */
    private readonly onNodeGone: (exp: NbdExport) => void,
  ) {
    const node = typeof opts.node === 'string' ? graph.lookup(opts.node) : opts.node;
    this.name = opts.name ?? node.nodeName;
    this.id = opts.id ?? this.name;
    if (Buffer.byteLength(this.name) > MAX_STRING) throw new BlockError('export name too long');
    if (opts.description !== undefined && Buffer.byteLength(opts.description) > MAX_STRING) {
      throw new BlockError('description too long');
    }
    this.description = opts.description;
    this.writable = opts.writable ?? false;
    this.maxConnections = opts.maxConnections ?? 0;
    this.multiConn = opts.multiConn ?? true;
    this.nodeName = node.nodeName;
    if (this.writable && node.readOnly) {
      throw new BlockError(`Cannot export read-only node '${node.nodeName}' as writable`, { errno: 'EPERM' });
    }
    for (const name of [...(opts.bitmap !== undefined ? [opts.bitmap] : []), ...(opts.bitmaps ?? [])]) {
      const bm = findDirtyBitmap(node, name);
      if (!bm) throw new BlockError(`Bitmap '${name}' is not found`);
      if (bm.inconsistent) throw new BlockError(`Bitmap '${name}' is inconsistent`);
      if (!this.bitmaps.some((b) => b.name === name)) this.bitmaps.push({ name, bitmap: bm });
    }
    this.allocationDepth = opts.allocationDepth ?? false;
    this.writethrough = opts.writethrough ?? false;
    this.backend = new BlockBackend(graph, {
      perm: Perm.CONSISTENT_READ | (this.writable ? Perm.WRITE : 0),
      shared: PERM_ALL,
      description: `NBD export '${this.name}'`,
    });
    this.backend.exportName = this.name;
    try {
      this.backend.attach(node);
    } catch (e) {
      this.backend.detach().catch(() => {});
      throw e;
    }
    for (const b of this.bitmaps) b.bitmap.busy = true;
    // The block core has no "node removed" notification: a detach from under us (graph shutdown)
    // drains first, so look at the backend once each drain has ended.
    this.backend.dev = {
      drainedEnd: () => {
        setImmediate(() => {
          if (!this.backend.root || this.backend.root.node.closed) this.onNodeGone(this);
        });
      },
    };
  }

  get node(): BlockNode | null {
    return this.backend.node;
  }

  /** Size of the export now (the node may have been resized since a client connected). */
  size(): number {
    return this.backend.getLength();
  }

  /** Transmission flags for a client (structured replies change what may be advertised). */
  transmissionFlags(structured: boolean): number {
    let f = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_CACHE;
    if (this.writable) f |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO;
    else f |= TxFlag.READ_ONLY;
    if (structured) f |= TxFlag.SEND_DF;
    if (this.multiConn) f |= TxFlag.CAN_MULTI_CONN;
    return f;
  }

  blockSizes(): BlockSizeConstraints {
    const limits = this.backend.node?.limits;
    const min = Math.max(1, limits?.requestAlignment ?? 1);
    const preferred = Math.max(min, 4096, limits?.optimalTransfer ?? 0);
    const maxTransfer = limits?.maxTransfer ?? MAX_PAYLOAD;
    // The largest payload, rounded down to the minimum block size.
    const max = Math.max(
      min,
      Math.min(MAX_PAYLOAD, maxTransfer) - (Math.min(MAX_PAYLOAD, maxTransfer) % min),
    );
    return { min, preferred: Math.min(preferred, max), max };
  }

  /** The metadata contexts this export offers. */
  contexts(): ExportContext[] {
    const out: ExportContext[] = [{ name: CONTEXT_BASE_ALLOCATION, kind: 'base' }];
    if (this.allocationDepth) out.push({ name: CONTEXT_ALLOCATION_DEPTH, kind: 'depth' });
    for (const b of this.bitmaps)
      out.push({ name: CONTEXT_DIRTY_BITMAP_PREFIX + b.name, kind: 'bitmap', bitmap: b.bitmap });
    return out;
  }

  /** Whether a new client may connect now. */
  acceptsClient(): boolean {
    return !this.shuttingDown && (this.maxConnections === 0 || this.clients.size < this.maxConnections);
  }

  info(): NbdExportInfo {
    return {
      id: this.id,
      name: this.name,
      description: this.description,
      nodeName: this.backend.node?.nodeName ?? this.nodeName,
      writable: this.writable,
      bitmaps: this.bitmaps.map((b) => b.name),
      clients: this.clients.size,
      shuttingDown: this.shuttingDown,
    };
  }

  /** Drops every client, then releases the node. */
  async shutdown(): Promise<void> {
    this.shuttingDown = true;
    await Promise.all([...this.clients].map((c) => c.abort('export removed')));
    for (const b of this.bitmaps) b.bitmap.busy = false;
    this.backend.dev = {};
    await this.backend.detach();
  }
}
