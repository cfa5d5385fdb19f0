export type { ColoStatus } from '@blockrep/colo';
export { type BlockQmpServerOptions, createBlockQmpServer } from './block-server';
export { type QmpAddress, QmpClient, type QmpClientOptions, type QmpEvent } from './client';
export { registerBitmapCommands } from './commands/bitmaps';
export { registerBlockCommands } from './commands/block';
export { registerBlockJobCommands } from './commands/block-jobs';
export { type BlockdevTypes, blockdevTypes } from './commands/blockdev-types';
export { registerCoreCommands } from './commands/core';
export {
  type BlockdevCreator,
  BlockdevCreators,
  fileCreator,
  registerCreateCommand,
} from './commands/create';
export { registerJobCommands } from './commands/jobs';
export { registerMirrorCommands } from './commands/mirror';
export { NbdServerHolder, registerNbdCommands, SocketAddress, toNbdAddress } from './commands/nbd';
export { blockDeviceInfo, displayFilename, imageInfo } from './commands/node-info';
export { qcow2Creator } from './commands/qcow2-create';
export { objectOptionsFromKeyval, QomObjects, registerQomCommands } from './commands/qom';
export { registerReplicationCommands } from './commands/replication';
export { type BlockrepDaemon, createBlockrepDaemon, referenceRegistry } from './daemon-server';
export { type DocumentedMember, documentedMembers, renderCommandReference } from './docs';
export { QmpError, type QmpErrorClass } from './errors';
export { JsonStreamer, parseQmpJson, qdictOrder, type StreamItem, toQemuPrettyJson, toQmpJson } from './json';
export {
  type CommandContext,
  type CommandDef,
  type CommandExample,
  CommandRegistry,
  type EventDef,
} from './registry';
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
