export { patternBuffer, randomBuffer } from './data';
export {
  hasPeer,
  MissingPeerError,
  PeerError,
  type PeerResult,
  peersRequired,
  qemuImg,
  qemuImgCompare,
  qemuImgJson,
  qemuIo,
  type RunPeerOptions,
  runPeer,
  waitForPidFile,
} from './peers';
export { freePort } from './ports';
export { makeTempDir, type TempDir, withTempDir } from './temp';
export { type WaitForOptions, waitFor } from './wait';
