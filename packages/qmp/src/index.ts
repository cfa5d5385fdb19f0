export { type CommandContext, type CommandDef, CommandRegistry, type EventDef } from './registry';
export { QmpError, type QmpErrorClass } from './errors';
export { JsonStreamer, parseQmpJson, qdictOrder, type StreamItem, toQmpJson } from './json';
export {
  EMPTY_OBJECT,
  type IntWidth,
  opt,
  optionMembers,
  type QMember,
  type QMembers,
  type QObjectType,
  type QType,
  req,
  type SchemaInfo,
  SchemaIntrospector,
  t,
  typeLabel,
  validateArgs,
  validateValue,
} from './schema';
export { DEFAULT_VERSION, QmpMonitor, QmpServer, type QmpServerOptions, type QmpVersion } from './server';
export { QmpClient, type QmpAddress, type QmpClientOptions, type QmpEvent } from './client';
export { type BlockQmpServerOptions, createBlockQmpServer, referenceRegistry } from './block-server';
export { renderCommandReference } from './docs';
export { registerBitmapCommands } from './commands/bitmaps';
export { registerBlockCommands } from './commands/block';
export { blockdevTypes, type BlockdevTypes } from './commands/blockdev-types';
export { type BlockdevCreator, BlockdevCreators, fileCreator, registerCreateCommand } from './commands/create';
export { registerCoreCommands } from './commands/core';
export { registerJobCommands } from './commands/jobs';
export { blockDeviceInfo, displayFilename, imageInfo } from './commands/node-info';
export { type BlockrepDaemon, createBlockrepDaemon } from './daemon-server';
export { NbdServerHolder, registerNbdCommands, SocketAddress, toNbdAddress } from './commands/nbd';
export { registerBlockJobCommands } from './commands/block-jobs';
export { registerReplicationCommands } from './commands/replication';
export { qcow2Creator } from './commands/qcow2-create';
