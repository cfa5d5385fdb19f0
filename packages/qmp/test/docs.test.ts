import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  documentedMembers,
  EMPTY_OBJECT,
  referenceRegistry,
  renderCommandReference,
  validateArgs,
  validateValue,
} from '../src/index';

const registry = referenceRegistry();

describe('docs/qmp-commands.md', () => {
  it('is what the schemas generate (run `pnpm --filter @blockrep/qmp docs` after a schema change)', () => {
    const committed = readFileSync(new URL('../../../docs/qmp-commands.md', import.meta.url), 'utf8');
    const text = renderCommandReference(registry);
    expect(text).toContain('### blockdev-add');
    expect(text).toContain('When `driver` is `null-co`:');
    expect(committed).toBe(text);
  });

  it("describes every member of every command's arguments and return value, event and type", () => {
    const undescribed = documentedMembers(registry)
      .filter((m) => !m.member.doc?.trim())
      .map((m) => `${m.owner}.${m.name}`);
    expect(undescribed).toEqual([]);
  });

  it("shows no QAPI implicit type names (a command's own arguments have none)", () => {
    expect(renderCommandReference(registry)).not.toMatch(/q_obj_/);
  });

  it('has an example for every command and event', () => {
    const without = [
      ...registry.commands().filter((c) => !c.examples?.length),
      ...registry.events().filter((e) => !e.examples?.length),
    ].map((d) => d.name);
    expect(without).toEqual([]);
  });

  it('has examples whose requests, replies and event data fit the schemas', () => {
    // SchemaInfo declares only the members every entry has; each meta-type adds its own.
    const partialReturns = new Set(['query-qmp-schema']);
    for (const c of registry.commands()) {
      for (const ex of c.examples ?? []) {
        const what = `${c.name} example${ex.title ? ` (${ex.title})` : ''}`;
        expect(() => validateArgs(c.args ?? EMPTY_OBJECT, ex.args ?? {}), what).not.toThrow();
        if (!ex.error && !partialReturns.has(c.name))
          expect(() => validateValue(c.returns ?? EMPTY_OBJECT, ex.returns ?? {}), what).not.toThrow();
      }
    }
    for (const e of registry.events()) {
      for (const ex of e.examples ?? []) {
        expect(() => validateArgs(e.data, ex.data), `${e.name} example`).not.toThrow();
      }
    }
  });
});
