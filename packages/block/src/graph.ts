import type { BlockBackend } from './backend';
import { BlockOp, blockAllOps, opBlocked, unblockAllOps, unblockOp } from './blockers';
import type { BlockDriver, OpenContext, ReopenState } from './driver';
import { BlockError, toBlockError } from './errors';
import * as io from './io';
import { BlockChild, BlockNode, type BlockParent } from './node';
import { type OptionSchema, type Options, opt, parseKeyVal, validateOptions } from './options';
import { ChildRole, defaultChildPerm, PERM_ALL, Perm, permNames } from './perm';

/** Options every node accepts, whatever its driver (QAPI's BlockdevOptions base). */
export const COMMON_OPTIONS: OptionSchema = {
  driver: opt.string('Block driver name', { required: true }),
  'node-name': opt.string('The node name (letter first, then letters, digits, -, _, .; at most 31)'),
  discard: opt.enum(['ignore', 'unmap'], 'Discard requests: ignore (default) or pass them down', {
    default: undefined,
  }),
  cache: opt.struct(
    {
      direct: opt.bool('Bypass the host page cache (not supported: must be off)'),
      'no-flush': opt.bool('Ignore flush requests (unsafe)'),
    },
    'Cache mode options',
  ),
  'read-only': opt.bool('Open the node read-only'),
  'auto-read-only': opt.bool('Fall back to read-only when read-write is not possible'),
  'force-share': opt.bool('Share all permissions (requires read-only)'),
  'detect-zeroes': opt.enum(['off', 'on', 'unmap'], 'Turn writes of zero buffers into zero writes'),
};

/** What a backing file's overlay leaves allowed on it (QEMU's bdrv_backing_attach). */
const BACKING_ALLOWED_OPS = [
  BlockOp.COMMIT_TARGET,
  BlockOp.STREAM,
  BlockOp.BACKUP_SOURCE,
  BlockOp.BACKUP_TARGET,
] as const;

/** QEMU's bdrv_get_device_or_node_name: the first named backend on the node, else its node name. */
function deviceOrNodeName(node: BlockNode): string {
  for (const p of node.parents) if (p.parent.kind === 'backend' && p.parent.name) return p.parent.name;
  return node.nodeName;
}

const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/** Options a nested child inherits from its parent unless it sets them itself. */
interface Inherited {
  readOnly: boolean;
  autoReadOnly: boolean;
  discard?: string;
  noFlush?: boolean;
  /** The nodes whose open is in progress above this one, outermost first. */
  opening?: readonly BlockNode[];
}

/** The changes of one graph transaction, undone in reverse if permissions do not work out. */
export class GraphTransaction {
  readonly undo: (() => void)[] = [];
  /**
   * The nodes whose parents, children or flags this transaction changed: only they and what lies
   * below them can get other permissions, so only that part of the graph is recomputed.
   */
  readonly touched = new Set<BlockNode>();

  constructor(readonly graph: BlockGraph) {}

  private touch(p: BlockParent | BlockNode): void {
    if (p.kind === 'node') this.touched.add(p);
  }

  /**
   * A backing file is busy for its overlay (QEMU's backing blocker): every operation on it is
   * refused ("node is used as backing hd of 'top'") but committing into it, streaming, and backup
   * from or to it.
   */
  private blockBacking(c: BlockChild): void {
    if (c.parent.kind !== 'node' || !(c.role & ChildRole.COW)) return;
    const reason = new Error(`node is used as backing hd of '${deviceOrNodeName(c.parent)}'`);
    c.backingBlocker = reason;
    const node = c.node;
    blockAllOps(node, reason);
    for (const op of BACKING_ALLOWED_OPS) unblockOp(node, op, reason);
    this.undo.push(() => {
      unblockAllOps(node, reason);
      c.backingBlocker = undefined;
    });
  }

  private unblockBacking(c: BlockChild): void {
    const reason = c.backingBlocker;
    if (!reason) return;
    const node = c.node;
    unblockAllOps(node, reason);
    c.backingBlocker = undefined;
    this.undo.push(() => {
      blockAllOps(node, reason);
      for (const op of BACKING_ALLOWED_OPS) unblockOp(node, op, reason);
      c.backingBlocker = reason;
    });
  }

  addChild(parent: BlockParent, node: BlockNode, name: string, role: number): BlockChild {
    if (parent.kind === 'node') this.graph.checkNoCycle(parent, node);
    this.touch(parent);
    this.touch(node);
    const c = new BlockChild(parent, node, name, role);
    if (parent.kind === 'node') parent.children.push(c);
    node.parents.push(c);
    this.undo.push(() => {
      if (parent.kind === 'node') remove(parent.children, c);
      remove(node.parents, c);
    });
    this.blockBacking(c);
    return c;
  }

  removeChild(c: BlockChild): void {
    const parent = c.parent;
    this.touch(parent);
    this.touch(c.node);
    this.unblockBacking(c);
    const ci = parent.kind === 'node' ? parent.children.indexOf(c) : -1;
    const pi = c.node.parents.indexOf(c);
    if (parent.kind === 'node' && ci >= 0) parent.children.splice(ci, 1);
    if (pi >= 0) c.node.parents.splice(pi, 1);
    this.graph.noteMaybeOrphan(c.node);
    this.undo.push(() => {
      if (parent.kind === 'node' && ci >= 0) parent.children.splice(ci, 0, c);
      if (pi >= 0) c.node.parents.splice(pi, 0, c);
    });
  }

  /** Points an existing edge at another node (QEMU's bdrv_replace_child). */
  setChildNode(c: BlockChild, node: BlockNode): void {
    if (c.parent.kind === 'node') this.graph.checkNoCycle(c.parent, node);
    const old = c.node;
    this.touch(c.parent);
    this.touch(old);
    this.touch(node);
    this.unblockBacking(c);
    const pi = old.parents.indexOf(c);
    old.parents.splice(pi, 1);
    node.parents.push(c);
    c.node = node;
    this.graph.noteMaybeOrphan(old);
    this.undo.push(() => {
      remove(node.parents, c);
      old.parents.splice(pi, 0, c);
      c.node = old;
    });
    this.blockBacking(c);
  }

  setReadOnly(node: BlockNode, readOnly: boolean): void {
    this.touch(node);
    const old = node.readOnly;
    node.readOnly = readOnly;
    this.undo.push(() => {
      node.readOnly = old;
    });
  }

  setBackendPerm(blk: BlockBackend, perm: number, shared: number): void {
    const [op, os] = [blk.perm, blk.shared];
    const root = blk.root;
    const [rp, rs] = root ? [root.perm, root.shared] : [0, 0];
    blk.perm = perm;
    blk.shared = shared;
    if (root) {
      this.touch(root.node);
      root.perm = perm;
      root.shared = shared;
    }
    this.undo.push(() => {
      blk.perm = op;
      blk.shared = os;
      if (root) {
        root.perm = rp;
        root.shared = rs;
      }
    });
  }
}

function remove<T>(arr: T[], x: T): void {
  const i = arr.indexOf(x);
  if (i >= 0) arr.splice(i, 1);
}

/**
 * The block graph: drivers, nodes by name, BlockBackends, and every operation that changes the
 * graph. Each change recomputes permissions as one transaction that rolls back on conflict.
 */
export class BlockGraph {
  private readonly drivers = new Map<string, BlockDriver>();
  private readonly nodes = new Map<string, BlockNode>();
  readonly backends = new Set<BlockBackend>();
  private autoCounter = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly eventListeners = new Set<(name: string, data: Record<string, unknown>) => void>();
  private maybeOrphans = new Set<BlockNode>();
  private readonly drains = new Map<BlockNode, { nodes: Set<BlockNode>; backends: Set<BlockBackend> }[]>();

  constructor(drivers: BlockDriver[] = []) {
    for (const d of drivers) this.registerDriver(d);
  }

  registerDriver(d: BlockDriver): void {
    this.drivers.set(d.name, d);
  }

  driver(name: string): BlockDriver | undefined {
    return this.drivers.get(name);
  }

  driverNames(): string[] {
    return [...this.drivers.keys()].sort();
  }

  /** All nodes, in the order they were opened. */
  allNodes(): BlockNode[] {
    return [...this.nodes.values()];
  }

  /** Nodes nobody uses as a child (roots of the graph). */
  rootNodes(): BlockNode[] {
    return this.allNodes().filter((n) => !n.parents.some((p) => p.parent.kind === 'node'));
  }

  getNode(name: string): BlockNode | undefined {
    return this.nodes.get(name);
  }

  /** Finds a node by node-name, or the root of a named BlockBackend (QEMU's bdrv_lookup_bs). */
  lookup(name: string): BlockNode {
    return this.lookupBs(name, name);
  }

  /**
   * QEMU's bdrv_lookup_bs: the root of the backend named `device`, else the node named
   * `nodeName` (either may be left out; backend and node names share one namespace).
   */
  lookupBs(device: string | undefined, nodeName: string | undefined): BlockNode {
    const n =
      (device !== undefined ? this.backendByName(device)?.node : undefined) ??
      (nodeName !== undefined ? this.nodes.get(nodeName) : undefined);
    // QEMU reports a GenericError.
    if (!n) throw new BlockError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
    return n;
  }

  /** Finds a node by node-name only. */
  findNode(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) throw new BlockError(`Cannot find node ${name}`, { errorClass: 'DeviceNotFound' });
    return n;
  }

  backendByName(name: string): BlockBackend | undefined {
    for (const b of this.backends) if (b.name === name) return b;
    return undefined;
  }

  /** Reserves a backend name (names share one namespace with node names). */
  checkBackendName(name: string): void {
    if (!NODE_NAME_RE.test(name)) throw new BlockError(`Invalid device name '${name}'`);
    if (this.backendByName(name)) throw new BlockError(`Device with id '${name}' already exists`);
    if (this.nodes.has(name)) {
      throw new BlockError(`Device name '${name}' conflicts with an existing node name`);
    }
  }

  private assignNodeName(name: string | undefined): { name: string; auto: boolean } {
    if (name === undefined) {
      let n: string;
      do n = `#block${++this.autoCounter}`;
      while (this.nodes.has(n));
      return { name: n, auto: true };
    }
    if (!NODE_NAME_RE.test(name)) throw new BlockError(`Invalid node-name: '${name}'`);
    if (this.backendByName(name)) throw new BlockError(`node-name=${name} is conflicting with a device id`);
    if (this.nodes.has(name)) {
      throw new BlockError(`Duplicate nodes with node-name='${name}'`);
    }
    if (name.length >= 32) throw new BlockError('Node name too long');
    return { name, auto: false };
  }

  /**
   * Opens a node from QEMU-style options (an object, or dotted key=value text). The node is
   * owned by the caller until closed with `close()` / `blockdevDel()`.
   */
  async open(input: Options | string): Promise<BlockNode> {
    const options = typeof input === 'string' ? parseKeyVal(input) : input;
    const node = await this.openNode(options, { readOnly: false, autoReadOnly: false });
    node.monitorOwned = true;
    node.extraRefs--;
    return node;
  }

  /** blockdev-add: like open(), but the root node must be named. */
  async blockdevAdd(options: Options): Promise<BlockNode> {
    this.checkBlockdevSchema(options, '');
    if (typeof options['node-name'] !== 'string') {
      throw new BlockError("'node-name' must be specified for the root node");
    }
    return this.open(options);
  }

  /**
   * blockdev-add's schema check, before any driver opens anything (QEMU's QAPI visitor): every
   * node of the tree against its driver's options, errors naming the member by its full path
   * ("Parameter 'file.bogus' is unexpected", "Parameter 'mode' is missing").
   */
  private checkBlockdevSchema(input: unknown, prefix: string): void {
    if (typeof input !== 'object' || input === null || Array.isArray(input)) return; // a node name
    const o = input as Options;
    const name = o.driver;
    if (name === undefined) throw new BlockError(`Parameter '${prefix}driver' is missing`);
    if (typeof name !== 'string') {
      throw new BlockError(`Invalid parameter type for '${prefix}driver', expected: string`);
    }
    const drv = this.drivers.get(name);
    if (!drv) throw new BlockError(`Parameter '${prefix}driver' does not accept value '${name}'`);
    const schema = { ...COMMON_OPTIONS, ...drv.options };
    validateOptions(schema, o, { prefix, skipDefaults: true });
    for (const [key, spec] of Object.entries(schema)) {
      const v = o[key];
      if (spec.type.kind === 'child') this.checkBlockdevSchema(v, `${prefix}${key}.`);
      else if (spec.type.kind === 'children' && Array.isArray(v)) {
        for (const [i, c] of v.entries()) this.checkBlockdevSchema(c, `${prefix}${key}.${i}.`);
      }
    }
  }

  /** blockdev-del: closes a node added by blockdev-add, if nothing uses it. */
  async blockdevDel(name: string): Promise<void> {
    const node = this.nodes.get(name);
    if (!node) throw new BlockError(`Failed to find node with node-name='${name}'`);
    if (node.hasBackend()) throw new BlockError(`Node ${name} is in use`);
    const blocked = opBlocked(node, BlockOp.DRIVE_DEL);
    if (blocked) throw blocked;
    if (!node.monitorOwned) throw new BlockError(`Node ${name} is not owned by the monitor`);
    if (node.refcnt > 1) throw new BlockError(`Block device ${name} is in use`);
    node.monitorOwned = false;
    await this.closeNode(node);
  }

  /** Releases the caller's ownership of a node opened with open(); closes it when unused. */
  async close(node: BlockNode): Promise<void> {
    node.monitorOwned = false;
    this.noteMaybeOrphan(node);
    await this.collectGarbage();
  }

  /** Opens a node; it comes back with one extra reference the caller must drop. */
  private async openNode(input: Options, inherit: Inherited): Promise<BlockNode> {
    if (typeof input !== 'object' || input === null || Array.isArray(input)) {
      throw new BlockError('Block node options must be an object');
    }
    // As bdrv_open does for -drive style options: a bare filename means the file protocol.
    if (input.driver === undefined && typeof input.filename === 'string')
      input = { driver: 'file', ...input };
    const driverName = input.driver;
    if (driverName === undefined) throw new BlockError("Parameter 'driver' is missing");
    if (typeof driverName !== 'string') {
      throw new BlockError("Invalid parameter type for 'driver', expected: string");
    }
    const drv = this.drivers.get(driverName);
    if (!drv) throw new BlockError(`Parameter 'driver' does not accept value '${driverName}'`);
    const schema = { ...COMMON_OPTIONS, ...drv.options };
    const opts = validateOptions(schema, input, {
      unknownKey: (path) =>
        new BlockError(
          drv.protocol
            ? `Block protocol '${drv.name}' doesn't support the option '${path}'`
            : `Block format '${drv.name}' does not support the option '${path}'`,
        ),
    });
    const cache = (opts.cache ?? {}) as { direct?: boolean; 'no-flush'?: boolean };
    if (cache.direct) throw new BlockError('cache.direct=on is not supported by blockrep');
    const readOnly = (opts['read-only'] as boolean | undefined) ?? inherit.readOnly;
    const forceShare = (opts['force-share'] as boolean | undefined) ?? false;
    if (forceShare && !readOnly)
      throw new BlockError('force-share=on can only be used with read-only images');
    const { name, auto } = this.assignNodeName(opts['node-name'] as string | undefined);
    const discard = (opts.discard as string | undefined) ?? inherit.discard ?? 'ignore';
    const node = new BlockNode(this, drv, name, auto, opts, {
      readOnly,
      autoReadOnly: (opts['auto-read-only'] as boolean | undefined) ?? inherit.autoReadOnly,
      discardUnmap: discard === 'unmap',
      detectZeroes: (opts['detect-zeroes'] as 'off' | 'on' | 'unmap' | undefined) ?? 'off',
      noFlush: cache['no-flush'] ?? inherit.noFlush ?? false,
      forceShare,
    });
    if (node.detectZeroes === 'unmap' && !node.discardUnmap) {
      throw new BlockError(
        'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap',
      );
    }
    // Registered from the start so that permission refreshes see the edges to its children.
    node.extraRefs = 1;
    this.nodes.set(name, node);
    const opening = [...(inherit.opening ?? []), node];
    const ctx: OpenContext = {
      graph: this,
      opening,
      openChild: (childName, ref, role, o) =>
        this.openChild(node, childName, ref, role, o?.optional ?? false, opening),
    };
    try {
      const driverOpts: Options = {};
      for (const k of Object.keys(drv.options)) if (opts[k] !== undefined) driverOpts[k] = opts[k];
      await drv.open(node, driverOpts, ctx);
      node.limits = { ...node.limits, ...drv.limits?.(node) };
      node.length = await drv.getLength(node);
    } catch (e) {
      // Undo a half-done open: drop the children it attached (closing the ones it created).
      this.update((tx) => {
        for (const c of [...node.children]) tx.removeChild(c);
      });
      node.closed = true;
      this.nodes.delete(name);
      await drv.close?.(node).catch(() => {});
      await this.collectGarbage();
      throw toBlockError(e);
    }
    return node;
  }

  private async openChild(
    parent: BlockNode,
    name: string,
    ref: unknown,
    role: number,
    optional: boolean,
    opening: readonly BlockNode[],
  ): Promise<BlockChild | null> {
    if (ref === undefined || ref === null) {
      if (optional) return null;
      throw new BlockError(`A block device must be specified for "${name}"`);
    }
    let child: BlockNode;
    let created = false;
    if (typeof ref === 'string') {
      child = this.lookup(ref);
      child.extraRefs++;
    } else {
      const inherit: Inherited = {
        readOnly: role & ChildRole.COW ? true : parent.readOnly,
        autoReadOnly: parent.autoReadOnly,
        discard: parent.discardUnmap ? 'unmap' : 'ignore',
        noFlush: parent.noFlush,
        opening,
      };
      child = await this.openNode(ref as Options, inherit);
      created = true;
    }
    try {
      return this.update((tx) => tx.addChild(parent, child, name, role));
    } finally {
      child.extraRefs--;
      if (created) this.noteMaybeOrphan(child);
    }
  }

  /** Attaches node as a child of parent (transactional; throws on a permission conflict). */
  attachChild(parent: BlockNode, node: BlockNode, name: string, role: number): BlockChild {
    if (parent.child(name)) throw new BlockError(`Node '${parent.nodeName}' already has a child '${name}'`);
    return this.update((tx) => tx.addChild(parent, node, name, role));
  }

  /** Detaches a child edge; a child nothing else uses is closed. */
  async detachChild(c: BlockChild): Promise<void> {
    this.update((tx) => tx.removeChild(c));
    await this.collectGarbage();
  }

  /**
   * Makes every parent of `from` (but those in `except`) use `to` instead (bdrv_replace_node).
   * Edges from `to` itself or from anything below it stay where they are: moving them would make
   * a loop (a filter inserted above `from` keeps its own child `from`, and so does a node reachable
   * through it).
   */
  async replaceNode(from: BlockNode, to: BlockNode, except: BlockChild[] = []): Promise<void> {
    const below = new Set<BlockNode>();
    const walk = (n: BlockNode) => {
      if (below.has(n)) return;
      below.add(n);
      for (const c of n.children) walk(c.node);
    };
    walk(to);
    this.update((tx) => {
      for (const c of [...from.parents]) {
        if (except.includes(c) || (c.parent.kind === 'node' && below.has(c.parent))) continue;
        tx.setChildNode(c, to);
      }
    });
    await this.collectGarbage();
  }

  checkNoCycle(parent: BlockNode, child: BlockNode): void {
    const seen = new Set<BlockNode>();
    const walk = (n: BlockNode): boolean => {
      if (n === parent) return true;
      if (seen.has(n)) return false;
      seen.add(n);
      return n.children.some((c) => walk(c.node));
    };
    if (walk(child)) {
      throw new BlockError(`Making '${child.nodeName}' a child of '${parent.nodeName}' would create a cycle`);
    }
  }

  /**
   * Runs a graph change as one transaction: apply it, recompute the permissions of the part of
   * the graph it touched (the changed nodes and everything below them; nothing else can change),
   * and on any error undo the change and restore those permissions exactly as they were.
   */
  update<T>(fn: (tx: GraphTransaction) => T): T {
    const tx = new GraphTransaction(this);
    let saved: (readonly [BlockChild, number, number])[] = [];
    let roots: Iterable<BlockNode> = [];
    try {
      const r = fn(tx);
      roots = tx.touched;
      const order = this.topoOrder(roots);
      saved = order.flatMap((n) => n.children.map((c) => [c, c.perm, c.shared] as const));
      this.refreshPerms(order);
      return r;
    } catch (e) {
      for (let i = tx.undo.length - 1; i >= 0; i--) tx.undo[i]!();
      for (const [c, p, s] of saved) {
        c.perm = p;
        c.shared = s;
      }
      this.reapplyDriverPerms(this.topoOrder(roots));
      throw e;
    }
  }

  /** Gives drivers back the permissions restored by an undone change (going back cannot conflict). */
  private reapplyDriverPerms(order: BlockNode[]): void {
    for (const node of order) {
      if (node.closed || !node.driver.applyPerm) continue;
      const [perm, shared] = node.cumulativePerm();
      try {
        node.driver.applyPerm(node, perm, shared);
      } catch {
        // The locks of the state before the change were held a moment ago: keep what is held.
      }
    }
  }

  /** The graph's nodes and the nodes of its backends. */
  private allReachable(): Set<BlockNode> {
    const all = new Set<BlockNode>(this.nodes.values());
    for (const b of this.backends) if (b.root) all.add(b.root.node);
    return all;
  }

  /** The given nodes and everything below them, parents before children. */
  private topoOrder(roots: Iterable<BlockNode>): BlockNode[] {
    const order: BlockNode[] = [];
    const seen = new Set<BlockNode>();
    const visit = (n: BlockNode) => {
      if (seen.has(n)) return;
      seen.add(n);
      for (const c of n.children) visit(c.node);
      order.push(n);
    };
    for (const n of roots) visit(n);
    return order.reverse();
  }

  /**
   * Recomputes the permissions of the edges below the given nodes (parents before children; by
   * default the whole graph) and checks each node's parents agree.
   */
  refreshPerms(order: BlockNode[] = this.topoOrder(this.allReachable())): void {
    for (const node of order) {
      const [perm, shared] = node.cumulativePerm();
      this.checkNodePerms(node, perm);
      if (!node.closed) node.driver.applyPerm?.(node, perm, shared);
      for (const c of node.children) {
        let [p, s] = node.driver.childPerm
          ? node.driver.childPerm(node, c, perm, shared)
          : defaultChildPerm(c.role, perm, shared, node.readOnly);
        if (node.forceShare) s = PERM_ALL;
        c.perm = p;
        c.shared = s;
      }
    }
  }

  private checkNodePerms(node: BlockNode, cumulative: number): void {
    if (node.closed) return;
    if (cumulative & (Perm.WRITE | Perm.WRITE_UNCHANGED) && node.readOnly) {
      const user = node.parents.find((p) => p.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))!;
      throw new BlockError(
        `Block node is read-only (node '${node.nodeName}' is used for writing by ${user.parentDesc()})`,
        {
          errno: 'EPERM',
        },
      );
    }
    const ps = node.parents;
    for (const a of ps) {
      for (const b of ps) {
        if (a === b) continue;
        const conflict = a.perm & ~b.shared;
        if (conflict) {
          throw new BlockError(
            `Permission conflict on node '${node.nodeName}': permissions '${permNames(conflict)}' are both required by ${a.parentDesc()} (uses node '${node.nodeName}' as '${a.name}' child) and unshared by ${b.parentDesc()} (uses node '${node.nodeName}' as '${b.name}' child).`,
            { errno: 'EPERM' },
          );
        }
      }
    }
  }

  noteMaybeOrphan(node: BlockNode): void {
    this.maybeOrphans.add(node);
  }

  /** Closes nodes nothing references any more (children are released in turn). */
  async collectGarbage(): Promise<void> {
    while (this.maybeOrphans.size) {
      const batch = [...this.maybeOrphans];
      this.maybeOrphans.clear();
      for (const n of batch) if (!n.closed && n.refcnt === 0) await this.closeNode(n);
    }
  }

  /** Closes one node: drain, flush if writable, driver close, release children. */
  private async closeNode(node: BlockNode): Promise<void> {
    if (node.closed) return;
    await this.drainBegin(node);
    try {
      if (!node.readOnly) await io.flush(node).catch(() => {});
      // As bdrv_close: a driver that fails to write out its state on close cannot do better, and
      // the rest of the graph still has to close.
      await node.driver.close?.(node).catch((e: unknown) => {
        this.emitEvent('BLOCK_CLOSE_ERROR', { 'node-name': node.nodeName, error: (e as Error).message });
      });
    } finally {
      node.closed = true;
      this.nodes.delete(node.nodeName);
      this.drainEnd(node);
    }
    this.update((tx) => {
      for (const c of [...node.children]) tx.removeChild(c);
    });
    await this.collectGarbage();
  }

  /** Closes every node and detaches every backend (daemon shutdown). */
  async closeAll(): Promise<void> {
    for (const b of [...this.backends]) await b.detach();
    for (const n of this.allNodes()) n.monitorOwned = false;
    for (const n of this.allNodes()) this.noteMaybeOrphan(n);
    await this.collectGarbage();
  }

  // ---- events ----

  /** Subscribes to the block layer's QMP events (QUORUM_FAILURE, ...); returns an unsubscribe. */
  onEvent(listener: (name: string, data: Record<string, unknown>) => void): () => void {
    this.eventListeners.add(listener);
    return () => this.eventListeners.delete(listener);
  }

  emitEvent(name: string, data: Record<string, unknown>): void {
    for (const l of this.eventListeners) l(name, data);
  }

  // ---- x-blockdev-change ----

  /** Adds an existing, parentless node as a child of a driver that supports it (quorum). */
  addDriverChild(parent: BlockNode, child: BlockNode): void {
    if (!parent.driver.addChild) {
      throw new BlockError(`The node ${parent.nodeName} does not support adding a child`);
    }
    if (child.parents.length > 0) throw new BlockError(`The node ${child.nodeName} already has a parent`);
    parent.driver.addChild(parent, child);
  }

  /** Removes one child of a driver that supports it (quorum); the child stays if owned. */
  async delDriverChild(parent: BlockNode, child: BlockChild): Promise<void> {
    if (!parent.driver.delChild) {
      throw new BlockError(`The node ${parent.nodeName} does not support removing a child`);
    }
    if (child.parent !== parent)
      throw new BlockError(`${child.node.nodeName} is not a child of ${parent.nodeName}`);
    parent.driver.delChild(parent, child);
    await this.collectGarbage();
  }

  // ---- drain ----

  notifyIdle(): void {
    const w = this.idleWaiters;
    if (!w.length) return;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private idle(): Promise<void> {
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** The node and everything above it, with the backends at the top. */
  private ancestry(node: BlockNode): { nodes: Set<BlockNode>; backends: Set<BlockBackend> } {
    const nodes = new Set<BlockNode>();
    const backends = new Set<BlockBackend>();
    const walk = (n: BlockNode) => {
      if (nodes.has(n)) return;
      nodes.add(n);
      for (const p of n.parents) {
        if (p.parent.kind === 'node') walk(p.parent);
        else backends.add(p.parent);
      }
    };
    walk(node);
    return { nodes, backends };
  }

  /**
   * Quiesces a node: its users (backends above it) stop submitting new requests, and this
   * resolves once no request is in flight on the node or anything above it. The nodes and
   * backends quiesced are remembered, so drainEnd releases exactly them even if the graph
   * changed in between (a commit pivoting the node's parents onto another node).
   */
  async drainBegin(node: BlockNode): Promise<void> {
    const { nodes, backends } = this.ancestry(node);
    let stack = this.drains.get(node);
    if (!stack) {
      stack = [];
      this.drains.set(node, stack);
    }
    stack.push({ nodes, backends });
    for (const n of nodes) n.quiesceCounter++;
    for (const b of backends) b.quiesce();
    for (;;) {
      const busy = [...nodes].some((n) => n.inFlight > 0) || [...backends].some((b) => b.inFlight > 0);
      if (!busy) return;
      await this.idle();
    }
  }

  /** Ends the newest drain of the node: held requests go on once no drain holds their backend. */
  drainEnd(node: BlockNode): void {
    const stack = this.drains.get(node);
    const d = stack?.pop();
    if (!d) return;
    if (!stack!.length) this.drains.delete(node);
    for (const n of d.nodes) n.quiesceCounter = Math.max(0, n.quiesceCounter - 1);
    for (const b of d.backends) b.unquiesce();
  }

  /** Runs fn with the node drained. */
  async drained<T>(node: BlockNode, fn: () => Promise<T> | T): Promise<T> {
    await this.drainBegin(node);
    try {
      return await fn();
    } finally {
      this.drainEnd(node);
    }
  }

  // ---- reopen ----

  /**
   * Reopens several nodes at once with new read-only flags (QEMU's reopen queue): every driver
   * prepares, permissions are rechecked with the new flags, then all commit or all abort.
   */
  async reopenMultiple(entries: { node: BlockNode; readOnly: boolean }[]): Promise<void> {
    const states: ReopenState[] = entries.map((e) => ({ node: e.node, readOnly: e.readOnly }));
    // Children that inherited read-only from their parent follow it (backing files do not).
    const queued = new Set(states.map((s) => s.node));
    for (let i = 0; i < states.length; i++) {
      const s = states[i]!;
      for (const c of s.node.children) {
        // Only children opened as part of the parent's options inherit; named nodes keep theirs.
        if (c.role & ChildRole.COW || queued.has(c.node) || c.node.monitorOwned) continue;
        if (c.node.options['read-only'] !== undefined) continue;
        queued.add(c.node);
        states.push({ node: c.node, readOnly: s.readOnly });
      }
    }
    const prepared: ReopenState[] = [];
    const drainedNodes = states.map((s) => s.node);
    for (const n of drainedNodes) await this.drainBegin(n);
    try {
      for (const s of states) {
        // Op blockers do not apply: QEMU reopens busy backing files writable (replication, commit).
        if (s.readOnly && !s.node.readOnly) await io.flush(s.node);
        await s.node.driver.reopenPrepare?.(s);
        prepared.push(s);
      }
      this.update((tx) => {
        for (const s of states) tx.setReadOnly(s.node, s.readOnly);
      });
    } catch (e) {
      for (const s of prepared) await s.node.driver.reopenAbort?.(s);
      for (const n of drainedNodes) this.drainEnd(n);
      throw toBlockError(e);
    }
    for (const s of states) s.node.driver.reopenCommit?.(s);
    for (const n of drainedNodes) this.drainEnd(n);
  }
}
