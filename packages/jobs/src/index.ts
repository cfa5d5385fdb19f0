export {
  BackupJob,
  type BackupOptions,
  type BackupSync,
  prepareBackup,
  startBackup,
  startPreparedBackup,
} from './backup/backup';
export { BlockCopy, CopyError } from './backup/block-copy';
export { CBW_CLUSTER, type CbwState, cbwDriver, cbwState } from './backup/cbw';
export { errorAction, ON_ERROR_VALUES, type OnError } from './block-error-policy';
export { BlockJob, type BlockJobInfo, type BlockJobNodeUse, type BlockJobOptions } from './block-job';
export {
  ActiveCommitJob,
  type CommitBase,
  CommitJob,
  type CommitOptions,
  chainBetween,
  startCommit,
} from './commit/commit';
export { Job, type JobInfo, type JobOptions, JobTxn } from './job';
export { type JobEvent, JobManager } from './manager';
export {
  MIRROR_DEFAULT_BUF_SIZE,
  type MirrorCopyMode,
  MirrorJob,
  type MirrorOptions,
  type MirrorSync,
  mirrorDefaultGranularity,
  startMirror,
} from './mirror/mirror';
export { mirrorTopDriver } from './mirror/mirror-top';
export { RateLimit } from './rate-limit';
export {
  isCompletedStatus,
  isReadyStatus,
  JOB_STATUSES,
  JOB_TYPES,
  JOB_VERBS,
  type JobStatus,
  type JobType,
  type JobVerb,
  transitionAllowed,
  verbAllowed,
} from './states';
export { StreamJob, type StreamOptions, startStream } from './stream/stream';
