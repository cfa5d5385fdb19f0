export { type CertOptions, makeCerts } from './certs';
export { patternBuffer, prng, randomBuffer } from './data';
export { type EtcdOptions, type EtcdServer, startEtcd } from './etcd';
export { type HostNetwork, makeHostNetwork } from './netns';
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
export { freePort, tcpAccepts, unixAccepts } from './ports';
export { makeTempDir, type TempDir, withTempDir } from './temp';
export { type WaitForOptions, waitFor } from './wait';
