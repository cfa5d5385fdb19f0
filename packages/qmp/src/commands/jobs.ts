import { BlockError } from '@blockrep/block';
import { BlockJob, JOB_STATUSES, JOB_TYPES, type Job, type JobManager } from '@blockrep/jobs';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

const JobType = t.enum('JobType', JOB_TYPES);
const JobStatus = t.enum('JobStatus', JOB_STATUSES);

const JobInfo = t.object('JobInfo', {
  id: req(t.str, 'The job id'),
  type: req(JobType, 'What kind of job it is'),
  status: req(JobStatus, 'Where the job is in its life'),
  'current-progress': req(t.int, 'Work done so far (arbitrary units)'),
  'total-progress': req(t.int, 'Estimated total work (same units)'),
  error: opt(t.str, 'Why the job failed or was cancelled'),
});

const BlockJobInfo = t.object('BlockJobInfo', {
  type: req(t.str, 'What kind of job it is (commit, stream, mirror, backup)'),
  device: req(t.str, 'The job id'),
  len: req(t.int, 'Estimated total work, bytes (it can grow while the job runs)'),
  offset: req(t.int, 'Work done so far, bytes'),
  busy: req(t.bool, 'Whether the job is working now, not sleeping or paused'),
  paused: req(t.bool, 'Whether the job is paused (by the user or while the graph is drained)'),
  speed: req(t.int, 'Rate limit, bytes per second (0: none)'),
  'io-status': req(
    t.enum('BlockDeviceIoStatus', ['ok', 'failed', 'nospace']),
    'ok, or the kind of I/O error that stopped the job',
  ),
  ready: req(t.bool, 'Whether the job is ready for job-complete (mirror, active commit)'),
  status: req(JobStatus, 'Where the job is in its life'),
  'auto-finalize': req(t.bool, 'Whether the job finalizes on its own once done (else: PENDING)'),
  'auto-dismiss': req(t.bool, 'Whether the job goes away on its own once concluded'),
  error: opt(t.str, 'Why the job failed'),
});

const JobId = (name: string) => t.object(name, { id: req(t.str, 'The job id') });

const blockJobEventBase = {
  type: req(JobType, 'What kind of job it is'),
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
    examples: [
      {
        returns: [
          {
            id: 'mirror0',
            type: 'mirror',
            status: 'ready',
            'current-progress': 10737418240,
            'total-progress': 10737418240,
          },
          { id: 'create0', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 },
        ],
      },
    ],
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
      examples: [{ args: { id: 'job0' } }],
      async handler(a: { id: string }) {
        await fn(jobs.get(a.id));
      },
    });
    if (!key) continue;
    r.registerCommand({
      name: `block-job-${verb}`,
      args: t.object(`q_obj_block-job-${verb}-arg`, { [key]: req(t.str, 'The job id') }),
      doc: `${doc} (block jobs only)`,
      examples: [{ args: { [key]: 'job0' } }],
      async handler(a: Record<string, string>) {
        await fn(findBlockJob(a[key]!));
      },
    });
  }

  r.registerCommand({
    name: 'query-block-jobs',
    returns: t.array(BlockJobInfo),
    doc: 'The block jobs (newest first), internal ones excluded.',
    examples: [
      {
        returns: [
          {
            type: 'mirror',
            device: 'mirror0',
            len: 10737418240,
            offset: 10737418240,
            busy: false,
            paused: false,
            speed: 0,
            'io-status': 'ok',
            ready: true,
            status: 'ready',
            'auto-finalize': true,
            'auto-dismiss': true,
          },
        ],
      },
    ],
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
    examples: [{ args: { device: 'mirror0', speed: 104857600 } }],
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
    examples: [
      { args: { device: 'mirror0' } },
      { title: 'A READY mirror left without switching over', args: { device: 'mirror0', force: true } },
    ],
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
    data: t.object('q_obj_JOB_STATUS_CHANGE-arg', {
      id: req(t.str, 'The job id'),
      status: req(JobStatus, 'The new status'),
    }),
    doc: 'A job changed state.',
    examples: [{ data: { id: 'mirror0', status: 'ready' } }],
  });
  r.registerEvent({
    name: 'BLOCK_JOB_COMPLETED',
    data: t.object('q_obj_BLOCK_JOB_COMPLETED-arg', {
      ...blockJobEventBase,
      error: opt(t.str, 'Why the job failed (absent when it succeeded)'),
    }),
    doc: 'A block job finished (error set when it failed).',
    examples: [
      { data: { type: 'backup', device: 'backup0', len: 10737418240, offset: 10737418240, speed: 0 } },
      {
        title: 'A failed job',
        data: {
          type: 'mirror',
          device: 'mirror0',
          len: 10737418240,
          offset: 4194304,
          speed: 0,
          error: 'No space left on device',
        },
      },
    ],
  });
  r.registerEvent({
    name: 'BLOCK_JOB_CANCELLED',
    data: t.object('q_obj_BLOCK_JOB_CANCELLED-arg', blockJobEventBase),
    doc: 'A block job was cancelled.',
    examples: [
      { data: { type: 'stream', device: 'stream0', len: 10737418240, offset: 134217728, speed: 0 } },
    ],
  });
  r.registerEvent({
    name: 'BLOCK_JOB_READY',
    data: t.object('q_obj_BLOCK_JOB_READY-arg', blockJobEventBase),
    doc: 'A block job is ready for job-complete.',
    examples: [
      { data: { type: 'mirror', device: 'mirror0', len: 10737418240, offset: 10737418240, speed: 0 } },
    ],
  });
  r.registerEvent({
    name: 'BLOCK_JOB_PENDING',
    data: t.object('q_obj_BLOCK_JOB_PENDING-arg', {
      type: req(JobType, 'What kind of job it is'),
      id: req(t.str, 'The job id'),
    }),
    doc: 'A block job waits for job-finalize.',
    examples: [{ data: { type: 'backup', id: 'backup0' } }],
  });
  r.registerEvent({
    name: 'BLOCK_JOB_ERROR',
    data: t.object('q_obj_BLOCK_JOB_ERROR-arg', {
      device: req(t.str, 'The job id'),
      operation: req(t.enum('IoOperationType', ['read', 'write']), 'Whether a read or a write failed'),
      action: req(
        t.enum('BlockErrorAction', ['ignore', 'report', 'stop']),
        'What the job does about it: go on (ignore), fail (report) or pause until resumed (stop)',
      ),
    }),
    doc: 'A block job met an I/O error.',
    examples: [{ data: { device: 'mirror0', operation: 'write', action: 'stop' } }],
  });
}
