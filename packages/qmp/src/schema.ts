import type { OptionSchema, OptionType } from '@blockrep/block';
import { QmpError } from './errors';

/**
 * QAPI types: the one description of a command's arguments and return value. From it come the
 * validation of arguments (with QEMU 7.2's error texts), `query-qmp-schema` and the generated
 * command reference.
 */
/**
 * 'driver-size': a QAPI int that the driver reads as a size, so a negative value gets QEMU's
 * QemuOpts complaint ("expects a non-negative number below 2^64").
 */
export type IntWidth = 'int' | 'uint32' | 'uint64' | 'size' | 'driver-size';

export type QType =
  | { kind: 'str' | 'bool' | 'number' | 'null' | 'any'; doc?: string }
  | { kind: 'int'; width: IntWidth }
  | { kind: 'enum'; name: string; values: readonly string[]; doc?: string }
  | { kind: 'array'; of: QType }
  | { kind: 'alternate'; name: string; of: readonly QType[]; doc?: string }
  | QObjectType;

export interface QObjectType {
  kind: 'object';
  name: string;
  members: QMembers;
  /** A flat union: the tag is one of `members` (an enum); variants add members per tag value. */
  union?: { tag: string; variants: () => Record<string, QMembers> };
  doc?: string;
}

export interface QMember {
  type: QType;
  optional?: boolean;
  doc?: string;
}

export type QMembers = Record<string, QMember>;

/** Builders for short, readable schemas. */
export const t = {
  str: { kind: 'str' } as QType,
  bool: { kind: 'bool' } as QType,
  number: { kind: 'number' } as QType,
  null: { kind: 'null' } as QType,
  any: { kind: 'any' } as QType,
  int: { kind: 'int', width: 'int' } as QType,
  uint32: { kind: 'int', width: 'uint32' } as QType,
  uint64: { kind: 'int', width: 'uint64' } as QType,
  size: { kind: 'int', width: 'size' } as QType,
  enum: (name: string, values: readonly string[], doc?: string): QType => ({
    kind: 'enum',
    name,
    values,
    doc,
  }),
  array: (of: QType): QType => ({ kind: 'array', of }),
  alternate: (name: string, of: readonly QType[], doc?: string): QType => ({
    kind: 'alternate',
    name,
    of,
    doc,
  }),
  object: (name: string, members: QMembers, doc?: string): QObjectType => ({
    kind: 'object',
    name,
    members,
    doc,
  }),
  union: (
    name: string,
    members: QMembers,
    tag: string,
    variants: () => Record<string, QMembers>,
    doc?: string,
  ): QObjectType => ({ kind: 'object', name, members, union: { tag, variants }, doc }),
};

/** A required member. */
export function req(type: QType, doc = ''): QMember {
  return { type, doc };
}

/** An optional member. */
export function opt(type: QType, doc = ''): QMember {
  return { type, optional: true, doc };
}

export const EMPTY_OBJECT: QObjectType = t.object('Empty', {});

// ---- validation ----

function invalidType(name: string, expected: string): QmpError {
  return QmpError.generic(`Invalid parameter type for '${name}', expected: ${expected}`);
}

/** Where a value sits: its full path for most errors, and its bare name, which QEMU's enum and
 * alternate errors use ('null' for list elements). */
interface Where {
  path: string;
  name: string | null;
}

function jsonKind(v: unknown): 'object' | 'array' | 'string' | 'number' | 'boolean' | 'null' | 'other' {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  const k = typeof v;
  if (k === 'object' || k === 'string' || k === 'number' || k === 'boolean') return k;
  return 'other';
}

/** The branch of an alternate a value of this JSON type goes to (QAPI dispatches on the type). */
function alternateBranch(alt: readonly QType[], v: unknown): QType | undefined {
  const k = jsonKind(v);
  return alt.find((b) => {
    switch (b.kind) {
      case 'object':
        return k === 'object';
      case 'array':
        return k === 'array';
      case 'str':
      case 'enum':
        return k === 'string';
      case 'int':
      case 'number':
        return k === 'number';
      case 'bool':
        return k === 'boolean';
      case 'null':
        return k === 'null';
      default:
        return true;
    }
  });
}

function checkInt(width: IntWidth, v: unknown, w: Where): number {
  const isInt = typeof v === 'number' && Number.isInteger(v);
  if (width === 'int' || width === 'driver-size') {
    if (!isInt) throw invalidType(w.path, 'integer');
    if (width === 'driver-size' && (v as number) < 0) {
      throw QmpError.generic(`Parameter '${w.name ?? w.path}' expects a non-negative number below 2^64`);
    }
    return v as number;
  }
  if (!isInt || (v as number) < 0) {
    // QEMU lets negative numbers through uint64 (they wrap), so a uint32 then fails its range.
    if (isInt && width === 'uint32') throw QmpError.generic(`Parameter '${w.path}' expects uint32_t`);
    throw QmpError.generic(`Parameter '${w.path}' expects uint64`);
  }
  if (width === 'uint32' && (v as number) > 0xffffffff)
    throw QmpError.generic(`Parameter '${w.path}' expects uint32_t`);
  return v as number;
}

function check(type: QType, v: unknown, w: Where): void {
  switch (type.kind) {
    case 'any':
      return;
    case 'str':
      if (typeof v !== 'string') throw invalidType(w.path, 'string');
      return;
    case 'bool':
      if (typeof v !== 'boolean') throw invalidType(w.path, 'boolean');
      return;
    case 'number':
      if (typeof v !== 'number') throw invalidType(w.path, 'number');
      return;
    case 'null':
      if (v !== null) throw invalidType(w.path, 'null');
      return;
    case 'int':
      checkInt(type.width, v, w);
      return;
    case 'enum':
      if (typeof v !== 'string') throw invalidType(w.path, 'string');
      if (!type.values.includes(v))
        throw QmpError.generic(`Parameter '${w.name ?? 'null'}' does not accept value '${v}'`);
      return;
    case 'array':
      if (!Array.isArray(v)) throw invalidType(w.path, 'array');
      v.forEach((e, i) => {
        check(type.of, e, { path: `${w.path}[${i}]`, name: null });
      });
      return;
    case 'alternate': {
      const branch = alternateBranch(type.of, v);
      if (!branch) throw invalidType(w.name ?? 'null', type.name);
      check(branch, v, w);
      return;
    }
    case 'object':
      checkObject(type, v, w);
  }
}

function checkObject(type: QObjectType, v: unknown, w: Where): void {
  if (jsonKind(v) !== 'object') throw invalidType(w.path || 'null', 'object');
  const o = v as Record<string, unknown>;
  const sub = (key: string) => (w.path ? `${w.path}.${key}` : key);
  const visit = (members: QMembers) => {
    for (const [key, m] of Object.entries(members)) {
      if (!Object.hasOwn(o, key)) {
        if (!m.optional) throw QmpError.generic(`Parameter '${sub(key)}' is missing`);
        continue;
      }
      check(m.type, o[key], { path: sub(key), name: key });
    }
  };
  visit(type.members);
  let known: QMembers = type.members;
  if (type.union) {
    const variant = type.union.variants()[o[type.union.tag] as string] ?? {};
    visit(variant);
    known = { ...known, ...variant };
  }
  for (const key of Object.keys(o)) {
    if (!Object.hasOwn(known, key)) throw QmpError.generic(`Parameter '${sub(key)}' is unexpected`);
  }
}

/** Checks a command's arguments against its argument type; throws a QmpError with QEMU's text. */
export function validateArgs(type: QObjectType, args: Record<string, unknown>): void {
  checkObject(type, args, { path: '', name: null });
}

/** Checks any value against a type (nested uses: reopen entries, tests of return values). */
export function validateValue(type: QType, v: unknown, path = ''): void {
  check(type, v, { path, name: path || null });
}

// ---- from the block layer's option schemas ----

/**
 * Converts a driver's option schema into QAPI members (BlockdevOptions<Driver>), with child
 * references as the BlockdevRef alternate.
 */
export function optionMembers(schema: OptionSchema, prefix: string, refs: BlockdevRefTypes): QMembers {
  const out: QMembers = {};
  for (const [key, spec] of Object.entries(schema)) {
    out[key] = {
      type: optionType(spec.type, `${prefix}-${key}`, refs),
      optional: !spec.required,
      doc: spec.doc,
    };
  }
  return out;
}

export interface BlockdevRefTypes {
  ref: QType;
  refOrNull: QType;
}

function optionType(ot: OptionType, name: string, refs: BlockdevRefTypes): QType {
  switch (ot.kind) {
    case 'string':
      return t.str;
    case 'bool':
      return t.bool;
    case 'int':
      // Ranges are the driver's to check, with its own words (QAPI only knows "int" here).
      return t.int;
    case 'size':
      return { kind: 'int', width: 'driver-size' };
    case 'number':
      return t.number;
    case 'enum':
      return t.enum(name, ot.values);
    case 'child':
      return ot.nullable ? refs.refOrNull : refs.ref;
    case 'children':
      return t.array(refs.ref);
    case 'struct':
      return t.object(name, optionMembers(ot.fields, name, refs));
    case 'list':
      return t.array(optionType(ot.of, name, refs));
    case 'union':
      return t.union(
        name,
        {
          [ot.tag]: req(
            t.enum(`${name}-${ot.tag}`, Object.keys(ot.variants)),
            'Which variant: it says which further members apply',
          ),
          ...optionMembers(ot.base ?? {}, name, refs),
        },
        ot.tag,
        () =>
          Object.fromEntries(
            Object.entries(ot.variants).map(([k, s]) => [k, optionMembers(s, `${name}-${k}`, refs)]),
          ),
      );
    case 'alternate':
      return t.alternate(
        name,
        ot.of.map((o, i) => optionType(o, `${name}-${i}`, refs)),
      );
    case 'any':
      return t.any;
  }
}

// ---- introspection (query-qmp-schema) ----

export type SchemaInfo = Record<string, unknown> & { name: string; 'meta-type': string };

const BUILTIN_JSON: Record<string, string> = {
  str: 'string',
  int: 'int',
  number: 'number',
  bool: 'boolean',
  null: 'null',
  any: 'value',
};

/**
 * Builds SchemaInfo entries for commands and events. Type names are masked as numbers, as QEMU
 * does (only command, event and built-in names are stable).
 */
export class SchemaIntrospector {
  readonly entries: SchemaInfo[] = [];
  private readonly names = new Map<object, string>();
  private readonly byName = new Map<string, string>();
  private counter = 0;

  command(name: string, args: QObjectType, returns: QType, features?: string[]): void {
    const e: SchemaInfo = {
      name,
      'meta-type': 'command',
      'arg-type': this.ref(args),
      'ret-type': this.ref(returns),
    };
    if (features?.length) e.features = features;
    this.entries.unshift(e);
  }

  event(name: string, data: QObjectType): void {
    this.entries.unshift({ name, 'meta-type': 'event', 'arg-type': this.ref(data) });
  }

  /** The SchemaInfo name of a type, emitting its entry the first time. */
  ref(type: QType): string {
    switch (type.kind) {
      case 'str':
      case 'bool':
      case 'number':
      case 'null':
      case 'any':
        return this.builtin(type.kind);
      case 'int':
        return this.builtin('int');
      case 'array': {
        const el = this.ref(type.of);
        const n = `[${el}]`;
        if (!this.byName.has(n)) {
          this.byName.set(n, n);
          this.entries.push({ name: n, 'meta-type': 'array', 'element-type': el });
        }
        return n;
      }
      default:
        return this.named(type);
    }
  }

  private builtin(n: string): string {
    if (!this.byName.has(n)) {
      this.byName.set(n, n);
      this.entries.push({ name: n, 'meta-type': 'builtin', 'json-type': BUILTIN_JSON[n]! });
    }
    return n;
  }

  private named(
    type: Exclude<QType, { kind: 'str' | 'bool' | 'number' | 'null' | 'any' | 'int' | 'array' }>,
  ): string {
    const known = this.names.get(type) ?? this.byName.get(`${type.kind}:${type.name}`);
    if (known) return known;
    const n = String(this.counter++);
    this.names.set(type, n);
    this.byName.set(`${type.kind}:${type.name}`, n);
    const entry: SchemaInfo = { name: n, 'meta-type': type.kind };
    this.entries.push(entry);
    if (type.kind === 'enum') {
      entry.members = type.values.map((v) => ({ name: v }));
      entry.values = [...type.values];
    } else if (type.kind === 'alternate') {
      entry.members = type.of.map((b) => ({ type: this.ref(b) }));
    } else {
      entry.members = this.members(type.members);
      if (type.union) {
        entry.tag = type.union.tag;
        entry.variants = Object.entries(type.union.variants()).map(([c, members]) => ({
          case: c,
          type: this.ref(t.object(`${type.name}-${c}`, members)),
        }));
      }
    }
    return n;
  }

  private members(ms: QMembers): Record<string, unknown>[] {
    return Object.entries(ms).map(([name, m]) => {
      const e: Record<string, unknown> = { name, type: this.ref(m.type) };
      if (m.optional) e.default = null;
      return e;
    });
  }
}

/** A short human name of a type for the generated documentation. */
export function typeLabel(type: QType): string {
  switch (type.kind) {
    case 'int':
      return type.width === 'driver-size' ? 'size' : type.width;
    case 'array':
      return `[${typeLabel(type.of)}]`;
    case 'enum':
    case 'alternate':
    case 'object':
      return type.name;
    default:
      return type.kind;
  }
}
