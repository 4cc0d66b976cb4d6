// Replicas sharing state through Redis (API.md "Replicas sharing state through Redis"): several
// proxies, each a Node process of its own (test/helpers/replica-child.mjs, driven over stdin and
// stdout), one redis-server and one real ACME server (pebble). Certificates: one order for all
// replicas, the CA's validation answered by a replica that did not order, a later replica loading
// the result, a renewal reaching every replica by pub/sub, a crashed orderer's lock expiring, keys
// sealed with encryptionKey. Rate limits: one budget across replicas, each replica alone while
// Redis is down, shared again once it is back.
//
// Pebble validates HTTP-01 at http://<domain>:<pebble.httpPort>. No replica binds that port:
// a gate in this process does, holds pebble's connections until the test opens it, then forwards
// them to the replicas' own challenge ports (acme.port) it names. So which replica answers the CA
// does not depend on which replica's process happened to start first.
// DEBUG_REPLICAS=1 prints the replicas' output as it comes (DEBUG_PEBBLE=1 pebble's).
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { randomBytes, X509Certificate } from 'node:crypto';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import type { ICertStatus, ISharedStateStats } from '../ts/index.js';
import { freePort, freePorts, runCleanups, sleep } from './helpers/net.js';
import { startPebble, type Pebble } from './helpers/pebble.js';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const REPLICA_CHILD = path.join(root, 'test', 'helpers', 'replica-child.mjs');
const ROUTE = 'auto-site';
/** Pebble (no validation sleep) issues within a few seconds; the bound keeps a broken run short. */
const ISSUE_TIMEOUT_MS = 20_000;
/** The lock's TTL on the Rust side: a crashed orderer's lock is gone after this. */
const LOCK_TTL_MS = 15_000;
const DEBUG = Boolean(process.env.DEBUG_REPLICAS);

if (!existsSync(path.join(root, 'dist_ts', 'index.js'))) {
  throw new Error('dist_ts/index.js is missing: the replicas import the built package (npx tsc -p tsconfig.json)');
}

// ---------------------------------------------------------------------------------------------
// Every child process this file starts is killed when it exits, whatever happened (a test that
// threw before its clean-up, a crash, the watchdog below): a leftover replica, redis-server or
// pebble would outlive the run. Pebble's process is the helper's, so it is found by its parent pid.

const liveChildren = new Set<ChildProcess>();

/** Pids of this process's children, from /proc. */
function ownChildPids(): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === process.pid) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

process.on('exit', () => {
  for (const child of liveChildren) child.kill('SIGKILL');
  for (const pid of ownChildPids()) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
  }
});

function track(child: ChildProcess): void {
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

// ---------------------------------------------------------------------------------------------
// redis-server and a raw RESP client (arrays too: KEYS, PUBSUB NUMSUB, HGETALL)

type TResp = string | number | null | Error | TResp[];

/** Parses one reply from `buf` at `at`; undefined while it is incomplete. */
function parseResp(buf: Buffer, at: number): { value: TResp; next: number } | undefined {
  const end = buf.indexOf('\r\n', at);
  if (end < 0) return undefined;
  const line = buf.toString('utf8', at + 1, end);
  const next = end + 2;
  switch (String.fromCharCode(buf[at])) {
    case '+':
      return { value: line, next };
    case '-':
      return { value: new Error(line), next };
    case ':':
      return { value: Number(line), next };
    case '$': {
      const len = Number(line);
      if (len < 0) return { value: null, next };
      if (buf.length < next + len + 2) return undefined;
      return { value: buf.toString('utf8', next, next + len), next: next + len + 2 };
    }
    case '*': {
      const count = Number(line);
      if (count < 0) return { value: null, next };
      const items: TResp[] = [];
      let pos = next;
      for (let i = 0; i < count; i++) {
        const item = parseResp(buf, pos);
        if (item === undefined) return undefined;
        items.push(item.value);
        pos = item.next;
      }
      return { value: items, next: pos };
    }
    default:
      return { value: new Error(`unexpected reply ${JSON.stringify(buf.toString())}`), next: buf.length };
  }
}

/** One command on a connection of its own; rejects when redis does not answer. */
function redisCommand(port: number, ...args: string[]): Promise<TResp> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`redis on ${port} did not answer ${args[0]}`));
    }, 2000);
    socket.on('connect', () => {
      socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`);
    });
    socket.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const reply = parseResp(buf, 0);
      if (reply === undefined) return;
      clearTimeout(timer);
      socket.destroy();
      resolve(reply.value);
    });
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function redisString(port: number, ...args: string[]): Promise<string | null> {
  const value = await redisCommand(port, ...args);
  if (value instanceof Error) throw value;
  if (value !== null && typeof value !== 'string') throw new Error(`${args[0]}: expected a string, got ${JSON.stringify(value)}`);
  return value;
}

async function redisNumber(port: number, ...args: string[]): Promise<number> {
  const value = await redisCommand(port, ...args);
  if (typeof value !== 'number') throw new Error(`${args[0]}: expected an integer, got ${String(value)}`);
  return value;
}

async function redisList(port: number, ...args: string[]): Promise<TResp[]> {
  const value = await redisCommand(port, ...args);
  if (!Array.isArray(value)) throw new Error(`${args[0]}: expected an array, got ${String(value)}`);
  return value;
}

interface IRedis {
  port: number;
  /** SIGKILL, and wait until it exited. */
  kill(): Promise<void>;
}

async function startRedis(port: number): Promise<IRedis> {
  const child = spawn('/usr/bin/redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1'], {
    stdio: ['ignore', 'ignore', 'ignore'],
  });
  track(child);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const kill = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  const deadline = Date.now() + 5000;
  for (;;) {
    if ((await redisCommand(port, 'PING').catch(() => null)) === 'PONG') break;
    if (child.exitCode !== null || Date.now() > deadline) {
      await kill();
      throw new Error(`redis-server on ${port} did not answer PING`);
    }
    await sleep(30);
  }
  return { port, kill };
}

// ---------------------------------------------------------------------------------------------
// The challenge gate on pebble.httpPort (see the top of the file)

interface IGate {
  /** Connections forwarded to a replica so far. */
  forwarded: number;
  /** From now on (and for every connection held until now) forward to `ports`, in turn. */
  open(ports: number[]): void;
  close(): Promise<void>;
}

async function startGate(port: number): Promise<IGate> {
  const sockets = new Set<net.Socket>();
  const held: net.Socket[] = [];
  let targets: number[] | null = null;
  let turn = 0;
  const keep = (socket: net.Socket): void => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
  };
  const forward = (socket: net.Socket): void => {
    if (socket.destroyed) return;
    const upstream = net.connect(targets![turn++ % targets!.length], '127.0.0.1');
    keep(upstream);
    upstream.on('error', () => socket.destroy());
    socket.on('error', () => upstream.destroy());
    socket.on('close', () => upstream.destroy());
    upstream.on('close', () => socket.destroy());
    socket.pipe(upstream);
    upstream.pipe(socket);
    gate.forwarded++;
  };
  const server = net.createServer((socket) => {
    keep(socket);
    // Not read while held: pebble's request waits in the socket until the gate opens.
    if (targets === null) held.push(socket);
    else forward(socket);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const gate: IGate = {
    forwarded: 0,
    open(ports) {
      targets = ports;
      for (const socket of held.splice(0)) forward(socket);
    },
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  return gate;
}

// ---------------------------------------------------------------------------------------------
// The replica driver: spawn, events, commands, kill

interface ICertEvent {
  event: string;
  data: any;
  /** When this process read it (ms since the epoch). */
  at: number;
}

interface IReplica {
  label: string;
  events: ICertEvent[];
  /** Its stderr and any stdout line outside the protocol, for a failed test's report. */
  output: string[];
  /** Resolves on `{"started":true}`; rejects on a start error or when the process ends first. */
  started: Promise<void>;
  call<T = unknown>(call: string, args?: unknown[], timeoutMs?: number): Promise<T>;
  /** SIGKILL, and wait until it exited. */
  kill(): Promise<void>;
}

interface IContext {
  defer(fn: () => Promise<unknown> | unknown): void;
  replicas: IReplica[];
}

function spawnReplica(ctx: IContext, label: string, options: object): IReplica {
  const child = spawn(process.execPath, [REPLICA_CHILD, JSON.stringify(options)], {
    cwd: root,
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, FORCE_COLOR: '0' },
  });
  track(child);
  const events: ICertEvent[] = [];
  const output: string[] = [];
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout }>();
  let nextId = 1;
  let exitReason: string | null = null;
  let settleStart: { resolve(): void; reject(e: Error): void } | null = null;
  const started = new Promise<void>((resolve, reject) => {
    settleStart = { resolve, reject };
  });
  started.catch(() => undefined); // awaited by the tests that care
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));

  const note = (line: string): void => {
    output.push(line);
    if (DEBUG) process.stderr.write(`[${label}] ${line}\n`);
  };
  const onMessage = (msg: any): void => {
    if (typeof msg.event === 'string' && 'data' in msg) {
      events.push({ event: msg.event, data: msg.data, at: Date.now() });
      note(`event ${msg.event} ${JSON.stringify(msg.data)}`);
    } else if (msg.started === true) {
      settleStart?.resolve();
    } else if (typeof msg.startError === 'string') {
      note(`start error: ${msg.startError}`);
      settleStart?.reject(new Error(`${label} did not start: ${msg.startError}`));
    } else if (typeof msg.id === 'number' && pending.has(msg.id)) {
      const waiter = pending.get(msg.id)!;
      pending.delete(msg.id);
      clearTimeout(waiter.timer);
      if ('error' in msg) waiter.reject(new Error(`${label}: ${msg.error}`));
      else waiter.resolve(msg.result);
    } else {
      note(JSON.stringify(msg));
    }
  };
  const lines = (stream: NodeJS.ReadableStream, protocol: boolean): void => {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (d: string) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let msg: unknown = undefined;
        if (protocol && line.startsWith('{')) {
          try {
            msg = JSON.parse(line);
          } catch {
            msg = undefined;
          }
        }
        if (msg !== null && typeof msg === 'object') onMessage(msg);
        else note(line);
      }
    });
  };
  lines(child.stdout!, true);
  lines(child.stderr!, false);
  child.stdin!.on('error', () => undefined); // EPIPE once it died
  child.once('exit', (code, signal) => {
    exitReason = signal !== null ? `killed by ${signal}` : `exit ${code}`;
    note(`process ended: ${exitReason}`);
    settleStart?.reject(new Error(`${label} ended before it started (${exitReason}): ${output.slice(-10).join(' | ')}`));
    for (const [, waiter] of pending) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error(`${label} ended (${exitReason}) before it answered`));
    }
    pending.clear();
  });

  const replica: IReplica = {
    label,
    events,
    output,
    started,
    call<T>(call: string, args: unknown[] = [], timeoutMs = 15_000): Promise<T> {
      if (exitReason !== null) return Promise.reject(new Error(`${label} has ended (${exitReason}); cannot call ${call}`));
      const id = nextId++;
      return new Promise<T>((resolve, reject) => {
        const timer = setTimeout(() => {
          pending.delete(id);
          reject(new Error(`${label} did not answer ${call} within ${timeoutMs} ms`));
        }, timeoutMs);
        pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
        child.stdin!.write(`${JSON.stringify({ id, call, args })}\n`);
      });
    },
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
  ctx.replicas.push(replica);
  ctx.defer(() => replica.kill());
  return replica;
}

/** Waits for `replica` to report it started, bounded. */
async function whenStarted(...replicas: IReplica[]): Promise<void> {
  await Promise.all(
    replicas.map((r) =>
      Promise.race([
        r.started,
        sleep(20_000).then(() => {
          throw new Error(`${r.label} did not report start within 20 s`);
        }),
      ]),
    ),
  );
}

async function sharedState(replica: IReplica): Promise<ISharedStateStats> {
  const stats = await replica.call<{ sharedState?: ISharedStateStats | null }>('getStatistics');
  if (stats?.sharedState == null) throw new Error(`${replica.label}: getStatistics().sharedState is ${String(stats?.sharedState)}`);
  return stats.sharedState;
}

const certStatus = (replica: IReplica, route = ROUTE): Promise<ICertStatus | null> => replica.call<ICertStatus | null>('getCertificateStatus', [route]);

/** Polls `check` until it returns true (bounded); `describe` says what was last seen when it times out. */
async function eventually(check: () => Promise<boolean>, timeoutMs: number, what: string, describe?: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${describe ? `; ${describe()}` : ''}`);
    await sleep(100);
  }
}

/** Waits for `type` about the route from `replica`; a 'certificate-failed' ends a wait for a certificate. */
async function waitEvent(replica: IReplica, type: string, timeoutMs = ISSUE_TIMEOUT_MS, route = ROUTE): Promise<ICertEvent> {
  const find = (t: string): ICertEvent | undefined => replica.events.find((e) => e.event === t && e.data?.routeName === route);
  await eventually(
    async () => find(type) !== undefined || find('certificate-failed') !== undefined,
    timeoutMs,
    `'${type}' from ${replica.label}`,
    () => `events: ${JSON.stringify(replica.events)}`,
  );
  const found = find(type);
  if (found === undefined) throw new Error(`${replica.label}: 'certificate-failed' instead of '${type}': ${JSON.stringify(find('certificate-failed')!.data)}`);
  return found;
}

/** Waits until `replica` says its certificate is valid; a 'certificate-failed' from it ends the wait. */
async function waitValid(replica: IReplica, timeoutMs = ISSUE_TIMEOUT_MS): Promise<void> {
  let last: ICertStatus | null = null;
  await eventually(
    async () => {
      const failed = replica.events.find((e) => e.event === 'certificate-failed');
      if (failed !== undefined) throw new Error(`${replica.label}: certificate-failed ${JSON.stringify(failed.data)}`);
      return (last = await certStatus(replica))?.status === 'valid';
    },
    timeoutMs,
    `a valid certificate on ${replica.label}`,
    () => `last status ${JSON.stringify(last)}, events ${JSON.stringify(replica.events)}`,
  );
}

// ---------------------------------------------------------------------------------------------
// Fixtures: redis-server for the certificate tests (each test its own key prefix and domain),
// pebble, a backend, a work directory

const workDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-replicas-'));
process.on('exit', () => rmSync(workDir, { recursive: true, force: true }));
const redis = await startRedis(await freePort());
let pebble: Pebble;
let trust: string;
try {
  pebble = await startPebble({ httpPort: await freePort() });
  // The root and the intermediate: whether the served chain carries the intermediate is not what
  // these tests are about.
  trust = `${await pebble.rootPem()}\n${await pebble.intermediatePem()}`;
} catch (err) {
  await redis.kill();
  throw err;
}

// The runner kills a file that runs past TEST_FILE_TIMEOUT_MS, with no chance to clean up: end
// before that, with everything stopped (the 'exit' handler above).
const fileLimitMs = Number(process.env.TEST_FILE_TIMEOUT_MS ?? 180_000);
setTimeout(() => {
  console.log(`not ok - test.replicas.ts ran past ${fileLimitMs - 10_000} ms; stopping its processes`);
  void Promise.race([pebble.stop(), sleep(3000)]).finally(() => process.exit(1));
}, fileLimitMs - 10_000).unref();

const backendServer = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => res.end('ok'));
});
await new Promise<void>((resolve) => backendServer.listen(0, '127.0.0.1', resolve));
const backendPort = (backendServer.address() as net.AddressInfo).port;

/** Pebble prints this once per new order (wfe: `Added order "<id>" to the db`). */
const ORDER_LINE = 'Added order';
const pebbleLines = (): string[] => pebble.logs().split('\n');
/** New orders pebble logged after line `mark` (a `pebbleLines().length` taken before). */
const ordersSince = (mark: number): number => pebbleLines().slice(mark).filter((l) => l.includes(ORDER_LINE)).length;
/** Serials pebble issued after line `mark` (`Issued certificate serial <hex> for order <id>`). */
const issuedSince = (mark: number): string[] =>
  pebbleLines()
    .slice(mark)
    .map((l) => /Issued certificate serial ([0-9a-fA-F]+)/.exec(l)?.[1])
    .filter((serial): serial is string => serial !== undefined)
    .map(normalSerial);

/** Runs `body` with clean-ups that always run (last registered first); on failure prints what the replicas and pebble said. */
function replicaTest(name: string, body: (ctx: IContext) => Promise<void>): void {
  tap.test(name, async () => {
    const cleanups: Array<() => Promise<unknown> | unknown> = [];
    const ctx: IContext = { defer: (fn) => cleanups.push(fn), replicas: [] };
    const pebbleMark = pebbleLines().length;
    try {
      await body(ctx);
    } catch (err) {
      for (const r of ctx.replicas) {
        process.stderr.write(`----- ${r.label}: events ${JSON.stringify(r.events)}\n${r.output.slice(-40).join('\n')}\n`);
      }
      process.stderr.write(`----- pebble during this test -----\n${pebbleLines().slice(pebbleMark).slice(-80).join('\n')}\n-----\n`);
      throw err;
    } finally {
      await runCleanups(cleanups);
    }
  });
}

interface IAcmeReplica {
  replica: IReplica;
  /** Its TLS port (the route's). */
  port: number;
  /** Its challenge port (acme.port). */
  acmePort: number;
  /** Its acme.certificateStore (the disk cache beside Redis). */
  store: string;
}

/** A replica with one 'auto' route for `domain`, sharing `prefix` in Redis; `store`: an existing
 * acme.certificateStore (a replica restarting), else an empty one of its own. */
async function acmeReplica(
  ctx: IContext,
  label: string,
  domain: string,
  redisOptions: { keyPrefix: string; encryptionKey?: string; syncIntervalMs?: number },
  store: string = mkdtempSync(path.join(workDir, `${label}-`)),
): Promise<IAcmeReplica> {
  const [port, acmePort] = await freePorts(2);
  const options = {
    gracefulShutdownTimeout: 200,
    acme: {
      email: 'ops@example.com',
      port: acmePort,
      directoryUrl: pebble.directoryUrl,
      directoryCaFile: pebble.caFile,
      certificateStore: store,
      useProduction: false,
      renewThresholdDays: 30,
      autoRenew: true,
      renewCheckIntervalHours: 24,
    },
    redis: { url: `redis://127.0.0.1:${redis.port}`, ...redisOptions },
    routes: [
      {
        name: ROUTE,
        match: { ports: port, domains: domain },
        action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort }, tls: { mode: 'terminate', certificate: 'auto' } },
      },
    ],
  };
  return { replica: spawnReplica(ctx, label, options), port, acmePort, store };
}

/** Serial numbers compared as OpenSSL prints them, without leading zeros. */
const normalSerial = (serial: string): string => serial.toUpperCase().replace(/^0+/, '');

/** The serial of the leaf `port` serves for `servername`, verified against pebble's CA. */
function servedSerial(port: number, servername: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername, ca: trust, rejectUnauthorized: true });
    let settled = false;
    const finish = (err: Error | null, serial?: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      if (err) reject(err);
      else resolve(serial!);
    };
    const timer = setTimeout(() => finish(new Error(`no handshake with ${servername} on ${port} within 5 s`)), 5000);
    socket.on('secureConnect', () => finish(null, normalSerial(socket.getPeerCertificate().serialNumber)));
    socket.on('error', (err) => finish(err));
    socket.on('close', () => finish(new Error(`${servername} on ${port}: closed before the handshake completed`)));
  });
}

/** The certificate record of `route` under `prefix`: a JSON string, as API.md lays it out. */
async function certRecord(prefix: string, route = ROUTE): Promise<{ chainPem?: string; keyPem?: string; sealedKey?: string; meta?: unknown }> {
  const raw = await redisString(redis.port, 'GET', `${prefix}cert:${route}`);
  if (raw === null) throw new Error(`no ${prefix}cert:${route} in Redis`);
  return JSON.parse(raw);
}

const leafSerialOf = (chainPem: string): string => normalSerial(new X509Certificate(chainPem).serialNumber);

/** The keys under `prefix` whose value, whatever its type, holds a private key in the clear. */
async function keysInTheClear(prefix: string): Promise<string[]> {
  const readers: Record<string, (k: string) => string[]> = {
    string: (k) => ['GET', k],
    hash: (k) => ['HGETALL', k],
    list: (k) => ['LRANGE', k, '0', '-1'],
    set: (k) => ['SMEMBERS', k],
    zset: (k) => ['ZRANGE', k, '0', '-1'],
  };
  const clear: string[] = [];
  for (const k of (await redisList(redis.port, 'KEYS', `${prefix}*`)).map(String)) {
    const type = await redisString(redis.port, 'TYPE', k);
    const read = readers[type ?? ''];
    if (read === undefined) continue; // gone meanwhile, or a stream
    if (JSON.stringify(await redisCommand(redis.port, ...read(k))).includes('PRIVATE KEY')) clear.push(k);
  }
  return clear;
}

async function sumOrders(replicas: IReplica[]): Promise<number> {
  let sum = 0;
  for (const r of replicas) sum += (await sharedState(r)).ordersPlaced;
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Certificates

/** The certificate test 1 got under 'rt1:' (tests 3 and 4 start from it). */
let firstSerial = '';
const DOMAIN1 = 'replicas1.test';

replicaTest('three replicas started together: one ACME order in all, every replica serves the same certificate', async (ctx) => {
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const mark = pebbleLines().length;
  const replicas = await Promise.all(['r1a', 'r1b', 'r1c'].map((label) => acmeReplica(ctx, label, DOMAIN1, { keyPrefix: 'rt1:' })));
  await whenStarted(...replicas.map((r) => r.replica));
  // Every replica answers challenges from Redis: pebble's requests go to all of them in turn.
  gate.open(replicas.map((r) => r.acmePort));

  const deadline = Date.now() + ISSUE_TIMEOUT_MS;
  const serials: string[] = [];
  for (const r of replicas) {
    await waitValid(r.replica, deadline - Date.now());
    serials.push(await servedSerial(r.port, DOMAIN1));
  }
  expect(new Set(serials).size).toEqual(1);
  expect(await sumOrders(replicas.map((r) => r.replica))).toEqual(1);
  expect(ordersSince(mark)).toEqual(1);
  expect(issuedSince(mark)).toEqual([serials[0]]);
  const states = await Promise.all(replicas.map((r) => sharedState(r.replica)));
  console.log(`one order for three replicas: serial ${serials[0]}; sharedState ${JSON.stringify(states)}`);
  for (const r of replicas) expect(r.replica.events.filter((e) => e.event === 'certificate-failed')).toEqual([]);

  // Stored once in Redis: the chain that is served, the key in the clear (no encryptionKey here).
  const record = await certRecord('rt1:');
  expect(leafSerialOf(record.chainPem!)).toEqual(serials[0]);
  expect(record.keyPem).toInclude('PRIVATE KEY');
  expect(record.meta !== undefined).toBeTrue();
  firstSerial = serials[0];
});

replicaTest("the CA's validation reaches only a replica that did not order: the order succeeds, both serve it", async (ctx) => {
  const domain = 'replicas2.test';
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const mark = pebbleLines().length;
  const a = await acmeReplica(ctx, 'r2a', domain, { keyPrefix: 'rt2:' });
  await whenStarted(a.replica);
  // B comes once A holds the order lock, so A is the one ordering.
  const lockKey = `rt2:lock:cert:${ROUTE}`;
  let polls = 0;
  await eventually(
    async () => (await redisString(redis.port, 'GET', lockKey)) !== null || (++polls % 5 === 0 && (await sharedState(a.replica)).ordersPlaced >= 1),
    10_000,
    `${lockKey} in Redis (A ordering)`,
  );
  const b = await acmeReplica(ctx, 'r2b', domain, { keyPrefix: 'rt2:' });
  await whenStarted(b.replica);
  gate.open([b.acmePort]);

  await waitEvent(a.replica, 'certificate-issued');
  // B waited on A's lock, or hears of the result: it has it soon after A.
  await waitValid(b.replica, 10_000);
  const serialA = await servedSerial(a.port, domain);
  expect(await servedSerial(b.port, domain)).toEqual(serialA);
  // Pebble's validation went to B alone, and succeeded.
  expect(gate.forwarded).toBeGreaterThanOrEqual(1);
  const stateA = await sharedState(a.replica);
  const stateB = await sharedState(b.replica);
  console.log(`validation connections through B: ${gate.forwarded}; A ${JSON.stringify(stateA)}; B ${JSON.stringify(stateB)}`);
  expect(stateA.ordersPlaced).toEqual(1);
  expect(stateB.ordersPlaced).toEqual(0);
  expect(stateB.lockWaits >= 1 || stateB.certificatesLoaded >= 1).toBeTrue();
  expect(ordersSince(mark)).toEqual(1);
});

replicaTest('a replica started later with the same prefix loads the certificate from Redis: no order, the same certificate', async (ctx) => {
  if (firstSerial === '') throw new Error('the first test left no certificate to load');
  const mark = pebbleLines().length;
  // No gate: an order from this replica could not be validated, and must not happen anyway.
  const late = await acmeReplica(ctx, 'r3', DOMAIN1, { keyPrefix: 'rt1:' });
  await whenStarted(late.replica);
  await waitValid(late.replica, 10_000);
  expect(await servedSerial(late.port, DOMAIN1)).toEqual(firstSerial);
  const state = await sharedState(late.replica);
  expect(state.ordersPlaced).toEqual(0);
  expect(state.certificatesLoaded).toBeGreaterThanOrEqual(1);
  expect(state.redisReachable).toBeTrue();
  expect(ordersSince(mark)).toEqual(0);
  expect(late.replica.events.filter((e) => e.event === 'certificate-failed' || e.event === 'certificate-renewed')).toEqual([]);
});

replicaTest('renewCertificate on one replica: one new order, every other replica serves the renewed certificate within seconds', async (ctx) => {
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  // A periodic re-read a minute apart: the renewal has to arrive by pub/sub.
  const replicas = await Promise.all(['r4a', 'r4b', 'r4c'].map((label) => acmeReplica(ctx, label, DOMAIN1, { keyPrefix: 'rt1:', syncIntervalMs: 60_000 })));
  await whenStarted(...replicas.map((r) => r.replica));
  gate.open(replicas.map((r) => r.acmePort));
  const deadline = Date.now() + 10_000;
  for (const r of replicas) await waitValid(r.replica, deadline - Date.now());
  const oldSerial = await servedSerial(replicas[0].port, DOMAIN1);
  for (const r of replicas) expect(await servedSerial(r.port, DOMAIN1)).toEqual(oldSerial);
  if (firstSerial !== '') expect(oldSerial).toEqual(firstSerial);
  // Each replica listens on the certificate channel.
  const numsub = await redisList(redis.port, 'PUBSUB', 'NUMSUB', 'rt1:certs');
  expect(Number(numsub[1])).toBeGreaterThanOrEqual(3);

  const mark = pebbleLines().length;
  const renewer = replicas[1];
  await renewer.replica.call('renewCertificate', [ROUTE], ISSUE_TIMEOUT_MS);
  const renewed = await waitEvent(renewer.replica, 'certificate-renewed', 5000);
  expect(renewed.data.domain).toEqual(DOMAIN1);
  const newSerial = await servedSerial(renewer.port, DOMAIN1);
  expect(newSerial).not.toEqual(oldSerial);
  expect(leafSerialOf((await certRecord('rt1:')).chainPem!)).toEqual(newSerial);

  const spread = Date.now() + 10_000;
  for (const r of [replicas[0], replicas[2]]) {
    let seen = '';
    await eventually(
      async () => (seen = await servedSerial(r.port, DOMAIN1).catch((err: Error) => err.message)) === newSerial,
      spread - Date.now(),
      `${r.replica.label} to serve the renewed certificate`,
      () => `it serves ${seen}, the renewed one is ${newSerial}`,
    );
  }
  // Once for all replicas.
  expect(ordersSince(mark)).toEqual(1);
  expect(await sumOrders(replicas.map((r) => r.replica))).toEqual(1);
});

replicaTest("the ordering replica killed mid-order: another waits for its lock to expire, then orders itself", async (ctx) => {
  const domain = 'replicas5.test';
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const a = await acmeReplica(ctx, 'r5a', domain, { keyPrefix: 'rt5:' });
  await whenStarted(a.replica);
  const lockKey = `rt5:lock:cert:${ROUTE}`;
  // Polled without a pause: A is killed as soon as it holds the lock, before its order can finish.
  const deadline = Date.now() + 10_000;
  while ((await redisString(redis.port, 'GET', lockKey)) === null) {
    if (Date.now() > deadline) throw new Error(`${lockKey} did not appear within 10 s`);
  }
  await a.replica.kill();
  const pttl = await redisNumber(redis.port, 'PTTL', lockKey);
  if (pttl === -2) throw new Error(`${lockKey} was gone right after A was killed: A finished or released it first`);
  // The lock outlives its crashed holder, but not for ever.
  expect(pttl).toBeGreaterThan(0);
  expect(pttl).toBeLessThanOrEqual(LOCK_TTL_MS);
  const lockGoneBy = Date.now() + pttl;

  const mark = pebbleLines().length;
  const b = await acmeReplica(ctx, 'r5b', domain, { keyPrefix: 'rt5:' });
  await whenStarted(b.replica);
  gate.open([b.acmePort]);
  const issued = await waitEvent(b.replica, 'certificate-issued', LOCK_TTL_MS + ISSUE_TIMEOUT_MS);
  console.log(`A killed holding the lock (PTTL ${pttl} ms); B's certificate ${issued.at - lockGoneBy} ms after the lock expired`);
  // B did not order while A's lock lived (a little slack for the two clocks' reading).
  expect(issued.at).toBeGreaterThanOrEqual(lockGoneBy - 500);
  await waitValid(b.replica, 5000);
  const serial = await servedSerial(b.port, domain);
  expect(leafSerialOf((await certRecord('rt5:')).chainPem!)).toEqual(serial);
  const state = await sharedState(b.replica);
  expect(state.lockWaits).toBeGreaterThanOrEqual(1);
  expect(state.ordersPlaced).toEqual(1);
  expect(ordersSince(mark)).toEqual(1);
});

replicaTest('encryptionKey: no private key in the clear anywhere in Redis; a replica with another key reports an error and orders nothing', async (ctx) => {
  const domain = 'replicas6.test';
  const key = randomBytes(32).toString('base64');
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const mark = pebbleLines().length;
  const sealed = await Promise.all(['r6a', 'r6b'].map((label) => acmeReplica(ctx, label, domain, { keyPrefix: 'rt6:', encryptionKey: key })));
  await whenStarted(...sealed.map((r) => r.replica));
  gate.open(sealed.map((r) => r.acmePort));
  const deadline = Date.now() + ISSUE_TIMEOUT_MS;
  for (const r of sealed) await waitValid(r.replica, deadline - Date.now());
  const serial = await servedSerial(sealed[0].port, domain);
  expect(await servedSerial(sealed[1].port, domain)).toEqual(serial);
  expect(await sumOrders(sealed.map((r) => r.replica))).toEqual(1);
  expect(ordersSince(mark)).toEqual(1);

  expect((await redisList(redis.port, 'KEYS', 'rt6:*')).map(String)).toContain(`rt6:cert:${ROUTE}`);
  const clear = await keysInTheClear('rt6:');
  if (clear.length > 0) throw new Error(`${clear.join(', ')} hold a private key in the clear`);
  const record = await certRecord('rt6:');
  expect(typeof record.sealedKey).toEqual('string');
  expect(record.keyPem).toBeUndefined();
  expect(leafSerialOf(record.chainPem!)).toEqual(serial);

  const markOther = pebbleLines().length;
  const other = await acmeReplica(ctx, 'r6-otherkey', domain, { keyPrefix: 'rt6:', encryptionKey: randomBytes(32).toString('base64') });
  await whenStarted(other.replica);
  let status: ICertStatus | null = null;
  await eventually(
    async () => (status = await certStatus(other.replica))?.status === 'error',
    10_000,
    "status 'error' on the replica with another key",
    () => `last status ${JSON.stringify(status)}`,
  );
  expect(status!.error).toInclude('encryptionKey');
  console.log(`with another key: ${status!.error}`);
  // It does not replace the certificate the others share, and serves none.
  await sleep(1500);
  expect((await sharedState(other.replica)).ordersPlaced).toEqual(0);
  expect(ordersSince(markOther)).toEqual(0);
  let handshake: string | Error = '';
  try {
    handshake = await servedSerial(other.port, domain);
  } catch (err) {
    handshake = err as Error;
  }
  expect(handshake).toBeInstanceOf(Error);
  expect(leafSerialOf((await certRecord('rt6:')).chainPem!)).toEqual(serial);
});

replicaTest('a failed order is reported by every waiting replica, not repeated', async (ctx) => {
  // Pebble's DNS gives no address for fail.*: the CA's validation fails, with no connection to
  // any replica (so no gate).
  const domain = 'fail.replicas8.test';
  const prefix = 'rt8:';
  const mark = pebbleLines().length;
  const replicas = await Promise.all(['r8a', 'r8b', 'r8c'].map((label) => acmeReplica(ctx, label, domain, { keyPrefix: prefix })));
  await whenStarted(...replicas.map((r) => r.replica));
  // One replica orders; the others wait on its lock, then read its failure (no retry: that comes
  // after a minute's backoff).
  const deadline = Date.now() + LOCK_TTL_MS + ISSUE_TIMEOUT_MS;
  const failures = new Map<IReplica, ICertEvent>();
  for (const r of replicas) {
    let status: ICertStatus | null = null;
    let state: ISharedStateStats | null = null;
    await eventually(
      async () => {
        status = await certStatus(r.replica);
        state = await sharedState(r.replica);
        return r.replica.events.some((e) => e.event === 'certificate-failed');
      },
      deadline - Date.now(),
      `'certificate-failed' from ${r.replica.label}`,
      () => `its status ${JSON.stringify(status)}, sharedState ${JSON.stringify(state)}, events ${JSON.stringify(r.replica.events)}`,
    );
    failures.set(r.replica, r.replica.events.find((e) => e.event === 'certificate-failed')!);
  }

  // Once for all replicas.
  expect(ordersSince(mark)).toEqual(1);
  const states = await Promise.all(replicas.map((r) => sharedState(r.replica)));
  console.log(`one failed order for three replicas: sharedState ${JSON.stringify(states)}`);
  expect(states.reduce((sum, s) => sum + s.ordersPlaced, 0)).toEqual(1);
  const orderer = replicas[states.findIndex((s) => s.ordersPlaced === 1)].replica;
  const waiters = replicas.map((r) => r.replica).filter((r) => r !== orderer);

  // The failure stays in Redis for the other replicas, for the first retry's backoff at most.
  const markerKey = `${prefix}cert-failed:${ROUTE}`;
  const pttl = await redisNumber(redis.port, 'PTTL', markerKey);
  expect(pttl).toBeGreaterThan(0);
  expect(pttl).toBeLessThanOrEqual(60_000);
  const marker = await redisString(redis.port, 'GET', markerKey);
  expect(marker).toEqual(failures.get(orderer)!.data.error);
  console.log(`${markerKey} (PTTL ${pttl} ms): ${marker}`);

  for (const r of replicas) {
    const failed = r.replica.events.filter((e) => e.event === 'certificate-failed');
    expect(failed.length).toEqual(1);
    expect(failed[0].data.domain).toEqual(domain);
    const status = await certStatus(r.replica);
    expect(status?.status).toEqual('error');
    expect(typeof status?.error).toEqual('string');
  }
  for (const r of waiters) {
    const error = failures.get(r)!.data.error as string;
    expect(error).toInclude("another replica's order failed just now");
    expect(error).toInclude(marker!);
    expect((await certStatus(r))!.error).toEqual(error);
  }
  expect(failures.get(orderer)!.data.error).not.toInclude("another replica's order failed just now");
  expect(ordersSince(mark)).toEqual(1);

  // A replica started while the failure stands reports it too, without an order of its own.
  const late = await acmeReplica(ctx, 'r8d', domain, { keyPrefix: prefix });
  await whenStarted(late.replica);
  await eventually(
    async () => late.replica.events.some((e) => e.event === 'certificate-failed'),
    ISSUE_TIMEOUT_MS,
    "'certificate-failed' from r8d",
    () => `events ${JSON.stringify(late.replica.events)}`,
  );
  const lateError = late.replica.events.find((e) => e.event === 'certificate-failed')!.data.error as string;
  expect(lateError).toInclude("another replica's order failed just now");
  expect((await sharedState(late.replica)).ordersPlaced).toEqual(0);
  expect(ordersSince(mark)).toEqual(1);
});

replicaTest('Redis emptied: a replica restarting writes its cached certificate back, no new order', async (ctx) => {
  const domain = 'replicas9.test';
  const prefix = 'rt9:';
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const first = await acmeReplica(ctx, 'r9a', domain, { keyPrefix: prefix });
  await whenStarted(first.replica);
  gate.open([first.acmePort]);
  await waitValid(first.replica);
  const serial = await servedSerial(first.port, domain);
  expect((await sharedState(first.replica)).ordersPlaced).toEqual(1);
  await first.replica.kill();

  // Everything in Redis is gone (a restart without persistence): the certificate, the account.
  expect(await redisString(redis.port, 'FLUSHALL')).toEqual('OK');
  expect(await redisList(redis.port, 'KEYS', `${prefix}*`)).toEqual([]);
  const mark = pebbleLines().length;

  // The replica again, with its disk cache: it serves what it had, and Redis has it again.
  const restarted = await acmeReplica(ctx, 'r9a-restarted', domain, { keyPrefix: prefix }, first.store);
  await whenStarted(restarted.replica);
  await waitValid(restarted.replica, 10_000);
  expect(await servedSerial(restarted.port, domain)).toEqual(serial);
  const certKey = `${prefix}cert:${ROUTE}`;
  await eventually(async () => (await redisNumber(redis.port, 'EXISTS', certKey)) === 1, 5000, `${certKey} back in Redis`);
  expect(leafSerialOf((await certRecord(prefix)).chainPem!)).toEqual(serial);
  expect((await sharedState(restarted.replica)).ordersPlaced).toEqual(0);

  // A new replica (an empty disk cache of its own) loads it from Redis.
  const fresh = await acmeReplica(ctx, 'r9b', domain, { keyPrefix: prefix });
  await whenStarted(fresh.replica);
  await waitValid(fresh.replica, 10_000);
  expect(await servedSerial(fresh.port, domain)).toEqual(serial);
  const state = await sharedState(fresh.replica);
  expect(state.ordersPlaced).toEqual(0);
  expect(state.certificatesLoaded).toBeGreaterThanOrEqual(1);
  expect((await sharedState(restarted.replica)).ordersPlaced).toEqual(0);
  expect(ordersSince(mark)).toEqual(0);
  for (const r of [restarted, fresh]) expect(r.replica.events.filter((e) => e.event === 'certificate-failed')).toEqual([]);
});

replicaTest('a key stored unsealed is used and sealed once encryptionKey is set', async (ctx) => {
  const domain = 'replicas10.test';
  const prefix = 'rt10:';
  const gate = await startGate(pebble.httpPort);
  ctx.defer(() => gate.close());
  const mark = pebbleLines().length;
  // Issued by replicas without encryptionKey: the key is in the clear.
  const plain = await Promise.all(['r10a', 'r10b'].map((label) => acmeReplica(ctx, label, domain, { keyPrefix: prefix })));
  await whenStarted(...plain.map((r) => r.replica));
  gate.open(plain.map((r) => r.acmePort));
  const deadline = Date.now() + ISSUE_TIMEOUT_MS;
  for (const r of plain) await waitValid(r.replica, deadline - Date.now());
  const serial = await servedSerial(plain[0].port, domain);
  expect(await servedSerial(plain[1].port, domain)).toEqual(serial);
  expect(await sumOrders(plain.map((r) => r.replica))).toEqual(1);
  expect(ordersSince(mark)).toEqual(1);
  const certKey = `${prefix}cert:${ROUTE}`;
  expect(await redisString(redis.port, 'GET', certKey)).toInclude('PRIVATE KEY');
  expect(await keysInTheClear(prefix)).toEqual([certKey]);

  // A replica with encryptionKey (and an empty disk cache): it uses that key, orders nothing.
  const markSealed = pebbleLines().length;
  const sealed = await acmeReplica(ctx, 'r10-sealed', domain, { keyPrefix: prefix, encryptionKey: randomBytes(32).toString('base64') });
  await whenStarted(sealed.replica);
  await waitValid(sealed.replica, 10_000);
  expect(await servedSerial(sealed.port, domain)).toEqual(serial);
  expect((await certStatus(sealed.replica))?.status).toEqual('valid');
  expect((await sharedState(sealed.replica)).ordersPlaced).toEqual(0);

  // And seals it in Redis.
  let clear: string[] = [];
  await eventually(
    async () => (clear = await keysInTheClear(prefix)).length === 0,
    5000,
    `no private key in the clear under ${prefix}`,
    () => `in the clear: ${clear.join(', ')}`,
  );
  const record = await certRecord(prefix);
  expect(typeof record.sealedKey).toEqual('string');
  expect(record.keyPem).toBeUndefined();
  expect(leafSerialOf(record.chainPem!)).toEqual(serial);
  expect(ordersSince(markSealed)).toEqual(0);
  expect(sealed.replica.events.filter((e) => e.event === 'certificate-failed')).toEqual([]);
  const plainStatuses = await Promise.all(plain.map((r) => certStatus(r.replica)));
  console.log(`sealed by r10-sealed; the replicas without the key now: ${JSON.stringify(plainStatuses)}`);
});

// ---------------------------------------------------------------------------------------------
// Rate limits

/** A GET through the proxy on `port` as client `client` (the rate limit's key); resolves with the status. */
function get(port: number, client: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, path: '/', agent: false, headers: { host: 'limit.test', 'x-client': client } },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
        res.on('error', reject);
      },
    );
    req.setTimeout(10_000, () => req.destroy(new Error(`GET through ${port} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

/** `count` requests as `client`, alternating over `ports`; the statuses per port, and how long it took. */
async function alternate(ports: number[], client: string, count: number): Promise<{ byPort: Map<number, number[]>; all: number[]; ms: number }> {
  const started = Date.now();
  const byPort = new Map<number, number[]>(ports.map((p) => [p, []]));
  const all: number[] = [];
  for (let i = 0; i < count; i++) {
    const port = ports[i % ports.length];
    const status = await get(port, client);
    byPort.get(port)!.push(status);
    all.push(status);
  }
  return { byPort, all, ms: Date.now() - started };
}

const passed = (statuses: number[]): number => statuses.filter((s) => s === 200).length;

/** 10 per 60 s is one request back every 6 s: a batch that ran longer may pass that many more. */
function expectBudget(statuses: number[], ms: number, budget = 10): void {
  expect(statuses.every((s) => s === 200 || s === 429)).toBeTrue();
  expect(passed(statuses)).toBeGreaterThanOrEqual(budget);
  expect(passed(statuses)).toBeLessThanOrEqual(budget + Math.floor(ms / 6000));
}

replicaTest('rate limit shared by two replicas: 10 of 20 in all; with Redis down each limits alone; once it is back, shared again', async (ctx) => {
  const [redisPort, p1, p2] = await freePorts(3);
  let limitRedis = await startRedis(redisPort);
  ctx.defer(() => limitRedis.kill());
  const options = (port: number): object => ({
    gracefulShutdownTimeout: 200,
    connectionRateLimitPerMinute: 0,
    maxConnectionsPerIP: 0,
    redis: { url: `redis://127.0.0.1:${redisPort}`, keyPrefix: 'rt7:' },
    routes: [
      {
        name: 'limited',
        match: { ports: port, domains: 'limit.test' },
        action: { type: 'forward', targets: [{ host: '127.0.0.1', port: backendPort }] },
        // Keyed by a header: each phase below uses a budget of its own.
        security: { rateLimit: { enabled: true, maxRequests: 10, window: 60, keyBy: 'header', headerName: 'X-Client' } },
      },
    ],
  });
  const r1 = spawnReplica(ctx, 'r7a', options(p1));
  const r2 = spawnReplica(ctx, 'r7b', options(p2));
  await whenStarted(r1, r2);

  const shared = await alternate([p1, p2], 'shared', 20);
  console.log(`shared: ${shared.all.join(' ')} (${shared.ms} ms)`);
  // One budget, not one each: each replica let some of the 10 through (they alternate).
  expectBudget(shared.all, shared.ms);
  for (const port of [p1, p2]) expect(passed(shared.byPort.get(port)!)).toBeGreaterThan(0);
  for (const r of [r1, r2]) expect((await sharedState(r)).rateLimitCalls).toBeGreaterThan(0);
  expect((await redisList(redisPort, 'KEYS', 'rt7:ratelimit:*')).length).toBeGreaterThan(0);

  // 30 requests of one key at once, 15 through each replica: checks that arrive together share a
  // script call, and the budget holds as it does one by one.
  const beforeBurst = await Promise.all([r1, r2].map((r) => sharedState(r)));
  const burstStarted = Date.now();
  const burst = await Promise.all(Array.from({ length: 30 }, (_, i) => get(i % 2 === 0 ? p1 : p2, 'burst')));
  const burstMs = Date.now() - burstStarted;
  expectBudget(burst, burstMs);
  const afterBurst = await Promise.all([r1, r2].map((r) => sharedState(r)));
  const checks = afterBurst.map((s, i) => s.rateLimitCalls - beforeBurst[i].rateLimitCalls);
  const scriptCalls = afterBurst.map((s, i) => s.rateLimitScriptCalls - beforeBurst[i].rateLimitScriptCalls);
  console.log(`burst: ${passed(burst)} of 30 passed (${burstMs} ms); checks ${checks.join('+')}, script calls ${scriptCalls.join('+')}`);
  expect(checks).toEqual([15, 15]);
  for (let i = 0; i < 2; i++) {
    expect(scriptCalls[i]).toBeGreaterThan(0);
    expect(scriptCalls[i]).toBeLessThanOrEqual(checks[i]);
  }

  await limitRedis.kill();
  const alone = await alternate([p1, p2], 'outage', 24);
  console.log(`redis down: ${alone.all.join(' ')} (${alone.ms} ms)`);
  for (const port of [p1, p2]) expectBudget(alone.byPort.get(port)!, alone.ms);
  const during = new Map<IReplica, ISharedStateStats>();
  for (const r of [r1, r2]) {
    const state = await sharedState(r);
    expect(state.rateLimitFallbacks).toBeGreaterThan(0);
    expect(state.redisReachable).toBeFalse();
    during.set(r, state);
  }

  limitRedis = await startRedis(redisPort);
  // Each replica finds its connection broken on its first call after the restart: probe (each
  // probe its own budget) until both count shared calls again.
  let probe = 0;
  for (const [r, port] of [[r1, p1], [r2, p2]] as const) {
    let state = during.get(r)!;
    await eventually(
      async () => {
        expect([200, 429]).toContain(await get(port, `probe-${probe++}`));
        state = await sharedState(r);
        return state.redisReachable && state.rateLimitCalls > during.get(r)!.rateLimitCalls;
      },
      10_000,
      `${r.label} to use Redis again`,
      () => `sharedState ${JSON.stringify(state)}`,
    );
  }
  const before = await Promise.all([r1, r2].map((r) => sharedState(r)));
  const again = await alternate([p1, p2], 'after', 20);
  console.log(`redis back (after ${probe} probes): ${again.all.join(' ')} (${again.ms} ms)`);
  expectBudget(again.all, again.ms);
  const after = await Promise.all([r1, r2].map((r) => sharedState(r)));
  for (let i = 0; i < 2; i++) {
    expect(after[i].rateLimitFallbacks).toEqual(before[i].rateLimitFallbacks);
    expect(after[i].rateLimitCalls).toBeGreaterThan(before[i].rateLimitCalls);
  }
});

tap.test('stop', async () => {
  await new Promise<void>((resolve) => {
    backendServer.closeAllConnections();
    backendServer.close(() => resolve());
  });
  await pebble.stop();
  await redis.kill();
  rmSync(workDir, { recursive: true, force: true });
});

tap.start();
