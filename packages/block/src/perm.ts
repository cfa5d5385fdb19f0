/** Permissions a parent takes on a child node, and shares with the node's other parents. */
export const Perm = {
  CONSISTENT_READ: 0x01,
  WRITE: 0x02,
  WRITE_UNCHANGED: 0x04,
  RESIZE: 0x08,
  GRAPH_MOD: 0x10,
} as const;

export const PERM_ALL = 0x1f;
/** Permissions a filter passes straight down to its filtered child. */
export const PERM_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE;

const NAMES: [number, string][] = [
  [Perm.CONSISTENT_READ, 'consistent read'],
  [Perm.WRITE, 'write'],
  [Perm.WRITE_UNCHANGED, 'write unchanged'],
  [Perm.RESIZE, 'resize'],
  [Perm.GRAPH_MOD, 'change children'],
];

/** "write, resize": the names QEMU prints for a permission mask. */
export function permNames(mask: number): string {
  return NAMES.filter(([bit]) => mask & bit)
    .map(([, n]) => n)
    .join(', ');
}

/** The QAPI names (query-named-block-nodes, x-debug-query-block-graph). */
export function permQapiNames(mask: number): string[] {
  return NAMES.filter(([bit]) => mask & bit).map(([, n]) =>
    n.replace(' ', '-').replace('change-children', 'graph-mod'),
  );
}

/** The role a child plays for its parent (QEMU's BdrvChildRole). */
export const ChildRole = {
  DATA: 0x01,
  METADATA: 0x02,
  FILTERED: 0x04,
  COW: 0x08,
  PRIMARY: 0x10,
} as const;

export type PermPair = [perm: number, shared: number];

/** A filter's child gets what the filter's parents need; the filter itself needs nothing more. */
export function filterChildPerm(perm: number, shared: number): PermPair {
  return [perm & PERM_PASSTHROUGH, (shared & PERM_PASSTHROUGH) | (PERM_ALL & ~PERM_PASSTHROUGH)];
}

/** A backing (COW) child is only read; others may write it if the parent copes with changing data. */
export function cowChildPerm(perm: number, shared: number): PermPair {
  const p = perm & Perm.CONSISTENT_READ;
  let s = shared & Perm.WRITE ? Perm.WRITE | Perm.RESIZE : 0;
  s |= Perm.CONSISTENT_READ | Perm.GRAPH_MOD | Perm.WRITE_UNCHANGED;
  return [p, s];
}

/**
 * A format's storage child (data and/or metadata): reads always, writes and resizes the file when
 * the node is writable (metadata), and lets nobody else write or resize under it.
 */
export function storageChildPerm(role: number, perm: number, shared: number, readOnly: boolean): PermPair {
  let [p, s] = filterChildPerm(perm, shared);
  if (role & ChildRole.METADATA) {
    p |= Perm.CONSISTENT_READ;
    s &= ~(Perm.WRITE | Perm.RESIZE);
    if (!readOnly) p |= Perm.WRITE | Perm.RESIZE;
  }
  if (role & ChildRole.DATA) {
    s &= ~Perm.RESIZE;
    if (p & Perm.WRITE_UNCHANGED) p |= Perm.WRITE;
    if (p & Perm.WRITE) p |= Perm.RESIZE;
  }
  return [p, s];
}

/** QEMU's default child permissions, chosen by the child's role. */
export function defaultChildPerm(role: number, perm: number, shared: number, readOnly: boolean): PermPair {
  if (role & ChildRole.FILTERED) return filterChildPerm(perm, shared);
  if (role & ChildRole.COW) return cowChildPerm(perm, shared);
  if (role & (ChildRole.DATA | ChildRole.METADATA)) return storageChildPerm(role, perm, shared, readOnly);
  return [0, PERM_ALL];
}
