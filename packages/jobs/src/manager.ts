import { EventEmitter } from 'node:events';
import { BlockError } from '@blockrep/block';
import type { Job, JobInfo } from './job';

/** An event for the monitors: QMP event name and data. */
export interface JobEvent {
  event: string;
  data: Record<string, unknown>;
}

/**
 * The jobs of one daemon: unique ids, lookup, query-jobs, and the events jobs emit. Listen with
 * `manager.on('event', (e: JobEvent) => ...)`.
 */
export class JobManager extends EventEmitter {
  /** Newest first, as QEMU lists its jobs. */
  private readonly jobs: Job[] = [];

  register(job: Job): void {
    this.jobs.unshift(job);
  }

  unregister(job: Job): void {
    const i = this.jobs.indexOf(job);
    if (i >= 0) this.jobs.splice(i, 1);
  }

  emitEvent(event: string, data: Record<string, unknown>): void {
    this.emit('event', { event, data } satisfies JobEvent);
  }

  /** A job by id, or undefined (internal jobs have no id and are never found). */
  find(id: string): Job | undefined {
    return this.jobs.find((j) => j.id === id);
  }

  /** A job by id for a QMP command; throws QEMU's "Job not found". */
  get(id: string): Job {
    const j = this.find(id);
    if (!j) throw new BlockError('Job not found');
    return j;
  }

  /** Every job, internal ones included. */
  all(): Job[] {
    return [...this.jobs];
  }

  /** query-jobs: the jobs users can see. */
  query(): JobInfo[] {
    return this.jobs.filter((j) => !j.internal).map((j) => j.info());
  }

  /** Force-cancels every job and waits for each to end (daemon shutdown). */
  async cancelAll(): Promise<void> {
    for (const j of [...this.jobs]) {
      if (j.status !== 'concluded' && j.status !== 'null') await j.cancel(true);
      await j.whenConcluded();
      if (j.status === 'concluded') j.userDismiss();
    }
  }
}
