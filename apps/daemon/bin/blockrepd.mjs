#!/usr/bin/env node
// The installed command: runs the built daemon (pnpm build creates dist/).
import '../dist/main.js';
