import { BlockError } from '@blockrep/block';
import type { ColoService } from '@blockrep/colo';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

/** The daemon's COLO host, when started with --colo. */
export interface ColoHolder {
  service: ColoService | null;
}

const ColoRole = t.enum('ColoPairRole', ['primary', 'standalone', 'secondary', 'fenced']);

function need(h: ColoHolder): ColoService {
  if (!h.service) throw new BlockError('COLO is not configured (start blockrepd with --colo FILE)');
  return h.service;
}

/** query-colo, colo-checkpoint, colo-failover and the COLO_ROLE_CHANGE event. */
export function registerColoCommands(r: CommandRegistry, h: ColoHolder): void {
  r.registerCommand({
    name: 'query-colo',
    returns: t.object('ColoPairStatus', {
      pair: req(t.str, 'The name of the pair (from the --colo configuration)'),
      name: req(t.str, "This host's name"),
      role: req(
        ColoRole,
        'primary (protected), standalone (primary without secondary), secondary, or fenced (lost the lease)',
      ),
      epoch: req(t.int, 'The fencing epoch of the lease this side holds or follows'),
      stage: req(t.str, 'What the host is doing (protected, resync, failover, ...)'),
      peer: req(t.any, 'The peer as last heard: name, alive, role, epoch, ready'),
      'lease-valid': req(t.bool, 'Whether this side may acknowledge guest writes now'),
      'last-checkpoint': opt(t.any, 'time (ISO 8601) and duration-ms of the last checkpoint'),
      checkpoints: req(t.int, 'Checkpoints taken since the daemon started'),
      'peer-missing-bytes': req(t.int, 'Bytes the dirty bitmap marks as possibly missing on the peer'),
      'bitmap-trusted': req(t.bool, 'False after an unclean stop: the next resync copies everything'),
      resync: opt(t.any, 'offset and len of the resync in progress'),
      'last-resync': opt(t.any, 'The last resync: peer, bytes, full (whole disk) and duration-ms'),
      'writes-acknowledged': req(t.int, 'Guest writes acknowledged (through the fence node)'),
      'writes-refused': req(t.int, 'Guest writes refused because the lease was not held'),
      'last-cycle': req(t.str, "The pair loop's last sentence"),
    }),
    doc: "The COLO pair as this host sees it (blockrep's own command).",
    examples: [
      {
        returns: {
          pair: 'vm1',
          name: 'host-a',
          role: 'primary',
          epoch: 7,
          stage: 'protected',
          peer: { name: 'host-b', alive: true, role: 'secondary', epoch: 7, ready: true },
          'lease-valid': true,
          'last-checkpoint': { time: '2023-11-14T22:13:20.000Z', 'duration-ms': 12 },
          checkpoints: 42,
          'peer-missing-bytes': 0,
          'bitmap-trusted': true,
          'writes-acknowledged': 18231,
          'writes-refused': 0,
          'last-cycle': 'checkpoint with host-b; lease renewed',
        },
      },
    ],
    handler: () => need(h).status(),
  });

  r.registerCommand({
    name: 'colo-checkpoint',
    doc: 'A checkpoint of the COLO pair now (the primary and its secondary in step).',
    examples: [{}],
    async handler() {
      await need(h).checkpoint();
    },
  });

  r.registerCommand({
    name: 'colo-failover',
    returns: t.str,
    doc: 'A failover on request: a primary steps down for its secondary; a secondary takes over.',
    examples: [{ returns: 'stepped down; the secondary takes over' }],
    handler: () => need(h).failover(),
  });

  r.registerEvent({
    name: 'COLO_ROLE_CHANGE',
    data: t.object('q_obj_COLO_ROLE_CHANGE-arg', {
      pair: req(t.str, 'The name of the pair'),
      host: req(t.str, 'The host whose role changed (this one)'),
      role: req(ColoRole, 'The new role'),
      previous: req(ColoRole, 'The role before'),
      epoch: req(t.int, 'The fencing epoch after the change'),
      reason: req(t.str, 'Why the role changed, in one sentence'),
    }),
    doc: "A COLO host's role changed.",
    examples: [
      {
        data: {
          pair: 'vm1',
          host: 'host-b',
          role: 'standalone',
          previous: 'secondary',
          epoch: 8,
          reason: 'promoted self to primary in epoch 8: primary host-a stopped answering',
        },
      },
    ],
  });
}
