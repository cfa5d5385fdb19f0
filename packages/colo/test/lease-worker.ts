// A process racing for the lease (lock-file-arbiter.test.ts): argv path, name, rounds. Prints
// "<name> <epoch>" for each grant, holds the lease briefly, checks nobody took it meanwhile,
// then releases it.
import { LockFileArbiter } from '../src/arbiter/lock-file';

const [path, name, rounds] = process.argv.slice(2) as [string, string, string];
const arbiter = new LockFileArbiter({ path, leaseTtl: 60_000 });
for (let i = 0; i < Number(rounds); i++) {
  const lease = await arbiter.acquire(name);
  if (lease) {
    process.stdout.write(`${name} ${lease.epoch}\n`);
    const seen = await arbiter.read();
    if (seen?.holder !== name || seen.epoch !== lease.epoch) {
      process.stderr.write(`${name}: lease ${lease.epoch} taken by ${JSON.stringify(seen)} while held\n`);
      process.exit(1);
    }
    await arbiter.release(name);
  }
  await new Promise((r) => setImmediate(r));
}
