import { type BlockGraph, COMMON_OPTIONS } from '@blockrep/block';
import {
  type BlockdevRefTypes,
  optionMembers,
  type QMembers,
  type QObjectType,
  type QType,
  req,
  t,
} from '../schema';

/** BlockdevOptions and its references, built from the graph's drivers (new drivers show up). */
export interface BlockdevTypes {
  driver: QType;
  options: QObjectType;
  ref: QType;
  refOrNull: QType;
}

const cache = new WeakMap<BlockGraph, BlockdevTypes>();

/**
 * The QAPI union BlockdevOptions: COMMON_OPTIONS as the base, one variant per driver from its
 * option schema. Block references (`file`, `backing`) are the BlockdevRef alternate (nested
 * options or a node name).
 */
export function blockdevTypes(graph: BlockGraph): BlockdevTypes {
  const known = cache.get(graph);
  if (known) return known;
  const driver: QType = {
    kind: 'enum',
    name: 'BlockdevDriver',
    get values() {
      return graph.driverNames();
    },
  };
  const refs = {} as BlockdevRefTypes;
  const base = optionMembers(COMMON_OPTIONS, 'BlockdevOptions', refs);
  const members: QMembers = { ...base, driver: req(driver, 'Block driver name') };
  // Keep QEMU's member order: driver first.
  const ordered: QMembers = { driver: members.driver!, ...members };
  const options: QObjectType = {
    kind: 'object',
    name: 'BlockdevOptions',
    members: ordered,
    union: {
      tag: 'driver',
      variants: () => {
        const out: Record<string, QMembers> = {};
        for (const name of graph.driverNames()) {
          const d = graph.driver(name)!;
          out[name] = optionMembers(d.options, `BlockdevOptions-${name}`, refs);
        }
        return out;
      },
    },
    doc: 'Options for creating a block node',
  };
  refs.ref = t.alternate(
    'BlockdevRef',
    [options, t.str],
    'Nested options for a new node, or the name of an existing one',
  );
  refs.refOrNull = t.alternate(
    'BlockdevRefOrNull',
    [options, t.str, t.null],
    'BlockdevRef, or null for none',
  );
  const types = { driver, options, ref: refs.ref, refOrNull: refs.refOrNull };
  cache.set(graph, types);
  return types;
}
