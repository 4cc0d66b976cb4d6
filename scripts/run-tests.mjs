#!/usr/bin/env node
// Runs every test of the project and ends with one line: "N passed, N failed" (", N skipped" when
// a test was skipped: tap.skip.test, for what this machine cannot check).
//   1. the Rust unit tests (`cargo test`), counted from libtest's "test result" lines; they are
//      compiled first with no time limit (a first compile takes minutes on a small machine), and
//      only their run is bounded;
//   2. every tapbundle file test/test.*.ts in its own Node process (tsx), counted from its TAP.
// A file that crashes, exits non-zero or hangs past TEST_FILE_TIMEOUT_MS counts as a failure.
// Arguments filter the test files by substring; `--no-cargo` skips the Rust tests.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const testDir = path.join(root, 'test');
const args = process.argv.slice(2);
const runCargo = !args.includes('--no-cargo') && args.filter((a) => !a.startsWith('--')).length === 0;
const filter = args.filter((a) => !a.startsWith('--'));
const timeoutMs = Number(process.env.TEST_FILE_TIMEOUT_MS ?? 180_000);

function run(command, argv, label, onLine, limitMs = timeoutMs) {
  return new Promise((resolve) => {
    const child = spawn(command, argv, {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FORCE_COLOR: '0' },
    });
    let buf = '';
    const feed = (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        process.stdout.write(`[${label}] ${line}\n`);
        onLine(line);
      }
    };
    child.stdout.on('data', feed);
    child.stderr.on('data', feed);
    let timedOut = false;
    const timer =
      limitMs === null
        ? null
        : setTimeout(() => {
            timedOut = true;
            child.kill('SIGKILL');
          }, limitMs);
    child.on('error', (err) => process.stdout.write(`[${label}] could not start ${command}: ${err.message}\n`));
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (buf) {
        process.stdout.write(`[${label}] ${buf}\n`);
        onLine(buf);
      }
      resolve({ code, signal, timedOut });
    });
  });
}

/** Why a step ended badly, in words: a timeout, a signal or an exit code. */
function describeEnd(result, limitMs) {
  if (result.timedOut) return `killed after ${limitMs} ms (TEST_FILE_TIMEOUT_MS)`;
  if (result.signal) return `killed by ${result.signal}`;
  return `exit ${result.code}`;
}

async function runCargoTests() {
  let passed = 0;
  let failed = 0;
  const built = await run('cargo', ['test', '--lib', '--no-run', '--quiet'], 'cargo test', () => {}, null);
  if (built.code !== 0) {
    process.stdout.write(`[cargo test] not ok - the Rust tests did not compile (${describeEnd(built, null)})\n`);
    return { passed, failed: 1 };
  }
  const result = await run('cargo', ['test', '--lib', '--quiet'], 'cargo test', (line) => {
    const m = /^test result: \w+\. (\d+) passed; (\d+) failed/.exec(line);
    if (m) {
      passed += Number(m[1]);
      failed += Number(m[2]);
    }
  });
  if (result.code !== 0 && failed === 0) {
    process.stdout.write(`[cargo test] not ok - the Rust tests ended without a result (${describeEnd(result, timeoutMs)})\n`);
    failed = 1;
  }
  return { passed, failed };
}

async function runTapFile(file) {
  let plan = null;
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  const result = await run(process.execPath, ['--import', 'tsx', path.join(testDir, file)], file, (line) => {
    let m;
    if ((m = /^1\.\.(\d+)\s*$/.exec(line))) plan = Number(m[1]);
    else if (/^ok \d+\b/.test(line)) passed++;
    else if (/^not ok \d+\b/.test(line)) failed++;
    else if (/^skipped test: /.test(line)) skipped++;
  });
  let missing = plan === null ? (passed + failed === 0 ? 1 : 0) : Math.max(0, plan - passed - failed);
  if ((result.code !== 0 || result.timedOut) && failed === 0 && missing === 0) missing = 1;
  if (missing > 0) {
    const why = describeEnd(result, timeoutMs);
    process.stdout.write(`[${file}] not ok - ${missing} test(s) did not report (${why})\n`);
  }
  return { passed, failed: failed + missing, skipped };
}

/**
 * The HTTP/3 tests' client and server run on aioquic in the venv `.venv-h3`: made here when it is
 * missing (a failure leaves those tests to say what is missing).
 */
const AIOQUIC = 'aioquic==1.7.2';
function ensureH3Venv() {
  const python = path.join(root, '.venv-h3', 'bin', 'python');
  const quiet = { cwd: root, stdio: 'ignore' };
  if (existsSync(python) && spawnSync(python, ['-c', 'import aioquic'], quiet).status === 0) return;
  console.log(`making .venv-h3 with ${AIOQUIC} for the HTTP/3 tests`);
  if (!existsSync(python) && spawnSync('python3', ['-m', 'venv', '.venv-h3'], quiet).status !== 0) {
    console.log('python3 -m venv failed (Debian: apt-get install python3-venv); the HTTP/3 tests will fail');
    return;
  }
  if (spawnSync(python, ['-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', AIOQUIC], quiet).status !== 0) {
    console.log(`pip install ${AIOQUIC} failed; the HTTP/3 tests will fail`);
  }
}

let passed = 0;
let failed = 0;
let skipped = 0;
if (filter.length === 0 || filter.some((p) => 'http3 quic-passthrough'.includes(p))) ensureH3Venv();
if (runCargo) {
  const r = await runCargoTests();
  passed += r.passed;
  failed += r.failed;
}
const files = readdirSync(testDir)
  .filter((f) => /^test\..+\.ts$/.test(f))
  .filter((f) => filter.length === 0 || filter.some((p) => f.includes(p)))
  .sort();
if (files.length === 0) {
  console.log('no test files found');
  failed++;
}
for (const file of files) {
  const r = await runTapFile(file);
  passed += r.passed;
  failed += r.failed;
  skipped += r.skipped;
}
console.log(`${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ''}`);
process.exit(failed > 0 ? 1 : 0);
