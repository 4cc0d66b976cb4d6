// One proxy replica in a Node process of its own (test/test.replicas.ts spawns several that share
// Redis). The options come as JSON in argv[2] (or REPLICA_OPTIONS). Protocol on stdout, one JSON
// object a line:
//   {"event":"certificate-issued","data":{...}}   every certificate event, as it happens
//   {"started":true} | {"startError":"..."}        once start() settled
//   {"id":1,"result":...} | {"id":1,"error":"..."} the answer to a command
// Commands on stdin, one JSON object a line: {"id":1,"call":"renewCertificate","args":["route"]};
// any method of SmartProxy may be called (getCertificateStatus, getStatistics, ...); after "stop"
// the process exits 0. SIGTERM, SIGINT or the end of stdin (the test died) stop it and exit too;
// a stop that hangs is cut short, so a replica never outlives its test for long.
import readline from 'node:readline';
import { SmartProxy } from '../../dist_ts/index.js';

const CERT_EVENTS = ['certificate-issued', 'certificate-renewed', 'certificate-failed', 'certificate-expiring'];
const STOP_GRACE_MS = 5000;

/** Maps, bigints and errors do not survive JSON.stringify as they are. */
function replacer(_key, value) {
  if (value instanceof Map) return Object.fromEntries(value);
  if (value instanceof Set) return [...value];
  if (typeof value === 'bigint') return Number(value);
  if (value instanceof Error) return { message: value.message };
  return value;
}

function send(message) {
  try {
    process.stdout.write(`${JSON.stringify(message, replacer)}\n`);
  } catch {
    // stdout gone: the test is gone, shutdown follows from stdin's end
  }
}

const messageOf = (err) => (err instanceof Error ? err.message : String(err));

let proxy = null;
let started = null; // the start() promise, once called
let stopping = null;

/** Stops the proxy (bounded) and exits with `code`; later calls wait for the first. */
function shutdown(code) {
  if (stopping === null) {
    // Exit even if stop() never settles.
    setTimeout(() => process.exit(code), STOP_GRACE_MS).unref();
    stopping = (async () => {
      try {
        if (started !== null) await started.catch(() => undefined);
        if (proxy !== null && started !== null) await proxy.stop();
      } catch (err) {
        process.stderr.write(`replica: stop failed: ${messageOf(err)}\n`);
      }
      process.exit(code);
    })();
  }
  return stopping;
}

process.on('SIGTERM', () => void shutdown(0));
process.on('SIGINT', () => void shutdown(0));
process.stdout.on('error', () => void shutdown(0));
process.on('uncaughtException', (err) => {
  process.stderr.write(`replica: uncaught ${err?.stack ?? err}\n`);
  void shutdown(1);
});
process.on('unhandledRejection', (err) => {
  process.stderr.write(`replica: unhandled rejection ${err?.stack ?? err}\n`);
});

async function handle(line) {
  if (line.trim() === '') return;
  let command;
  try {
    command = JSON.parse(line);
  } catch {
    send({ id: null, error: `not JSON: ${line.slice(0, 200)}` });
    return;
  }
  const { id, call, args = [] } = command;
  if (call === 'stop') {
    try {
      if (started !== null) await started.catch(() => undefined);
      if (proxy !== null) await proxy.stop();
      send({ id, result: null });
    } catch (err) {
      send({ id, error: messageOf(err) });
    }
    process.exit(0);
  }
  try {
    if (proxy === null) throw new Error('no proxy (the constructor failed)');
    if (typeof proxy[call] !== 'function' || call.startsWith('_')) throw new Error(`unknown call ${call}`);
    // Commands wait for start(): a status asked for right after spawning reflects the started proxy.
    if (started !== null) await started.catch(() => undefined);
    const result = await proxy[call](...args);
    send({ id, result: result === undefined ? null : result });
  } catch (err) {
    send({ id, error: messageOf(err) });
  }
}

// Commands are read from the beginning, so none is lost while start() runs.
const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
input.on('line', (line) => void handle(line));
input.on('close', () => void shutdown(0));

const raw = process.argv[2] ?? process.env.REPLICA_OPTIONS;
try {
  if (raw === undefined) throw new Error('no options: pass them as JSON in argv[2] or REPLICA_OPTIONS');
  proxy = new SmartProxy(JSON.parse(raw));
  for (const event of CERT_EVENTS) proxy.on(event, (data) => send({ event, data }));
  // An 'error' event without a listener would throw and end the replica.
  proxy.on('error', (err) => process.stderr.write(`replica: error event: ${messageOf(err)}\n`));
} catch (err) {
  send({ startError: messageOf(err) });
}
if (proxy !== null) {
  started = proxy.start();
  try {
    await started;
    send({ started: true });
  } catch (err) {
    send({ startError: messageOf(err) });
  }
}
