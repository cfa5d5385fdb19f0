export { qcow2Driver, qcow2FormatSpecific } from './driver';
export { Qcow2Image } from './image';
