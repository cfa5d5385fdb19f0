export { type ColoServer, coloPrimaryChildOptions, coloQuorumOptions, coloSecondaryOptions } from './colo';
export {
  type ReplicationInfo,
  ReplicationManager,
  type ReplicationMode,
  type ReplicationStage,
  type ReplicationState,
  replicationInfo,
} from './replication';
