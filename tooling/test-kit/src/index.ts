export { patternBuffer, randomBuffer } from './data';
export {
  hasPeer,
  PeerError,
  type PeerResult,
  qemuImg,
  qemuImgJson,
  qemuIo,
  type RunPeerOptions,
  runPeer,
} from './peers';
export { freePort } from './ports';
export { makeTempDir, type TempDir, withTempDir } from './temp';
