import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { referenceRegistry, renderCommandReference } from '../src/index';

describe('docs/qmp-commands.md', () => {
  it('is what the schemas generate (run `pnpm --filter @blockrep/qmp docs` after a schema change)', () => {
    const committed = readFileSync(new URL('../../../docs/qmp-commands.md', import.meta.url), 'utf8');
    const text = renderCommandReference(referenceRegistry());
    expect(text).toContain('### blockdev-add');
    expect(text).toContain('When `driver` is `null-co`:');
    expect(committed).toBe(text);
  });
});
