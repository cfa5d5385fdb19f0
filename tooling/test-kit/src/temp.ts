import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, onTestFinished } from 'vitest';

export interface TempDir {
  readonly path: string;
  /** A path inside the directory. */
  file(name: string): string;
  remove(): void;
}

const pending = new Set<TempDir>();

function removeAll(): void {
  for (const d of [...pending]) d.remove();
}

// Directories made outside a test (in beforeAll, or at collection) go when the file's tests are
// done; whatever is left when the process exits (a test file that threw, a worker told to stop)
// goes then. Registering afterAll fails outside a vitest run (a bench importing this module).
try {
  afterAll(removeAll);
} catch {
  // not collecting a test file
}
process.once('exit', removeAll);

/** A fresh directory under the system temp dir, removed after the current test (or, made
 * outside a test, after the test file). */
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
  try {
    onTestFinished(() => dir.remove());
  } catch {
    // outside a running test: removed by the afterAll or exit hook above
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
