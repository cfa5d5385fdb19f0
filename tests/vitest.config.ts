import { sharedConfig } from '@blockrep/test-kit/vitest';

export default sharedConfig({ include: ['src/**/*.test.ts'], testTimeout: 120_000 });
