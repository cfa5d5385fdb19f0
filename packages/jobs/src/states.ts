/** The states of a job (QAPI JobStatus), in QEMU's order. */
export const JOB_STATUSES = [
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];

/** The commands a user can send a job (QAPI JobVerb). */
export const JOB_VERBS = [
  'cancel',
  'pause',
  'resume',
  'set-speed',
  'complete',
  'finalize',
  'dismiss',
] as const;
export type JobVerb = (typeof JOB_VERBS)[number];

/** The kinds of job (QAPI JobType). */
export const JOB_TYPES = [
  'commit',
  'stream',
  'mirror',
  'backup',
  'create',
  'amend',
  'snapshot-load',
  'snapshot-save',
  'snapshot-delete',
] as const;
export type JobType = (typeof JOB_TYPES)[number];

/**
 * Which state may follow which (QEMU's transition table). Anything else is a bug in the job
 * code, never a user error.
 */
const TRANSITIONS: Record<JobStatus, readonly JobStatus[]> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** The states in which each verb is accepted (QEMU's verb table). */
const VERBS: Record<JobVerb, readonly JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export function transitionAllowed(from: JobStatus, to: JobStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

export function verbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return VERBS[verb].includes(status);
}

/** Ready for completion (QEMU's job_is_ready). */
export function isReadyStatus(s: JobStatus): boolean {
  return s === 'ready' || s === 'standby';
}

/** The job's run is over (QEMU's job_is_completed). */
export function isCompletedStatus(s: JobStatus): boolean {
  return s === 'waiting' || s === 'pending' || s === 'aborting' || s === 'concluded' || s === 'null';
}
