#!/usr/bin/env node
// The installed command: runs the built CLI (pnpm build creates dist/).
import '../dist/main.js';
