export { makeTempDir, withTempDir, type TempDir } from './temp';
export { freePort } from './ports';
export {
  hasPeer,
  runPeer,
  qemuImg,
  qemuImgJson,
  qemuIo,
  PeerError,
  type PeerResult,
  type RunPeerOptions,
} from './peers';
export { patternBuffer, randomBuffer } from './data';
