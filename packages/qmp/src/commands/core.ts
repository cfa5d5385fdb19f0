import { QmpError } from '../errors';
import type { CommandRegistry } from '../registry';
import { opt, req, t } from '../schema';

const QMPCapability = t.enum('QMPCapability', ['oob'], 'Optional QMP features');

const VersionTriple = t.object('VersionTriple', {
  major: req(t.int),
  minor: req(t.int),
  micro: req(t.int),
});

const VersionInfo = t.object('VersionInfo', {
  qemu: req(VersionTriple, 'The QEMU version this server is compatible with'),
  package: req(t.str, 'The build of the server'),
});

const CommandInfo = t.object('CommandInfo', { name: req(t.str) });

const SchemaInfo = t.object('SchemaInfo', {
  name: req(t.str),
  'meta-type': req(
    t.enum('SchemaMetaType', ['builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event']),
  ),
  features: opt(t.array(t.str)),
});

/** The commands of the protocol itself. */
export function registerCoreCommands(r: CommandRegistry): void {
  r.registerCommand({
    name: 'qmp_capabilities',
    args: t.object('q_obj_qmp_capabilities-arg', {
      enable: opt(t.array(QMPCapability), 'Capabilities to enable (none are offered)'),
    }),
    doc: 'Ends capabilities negotiation: the monitor accepts commands and receives events from now on.',
    handler(args: { enable?: string[] }, ctx) {
      for (const cap of args.enable ?? []) throw QmpError.generic(`Capability '${cap}' not available`);
      ctx.monitor.mode = 'command';
    },
  });

  r.registerCommand({
    name: 'query-version',
    returns: VersionInfo,
    doc: 'The version of the server.',
    handler(_args, ctx) {
      const v = ctx.server.version;
      return { qemu: { major: v.major, minor: v.minor, micro: v.micro }, package: v.package };
    },
  });

  r.registerCommand({
    name: 'query-commands',
    returns: t.array(CommandInfo),
    doc: 'The names of the commands the server accepts.',
    handler(_args, ctx) {
      return ctx.server.registry.commands().map((c) => ({ name: c.name }));
    },
  });

  r.registerCommand({
    name: 'query-qmp-schema',
    returns: t.array(SchemaInfo),
    doc: "The QMP schema (QEMU's SchemaInfo entries); type names other than built-ins are masked as numbers.",
    handler(_args, ctx) {
      return ctx.server.registry.schema();
    },
  });

  r.registerCommand({
    name: 'quit',
    doc: 'Stops the server after answering.',
    handler(_args, ctx) {
      ctx.server.requestQuit();
    },
  });
}
