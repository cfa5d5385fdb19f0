import { QmpError } from '../errors';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

const QMPCapability = t.enum('QMPCapability', ['oob'], 'Optional QMP features');

const VersionTriple = t.object('VersionTriple', {
  major: req(t.int, 'Major version'),
  minor: req(t.int, 'Minor version'),
  micro: req(t.int, 'Micro (patch) version'),
});

const VersionInfo = t.object('VersionInfo', {
  qemu: req(VersionTriple, 'The QEMU version this server is compatible with'),
  package: req(t.str, 'The build of the server'),
});

const CommandInfo = t.object('CommandInfo', { name: req(t.str, 'The command name') });

const SchemaInfo = t.object('SchemaInfo', {
  name: req(
    t.str,
    'The entity: a command or event name, a built-in type name, or a type name masked as a number',
  ),
  'meta-type': req(
    t.enum('SchemaMetaType', ['builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event']),
    'What kind of entity it is; each kind adds its own members (arg-type, members, element-type, ...)',
  ),
  features: opt(t.array(t.str), 'Special features of the entity, e.g. unstable'),
});

/** The commands of the protocol itself. */
export function registerCoreCommands(r: CommandRegistry): void {
  r.registerCommand({
    name: 'qmp_capabilities',
    args: t.object('q_obj_qmp_capabilities-arg', {
      enable: opt(t.array(QMPCapability), 'Capabilities to enable (none are offered)'),
    }),
    doc: 'Ends capabilities negotiation: the monitor accepts commands and receives events from now on.',
    examples: [{}],
    handler(args: { enable?: string[] }, ctx) {
      for (const cap of args.enable ?? []) throw QmpError.generic(`Capability '${cap}' not available`);
      ctx.monitor.mode = 'command';
    },
  });

  r.registerCommand({
    name: 'query-version',
    returns: VersionInfo,
    doc: 'The version of the server.',
    examples: [{ returns: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'blockrep 0.0.0' } }],
    handler(_args, ctx) {
      const v = ctx.server.version;
      return { qemu: { major: v.major, minor: v.minor, micro: v.micro }, package: v.package };
    },
  });

  r.registerCommand({
    name: 'query-commands',
    returns: t.array(CommandInfo),
    doc: 'The names of the commands the server accepts.',
    examples: [
      { returns: [{ name: 'qmp_capabilities' }, { name: 'query-version' }, { name: 'blockdev-add' }] },
    ],
    handler(_args, ctx) {
      return ctx.server.registry.commands().map((c) => ({ name: c.name }));
    },
  });

  r.registerCommand({
    name: 'query-qmp-schema',
    returns: t.array(SchemaInfo),
    doc: "The QMP schema (QEMU's SchemaInfo entries); type names other than built-ins are masked as numbers.",
    examples: [
      {
        returns: [
          { name: 'block_resize', 'meta-type': 'command', 'arg-type': '37', 'ret-type': '0' },
          { name: 'BLOCK_JOB_READY', 'meta-type': 'event', 'arg-type': '222' },
          { name: 'str', 'meta-type': 'builtin', 'json-type': 'string' },
        ],
      },
    ],
    handler(_args, ctx) {
      return ctx.server.registry.schema();
    },
  });

  r.registerCommand({
    name: 'quit',
    doc: 'Stops the server after answering.',
    examples: [{}],
    handler(_args, ctx) {
      ctx.server.requestQuit();
    },
  });
}
