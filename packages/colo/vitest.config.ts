import { sharedConfig } from '@blockrep/test-kit/vitest';

export default sharedConfig();
