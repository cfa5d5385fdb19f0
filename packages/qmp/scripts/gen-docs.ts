/** Writes docs/qmp-commands.md from the command schemas: `pnpm --filter @blockrep/qmp docs`. */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { referenceRegistry, renderCommandReference } from '../src/index';

const target = fileURLToPath(new URL('../../../docs/qmp-commands.md', import.meta.url));
writeFileSync(target, renderCommandReference(referenceRegistry()));
console.log(`wrote ${target}`);
