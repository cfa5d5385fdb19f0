import { BlockError } from './errors';

/**
 * Option schemas: what a driver (or a command) accepts. One declaration gives validation, the
 * coercion of command-line strings, defaults, and the documentation shown by `query-qmp-schema`.
 */
export type OptionType =
  | { kind: 'string' }
  | { kind: 'bool' }
  | { kind: 'int'; min?: number; max?: number }
  | { kind: 'size' }
  | { kind: 'number' }
  | { kind: 'enum'; values: readonly string[] }
  | { kind: 'child'; nullable?: boolean }
  | { kind: 'children' }
  | { kind: 'struct'; fields: OptionSchema }
  | { kind: 'list'; of: OptionType }
  | { kind: 'union'; tag: string; base?: OptionSchema; variants: Record<string, OptionSchema> }
  | { kind: 'alternate'; of: readonly OptionType[] }
  | { kind: 'any' };

export interface OptionSpec {
  type: OptionType;
  required?: boolean;
  default?: unknown;
  doc: string;
}

export type OptionSchema = Record<string, OptionSpec>;
export type Options = Record<string, unknown>;

/** Builders that keep schemas short and readable. */
export const opt = {
  string: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'string' },
    doc,
    ...extra,
  }),
  bool: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'bool' },
    doc,
    ...extra,
  }),
  int: (doc: string, extra: Partial<OptionSpec> & { min?: number; max?: number } = {}): OptionSpec => {
    const { min, max, ...rest } = extra;
    return { type: { kind: 'int', min, max }, doc, ...rest };
  },
  size: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'size' },
    doc,
    ...extra,
  }),
  number: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'number' },
    doc,
    ...extra,
  }),
  enum: (values: readonly string[], doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'enum', values },
    doc,
    ...extra,
  }),
  child: (doc: string, extra: Partial<OptionSpec> & { nullable?: boolean } = {}): OptionSpec => {
    const { nullable, ...rest } = extra;
    return { type: { kind: 'child', nullable }, doc, ...rest };
  },
  children: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'children' },
    doc,
    ...extra,
  }),
  struct: (fields: OptionSchema, doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'struct', fields },
    doc,
    ...extra,
  }),
  list: (of: OptionType, doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'list', of },
    doc,
    ...extra,
  }),
  any: (doc: string, extra: Partial<OptionSpec> = {}): OptionSpec => ({
    type: { kind: 'any' },
    doc,
    ...extra,
  }),
};

export interface ValidateHooks {
  /** The error for a key the schema does not know (default: QAPI's "Parameter 'x' is unexpected"). */
  unknownKey?: (path: string) => Error;
}

function optErr(msg: string): BlockError {
  return new BlockError(msg, { errno: 'EINVAL' });
}

const SIZE_SUFFIX: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/** Parses "64M", "1.5G", "4096" as QEMU's size parser does (binary suffixes). */
export function parseSize(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?|0x[0-9a-f]+)\s*([bkmgtpe])?\s*$/i.exec(text);
  if (!m) return undefined;
  const hex = m[1]!.toLowerCase().startsWith('0x');
  if (hex && m[2]) return undefined;
  const n = hex ? Number.parseInt(m[1]!, 16) : Number(m[1]);
  const v = n * SIZE_SUFFIX[(m[2] ?? 'b').toLowerCase()]!;
  if (!Number.isFinite(v) || (!Number.isInteger(v) && !m[2])) return undefined;
  const r = Math.floor(v);
  return r <= Number.MAX_SAFE_INTEGER ? r : undefined;
}

function parseIntText(text: string): number | undefined {
  const t = text.trim();
  if (!/^[-+]?(0x[0-9a-f]+|\d+)$/i.test(t)) return undefined;
  const neg = t.startsWith('-');
  const body = t.replace(/^[-+]/, '');
  const v = body.toLowerCase().startsWith('0x') ? Number.parseInt(body, 16) : Number(body);
  return Number.isSafeInteger(v) ? (neg ? -v : v) : undefined;
}

const BOOL_TEXT: Record<string, boolean> = {
  on: true,
  yes: true,
  true: true,
  off: false,
  no: false,
  false: false,
};

function typeName(t: OptionType): string {
  switch (t.kind) {
    case 'int':
    case 'size':
      return 'integer';
    case 'bool':
      return 'boolean';
    case 'struct':
    case 'union':
      return 'object';
    case 'list':
    case 'children':
      return 'array';
    case 'child':
      return 'BlockdevRef';
    default:
      return t.kind;
  }
}

/**
 * Checks a value against a type, converting the strings of the dotted key=value syntax into the
 * type's value. Errors use QEMU's texts and name the full dotted path of the bad parameter.
 */
export function coerceValue(t: OptionType, v: unknown, path: string, hooks: ValidateHooks = {}): unknown {
  const badType = () => optErr(`Invalid parameter type for '${path}', expected: ${typeName(t)}`);
  switch (t.kind) {
    case 'any':
      return v;
    case 'string':
      if (typeof v !== 'string') throw badType();
      return v;
    case 'bool':
      if (typeof v === 'boolean') return v;
      if (typeof v === 'string' && v in BOOL_TEXT) return BOOL_TEXT[v];
      if (typeof v === 'string') throw optErr(`Parameter '${path}' expects 'on' or 'off'`);
      throw badType();
    case 'int': {
      let n: number | undefined;
      if (typeof v === 'number') {
        if (!Number.isSafeInteger(v)) throw badType();
        n = v;
      } else if (typeof v === 'string') {
        n = parseIntText(v);
        if (n === undefined) throw optErr(`Parameter '${path}' expects integer`);
      } else throw badType();
      if ((t.min !== undefined && n < t.min) || (t.max !== undefined && n > t.max)) {
        throw optErr(`Parameter '${path}' expects a value between ${t.min ?? '-inf'} and ${t.max ?? 'inf'}`);
      }
      return n;
    }
    case 'size': {
      if (typeof v === 'number') {
        if (!Number.isSafeInteger(v) || v < 0) throw badType();
        return v;
      }
      if (typeof v === 'string') {
        const n = parseSize(v);
        if (n === undefined) throw optErr(`Parameter '${path}' expects a non-negative number below 2^64`);
        return n;
      }
      throw badType();
    }
    case 'number':
      if (typeof v === 'number') return v;
      if (typeof v === 'string' && v.trim() !== '' && Number.isFinite(Number(v))) return Number(v);
      if (typeof v === 'string') throw optErr(`Parameter '${path}' expects number`);
      throw badType();
    case 'enum':
      if (typeof v !== 'string') throw badType();
      if (!t.values.includes(v)) throw optErr(`Parameter '${path}' does not accept value '${v}'`);
      return v;
    case 'child':
      if (v === null && t.nullable) return null;
      if (typeof v === 'string' || (typeof v === 'object' && v !== null && !Array.isArray(v))) return v;
      throw badType();
    case 'children':
      if (!Array.isArray(v)) throw badType();
      v.forEach((c, i) => {
        if (typeof c !== 'string' && (typeof c !== 'object' || c === null || Array.isArray(c))) {
          throw optErr(`Invalid parameter type for '${path}[${i}]', expected: BlockdevRef`);
        }
      });
      return v;
    case 'list':
      if (!Array.isArray(v)) throw badType();
      return v.map((e, i) => coerceValue(t.of, e, `${path}[${i}]`, hooks));
    case 'struct':
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badType();
      return validateOptions(t.fields, v as Options, { ...hooks, prefix: `${path}.` });
    case 'union': {
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badType();
      const o = v as Options;
      const tagPath = `${path}.${t.tag}`;
      const tag = o[t.tag];
      if (tag === undefined) throw optErr(`Parameter '${tagPath}' is missing`);
      if (typeof tag !== 'string') throw optErr(`Invalid parameter type for '${tagPath}', expected: string`);
      const variant = t.variants[tag];
      if (!variant) throw optErr(`Parameter '${tagPath}' does not accept value '${tag}'`);
      const fields: OptionSchema = {
        [t.tag]: { type: { kind: 'enum', values: Object.keys(t.variants) }, required: true, doc: '' },
        ...t.base,
        ...variant,
      };
      return validateOptions(fields, o, { ...hooks, prefix: `${path}.` });
    }
    case 'alternate': {
      let first: unknown;
      for (const alt of t.of) {
        try {
          return coerceValue(alt, v, path, hooks);
        } catch (e) {
          first ??= e;
        }
      }
      throw first;
    }
  }
}

/** Validates an options object against a schema: types, required keys, unknown keys, defaults. */
export function validateOptions(
  schema: OptionSchema,
  input: Options,
  hooks: ValidateHooks & { prefix?: string; skipDefaults?: boolean } = {},
): Options {
  const prefix = hooks.prefix ?? '';
  const out: Options = {};
  for (const key of Object.keys(input)) {
    const spec = schema[key];
    const path = prefix + key;
    if (!spec) throw hooks.unknownKey ? hooks.unknownKey(path) : optErr(`Parameter '${path}' is unexpected`);
    const v = input[key];
    if (v === undefined) continue;
    out[key] = coerceValue(spec.type, v, path, { unknownKey: hooks.unknownKey });
  }
  for (const [key, spec] of Object.entries(schema)) {
    if (out[key] !== undefined) continue;
    if (spec.required) throw optErr(`Parameter '${prefix}${key}' is missing`);
    if (spec.default !== undefined && !hooks.skipDefaults) out[key] = spec.default;
  }
  return out;
}

/**
 * Parses QEMU's dotted key=value syntax ("driver=raw,file.driver=file,file.filename=a,,b.img")
 * into nested options; ",," is a literal comma, numeric keys make lists ("children.0.driver=").
 * `impliedKey` names the key of a first item given without "=" (e.g. "type" for --export).
 */
export function parseKeyVal(text: string, impliedKey?: string): Options {
  const root: Options = {};
  let i = 0;
  let first = true;
  while (i < text.length) {
    let key = '';
    const keyStart = i;
    while (i < text.length && text[i] !== '=' && text[i] !== ',') key += text[i++];
    let value: string;
    if (text[i] === '=') {
      i++;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] === ',') {
            value += ',';
            i += 2;
            continue;
          }
          break;
        }
        value += text[i++];
      }
    } else {
      if (!(first && impliedKey)) {
        throw optErr(
          key ? `Expected '=' after parameter '${key}'` : `Invalid parameter '' at offset ${keyStart}`,
        );
      }
      // An implied value may contain ",," escapes like any other value.
      i = keyStart;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] === ',') {
            value += ',';
            i += 2;
            continue;
          }
          break;
        }
        value += text[i++];
      }
      key = impliedKey;
    }
    if (text[i] === ',') {
      i++;
      if (i === text.length) throw optErr('Expected parameter before end of input');
    }
    first = false;
    const parts = key.split('.');
    for (const p of parts) {
      if (!/^[A-Za-z0-9_-]+$/.test(p)) throw optErr(`Invalid parameter '${key}'`);
    }
    let cur = root;
    for (let k = 0; k < parts.length - 1; k++) {
      const p = parts[k]!;
      const next = cur[p];
      if (next === undefined) cur[p] = {};
      else if (typeof next !== 'object') {
        throw optErr(`Parameter '${parts.slice(0, k + 1).join('.')}' used inconsistently`);
      }
      cur = cur[p] as Options;
    }
    const last = parts[parts.length - 1]!;
    if (typeof cur[last] === 'object') throw optErr(`Parameter '${key}' used inconsistently`);
    cur[last] = value;
  }
  return listify(root, '') as Options;
}

/** Objects whose keys are all 0..n-1 become arrays (QEMU's keyval list convention). */
function listify(o: unknown, path: string): unknown {
  if (typeof o !== 'object' || o === null) return o;
  const obj = o as Options;
  const keys = Object.keys(obj);
  for (const k of keys) obj[k] = listify(obj[k], path ? `${path}.${k}` : k);
  if (keys.length === 0 || !keys.every((k) => /^\d+$/.test(k))) {
    if (keys.some((k) => /^\d+$/.test(k)) && keys.some((k) => !/^\d+$/.test(k))) {
      throw optErr(`Parameter '${path ? `${path}.` : ''}${keys.find((k) => /^\d+$/.test(k))}' is unexpected`);
    }
    return obj;
  }
  const arr: unknown[] = [];
  for (let n = 0; n < keys.length; n++) {
    if (!(String(n) in obj)) throw optErr(`Parameter '${path ? `${path}.` : ''}${n}' missing`);
    arr.push(obj[String(n)]);
  }
  return arr;
}

/** Parses a command-line option value: JSON when it starts with '{', else dotted key=value. */
export function parseOptionArg(text: string, impliedKey?: string): Options {
  if (text.trimStart().startsWith('{')) {
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch (e) {
      throw optErr(`JSON parse error: ${(e as Error).message}`);
    }
    if (typeof v !== 'object' || v === null || Array.isArray(v))
      throw optErr('JSON options must be an object');
    return v as Options;
  }
  return parseKeyVal(text, impliedKey);
}
