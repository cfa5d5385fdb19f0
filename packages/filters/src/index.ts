import type { BlockDriver } from '@blockrep/block';
import { blkdebugDriver } from './blkdebug/blkdebug';
import { quorumDriver } from './quorum/quorum';

export { blkdebugDriver, blkdebugEvent } from './blkdebug/blkdebug';
export { quorumDriver } from './quorum/quorum';

/** The filter drivers this package provides. */
export const filterDrivers: BlockDriver[] = [quorumDriver, blkdebugDriver];
