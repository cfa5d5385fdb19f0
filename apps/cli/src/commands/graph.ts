import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { optString } from '../args';
import { CliFailure } from '../failure';
import { connectQmp, executeQmp } from './qmp';

interface GraphNode {
  id: number;
  type: 'block-backend' | 'block-job' | 'block-driver';
  name: string;
}

interface GraphEdge {
  parent: number;
  child: number;
  name: string;
  perm: string[];
  'shared-perm': string[];
}

/** A DOT string (labels keep their \\n line breaks). */
const quote = (s: string) => `"${s.replace(/"/g, '\\"')}"`;

const SHAPES: Record<GraphNode['type'], string> = {
  'block-backend': 'box, style=filled, fillcolor="#d0e4f5"',
  'block-job': 'parallelogram, style=filled, fillcolor="#f5e6c8"',
  'block-driver': 'ellipse',
};

/** What the graph's labels can say beyond node names: drivers, file names, exports. */
export interface GraphDetails {
  /** Node name -> driver. */
  drivers: Map<string, string>;
  /** Node name -> the file (or URI) a protocol node opens. */
  files?: Map<string, string>;
  /** Node name -> the ids of the NBD exports serving it. */
  exports?: Map<string, string[]>;
}

/** Drivers whose node stands for a file or a connection: their label shows what they open. */
const PROTOCOLS = new Set(['file', 'nbd', 'host_device']);

/**
 * The block graph in DOT: nodes named with their driver (protocol nodes with the file they open),
 * block backends of NBD exports named by the export, edges with child name and permissions.
 */
export function graphToDot(graph: { nodes: GraphNode[]; edges: GraphEdge[] }, details: GraphDetails): string {
  const byId = new Map(graph.nodes.map((n) => [n.id, n]));
  const lines = ['digraph block_graph {', '  rankdir=LR;', '  node [fontname="Helvetica"];'];
  for (const n of [...graph.nodes].sort((a, b) => a.id - b.id)) {
    let label: string;
    if (n.type === 'block-driver') {
      const driver = details.drivers.get(n.name);
      const file = driver && PROTOCOLS.has(driver) ? details.files?.get(n.name) : undefined;
      label = [n.name, driver, file].filter((x) => x !== undefined && x !== '').join('\\n');
    } else if (n.type === 'block-backend' && !n.name) {
      // An anonymous backend: an export's, when an export serves the node it holds.
      const roots = graph.edges.filter((e) => e.parent === n.id).map((e) => byId.get(e.child)?.name ?? '');
      const ids = roots.flatMap((r) => details.exports?.get(r) ?? []);
      label = ids.length
        ? `NBD export ${ids.map((i) => `'${i}'`).join(', ')}\\nblock-backend`
        : '(anonymous)\\nblock-backend';
    } else {
      label = `${n.name || '(anonymous)'}\\n${n.type}`;
    }
    lines.push(`  n${n.id} [label=${quote(label)}, shape=${SHAPES[n.type]}];`);
  }
  for (const e of graph.edges) {
    const label = `${e.name}\\nperm: ${e.perm.join(', ') || '-'}\\nshared: ${e['shared-perm'].join(', ') || '-'}`;
    lines.push(`  n${e.parent} -> n${e.child} [label=${quote(label)}];`);
  }
  lines.push('}');
  return `${lines.join('\n')}\n`;
}

function renderDot(dot: string, format: 'svg' | 'png'): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn('dot', [`-T${format}`], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e) =>
      reject(new CliFailure(`Cannot run Graphviz's dot (${e.message}); use --format dot`)),
    );
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out));
      else reject(new CliFailure(`dot failed: ${Buffer.concat(err).toString().trim()}`));
    });
    child.stdin.end(dot);
  });
}

/** blockrep graph --socket PATH [--format dot|svg|png] [-o FILE] */
export async function graphCommand(args: string[]): Promise<number> {
  const { p, client } = await connectQmp(args, 'graph', { short: ':ho:', long: { format: { arg: true } } });
  try {
    const format = optString(p, '--format') ?? 'dot';
    if (format !== 'dot' && format !== 'svg' && format !== 'png')
      throw new CliFailure(`Unknown graph format '${format}' (dot, svg or png)`);
    const graph = (await executeQmp(client, 'x-debug-query-block-graph')) as {
      nodes: GraphNode[];
      edges: GraphEdge[];
    };
    const named = (await executeQmp(client, 'query-named-block-nodes', { flat: true })) as {
      'node-name': string;
      drv: string;
      file: string;
    }[];
    const exported = (await executeQmp(client, 'query-block-exports').catch(() => [])) as {
      id: string;
      'node-name': string;
    }[];
    const exports = new Map<string, string[]>();
    for (const e of exported) exports.set(e['node-name'], [...(exports.get(e['node-name']) ?? []), e.id]);
    const dot = graphToDot(graph, {
      drivers: new Map(named.map((n) => [n['node-name'], n.drv])),
      files: new Map(named.map((n) => [n['node-name'], n.file])),
      exports,
    });
    const out = format === 'dot' ? Buffer.from(dot) : await renderDot(dot, format);
    const file = optString(p, '-o');
    if (file) writeFileSync(file, out);
    else process.stdout.write(out);
  } finally {
    await client.close();
  }
  return 0;
}
