/**
 * The tsup settings every library package builds with: ES modules and CommonJS (dist/index.js
 * and dist/index.cjs, each with its declarations) for Node 20; `import.meta.url` is shimmed in
 * the CommonJS build.
 */
export default {
  entry: ['src/index.ts'],
  format: ['esm', 'cjs'],
  dts: true,
  clean: true,
  sourcemap: true,
  shims: true,
  target: 'node20',
};
