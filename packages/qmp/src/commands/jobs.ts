import { BlockError } from '@blockrep/block';
import { BlockJob, JOB_STATUSES, JOB_TYPES, type Job, type JobManager } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

const JobType = t.enum('JobType', JOB_TYPES);
const JobStatus = t.enum('JobStatus', JOB_STATUSES);

const JobInfo = t.object('JobInfo', {
  id: req(t.str),
  type: req(JobType),
  status: req(JobStatus),
  'current-progress': req(t.int, 'Work done so far (arbitrary units)'),
  'total-progress': req(t.int, 'Estimated total work (same units)'),
  error: opt(t.str, 'Why the job failed or was cancelled'),
});

const BlockJobInfo = t.object('BlockJobInfo', {
  type: req(t.str),
  device: req(t.str, 'The job id'),
  len: req(t.int),
  offset: req(t.int),
  busy: req(t.bool),
  paused: req(t.bool),
  speed: req(t.int),
  'io-status': req(t.enum('BlockDeviceIoStatus', ['ok', 'failed', 'nospace'])),
  ready: req(t.bool),
  status: req(JobStatus),
  'auto-finalize': req(t.bool),
  'auto-dismiss': req(t.bool),
  error: opt(t.str),
});

const JobId = (name: string) => t.object(name, { id: req(t.str, 'The job id') });

const blockJobEventBase = {
  type: req(JobType),
  device: req(t.str, 'The job id'),
  len: req(t.int, 'Total work'),
  offset: req(t.int, 'Work done'),
  speed: req(t.int, 'Rate limit in bytes per second'),
};

/** query-jobs, the job-* verbs, the block-job-* commands the framework can serve, and job events. */
export function registerJobCommands(r: CommandRegistry, jobs: JobManager): void {
  r.registerCommand({
    name: 'query-jobs',
    returns: t.array(JobInfo),
    doc: 'The jobs (newest first), internal ones excluded.',
    handler: () => jobs.query(),
  });

  const findBlockJob = (id: string): BlockJob => {
    const j = jobs.find(id);
    if (!(j instanceof BlockJob)) {
      throw new BlockError(`Block job '${id}' not found`, { errorClass: 'DeviceNotActive' });
    }
    return j;
  };

  // The job verbs: job-<verb> takes the job by its id; block-job-<verb> (where QEMU has one) a
  // block job by its id, under the argument name QEMU's schema gives it.
  const verbs: [verb: string, doc: string, blockKey: 'device' | 'id' | null, fn: (j: Job) => unknown][] = [
    ['pause', 'Pauses a job (user pause; nests with internal pauses).', 'device', (j) => j.userPause()],
    ['resume', 'Resumes a job paused by the user.', 'device', (j) => j.userResume()],
    ['cancel', 'Cancels a job (always a hard cancel, as in QEMU).', null, (j) => j.userCancel(true)],
    ['complete', 'Asks a READY job to finish.', 'device', (j) => j.userComplete()],
    ['finalize', 'Finalizes a job waiting in PENDING (auto-finalize off).', 'id', (j) => j.userFinalize()],
    ['dismiss', 'Removes a CONCLUDED job (auto-dismiss off).', 'id', (j) => j.userDismiss()],
  ];
  for (const [verb, doc, key, fn] of verbs) {
    r.registerCommand({
      name: `job-${verb}`,
      args: JobId(`q_obj_job-${verb}-arg`),
      doc,
      async handler(a: { id: string }) {
        await fn(jobs.get(a.id));
      },
    });
    if (!key) continue;
    r.registerCommand({
      name: `block-job-${verb}`,
      args: t.object(`q_obj_block-job-${verb}-arg`, { [key]: req(t.str, 'The job id') }),
      doc: `${doc} (block jobs only)`,
      async handler(a: Record<string, string>) {
        await fn(findBlockJob(a[key]!));
      },
    });
  }

  r.registerCommand({
    name: 'query-block-jobs',
    returns: t.array(BlockJobInfo),
    doc: 'The block jobs (newest first), internal ones excluded.',
    handler: () =>
      jobs
        .all()
        .filter((j): j is BlockJob => j instanceof BlockJob && !j.internal)
        .map((j) => j.blockInfo()),
  });

  r.registerCommand({
    name: 'block-job-set-speed',
    args: t.object('q_obj_block-job-set-speed-arg', {
      device: req(t.str, 'The job id'),
      speed: req(t.int, 'Bytes per second, 0 for unlimited'),
    }),
    doc: "Changes a block job's rate limit.",
    handler(a: { device: string; speed: number }) {
      findBlockJob(a.device).setSpeed(a.speed);
    },
  });

  r.registerCommand({
    name: 'block-job-cancel',
    args: t.object('q_obj_block-job-cancel-arg', {
      device: req(t.str, 'The job id'),
      force: opt(t.bool, 'Cancel even a READY job that would otherwise complete (default false)'),
    }),
    doc: 'Cancels a block job; without force a READY mirror-like job completes instead.',
    async handler(a: { device: string; force?: boolean }) {
      const j = findBlockJob(a.device);
      if (j.userPaused && !(a.force ?? false)) {
        throw new BlockError(`The block job for device '${a.device}' is currently paused`);
      }
      await j.userCancel(a.force ?? false);
    },
  });

  r.registerEvent({
    name: 'JOB_STATUS_CHANGE',
    data: t.object('q_obj_JOB_STATUS_CHANGE-arg', { id: req(t.str), status: req(JobStatus) }),
    doc: 'A job changed state.',
  });
  r.registerEvent({
    name: 'BLOCK_JOB_COMPLETED',
    data: t.object('q_obj_BLOCK_JOB_COMPLETED-arg', { ...blockJobEventBase, error: opt(t.str) }),
    doc: 'A block job finished (error set when it failed).',
  });
  r.registerEvent({
    name: 'BLOCK_JOB_CANCELLED',
    data: t.object('q_obj_BLOCK_JOB_CANCELLED-arg', blockJobEventBase),
    doc: 'A block job was cancelled.',
  });
  r.registerEvent({
    name: 'BLOCK_JOB_READY',
    data: t.object('q_obj_BLOCK_JOB_READY-arg', blockJobEventBase),
    doc: 'A block job is ready for job-complete.',
  });
  r.registerEvent({
    name: 'BLOCK_JOB_PENDING',
    data: t.object('q_obj_BLOCK_JOB_PENDING-arg', { type: req(JobType), id: req(t.str) }),
    doc: 'A block job waits for job-finalize.',
  });
  r.registerEvent({
    name: 'BLOCK_JOB_ERROR',
    data: t.object('q_obj_BLOCK_JOB_ERROR-arg', {
      device: req(t.str),
      operation: req(t.enum('IoOperationType', ['read', 'write'])),
      action: req(t.enum('BlockErrorAction', ['ignore', 'report', 'stop'])),
    }),
    doc: 'A block job met an I/O error.',
  });
}
