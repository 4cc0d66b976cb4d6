// The `logger` option: the engine's notable events (start, routes updated, a backend marked down
// and healthy again, stop) reach it with structured fields; debug events only with
// enableDetailedLogging; at most 100 entries a second, the excess summed up in one entry; a logger
// that throws loses nothing else; without a logger, standard error gets one line per event.
import { tap, expect } from '@push.rocks/tapbundle';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

import { SmartProxy } from '../ts/index.js';
import type { ILogEntry } from '../ts/index.js';
import { freePorts, startTaggedServer, startTcpServer, thrown, waitFor, type ITestServer } from './helpers/net.js';

const entries: ILogEntry[] = [];
const up = await startTaggedServer('up');
const [port, downPort, floodPort] = await freePorts(3);
const healthFast = { path: '/', interval: 100, timeout: 300, unhealthyThreshold: 2, healthyThreshold: 2 };
const balanced = {
  name: 'balanced',
  match: { ports: port },
  action: {
    type: 'forward' as const,
    targets: [
      { host: '127.0.0.1', port: up.port },
      { host: '127.0.0.1', port: downPort },
    ],
    loadBalancing: { algorithm: 'round-robin' as const, healthCheck: healthFast },
  },
};
const proxy = new SmartProxy({ routes: [balanced], logger: (entry) => entries.push(entry), gracefulShutdownTimeout: 200 });

const find = (message: string, where: (e: ILogEntry) => boolean = () => true) => entries.find((e) => e.message === message && where(e));

tap.test('start: one info entry naming the ports and the number of routes', async () => {
  await proxy.start();
  await waitFor(() => find('proxy started', (e) => String(e.fields?.ports).includes(String(port))) !== undefined, 5000, 'the start entry');
  const started = find('proxy started', (e) => String(e.fields?.ports).includes(String(port)))!;
  expect(started.level).toEqual('info');
  expect(started.fields?.routes).toEqual(1);
});

let revived: ITestServer | undefined;

tap.test('a backend that stops answering probes is marked down (warn), and healthy again (info) when it returns', async () => {
  const isDown = (e: ILogEntry) => e.fields?.port === downPort && e.fields?.host === '127.0.0.1';
  await waitFor(() => find('backend marked down', isDown) !== undefined, 5000, 'the backend-down entry');
  expect(find('backend marked down', isDown)!.level).toEqual('warn');
  revived = await startTcpServer((socket) => socket.end(), downPort);
  await waitFor(() => find('backend is healthy again', isDown) !== undefined, 5000, 'the healthy-again entry');
  expect(find('backend is healthy again', isDown)!.level).toEqual('info');
  // Info-level logging by default: no debug entry from this proxy's connections.
  expect(entries.some((e) => e.level === 'debug')).toBeFalse();
});

tap.test('updateRoutes: one info entry with the new number of routes', async () => {
  await proxy.updateRoutes([balanced, { name: 'second', match: { ports: port, domains: 'second.test' }, action: { type: 'forward', target: { host: '127.0.0.1', port: up.port } } }]);
  await waitFor(() => find('routes updated', (e) => e.fields?.routes === 2) !== undefined, 5000, 'the routes-updated entry');
});

tap.test('enableDetailedLogging: debug entries, at most 100 a second, the excess summed up in one warn entry', async () => {
  const detailed: ILogEntry[] = [];
  const flood = new SmartProxy({
    enableDetailedLogging: true,
    maxConnectionsPerIP: 0,
    connectionRateLimitPerMinute: 0,
    routes: [{ name: 'flood', match: { ports: floodPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: up.port } } }],
    logger: (entry) => detailed.push(entry),
  });
  await flood.start();
  try {
    // 400 connections that each end at once: a debug "connection closed" entry apiece.
    await Promise.all(
      Array.from({ length: 400 }, () => new Promise<void>((resolve) => {
        const socket = net.connect(floodPort, '127.0.0.1', () => socket.destroy());
        socket.on('close', () => resolve());
        socket.on('error', () => resolve());
      })),
    );
    const summary = () => detailed.find((e) => e.level === 'warn' && typeof e.fields?.suppressed === 'number');
    await waitFor(() => summary() !== undefined, 5000, 'the summary of suppressed entries');
    expect(detailed.some((e) => e.level === 'debug' && e.message === 'connection closed')).toBeTrue();
    const closed = detailed.filter((e) => e.message === 'connection closed' && e.fields?.port === floodPort).length;
    expect((summary()!.fields!.suppressed as number) + closed).toBeGreaterThanOrEqual(400);
    // Per second of delivery, never more than 100 entries (the summary included).
    expect(detailed.indexOf(summary()!)).toBeLessThanOrEqual(100);
  } finally {
    await flood.stop();
  }
});

tap.test('a logger that throws loses its entries, not the proxy', async () => {
  const [throwingPort] = await freePorts(1);
  let calls = 0;
  const throwing = new SmartProxy({
    routes: [{ match: { ports: throwingPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: up.port } } }],
    logger: () => {
      calls++;
      throw new Error('logger failure');
    },
  });
  await throwing.start();
  await waitFor(() => calls > 0, 5000, 'a call of the throwing logger');
  const greeting = await new Promise<string>((resolve, reject) => {
    const socket = net.connect(throwingPort, '127.0.0.1');
    socket.once('data', (d) => {
      socket.destroy();
      resolve(d.toString());
    });
    socket.on('error', reject);
  });
  expect(greeting).toEqual('up\n');
  await throwing.stop();
});

tap.test('a logger that is not a function is refused, naming the option', async () => {
  const err = thrown(() => new SmartProxy({ routes: [], logger: 'console' as unknown as () => void }));
  expect(err?.message ?? '').toInclude('logger');
});

tap.test('stop: one info entry', async () => {
  const before = entries.filter((e) => e.message === 'proxy stopped').length;
  await proxy.stop();
  await waitFor(() => entries.filter((e) => e.message === 'proxy stopped').length > before, 5000, 'the stop entry');
});

tap.test('without a logger, standard error gets one line per event', async () => {
  const [cliPort] = await freePorts(1);
  const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-logger-'));
  const configFile = path.join(dir, 'config.json');
  writeFileSync(configFile, JSON.stringify({ routes: [{ match: { ports: cliPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: up.port } } }] }));
  const child = spawn(process.execPath, ['--import', 'tsx', path.join(import.meta.dirname, '..', 'ts', 'cli.ts'), configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    await waitFor(() => stdout.includes('press Ctrl+C'), 60_000, 'the CLI to start');
    await waitFor(() => stderr.includes('smartproxy: proxy started'), 5000, 'the start line on stderr');
  } finally {
    child.kill('SIGTERM');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  }
  const line = stderr.split('\n').find((l) => l.includes('smartproxy: proxy started'))!;
  expect(line).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO smartproxy: proxy started /);
  expect(line).toInclude(String(cliPort));
  expect(stderr).toInclude('INFO smartproxy: proxy stopped');
});

tap.test('teardown', async () => {
  await proxy.stop();
  await up.close();
  await revived?.close();
});

export default tap.start();
