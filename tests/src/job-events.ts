import type { QmpClient, QmpEvent } from '@blockrep/qmp';

/** A session's job events without timestamps: name plus the fields QEMU and we both fill. */
export function jobEventSummary(events: QmpEvent[]): string[] {
  return events
    .filter((e) => e.event.startsWith('JOB_') || e.event.startsWith('BLOCK_JOB_'))
    .map((e) => {
      const d = e.data as Record<string, unknown>;
      if (e.event === 'JOB_STATUS_CHANGE') return `${e.event} ${d.id} ${d.status}`;
      return `${e.event} ${d.type} ${d.device} len=${d.len} offset=${d.offset}${d.error ? ` error=${d.error}` : ''}`;
    });
}

/** Waits for a job to reach a status (sized for a loaded CI machine). */
export async function waitJobStatus(qmp: QmpClient, id: string, status: string): Promise<void> {
  await qmp.waitEvent('JOB_STATUS_CHANGE', (e) => e.data?.id === id && e.data?.status === status, 60_000);
}
