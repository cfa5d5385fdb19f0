export { BlockJob, type BlockJobInfo, type BlockJobNodeUse, type BlockJobOptions } from './block-job';
export { Job, type JobInfo, type JobOptions } from './job';
export { type JobEvent, JobManager } from './manager';
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
