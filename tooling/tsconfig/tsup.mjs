/** The tsup settings every package builds with (ESM + declarations for Node 20). */
export default {
  entry: ['src/index.ts'],
  format: ['esm'],
  dts: true,
  clean: true,
  sourcemap: true,
  target: 'node20',
};
