import type { BlockrepDaemon } from '@blockrep/qmp';
import type { Logger, LogLevel } from './log';

/**
 * What blockrepd logs of what it does: QMP commands (debug; a failed one at warn, with QEMU's error
 * class and text), NBD clients coming and going (info), and the QMP events a daemon emits: job
 * transitions and endings, replication stages and errors, COLO role changes, quorum votes lost,
 * corrupt images. Arguments of commands are not logged (secrets, TLS keys may be among them).
 */
export function attachLogging(daemon: BlockrepDaemon, log: Logger): void {
  daemon.qmp.on('command', (c: { name: string; ms: number; error?: { class: string; desc: string } }) => {
    const ms = Math.round(c.ms * 1000) / 1000;
    if (c.error)
      log.warn('QMP command failed', { command: c.name, class: c.error.class, error: c.error.desc, ms });
    else log.debug('QMP command', { command: c.name, ms });
  });
  daemon.nbd.onClient = (e) => {
    if (e.event === 'connect') log.info('NBD client connected', { peer: e.peer });
    else if (e.event === 'export')
      log.debug('NBD client chose an export', { peer: e.peer, export: e.export });
    else log.info('NBD client disconnected', { peer: e.peer, ...(e.export ? { export: e.export } : {}) });
  };
  // What the monitors get: floods (a dead quorum child's QUORUM_REPORT_BAD per read) come
  // rate-limited as QEMU limits them, so the log does not drown in them.
  daemon.qmp.on('qmp-event-delivered', (m: { event: string; data?: Record<string, unknown> }) => {
    const [level, msg] = describe(m.event, m.data ?? {});
    log.log(level, msg, { event: m.event, ...(m.data ?? {}) });
  });
}

/** The level and line of one QMP event. */
function describe(event: string, d: Record<string, unknown>): [LogLevel, string] {
  switch (event) {
    case 'JOB_STATUS_CHANGE':
      return ['info', 'job status'];
    case 'BLOCK_JOB_COMPLETED':
      return d.error ? ['error', 'block job failed'] : ['info', 'block job completed'];
    case 'BLOCK_JOB_CANCELLED':
      return ['info', 'block job cancelled'];
    case 'BLOCK_JOB_ERROR':
      return ['warn', 'block job I/O error'];
    case 'BLOCK_JOB_READY':
      return ['info', 'block job ready'];
    case 'BLOCK_JOB_PENDING':
      return ['info', 'block job pending'];
    case 'REPLICATION_ERROR':
      return ['error', 'replication error'];
    case 'QUORUM_FAILURE':
      return ['error', 'quorum failure'];
    case 'QUORUM_REPORT_BAD':
      return ['warn', 'quorum child failed'];
    case 'BLOCK_IMAGE_CORRUPTED':
      return ['error', 'image corrupted'];
    case 'BLOCK_EXPORT_DELETED':
      return ['info', 'export deleted'];
    default:
      return [
        event.includes('ERROR') || event.includes('FAIL') ? 'error' : 'info',
        event.toLowerCase().replaceAll('_', ' '),
      ];
  }
}
