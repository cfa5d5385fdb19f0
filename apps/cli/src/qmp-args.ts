import { CliFailure } from './failure';

/*
 * QMP command lines as qmp-shell takes them: `name key=value ...` (values JSON when they parse,
 * dotted keys nest: file.driver=file), a JSON object of arguments, or a whole `{"execute": ...}`.
 */

export interface QmpCall {
  execute: string;
  arguments?: Record<string, unknown>;
}

function jsonOrString(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** key=value pairs into an arguments object. */
export function parseKeyValues(items: string[]): Record<string, unknown> {
  const args: Record<string, unknown> = {};
  for (const item of items) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new CliFailure(`Invalid argument '${item}': expected key=value`);
    const path = item.slice(0, eq).split('.');
    let obj = args;
    for (const key of path.slice(0, -1)) {
      const inner = obj[key];
      if (inner !== undefined && (typeof inner !== 'object' || inner === null))
        throw new CliFailure(`Cannot set '${item.slice(0, eq)}': '${key}' has a value`);
      if (inner === undefined) obj[key] = {};
      obj = obj[key] as Record<string, unknown>;
    }
    const last = path[path.length - 1]!;
    if (last in obj) throw new CliFailure(`Duplicate key '${item.slice(0, eq)}'`);
    obj[last] = jsonOrString(item.slice(eq + 1));
  }
  return args;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** One command from a name and its argument words (key=value pairs or one JSON object). */
export function qmpCall(name: string, words: string[]): QmpCall {
  if (words.length === 1 && words[0]!.trim().startsWith('{')) {
    const parsed = jsonOrString(words[0]!);
    if (!isObject(parsed)) throw new CliFailure(`Invalid JSON arguments: ${words[0]}`);
    return { execute: name, arguments: parsed };
  }
  return words.length ? { execute: name, arguments: parseKeyValues(words) } : { execute: name };
}

/** Splits a shell line into words, keeping JSON objects and quoted strings whole. */
export function splitLine(line: string): string[] {
  const words: string[] = [];
  let cur = '';
  let depth = 0;
  let quote: string | null = null;
  for (const ch of line) {
    if (quote) {
      cur += ch;
      if (ch === quote) quote = null;
      continue;
    }
    if (ch === '"' || ch === "'") quote = ch;
    else if (ch === '{' || ch === '[') depth++;
    else if (ch === '}' || ch === ']') depth--;
    if (/\s/.test(ch) && depth === 0) {
      if (cur) words.push(cur);
      cur = '';
    } else cur += ch;
  }
  if (cur) words.push(cur);
  // A quoted value is a JSON string; quotes around a plain word only group it.
  return words.map((w) => w.replace(/^([^=]*=)'(.*)'$/, '$1$2'));
}

/** A qmp-shell line: raw JSON `{"execute": ...}` or `name key=value ...`. */
export function parseShellLine(line: string): QmpCall | null {
  const text = line.trim();
  if (!text || text.startsWith('#')) return null;
  if (text.startsWith('{')) {
    const parsed = jsonOrString(text);
    if (!isObject(parsed) || typeof parsed.execute !== 'string')
      throw new CliFailure(`Invalid QMP message: ${text}`);
    return parsed.arguments === undefined
      ? { execute: parsed.execute }
      : { execute: parsed.execute, arguments: parsed.arguments as Record<string, unknown> };
  }
  const [name, ...words] = splitLine(text);
  return qmpCall(name!, words);
}
