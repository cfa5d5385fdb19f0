import type { UserConfig } from 'vitest/config';

export declare function sharedConfig(extra?: { testTimeout?: number; include?: string[] }): UserConfig;
