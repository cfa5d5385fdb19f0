import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export { runPeer } from '@blockrep/test-kit';

/** A temp directory the caller removes (benchmarks run outside vitest's cleanup). */
export function makeTempDirPlain(): string {
  return mkdtempSync(join(tmpdir(), 'blockrep-bench-'));
}
