import { open } from 'node:fs/promises';

/*
 * Internal snapshots of a qcow2 image, read from its snapshot table for `info` (the qcow2 package
 * reads only the active layer's view of them).
 */

/** One entry of `qemu-img info`'s "snapshots" list (SnapshotInfo). */
export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

const FIXED = 40;

/** The snapshot table at offset (count entries), as qemu-img info lists it. */
export async function readSnapshotTable(
  file: string,
  offset: number,
  count: number,
): Promise<SnapshotInfo[]> {
  const fh = await open(file, 'r');
  try {
    const read = async (at: number, bytes: number) => {
      const b = Buffer.alloc(bytes);
      // Past the end of the file the table reads as zeroes, as QEMU reads it.
      await fh.read(b, 0, bytes, at);
      return b;
    };
    const out: SnapshotInfo[] = [];
    let pos = offset;
    for (let i = 0; i < count; i++) {
      const fixed = await read(pos, FIXED);
      const idLen = fixed.readUInt16BE(12);
      const nameLen = fixed.readUInt16BE(14);
      const extraLen = fixed.readUInt32BE(36);
      const extra = await read(pos + FIXED, extraLen);
      const strings = await read(pos + FIXED + extraLen, idLen + nameLen);
      const clock = fixed.readBigUInt64BE(24);
      // The extra data may hold a 64-bit VM state size and the instruction count (-1: none).
      const stateSize = extraLen >= 8 ? Number(extra.readBigUInt64BE(0)) : fixed.readUInt32BE(32);
      const icount = extraLen >= 24 ? extra.readBigInt64BE(16) : -1n;
      const info: SnapshotInfo = {
        id: strings.subarray(0, idLen).toString(),
        name: strings.subarray(idLen).toString(),
        'vm-state-size': stateSize,
        'date-sec': fixed.readUInt32BE(16),
        'date-nsec': fixed.readUInt32BE(20),
        'vm-clock-sec': Number(clock / 1_000_000_000n),
        'vm-clock-nsec': Number(clock % 1_000_000_000n),
      };
      if (icount !== -1n) info.icount = Number(icount);
      out.push(info);
      pos = Math.ceil((pos + FIXED + extraLen + idLen + nameLen) / 8) * 8;
    }
    return out;
  } finally {
    await fh.close();
  }
}

const pad2 = (n: number) => String(n).padStart(2, '0');

/** The "Snapshot list:" table of qemu-img info (dates in local time, as qemu-img prints them). */
export function snapshotTable(snapshots: SnapshotInfo[], humanSize: (n: number) => string): string[] {
  const lines = [
    'Snapshot list:',
    `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`,
  ];
  for (const s of snapshots) {
    const d = new Date(s['date-sec'] * 1000);
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const secs = s['vm-clock-sec'];
    const ms = Math.floor(s['vm-clock-nsec'] / 1_000_000);
    const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(ms).padStart(3, '0')}`;
    const size = humanSize(s['vm-state-size']);
    lines.push(
      `${s.id.padEnd(9)} ${s.name.padEnd(16)} ${size.padStart(8)}${date.padStart(20)}${clock.padStart(13)}${(s.icount === undefined ? '' : String(s.icount)).padStart(11)}`,
    );
  }
  return lines;
}
