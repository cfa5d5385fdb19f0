import { closeSync, openSync, readSync } from 'node:fs';
import {
  BlockBackend,
  type BlockError,
  type BlockGraph,
  type BlockNode,
  createGraph,
  iovIsZero,
  type Options,
  Perm,
  parseKeyVal,
} from '@blockrep/block';
import { type Qcow2Image, qcow2Driver } from '@blockrep/qcow2';
import { CliFailure } from './failure';

/* Opening image files the way qemu-img does: a format given with -f or probed, the chain below. */

export const IMAGE_FORMATS = ['raw', 'qcow2'] as const;
const QCOW2_MAGIC = 0x514649fb;

export function imageGraph(): BlockGraph {
  return createGraph([qcow2Driver]);
}

/** qcow2 by its magic, raw otherwise (qemu-img's probe, for the formats we have). */
export function probeFormat(file: string): 'qcow2' | 'raw' {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (e) {
    // Named by the format layer and the protocol below it, as qemu-img does.
    throw new CliFailure(`Could not open '${file}': Could not open '${file}': ${errnoMessage(e)}`);
  }
  try {
    const b = Buffer.alloc(4);
    return readSync(fd, b, 0, 4, 0) === 4 && b.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    closeSync(fd);
  }
}

function errnoMessage(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'No such file or directory';
  if (code === 'EACCES') return 'Permission denied';
  return (e as Error).message;
}

export function checkFormat(fmt: string): void {
  if (!(IMAGE_FORMATS as readonly string[]).includes(fmt))
    throw new CliFailure(`Unknown file format '${fmt}'`);
}

/**
 * An image argument as qemu-img reads it: a path, a `json:{...}` filename (nested or dotted
 * keys), or with --image-opts a key=value list ("driver=qcow2,file.filename=a.qcow2"). `options`
 * is null for a path; `path` is the file below the format (probed when no driver is named), or
 * '' when the options name none.
 */
export interface ImageArg {
  options: Options | null;
  path: string;
}

/** Nests dotted keys ("file.filename") as QEMU does with the options of a json: filename. */
function crumple(o: Options): Options {
  const out: Options = {};
  for (const [k, v] of Object.entries(o)) {
    const parts = k.split('.');
    let at = out;
    for (const part of parts.slice(0, -1)) {
      if (at[part] === undefined) at[part] = {};
      if (typeof at[part] !== 'object' || at[part] === null)
        throw new Error(`Cannot mix a value and members for '${part}'`);
      at = at[part] as Options;
    }
    const last = parts[parts.length - 1]!;
    at[last] = v !== null && typeof v === 'object' && !Array.isArray(v) ? crumple(v as Options) : v;
  }
  return out;
}

export function imageArg(arg: string, opts: { imageOpts?: boolean; format?: string } = {}): ImageArg {
  let options: Options;
  if (opts.imageOpts) {
    if (opts.format !== undefined) throw new CliFailure('--image-opts and --format are mutually exclusive');
    try {
      options = parseKeyVal(arg);
    } catch (e) {
      throw new CliFailure((e as Error).message);
    }
  } else if (arg.startsWith('json:')) {
    let v: unknown;
    try {
      v = JSON.parse(arg.slice(5));
    } catch (e) {
      throw new CliFailure(
        `Could not open '${arg}': Could not parse the JSON options: ${(e as Error).message}`,
      );
    }
    if (v === null || typeof v !== 'object' || Array.isArray(v))
      throw new CliFailure(`Could not open '${arg}': Could not parse the JSON options: not an object`);
    try {
      options = crumple(v as Options);
    } catch (e) {
      throw new CliFailure(`Could not open '${arg}': ${(e as Error).message}`);
    }
    // -f names the format even over the driver the options give (as qemu-img).
    if (opts.format !== undefined) options.driver = opts.format;
  } else return { options: null, path: arg };
  // A file given by name alone is a file protocol node ("file=a.qcow2", "file.filename=...").
  if (typeof options.file === 'string') options.file = { driver: 'file', filename: options.file };
  const f = options.file as Options | undefined;
  if (f && typeof f === 'object' && f.driver === undefined && typeof f.filename === 'string')
    f.driver = 'file';
  const path =
    f && typeof f === 'object' && f.driver === 'file' && typeof f.filename === 'string' ? f.filename : '';
  return { options, path };
}

export interface OpenImageOptions {
  format?: string;
  /** --image-opts: the argument is a key=value option list. */
  imageOpts?: boolean;
  readOnly?: boolean;
  /** `null`: open without the backing file; a node name: that node as backing. */
  backing?: null | string;
  nodeName?: string;
  /** -U: share every permission with other users, even writers (read-only opens only). */
  forceShare?: boolean;
  /** Zero writes may unmap (discard=unmap unless the options say otherwise), as qemu-img opens targets. */
  unmap?: boolean;
}

/** qemu-img's failure to open an image: the error's message, and its hint (image locks). */
export function openFailure(file: string, e: unknown): CliFailure {
  return new CliFailure(`Could not open '${file}': ${(e as Error).message}`, 1, (e as BlockError).hint);
}

/** Whether -U / --force-share was given. */
export function forceShare(p: { opts: Map<string, string | true> }): boolean {
  return p.opts.has('-U') || p.opts.has('--force-share');
}

/** Opens an image file as a format node (and its backing chain unless told otherwise). */
export async function openImage(
  graph: BlockGraph,
  file: string,
  opts: OpenImageOptions = {},
): Promise<BlockNode> {
  const spec = imageArg(file, opts);
  let options: Options;
  if (spec.options) {
    options = { ...spec.options };
    if (options.file === undefined)
      throw new CliFailure(`Could not open '${file}': A block device must be specified for "file"`);
    if (options.driver === undefined) {
      if (!spec.path) throw new CliFailure(`Could not open '${file}': Must specify the format (driver)`);
      options.driver = probeFormat(spec.path);
    }
    if (!(IMAGE_FORMATS as readonly string[]).includes(options.driver as string))
      throw new CliFailure(`Could not open '${file}': Unknown driver '${options.driver}'`);
    if (options['read-only'] === undefined) options['read-only'] = opts.readOnly ?? true;
  } else {
    const format = opts.format ?? probeFormat(file);
    if (!(IMAGE_FORMATS as readonly string[]).includes(format))
      throw new CliFailure(`Could not open '${file}': Unknown driver '${format}'`);
    options = {
      driver: format,
      'read-only': opts.readOnly ?? true,
      file: { driver: 'file', filename: file },
    };
  }
  const format = options.driver as string;
  if (opts.nodeName) options['node-name'] = opts.nodeName;
  if (opts.forceShare) options['force-share'] = true;
  if (opts.unmap && options.discard === undefined) options.discard = 'unmap';
  if (opts.backing !== undefined && format === 'qcow2') options.backing = opts.backing;
  try {
    return await graph.open(options);
  } catch (e) {
    throw openFailure(file, e);
  }
}

/** What QEMU warns about an image it opens, on stderr: the first line as the program's warning. */
export function printWarnings(node: BlockNode): void {
  const w = qcow2Of(node)?.header.warnings ?? [];
  if (w.length) process.stderr.write(`blockrep: warning: ${w.join('\n')}\n`);
}

/** A backend on node with the permissions a reader (or writer) needs. */
export function attachBackend(graph: BlockGraph, node: BlockNode, write: boolean): BlockBackend {
  const blk = new BlockBackend(graph, {
    perm: Perm.CONSISTENT_READ | (write ? Perm.WRITE | Perm.RESIZE : 0),
  });
  try {
    blk.attach(node);
  } catch (e) {
    // Refused by the image locks (or another user of the node): qemu-img reports it on open.
    throw openFailure(node.filename, e);
  }
  return blk;
}

/** The qcow2 image behind a node, or null for other formats. */
export function qcow2Of(node: BlockNode): Qcow2Image | null {
  return node.driver.name === 'qcow2' ? (node.opaque as Qcow2Image) : null;
}

/** The nodes of an image's backing chain, top first. */
export function backingChain(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | null = top; n; n = n.backing?.node ?? null) out.push(n);
  return out;
}

/** Whether every byte of buf is zero. */
export function isZero(buf: Buffer): boolean {
  return iovIsZero([buf]);
}

/** Runs tasks from next() with at most `depth` in flight; rejects on the first failure. */
export async function runInFlight(depth: number, next: () => (() => Promise<void>) | null): Promise<void> {
  let failure: unknown = null;
  const worker = async () => {
    for (;;) {
      if (failure) return;
      const task = next();
      if (!task) return;
      try {
        await task();
      } catch (e) {
        failure ??= e;
        return;
      }
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  if (failure) throw failure;
}
