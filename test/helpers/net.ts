// Real sockets for the tests: backends, clients and small waiting helpers. No mocks.
import * as net from 'node:net';
import { readdirSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';

/** Ports that were free a moment ago (bound to 0 and released). */
/** Ports for tests come from below the kernel's ephemeral range (32768 up on Linux): a port the
 * kernel handed out for listen(0) and that was closed again could meanwhile become the local port
 * of some outgoing connection, and the proxy's bind would then fail with EADDRINUSE. */
const TEST_PORTS = { from: 10000, to: 32000 } as const;

function listenOn(port: number): Promise<net.Server | null> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(null));
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

export async function freePorts(count: number): Promise<number[]> {
  const servers: net.Server[] = [];
  const ports: number[] = [];
  for (let attempt = 0; ports.length < count && attempt < 1000; attempt++) {
    const port = TEST_PORTS.from + Math.floor(Math.random() * (TEST_PORTS.to - TEST_PORTS.from));
    if (ports.includes(port)) continue;
    const server = await listenOn(port);
    if (server === null) continue;
    servers.push(server);
    ports.push(port);
  }
  await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  if (ports.length < count) throw new Error(`no ${count} free ports found`);
  return ports;
}

export async function freePort(): Promise<number> {
  return (await freePorts(1))[0];
}

/** A run of `count` consecutive free ports. */
export async function freePortRange(count: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const start = TEST_PORTS.from + Math.floor(Math.random() * (TEST_PORTS.to - TEST_PORTS.from - count));
    const servers: net.Server[] = [];
    let ok = true;
    for (let p = start; p < start + count && ok; p++) {
      const server = net.createServer();
      ok = await new Promise<boolean>((resolve) => {
        server.once('error', () => resolve(false));
        server.listen(p, '127.0.0.1', () => resolve(true));
      });
      if (ok) servers.push(server);
    }
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    if (ok) return start;
  }
  throw new Error('no free port range found');
}

export interface ITestServer {
  port: number;
  connections: number;
  close(): Promise<void>;
}

/** Listens on `server` and tracks its sockets: `close()` destroys the open ones, then closes it. */
export async function listenTracked(server: net.Server, port = 0, host = '127.0.0.1'): Promise<ITestServer> {
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    result.connections++;
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(port, host, resolve));
  const result: ITestServer = {
    port: (server.address() as net.AddressInfo).port,
    connections: 0,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  return result;
}

/** A TCP server; `onSocket` gets every accepted socket. Open sockets are destroyed on close. */
export function startTcpServer(onSocket: (socket: net.Socket) => void, port = 0, host = '127.0.0.1'): Promise<ITestServer> {
  return listenTracked(net.createServer(onSocket), port, host);
}

/** Runs `fn` and returns what it threw (or undefined). */
export function thrown(fn: () => unknown): Error | undefined {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  return undefined;
}

/** Echoes every byte and half-closes when the client does. */
export function startEchoServer(port = 0): Promise<ITestServer> {
  return startTcpServer((socket) => socket.pipe(socket), port);
}

/** Writes `greeting` to every new connection, then echoes. */
export function startTaggedServer(tag: string, port = 0, host = '127.0.0.1'): Promise<ITestServer> {
  return startTcpServer((socket) => {
    socket.write(`${tag}\n`);
    socket.pipe(socket);
  }, port, host);
}

/** Connects, writes `payload`, half-closes, and resolves with everything received until close. */
export function exchange(port: number, payload: Buffer | string, host = '127.0.0.1', localAddress?: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host, localAddress }, () => socket.end(payload));
    const chunks: Buffer[] = [];
    socket.on('data', (d: Buffer) => chunks.push(d));
    socket.on('error', reject);
    socket.on('close', () => resolve(Buffer.concat(chunks)));
  });
}

/** Connects and reads until `expected` bytes arrived or the socket closed. */
export function connectAndRead(port: number, writeFirst?: string, localAddress?: string): Promise<{ data: string; closed: boolean; socket: net.Socket }> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1', localAddress });
    let data = '';
    let done = false;
    const finish = (closed: boolean): void => {
      if (done) return;
      done = true;
      resolve({ data, closed, socket });
    };
    socket.on('connect', () => {
      if (writeFirst !== undefined) socket.write(writeFirst);
    });
    socket.on('data', (d: Buffer) => {
      data += d.toString();
      if (data.includes('\n')) finish(false);
    });
    socket.on('error', () => finish(true));
    socket.on('close', () => finish(true));
  });
}

/** Resolves once the socket is closed by the other side (or errors), with the time it took. */
export function waitForClose(socket: net.Socket): Promise<number> {
  const started = Date.now();
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve(0);
    socket.on('error', () => undefined);
    socket.once('close', () => resolve(Date.now() - started));
  });
}

export async function waitFor(condition: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Open file descriptors of this process (the proxy runs in it). */
export function openFdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/**
 * A port where TCP connects hang: a listener that never accepts (python, backlog 0) whose accept
 * queue is filled first, so further SYNs are dropped and a connect stays pending.
 */
export async function startBlackhole(): Promise<{ port: number; close(): void }> {
  const child: ChildProcess = spawn('python3', [
    '-c',
    'import socket,sys,time\ns=socket.socket()\ns.bind(("127.0.0.1",0))\ns.listen(0)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(600)',
  ], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim())));
    child.once('error', reject);
  });
  const fillers: net.Socket[] = [];
  for (let i = 0; i < 3; i++) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => undefined);
    fillers.push(s);
  }
  await sleep(100);
  return {
    port,
    close: () => {
      for (const s of fillers) s.destroy();
      child.kill('SIGKILL');
    },
  };
}

/** The error `promise` rejects with, or undefined when it resolves. */
export async function rejection(promise: Promise<unknown>): Promise<Error | undefined> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  return undefined;
}

/** Whether a connection to 127.0.0.1:`port` is refused (nothing listens there). */
export function connectionRefused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.on('connect', () => {
      socket.destroy();
      resolve(false);
    });
    socket.on('error', () => resolve(true));
  });
}

/** Registers a clean-up with `withCleanup`. */
export type TDefer = (fn: () => Promise<unknown> | unknown) => void;

/** Runs clean-ups last registered first, each one even when an earlier one failed. */
export async function runCleanups(cleanups: Array<() => Promise<unknown> | unknown>): Promise<void> {
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch (err) {
      console.error('clean-up failed:', err);
    }
  }
}

/** Runs `body` with a list of clean-ups that always run afterwards (last registered first). */
export async function withCleanup(body: (defer: TDefer) => Promise<void>): Promise<void> {
  const cleanups: Array<() => Promise<unknown> | unknown> = [];
  try {
    await body((fn) => cleanups.push(fn));
  } finally {
    await runCleanups(cleanups);
  }
}
