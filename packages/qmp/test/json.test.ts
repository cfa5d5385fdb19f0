import { describe, expect, it } from 'vitest';
import { JsonStreamer, parseQmpJson, qdictOrder, type StreamItem, toQmpJson } from '../src/index';

function feed(chunks: string[], maxBytes?: number): StreamItem[] {
  const out: StreamItem[] = [];
  const s = new JsonStreamer((i) => out.push(i), { maxBytes });
  for (const c of chunks) s.feed(c);
  return out;
}

describe('JsonStreamer', () => {
  it('joins values split anywhere, including inside strings, escapes and numbers', () => {
    const text = '{"a": "b\\u00e9c", "n": -12.5e1, "l": [true, false, null]}';
    for (let cut = 1; cut < text.length; cut++) {
      expect(feed([text.slice(0, cut), text.slice(cut), '\n'])).toEqual([
        { value: { a: 'béc', n: -125, l: [true, false, null] } },
      ]);
    }
  });

  it('splits UTF-8 characters across Buffer chunks correctly', () => {
    const out: StreamItem[] = [];
    const s = new JsonStreamer((i) => out.push(i));
    const bytes = Buffer.from('{"a":"é€😀"}');
    for (const b of bytes) s.feed(Buffer.from([b]));
    expect(out).toEqual([{ value: { a: 'é€😀' } }]);
  });

  it('refuses a value over the size limit without keeping it, then goes on', () => {
    const out = feed([`{"id":"${'x'.repeat(5000)}"}`, '{"ok":1}'], 1000);
    expect(out).toEqual([
      { error: 'JSON token size limit exceeded' },
      { error: 'JSON parse error, expecting value' },
      { value: { ok: 1 } },
    ]);
    const many = feed([`[${'1,'.repeat(600)}1]`, '[2]'], 1000);
    expect(many[0]).toEqual({ error: 'JSON token size limit exceeded' });
    expect(many.at(-1)).toEqual({ value: [2] });
  });

  it('does not let keys reach the prototype', () => {
    const [item] = parseQmpJson('{"__proto__": {"polluted": 1}}');
    const v = (item as { value: any }).value;
    expect(Object.keys(v)).toEqual(['__proto__']);
    expect(({} as any).polluted).toBeUndefined();
  });
});

describe('toQmpJson', () => {
  it('orders keys as QEMU QDicts print them', () => {
    expect(qdictOrder(['major', 'minor', 'micro'])).toEqual(['micro', 'minor', 'major']);
    expect(qdictOrder(['return', 'id'])).toEqual(['return', 'id']);
    expect(qdictOrder(['event', 'data', 'timestamp'])).toEqual(['timestamp', 'event', 'data']);
    expect(toQmpJson({ id: 1, error: { desc: 'd', class: 'c' } })).toBe(
      '{"id": 1, "error": {"class": "c", "desc": "d"}}',
    );
  });

  it('writes numbers and strings as QEMU does', () => {
    expect(toQmpJson([1.5e3, -0, Number.POSITIVE_INFINITY, 'a"\\\u0001é'])).toBe(
      '[1500, -0, inf, "a\\"\\\\\\u0001\\u00E9"]',
    );
  });
});
