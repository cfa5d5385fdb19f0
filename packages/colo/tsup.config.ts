export { default } from '@blockrep/tsconfig/tsup.mjs';
