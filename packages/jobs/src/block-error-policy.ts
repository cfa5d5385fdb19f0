import { type BlockError, toBlockError } from '@blockrep/block';

/** QEMU's BlockdevOnError: what a block job does when a request fails. */
export type OnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
export const ON_ERROR_VALUES: readonly OnError[] = ['report', 'ignore', 'enospc', 'stop', 'auto'];

/** The action an error policy picks for one error (QEMU's block_job_error_action). */
export function errorAction(policy: OnError, err: unknown): 'report' | 'ignore' | 'stop' {
  const e: BlockError = toBlockError(err);
  switch (policy) {
    case 'enospc':
      return e.errno === 'ENOSPC' ? 'stop' : 'report';
    case 'stop':
      return 'stop';
    case 'ignore':
      return 'ignore';
    default:
      return 'report';
  }
}
