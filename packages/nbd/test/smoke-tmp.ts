import { createGraph } from '@blockrep/block';
import { NbdServer } from '@blockrep/nbd';
const g = createGraph();
const node = await g.open({
  driver: 'raw',
  'node-name': 'disk',
  file: { driver: 'file', filename: process.argv[2] },
});
const s = new NbdServer(g);
const a = await s.listen({ type: 'inet', host: '127.0.0.1', port: Number(process.argv[3]) });
s.addExport({ node, name: 'disk', writable: true, description: 'a test disk' });
console.log('listening', JSON.stringify(a));
if (process.argv[4]) setTimeout(() => process.exit(0), Number(process.argv[4]) * 1000);
