import { CONTEXT_DIRTY_BITMAP_PREFIX, Info, MAX_STRING, OPT_REPLY_MAGIC, Opt, Rep } from '../protocol';
import type { ExportContext, NbdExport } from './export';

/*
 * The handshake's options (nbdkit's protocol-handshake-newstyle.c in our terms): NBD_OPT_LIST,
 * NBD_OPT_INFO/GO and NBD_OPT_LIST/SET_META_CONTEXT parsed and answered. The connection keeps
 * the state (structured replies, TLS, the chosen contexts) and the loop over options.
 */

/** A selected context: its id on the wire is its position in the export's list, plus one. */
export interface MetaContext extends ExportContext {
  id: number;
}

/** How an option is answered. */
export interface OptionReplies {
  reply(opt: number, type: number, data?: Buffer): void;
  error(opt: number, type: number, message: string): void;
}

/** What the options see of the server. */
export interface OptionContext {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
}

/** An option reply: magic, option, reply type, length, data. */
export function optionReply(opt: number, type: number, data?: Buffer): Buffer {
  const h = Buffer.allocUnsafe(20);
  h.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data ? data.length : 0, 16);
  return data ? Buffer.concat([h, data]) : h;
}

/** NBD_OPT_LIST: every export (name and description), then ACK. */
export function listOption(opt: number, len: number, ctx: OptionContext, out: OptionReplies): void {
  if (len !== 0) {
    out.error(opt, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data');
    return;
  }
  for (const exp of ctx.listExports()) {
    const name = Buffer.from(exp.name);
    const b = Buffer.allocUnsafe(4 + name.length);
    b.writeUInt32BE(name.length, 0);
    name.copy(b, 4);
    out.reply(opt, Rep.SERVER, exp.description ? Buffer.concat([b, Buffer.from(exp.description)]) : b);
  }
  out.reply(opt, Rep.ACK);
}

/** An info item: its type and data. */
function infoItem(type: number, data: Buffer): Buffer {
  const b = Buffer.allocUnsafe(2 + data.length);
  b.writeUInt16BE(type, 0);
  data.copy(b, 2);
  return b;
}

/**
 * NBD_OPT_INFO / NBD_OPT_GO: answered with the export's information; for a GO that succeeded,
 * the export to enter transmission with, whether the client acknowledged block sizes, and the
 * name it asked for (null otherwise).
 */
export function infoOption(
  opt: number,
  data: Buffer,
  structured: boolean,
  ctx: OptionContext,
  out: OptionReplies,
): { exp: NbdExport; name: string; blockSizeAcked: boolean } | null {
  if (data.length < 6) {
    out.error(opt, Rep.ERR_INVALID, 'option too short');
    return null;
  }
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) {
    out.error(opt, Rep.ERR_INVALID, 'bad export name length');
    return null;
  }
  const name = data.toString('utf8', 4, 4 + nameLen);
  const nreq = data.readUInt16BE(4 + nameLen);
  if (4 + nameLen + 2 + 2 * nreq !== data.length) {
    out.error(opt, Rep.ERR_INVALID, 'bad number of information requests');
    return null;
  }
  const reqs = new Set<number>();
  for (let i = 0; i < nreq; i++) reqs.add(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  const exp = ctx.findExport(name);
  if (!exp) {
    out.error(opt, Rep.ERR_UNKNOWN, `export '${name}' not present`);
    return null;
  }
  if (opt === Opt.GO && !exp.acceptsClient()) {
    out.error(opt, Rep.ERR_POLICY, `export '${name}' has reached its connection limit`);
    return null;
  }
  const ex = Buffer.allocUnsafe(10);
  ex.writeBigUInt64BE(BigInt(exp.size()), 0);
  ex.writeUInt16BE(exp.transmissionFlags(structured), 8);
  out.reply(opt, Rep.INFO, infoItem(Info.EXPORT, ex));
  if (reqs.has(Info.NAME)) out.reply(opt, Rep.INFO, infoItem(Info.NAME, Buffer.from(exp.name)));
  if (reqs.has(Info.DESCRIPTION) && exp.description) {
    out.reply(opt, Rep.INFO, infoItem(Info.DESCRIPTION, Buffer.from(exp.description)));
  }
  // Block sizes go out whether asked for or not (the spec allows it; clients use them).
  const sizes = exp.blockSizes();
  const bs = Buffer.allocUnsafe(12);
  bs.writeUInt32BE(sizes.min, 0);
  bs.writeUInt32BE(sizes.preferred, 4);
  bs.writeUInt32BE(sizes.max, 8);
  out.reply(opt, Rep.INFO, infoItem(Info.BLOCK_SIZE, bs));
  out.reply(opt, Rep.ACK);
  if (opt !== Opt.GO) return null;
  return { exp, name, blockSizeAcked: reqs.has(Info.BLOCK_SIZE) };
}

/**
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: answered with the matching contexts; for
 * a SET, the contexts selected and the export they were selected for (null otherwise).
 */
export function metaContextOption(
  opt: number,
  data: Buffer,
  structured: boolean,
  ctx: OptionContext,
  out: OptionReplies,
): { contexts: MetaContext[]; exportName: string } | null {
  const list = opt === Opt.LIST_META_CONTEXT;
  if (!structured) {
    out.error(opt, Rep.ERR_INVALID, 'request structured replies first');
    return null;
  }
  const bad = (why: string) => {
    out.error(opt, Rep.ERR_INVALID, why);
    return null;
  };
  if (data.length < 8) return bad('option too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) return bad('bad export name length');
  const name = data.toString('utf8', 4, 4 + nameLen);
  const nq = data.readUInt32BE(4 + nameLen);
  const queries: string[] = [];
  let pos = 8 + nameLen;
  for (let i = 0; i < nq; i++) {
    if (pos + 4 > data.length) return bad('truncated query list');
    const ql = data.readUInt32BE(pos);
    if (ql > MAX_STRING || pos + 4 + ql > data.length) return bad('bad query length');
    queries.push(data.toString('utf8', pos + 4, pos + 4 + ql));
    pos += 4 + ql;
  }
  if (pos !== data.length) return bad('trailing data after the queries');
  const exp = ctx.findExport(name);
  if (!exp) {
    out.error(opt, Rep.ERR_UNKNOWN, `export '${name}' not present`);
    return null;
  }
  const offered = exp.contexts().map((c, i) => ({ ...c, id: i + 1 }));
  const selected: MetaContext[] = [];
  const pick = (c: MetaContext) => {
    if (!selected.includes(c)) selected.push(c);
  };
  if (list && queries.length === 0) offered.forEach(pick);
  for (const q of queries) {
    for (const c of offered) {
      // A bare namespace lists everything in it; selection needs exact names.
      const prefixMatch =
        list && (q === 'base:' || q === 'qemu:' || q === CONTEXT_DIRTY_BITMAP_PREFIX) && c.name.startsWith(q);
      if (c.name === q || prefixMatch) pick(c);
    }
  }
  for (const c of selected) {
    const nb = Buffer.from(c.name);
    const b = Buffer.allocUnsafe(4 + nb.length);
    b.writeUInt32BE(list ? 0 : c.id, 0);
    nb.copy(b, 4);
    out.reply(opt, Rep.META_CONTEXT, b);
  }
  out.reply(opt, Rep.ACK);
  return list ? null : { contexts: selected, exportName: name };
}
