import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeTempDir, withTempDir } from './temp';

// Leaked directories once filled a CI machine's disk (the removal hook never ran): each case
// checks that the directory of an earlier test is really gone.
describe('temp dirs are removed', () => {
  let madeInTest = '';
  let madeInBeforeAll = '';
  beforeAll(() => {
    madeInBeforeAll = makeTempDir().path;
  });
  afterAll(() => {
    // Still there for every test of the file; the file's own afterAll hook removes it.
    expect(existsSync(madeInBeforeAll)).toBe(true);
  });

  it('a directory made in a test exists during it', () => {
    madeInTest = makeTempDir().path;
    expect(existsSync(madeInTest)).toBe(true);
    expect(existsSync(madeInBeforeAll)).toBe(true);
  });

  it('is gone after that test, while one made in beforeAll stays for the file', () => {
    expect(madeInTest).not.toBe('');
    expect(existsSync(madeInTest)).toBe(false);
    expect(existsSync(madeInBeforeAll)).toBe(true);
  });

  it('withTempDir removes its directory when fn throws', async () => {
    let path = '';
    await expect(
      withTempDir((d) => {
        path = d.path;
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(existsSync(path)).toBe(false);
  });
});
