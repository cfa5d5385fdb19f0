import type { CommandDef, CommandExample, CommandRegistry, EventDef } from './registry';
import { type QMember, type QMembers, type QObjectType, type QType, typeLabel } from './schema';

/*
 * The command reference (docs/qmp-commands.md): every command with its arguments, return value
 * and examples, every event, and the types their members use, all generated from the schemas.
 */

type NamedType = QObjectType | Extract<QType, { kind: 'alternate' }>;

/** QAPI's implicit types (a command's or event's own members) are named q_obj_<name>-arg. */
function isImplicit(name: string): boolean {
  return name.startsWith('q_obj_');
}

/** The object or alternate a member's type names (through lists), if any. */
function namedType(type: QType): NamedType | null {
  const t = type.kind === 'array' ? namedType(type.of) : type;
  return t && (t.kind === 'object' || t.kind === 'alternate') ? t : null;
}

/** The member lists of an object type: its own, then one per union variant. */
function memberLists(type: QObjectType): { variant?: string; members: QMembers }[] {
  const out: { variant?: string; members: QMembers }[] = [{ members: type.members }];
  if (type.union) {
    for (const [tag, members] of Object.entries(type.union.variants())) out.push({ variant: tag, members });
  }
  return out;
}

/**
 * What tells two types of one name apart: some variants build their types anew on every call,
 * and two schemas may each declare a type of the same name (as QEMU's chardev and NBD addresses).
 */
function signature(type: NamedType): string {
  if (type.kind === 'alternate') return JSON.stringify(type.of.map(typeLabel));
  return JSON.stringify(
    memberLists(type).map((l) => [
      l.variant,
      Object.entries(l.members).map(([k, m]) => [k, typeLabel(m.type), !!m.optional, m.doc]),
    ]),
  );
}

/** A member and where it sits, for checks that every member is described. */
export interface DocumentedMember {
  /** The command, event or type the member belongs to (with the union variant, if any). */
  owner: string;
  name: string;
  member: QMember;
}

/** A type the reference lists on its own: the members of some command or event refer to it. */
interface ListedType {
  type: NamedType;
  usedBy: Set<string>;
}

interface Catalogue {
  /** Types reached through members, by name; several when schemas differ under one name. */
  types: Map<string, ListedType[]>;
  members: DocumentedMember[];
}

/** Walks every command's and event's members, and the members of every type they reach. */
function catalogue(r: CommandRegistry): Catalogue {
  const types = new Map<string, ListedType[]>();
  const members: DocumentedMember[] = [];
  const described = new Set<string>();
  // One walk per command and event, so that each type learns every user (a type reached again
  // in the same walk, as a recursive one, is not walked again).
  const walk = (root: NamedType, user: string) => {
    const walked = new Set<string>();
    const visitType = (type: NamedType, nested: boolean) => {
      const sig = signature(type);
      if (nested) {
        const list = types.get(type.name) ?? [];
        types.set(type.name, list);
        const entry = list.find((e) => signature(e.type) === sig);
        if (entry) entry.usedBy.add(user);
        else list.push({ type, usedBy: new Set([user]) });
      }
      const key = `${type.name}\0${sig}`;
      if (walked.has(key)) return;
      walked.add(key);
      if (type.kind === 'alternate') {
        for (const b of type.of) {
          const t = namedType(b);
          if (t) visitType(t, true);
        }
        return;
      }
      const owner = isImplicit(type.name) ? user : type.name;
      const describe = !described.has(key);
      described.add(key);
      for (const l of memberLists(type)) {
        const where = l.variant ? `${owner} (${type.union!.tag}: ${l.variant})` : owner;
        for (const [name, member] of Object.entries(l.members)) {
          if (describe) members.push({ owner: where, name, member });
          const t = namedType(member.type);
          if (t) visitType(t, true);
        }
      }
    };
    visitType(root, false);
  };
  for (const c of sortedCommands(r)) {
    for (const root of [c.args, c.returns]) {
      const t = root && namedType(root);
      if (t) walk(t, c.name);
    }
  }
  for (const e of sortedEvents(r)) walk(e.data, e.name);
  return { types, members };
}

/** Every member of every command's arguments and return value, event's data and type they use. */
export function documentedMembers(r: CommandRegistry): DocumentedMember[] {
  return catalogue(r).members;
}

function sortedCommands(r: CommandRegistry): CommandDef[] {
  return [...r.commands()].sort((a, b) => a.name.localeCompare(b.name));
}

function sortedEvents(r: CommandRegistry): EventDef[] {
  return [...r.events()].sort((a, b) => a.name.localeCompare(b.name));
}

/** GitHub's anchor of a heading. */
function anchor(heading: string): string {
  return heading
    .toLowerCase()
    .replace(/[^a-z0-9 _-]/g, '')
    .replace(/ /g, '-');
}

function escapeCell(s: string): string {
  return s.replace(/\|/g, '\\|').replace(/\n/g, ' ');
}

// ---- examples in QEMU's style ----

const WIDTH = 100;

/**
 * JSON as QEMU's documentation writes it: `{ "a": 1 }` on one line when it fits, otherwise as
 * many members a line as fit, aligned under the first; a member too long for a line is broken
 * the same way.
 */
function qemuJson(v: unknown, col: number): string {
  const flat = flatJson(v);
  if (col + flat.length <= WIDTH || v === null || typeof v !== 'object') return flat;
  const entries = Array.isArray(v)
    ? v.map((x) => ({ key: '', value: x as unknown }))
    : Object.entries(v as Record<string, unknown>).map(([k, x]) => ({
        key: `${JSON.stringify(k)}: `,
        value: x,
      }));
  if (!entries.length) return flat;
  const [open, close] = Array.isArray(v) ? ['[', ']'] : ['{', '}'];
  const pad = ' '.repeat(col + 2);
  const lines: string[] = [];
  let line = '';
  for (const e of entries) {
    const flatEntry = e.key + flatJson(e.value);
    // The room left counts the separator and, for the last member, the closing bracket.
    if (line && col + 2 + line.length + 2 + flatEntry.length + 2 <= WIDTH) line += `, ${flatEntry}`;
    else {
      if (line) lines.push(line);
      line = e.key + qemuJson(e.value, col + 2 + e.key.length);
      if (line.includes('\n')) {
        lines.push(line);
        line = '';
      }
    }
  }
  if (line) lines.push(line);
  return `${open} ${lines.join(`,\n${pad}`)} ${close}`;
}

function flatJson(v: unknown): string {
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  if (Array.isArray(v)) return v.length ? `[ ${v.map(flatJson).join(', ')} ]` : '[]';
  const e = Object.entries(v as Record<string, unknown>);
  return e.length ? `{ ${e.map(([k, x]) => `${JSON.stringify(k)}: ${flatJson(x)}`).join(', ')} }` : '{}';
}

function message(prefix: '-> ' | '<- ', v: unknown): string {
  return prefix + qemuJson(v, prefix.length);
}

function commandExample(name: string, ex: CommandExample): string[] {
  const request: Record<string, unknown> = { execute: name };
  if (ex.args) request.arguments = ex.args;
  const reply = ex.error ? { error: ex.error } : { return: ex.returns ?? {} };
  return [...exampleTitle(ex.title), '```', message('-> ', request), message('<- ', reply), '```', ''];
}

function exampleTitle(title: string | undefined): string[] {
  return title ? [`${title}:`, ''] : [];
}

/** An event's timestamp in the examples (the time a real one carries). */
const EXAMPLE_TIME = { seconds: 1700000000, microseconds: 123456 };

// ---- tables ----

class Renderer {
  /** Where a type's members are listed: its own section, or the command that has it as its own. */
  private readonly links = new Map<string, string>();

  constructor(
    private readonly r: CommandRegistry,
    private readonly cat: Catalogue,
  ) {
    for (const c of sortedCommands(r)) {
      for (const root of [c.args, c.returns]) {
        const t = root && namedType(root);
        if (t && !isImplicit(t.name) && !this.links.has(t.name)) this.links.set(t.name, anchor(c.name));
      }
    }
    for (const name of cat.types.keys()) {
      if (!this.pointsToCommand(name)) this.links.set(name, anchor(name));
    }
  }

  /** A type listed in full at a command (an argument or return type) is not repeated. */
  private pointsToCommand(name: string): string | null {
    const list = this.cat.types.get(name);
    if (list?.length !== 1) return null;
    for (const c of sortedCommands(this.r)) {
      for (const root of [c.args, c.returns]) {
        const t = root && namedType(root);
        if (t && t.name === name && signature(t) === signature(list[0]!.type)) return c.name;
      }
    }
    return null;
  }

  private label(type: QType): string {
    if (type.kind === 'array') return `[${this.label(type.of)}]`;
    const name = typeLabel(type);
    const link = (type.kind === 'object' || type.kind === 'alternate') && this.links.get(name);
    let out = link ? `[${name}](#${link})` : name;
    if (type.kind === 'enum') out += ` (${type.values.map((v) => `\`${v}\``).join(', ')})`;
    return out;
  }

  membersTable(members: QMembers): string[] {
    const rows = Object.entries(members);
    if (!rows.length) return ['(none)', ''];
    const out = ['| Name | Type | Required | Description |', '|---|---|---|---|'];
    for (const [name, m] of rows) {
      out.push(
        `| \`${name}\` | ${escapeCell(this.label(m.type))} | ${m.optional ? 'no' : 'yes'} | ${escapeCell(m.doc ?? '')} |`,
      );
    }
    out.push('');
    return out;
  }

  /** An object's members, its union variants as sub-tables. */
  objectTables(t: QObjectType): string[] {
    const out = this.membersTable(t.members);
    if (t.union) {
      for (const [tag, members] of Object.entries(t.union.variants())) {
        if (!Object.keys(members).length) continue;
        out.push(`When \`${t.union.tag}\` is \`${tag}\`:`, '', ...this.membersTable(members));
      }
    }
    return out;
  }

  /** A command's arguments or return value; QAPI's implicit types show no name. */
  describe(type: QType, what: string): string[] {
    const t = type.kind === 'array' ? type.of : type;
    if (t.kind !== 'object') return [`${what}: \`${typeLabel(type)}\``, ''];
    const head = isImplicit(t.name) ? `${what}:` : `${what}: \`${typeLabel(type)}\``;
    return [head, '', ...(t.doc ? [t.doc, ''] : []), ...this.objectTables(t)];
  }

  command(c: CommandDef): string[] {
    const out = [`### ${c.name}`, '', c.doc, ''];
    if (c.features?.length) out.push(`Features: ${c.features.join(', ')}`, '');
    if (c.args && Object.keys(c.args.members).length) out.push(...this.describe(c.args, 'Arguments'));
    else out.push('Arguments: none', '');
    if (c.returns) out.push(...this.describe(c.returns, 'Returns'));
    else out.push('Returns: `{}`', '');
    const examples = c.examples ?? [];
    if (examples.length) out.push(examples.length > 1 ? 'Examples:' : 'Example:', '');
    for (const ex of examples) out.push(...commandExample(c.name, ex));
    return out;
  }

  event(e: EventDef): string[] {
    const out = [`### ${e.name}`, '', e.doc, '', 'Data:', '', ...this.membersTable(e.data.members)];
    const examples = e.examples ?? [];
    if (examples.length) out.push(examples.length > 1 ? 'Examples:' : 'Example:', '');
    for (const ex of examples) {
      const msg = { event: e.name, data: ex.data, timestamp: EXAMPLE_TIME };
      out.push(...exampleTitle(ex.title), '```', message('<- ', msg), '```', '');
    }
    return out;
  }

  type(name: string, list: ListedType[]): string[] {
    const out = [`### ${name}`, ''];
    const at = this.pointsToCommand(name);
    if (at) return [...out, `Listed with [${at}](#${anchor(at)}).`, ''];
    for (const { type, usedBy } of list) {
      if (list.length > 1)
        out.push(`As ${[...usedBy].sort().join(', ')} use${usedBy.size > 1 ? '' : 's'} it:`, '');
      if (type.doc) out.push(type.doc, '');
      if (type.kind === 'alternate') {
        out.push(`One of: ${type.of.map((b) => this.label(b)).join(', ')}`, '');
      } else out.push(...this.objectTables(type));
    }
    return out;
  }
}

/** The command reference (docs/qmp-commands.md), generated from the registry's schemas. */
export function renderCommandReference(r: CommandRegistry): string {
  const cat = catalogue(r);
  const render = new Renderer(r, cat);
  const out = [
    '# QMP command reference',
    '',
    '<!-- Generated by packages/qmp/scripts/gen-docs.ts from the command schemas; do not edit. -->',
    '',
    'Argument errors use the texts of QEMU 7.2 (e.g. "Parameter \'x\' is missing"). Types: `int` is a',
    'signed 64-bit integer, `uint32`/`uint64`/`size` unsigned ones; `[T]` is a list of T. The',
    'types members refer to are listed under [Types](#types). In the examples `->` is what the',
    'client sends and `<-` what the server answers.',
    '',
    '## Commands',
    '',
  ];
  for (const c of sortedCommands(r)) out.push(...render.command(c));
  out.push('## Events', '');
  for (const e of sortedEvents(r)) out.push(...render.event(e));
  out.push('## Types', '');
  for (const name of [...cat.types.keys()].sort((a, b) => a.localeCompare(b))) {
    out.push(...render.type(name, cat.types.get(name)!));
  }
  return `${out.join('\n').trimEnd()}\n`;
}
