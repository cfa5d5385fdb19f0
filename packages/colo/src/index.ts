export { type Arbiter, type ArbiterLease, ArbiterUnavailable } from './arbiter/arbiter';
export { EtcdArbiter, type EtcdArbiterOptions } from './arbiter/etcd';
export { LockFileArbiter, type LockFileArbiterOptions } from './arbiter/lock-file';
export { type Heartbeat, PeerChannel, type PeerChannelOptions } from './channel';
export {
  type ColoAddress,
  type ColoArbiterConfig,
  type ColoConfig,
  ColoConfigError,
  type ColoHost,
  formatColoAddress,
  loadColoConfig,
  parseColoAddress,
  parseColoConfig,
  TLS_FILES,
} from './config';
export { coloFenceDriver, fenceCounters, setFenceCheck } from './fence';
export { type ColoActions, ColoPair, type ColoPairOptions, type ColoRole, type PeerState } from './pair';
export { COLO_NODES, ColoService, type ColoServiceOptions, type ColoStatus } from './service';
