import { sharedConfig } from '@blockrep/test-kit/vitest';

export default sharedConfig({ testTimeout: 60_000 });
