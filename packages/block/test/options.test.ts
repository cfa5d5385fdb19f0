import { describe, expect, it } from 'vitest';
import { opt, parseKeyVal, parseOptionArg, parseSize, validateOptions } from '../src/index';

describe('parseKeyVal', () => {
  it('turns dotted keys into nested objects and ",," into a comma', () => {
    expect(parseKeyVal('driver=raw,file.driver=file,file.filename=a,,b.img')).toEqual({
      driver: 'raw',
      file: { driver: 'file', filename: 'a,b.img' },
    });
  });

  it('makes lists of numeric keys', () => {
    expect(parseKeyVal('driver=quorum,children.0=a,children.1.driver=file,children.1.filename=x')).toEqual({
      driver: 'quorum',
      children: ['a', { driver: 'file', filename: 'x' }],
    });
  });

  it('takes an implied first key', () => {
    expect(parseKeyVal('nbd,id=e0,node-name=n', 'type')).toEqual({ type: 'nbd', id: 'e0', 'node-name': 'n' });
  });

  it('lets the last of repeated keys win and keeps empty values', () => {
    expect(parseKeyVal('a=1,a=2,b=')).toEqual({ a: '2', b: '' });
  });

  it('rejects malformed input with a message naming the problem', () => {
    expect(() => parseKeyVal('driver')).toThrow("Expected '=' after parameter 'driver'");
    expect(() => parseKeyVal('file=x,file.driver=y')).toThrow("Parameter 'file' used inconsistently");
    expect(() => parseKeyVal('children.1=a')).toThrow("Parameter 'children.0' missing");
    expect(() => parseKeyVal('a b=1')).toThrow("Invalid parameter 'a b'");
    expect(() => parseKeyVal('a=1,')).toThrow('Expected parameter before end of input');
  });

  it('parseOptionArg accepts JSON too', () => {
    expect(parseOptionArg('{"driver":"null-co","size":512}')).toEqual({ driver: 'null-co', size: 512 });
    expect(() => parseOptionArg('{"driver":')).toThrow(/JSON parse error/);
  });
});

describe('validateOptions', () => {
  const schema = {
    name: opt.string('n', { required: true }),
    size: opt.size('s'),
    count: opt.int('c', { min: 0, max: 10 }),
    on: opt.bool('b', { default: false }),
    mode: opt.enum(['a', 'b'], 'm'),
    cache: opt.struct({ direct: opt.bool('d') }, 'c'),
  };

  it('coerces command-line strings and fills defaults', () => {
    expect(
      validateOptions(schema, { name: 'x', size: '64M', count: '3', on: 'on', cache: { direct: 'off' } }),
    ).toEqual({
      name: 'x',
      size: 64 << 20,
      count: 3,
      on: true,
      cache: { direct: false },
    });
  });

  it('names the bad parameter in QEMU words', () => {
    expect(() => validateOptions(schema, {})).toThrow("Parameter 'name' is missing");
    expect(() => validateOptions(schema, { name: 'x', foo: 1 })).toThrow("Parameter 'foo' is unexpected");
    expect(() => validateOptions(schema, { name: 'x', count: 'abc' })).toThrow(
      "Parameter 'count' expects integer",
    );
    expect(() => validateOptions(schema, { name: 'x', count: 'x' })).toThrow(/expects integer/);
    expect(() => validateOptions(schema, { name: 'x', count: 11 })).toThrow(
      "Parameter 'count' expects a value between 0 and 10",
    );
    expect(() => validateOptions(schema, { name: 1 })).toThrow(
      "Invalid parameter type for 'name', expected: string",
    );
    expect(() => validateOptions(schema, { name: 'x', on: 'maybe' })).toThrow(
      "Parameter 'on' expects 'on' or 'off'",
    );
    expect(() => validateOptions(schema, { name: 'x', mode: 'c' })).toThrow(
      "Parameter 'mode' does not accept value 'c'",
    );
    expect(() => validateOptions(schema, { name: 'x', cache: { foo: 1 } })).toThrow(
      "Parameter 'cache.foo' is unexpected",
    );
    expect(() => validateOptions(schema, { name: 'x', size: '12Q' })).toThrow(
      /Parameter 'size' expects a non-negative number/,
    );
  });
});

describe('parseSize', () => {
  it('parses binary suffixes like QEMU', () => {
    expect(parseSize('512')).toBe(512);
    expect(parseSize('1k')).toBe(1024);
    expect(parseSize('1.5M')).toBe(1.5 * 2 ** 20);
    expect(parseSize('2G')).toBe(2 * 2 ** 30);
    expect(parseSize('0x1000')).toBe(4096);
    expect(parseSize('1.5')).toBeUndefined();
    expect(parseSize('-1')).toBeUndefined();
  });
});
