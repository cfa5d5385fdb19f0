/*
 * The node options of a COLO pair, as QEMU's COLO documentation sets it up, for blockdev-add over
 * QMP (or BlockGraph.blockdevAdd). The primary's guest disk is a quorum (read-pattern fifo,
 * vote-threshold 1) over its local disk; the replication child below is added to it with
 * x-blockdev-change. The secondary exports its disk for the primary's NBD client and runs its VM
 * on the replication node: replication -> active -> hidden -> secondary disk.
 */

/** Where the secondary's NBD server listens. */
export type ColoServer = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: string };

/** A qcow2 node on a file. */
function qcow2(nodeName: string, filename: string, backing?: unknown): Record<string, unknown> {
  return {
    driver: 'qcow2',
    'node-name': nodeName,
    file: { driver: 'file', filename },
    ...(backing !== undefined ? { backing } : {}),
  };
}

/**
 * The secondary's replication node (mode secondary) over the active image, whose backing is the
 * hidden image, whose backing is the secondary disk (a node already added, by name).
 */
export function coloSecondaryOptions(o: {
  nodeName: string;
  activeFile: string;
  hiddenFile: string;
  secondaryDisk: string;
  /** The root node above it (default: the replication node itself; QEMU's docs put a quorum there). */
  topId?: string;
}): Record<string, unknown> {
  return {
    driver: 'replication',
    'node-name': o.nodeName,
    mode: 'secondary',
    'top-id': o.topId ?? o.nodeName,
    file: qcow2('active', o.activeFile, qcow2('hidden', o.hiddenFile, o.secondaryDisk)),
  };
}

/** The primary's replication node (mode primary) over an NBD client of the secondary's export. */
export function coloPrimaryChildOptions(o: {
  nodeName: string;
  server: ColoServer;
  exportName: string;
}): Record<string, unknown> {
  return {
    driver: 'replication',
    'node-name': o.nodeName,
    mode: 'primary',
    file: { driver: 'nbd', server: o.server, export: o.exportName },
  };
}

/** The primary's guest disk: a quorum over its local disk (the replication child comes later). */
export function coloQuorumOptions(o: { nodeName: string; localDisk: string }): Record<string, unknown> {
  return {
    driver: 'quorum',
    'node-name': o.nodeName,
    'read-pattern': 'fifo',
    'vote-threshold': 1,
    children: [o.localDisk],
  };
}
