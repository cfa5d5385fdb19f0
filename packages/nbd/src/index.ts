/**
 * @blockrep/nbd: the NBD wire protocol for blockrep — a server exporting block nodes
 * (`NbdServer`), and the `nbd` protocol driver opening a remote export as a block node
 * (`nbdDriver`). See README.md for options and behaviour.
 */

export {
  NbdClientConnection,
  NbdConnectionLost,
  type NbdConnectOptions,
  type NbdExportDetails,
} from './client/connection';
export { nbdBreakConnection, nbdDriver, parseNbdUri } from './client/driver';
export { NbdClientSession, type NbdSessionOptions } from './client/session';
export * as nbdProtocol from './protocol';
export {
  type BlockSizeConstraints,
  type ExportContext,
  NbdExport,
  type NbdExportInfo,
  type NbdExportOptions,
} from './server/export';
export {
  type NbdListenOptions,
  type NbdRemoveMode,
  NbdServer,
  type NbdServerOptions,
  type NbdSocketAddress,
} from './server/server';
export {
  lookupTlsCreds,
  NbdTlsCreds,
  registerTlsCreds,
  setTlsObjectLookup,
  type TlsCredsOptions,
  unregisterTlsCreds,
} from './tls';
