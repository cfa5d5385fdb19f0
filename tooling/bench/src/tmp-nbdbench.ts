import { run } from './nbd';

const rows = await run();
for (const r of rows)
  console.log(
    r.name.padEnd(44),
    r.ours.toFixed(0).padStart(8),
    r.qemu.toFixed(0).padStart(8),
    r.unit,
    (r.ours / r.qemu).toFixed(2),
  );
