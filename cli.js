#!/usr/bin/env node
// The `smartproxy` command: see dist_ts/cli.js (compiled from ts/cli.ts).
import './dist_ts/cli.js';
