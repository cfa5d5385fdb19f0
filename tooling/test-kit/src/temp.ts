import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';

export interface TempDir {
  readonly path: string;
  /** A path inside the directory. */
  file(name: string): string;
  remove(): void;
}

const pending = new Set<TempDir>();
let hooked = false;

/** A fresh directory under the system temp dir, removed after the current test. */
export function makeTempDir(prefix = 'blockrep-'): TempDir {
  const path = mkdtempSync(join(tmpdir(), prefix));
  const dir: TempDir = {
    path,
    file: (name) => join(path, name),
    remove: () => {
      pending.delete(dir);
      rmSync(path, { recursive: true, force: true });
    },
  };
  pending.add(dir);
  if (!hooked) {
    hooked = true;
    afterEach(() => {
      for (const d of [...pending]) d.remove();
    });
  }
  return dir;
}

/** Runs fn with a temp dir that is removed afterwards, whatever fn does. */
export async function withTempDir<T>(fn: (dir: TempDir) => Promise<T> | T): Promise<T> {
  const dir = makeTempDir();
  try {
    return await fn(dir);
  } finally {
    dir.remove();
  }
}
