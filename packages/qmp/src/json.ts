import { StringDecoder } from 'node:string_decoder';

/**
 * QMP's JSON: a streaming reader with QEMU's extensions and error texts (single-quoted strings,
 * values split across reads or several in one read, nesting and size limits) and a writer that
 * formats like QEMU (", " and ": " separators, non-ASCII as \uXXXX).
 */

export const MAX_NESTING = 1024;
export const MAX_TOKEN_BYTES = 64 << 20;
export const MAX_TOKEN_COUNT = 2 << 20;

type TokenKind = '{' | '}' | '[' | ']' | ',' | ':' | 'string' | 'number' | 'keyword' | 'error';

interface Token {
  kind: TokenKind;
  text: string;
}

const NUMBER_CHARS = /[0-9+\-.eE]/;
const NUMBER_PREFIX = /^-?(?:$|(?:0|[1-9]\d*)(?:$|\.\d*$|(?:\.\d+)?[eE][+-]?\d*$))/;
const NUMBER_FULL = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/;
const WHITESPACE = new Set([' ', '\t', '\r', '\n']);
const PUNCT = new Set(['{', '}', '[', ']', ',', ':']);
const RESYNC = PUNCT;

class JsonSyntaxError extends Error {}

/** A value or a parse error ("JSON parse error, ..." as QEMU words it). */
export type StreamItem = { value: unknown } | { error: string };

/**
 * Splits a byte stream into JSON values the way QEMU's json-streamer does: tokens are collected
 * until the braces and brackets balance, then parsed; an error drops what was collected and
 * reading goes on with the next token.
 */
export class JsonStreamer {
  private readonly decoder = new StringDecoder('utf8');
  private mode: 'start' | 'string' | 'number' | 'keyword' | 'recovery' = 'start';
  private text = '';
  private quote = '';
  private escape = false;
  private tokens: Token[] = [];
  private depth = 0;
  private bytes = 0;

  /** Bytes one value may take before it is refused (QEMU: 64 MiB). */
  private readonly maxBytes: number;
  /** The string being read is over the limit: it is scanned to its end, not kept. */
  private oversized = false;

  constructor(
    private readonly emit: (item: StreamItem) => void,
    opts: { maxBytes?: number } = {},
  ) {
    this.maxBytes = opts.maxBytes ?? MAX_TOKEN_BYTES;
  }

  feed(chunk: Buffer | string): void {
    const s = typeof chunk === 'string' ? chunk : this.decoder.write(chunk);
    let i = 0;
    while (i < s.length) {
      if (this.mode === 'string' && !this.escape) {
        // Copy a run of ordinary characters at once: big strings must not cost a call per char.
        let j = i;
        while (j < s.length) {
          const code = s.charCodeAt(j);
          if (code < 0x20 || code === 0x5c || s[j] === this.quote) break;
          j++;
        }
        if (j > i) {
          this.appendString(s.slice(i, j));
          i = j;
          continue;
        }
      }
      this.char(s[i]!);
      i++;
    }
  }

  /** End of input: a value still being read is dropped (QEMU ignores it too). */
  reset(): void {
    this.mode = 'start';
    this.oversized = false;
    this.text = '';
    this.tokens = [];
    this.depth = 0;
    this.bytes = 0;
  }

  private char(c: string): void {
    switch (this.mode) {
      case 'recovery':
        // After a lexical error QEMU skips to a point where a token can start for sure: a
        // structural character or a control character other than tab.
        if (RESYNC.has(c) || (c < ' ' && c !== '\t')) {
          this.mode = 'start';
          this.char(c);
        }
        return;
      case 'string':
        this.appendString(c);
        if (this.escape) {
          this.escape = false;
        } else if (c === '\\') {
          this.escape = true;
        } else if (c === this.quote) {
          if (this.oversized) {
            this.oversized = false;
            this.mode = 'start';
            this.text = '';
            this.fail('JSON token size limit exceeded');
          } else {
            this.token('string', this.text);
          }
        } else if (c < ' ') {
          this.lexError();
        }
        return;
      case 'number':
        if (NUMBER_CHARS.test(c)) {
          this.text += c;
          if (!NUMBER_PREFIX.test(this.text)) this.lexError();
          return;
        }
        if (!NUMBER_FULL.test(this.text)) {
          this.text += c;
          this.lexError();
          return;
        }
        this.token('number', this.text);
        this.char(c);
        return;
      case 'keyword':
        if (/[A-Za-z]/.test(c)) {
          this.text += c;
          if (this.text.length > this.maxBytes) {
            this.fail('JSON token size limit exceeded');
            this.text = '';
            this.mode = 'recovery';
          }
          return;
        }
        this.token('keyword', this.text);
        this.char(c);
        return;
      case 'start':
        if (WHITESPACE.has(c)) return;
        if (PUNCT.has(c)) {
          this.token(c as TokenKind, c);
          return;
        }
        this.text = c;
        if (c === '"' || c === "'") {
          this.mode = 'string';
          this.quote = c;
          this.escape = false;
        } else if (c === '-' || (c >= '0' && c <= '9')) {
          this.mode = 'number';
        } else if (/[A-Za-z]/.test(c)) {
          this.mode = 'keyword';
        } else {
          // QEMU's lexer sees bytes: the stray token is the first byte of a multi-byte character,
          // which its output shows as U+FFFD.
          if (c > '\x7f') this.text = '\ufffd';
          this.lexError();
        }
    }
  }

  /** Adds to the string being read; past the limit only its length is counted, not its text. */
  private appendString(part: string): void {
    if (this.oversized) return;
    this.text += part;
    if (this.bytes + this.text.length > this.maxBytes) {
      this.oversized = true;
      this.text = this.quote;
    }
  }

  private lexError(): void {
    this.token('error', this.text);
  }

  private token(kind: TokenKind, text: string): void {
    this.mode = 'start';
    this.text = '';
    if (kind === 'error') {
      this.fail(`JSON parse error, stray '${text}'`);
      this.mode = 'recovery';
      return;
    }
    this.bytes += text.length;
    if (kind === '{' || kind === '[') {
      this.depth++;
      if (this.depth > MAX_NESTING) {
        this.fail('JSON nesting depth limit exceeded');
        return;
      }
    } else if (kind === '}' || kind === ']') {
      this.depth--;
    }
    this.tokens.push({ kind, text });
    if (this.bytes > this.maxBytes) {
      this.fail('JSON token size limit exceeded');
      return;
    }
    if (this.tokens.length > MAX_TOKEN_COUNT) {
      this.fail('JSON token count limit exceeded');
      return;
    }
    if (this.depth <= 0) {
      const tokens = this.tokens;
      this.tokens = [];
      this.depth = 0;
      this.bytes = 0;
      try {
        this.emit({ value: new TokenParser(tokens).parse() });
      } catch (e) {
        if (!(e instanceof JsonSyntaxError)) throw e;
        this.emit({ error: `JSON parse error, ${e.message}` });
      }
    }
  }

  private fail(msg: string): void {
    this.tokens = [];
    this.depth = 0;
    this.bytes = 0;
    this.emit({ error: msg });
  }
}

class TokenParser {
  private pos = 0;

  constructor(private readonly tokens: Token[]) {}

  parse(): unknown {
    return this.value();
  }

  private next(): Token | undefined {
    return this.tokens[this.pos++];
  }

  private value(): unknown {
    const t = this.next();
    if (!t) throw new JsonSyntaxError('premature end of input');
    switch (t.kind) {
      case '{':
        return this.object();
      case '[':
        return this.array();
      case 'string':
        return decodeString(t.text);
      case 'number':
        return Number(t.text);
      case 'keyword':
        if (t.text === 'true') return true;
        if (t.text === 'false') return false;
        if (t.text === 'null') return null;
        throw new JsonSyntaxError(`invalid keyword '${t.text}'`);
      default:
        throw new JsonSyntaxError('expecting value');
    }
  }

  private object(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    if (this.tokens[this.pos]?.kind === '}') {
      this.pos++;
      return out;
    }
    for (;;) {
      const key = this.value();
      if (typeof key !== 'string') throw new JsonSyntaxError('key is not a string in object');
      if (this.next()?.kind !== ':') throw new JsonSyntaxError('missing : in object pair');
      const v = this.value();
      if (Object.hasOwn(out, key)) throw new JsonSyntaxError('duplicate key');
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
      const sep = this.next();
      if (sep?.kind === '}') return out;
      if (sep?.kind !== ',') throw new JsonSyntaxError('expected separator in dict');
    }
  }

  private array(): unknown[] {
    const out: unknown[] = [];
    if (this.tokens[this.pos]?.kind === ']') {
      this.pos++;
      return out;
    }
    for (;;) {
      out.push(this.value());
      const sep = this.next();
      if (sep?.kind === ']') return out;
      if (sep?.kind !== ',') throw new JsonSyntaxError('expected separator in list');
    }
  }
}

const SIMPLE_ESCAPES: Record<string, string> = {
  '"': '"',
  "'": "'",
  '\\': '\\',
  '/': '/',
  b: '\b',
  f: '\f',
  n: '\n',
  r: '\r',
  t: '\t',
};

function hex4(s: string, at: number): number {
  const h = s.slice(at, at + 4);
  return /^[0-9a-fA-F]{4}$/.test(h) ? Number.parseInt(h, 16) : -1;
}

/** Decodes a quoted string token (either quote), with QEMU's complaints about bad escapes. */
function decodeString(tok: string): string {
  if (tok.indexOf('\\') < 0) return tok.slice(1, -1);
  let out = '';
  const end = tok.length - 1;
  for (let i = 1; i < end; i++) {
    const c = tok[i]!;
    if (c !== '\\') {
      out += c;
      continue;
    }
    const e = tok[++i]!;
    if (e in SIMPLE_ESCAPES) {
      out += SIMPLE_ESCAPES[e];
      continue;
    }
    if (e !== 'u') throw new JsonSyntaxError('invalid escape sequence in string');
    const bad = () => new JsonSyntaxError(`${tok.slice(i - 1, i + 5)} is not a valid Unicode character`);
    const cp = hex4(tok, i + 1);
    if (cp < 0) throw bad();
    if (cp >= 0xd800 && cp <= 0xdbff) {
      const lo = tok[i + 5] === '\\' && tok[i + 6] === 'u' ? hex4(tok, i + 7) : -1;
      if (lo < 0xdc00 || lo > 0xdfff) throw bad();
      out += String.fromCharCode(cp, lo);
      i += 10;
      continue;
    }
    if (cp >= 0xdc00 && cp <= 0xdfff) throw bad();
    out += String.fromCharCode(cp);
    i += 4;
  }
  return out;
}

const NEEDS_ESCAPE = /["\\\u0000-\u001f\u007f-\uffff]/g;
const SHORT_ESCAPES: Record<string, string> = {
  '"': '\\"',
  '\\': '\\\\',
  '\b': '\\b',
  '\f': '\\f',
  '\n': '\\n',
  '\r': '\\r',
  '\t': '\\t',
};

function escapeChar(c: string): string {
  return SHORT_ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`;
}

function quote(s: string): string {
  return `"${s.replace(NEEDS_ESCAPE, escapeChar)}"`;
}

function number(n: number): string {
  if (Number.isNaN(n)) return 'nan';
  if (n === Number.POSITIVE_INFINITY) return 'inf';
  if (n === Number.NEGATIVE_INFINITY) return '-inf';
  if (Object.is(n, -0)) return '-0';
  return String(n);
}

const QDICT_BUCKETS = 512;

/** The bucket hash of QEMU's QDict (gdbm's, via tdb), which decides the order keys print in. */
function qdictHash(key: string): number {
  const b = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) v = (v + ((b[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, v) + 12345) >>> 0;
}

const bucketCache = new Map<string, number>();

function bucket(key: string): number {
  let b = bucketCache.get(key);
  if (b === undefined) {
    b = qdictHash(key) % QDICT_BUCKETS;
    if (bucketCache.size < 10_000) bucketCache.set(key, b);
  }
  return b;
}

/**
 * Keys in the order QEMU prints a dictionary: by hash bucket, and within a bucket the key added
 * last first. With keys added in QAPI member order the output is byte for byte QEMU's.
 */
export function qdictOrder(keys: string[]): string[] {
  return keys
    .map((k, i) => ({ k, i, b: bucket(k) }))
    .sort((x, y) => x.b - y.b || y.i - x.i)
    .map((x) => x.k);
}

/** Serialises like QEMU's monitor: `{"a": 1, "b": [1, 2]}`, ASCII only. */
export function toQmpJson(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  switch (typeof v) {
    case 'string':
      return quote(v);
    case 'number':
      return number(v);
    case 'bigint':
      return v.toString();
    case 'boolean':
      return v ? 'true' : 'false';
    case 'object': {
      if (Array.isArray(v)) return `[${v.map(toQmpJson).join(', ')}]`;
      const parts: string[] = [];
      for (const k of qdictOrder(Object.keys(v as Record<string, unknown>))) {
        const x = (v as Record<string, unknown>)[k];
        if (x !== undefined) parts.push(`${quote(k)}: ${toQmpJson(x)}`);
      }
      return `{${parts.join(', ')}}`;
    }
    default:
      return 'null';
  }
}

/**
 * Pretty-prints like QEMU's qobject_to_json_pretty (what `qemu-img ... --output=json` prints):
 * four spaces per level, keys in QDict order, an empty list or object still on two lines.
 */
export function toQemuPrettyJson(v: unknown, level = 0): string {
  const pad = (n: number) => '    '.repeat(n);
  if (v === null || typeof v !== 'object') return toQmpJson(v);
  const items = Array.isArray(v)
    ? v.map((x) => `${pad(level + 1)}${toQemuPrettyJson(x, level + 1)}`)
    : qdictOrder(Object.keys(v as Record<string, unknown>))
        .filter((k) => (v as Record<string, unknown>)[k] !== undefined)
        .map(
          (k) =>
            `${pad(level + 1)}${quote(k)}: ${toQemuPrettyJson((v as Record<string, unknown>)[k], level + 1)}`,
        );
  const [open, close] = Array.isArray(v) ? ['[', ']'] : ['{', '}'];
  return items.length
    ? `${open}\n${items.join(',\n')}\n${pad(level)}${close}`
    : `${open}\n${pad(level)}${close}`;
}

/** Parses one complete JSON text with QMP's reader (for tests and the client). */
export function parseQmpJson(text: string): StreamItem[] {
  const out: StreamItem[] = [];
  const s = new JsonStreamer((i) => out.push(i));
  s.feed(`${text}\n`);
  return out;
}
