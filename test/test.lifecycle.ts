// Runtime control: start/stop, updateRoutes with live connections, listening ports, bind errors,
// config errors, and that the process exits once the proxy is stopped.
import { tap, expect } from '@push.rocks/tapbundle';
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import path from 'node:path';

import { SmartProxy, SmartProxyConfigError } from '../ts/index.js';
import { connectAndRead, freePort, freePorts, startEchoServer, startTaggedServer, waitFor, waitForClose } from './helpers/net.js';

function forward(port: number | number[], backendPort: number, name?: string) {
  return { name, match: { ports: port }, action: { type: 'forward' as const, target: { host: '127.0.0.1', port: backendPort } } };
}

function exchangeLine(socket: net.Socket, line: string): Promise<string> {
  return new Promise((resolve) => {
    socket.once('data', (d: Buffer) => resolve(d.toString()));
    socket.write(line);
  });
}

tap.test('updateRoutes keeps a live connection and sends new connections to the new route', async () => {
  const oldBackend = await startEchoServer();
  const newBackend = await startTaggedServer('new');
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(port, oldBackend.port, 'old')] });
  await proxy.start();
  const live = net.connect(port, '127.0.0.1');
  await new Promise<void>((resolve) => live.on('connect', () => resolve()));
  expect(await exchangeLine(live, 'before')).toEqual('before');

  await proxy.updateRoutes([forward(port, newBackend.port, 'new')]);
  expect(await exchangeLine(live, 'after')).toEqual('after');
  expect((await connectAndRead(port)).data).toEqual('new\n');
  live.destroy();
  await proxy.stop();
  await oldBackend.close();
  await newBackend.close();
});

tap.test('updateRoutes binds new ports and releases unused ones', async () => {
  const backend = await startTaggedServer('hi');
  const [a, b] = await freePorts(2);
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(a, backend.port)] });
  await proxy.start();
  await proxy.updateRoutes([forward(b, backend.port)]);
  expect(proxy.getListeningPorts()).toEqual([b]);
  expect((await connectAndRead(b)).data).toEqual('hi\n');
  const gone = await connectAndRead(a);
  expect(gone.closed).toBeTrue();
  // The released port is really free again.
  const reuse = net.createServer();
  await new Promise<void>((resolve, reject) => {
    reuse.once('error', reject);
    reuse.listen(a, '127.0.0.1', () => resolve());
  });
  reuse.close();
  await proxy.stop();
  await backend.close();
});

tap.test('concurrent updateRoutes calls apply in call order', async () => {
  const backend = await startTaggedServer('x');
  const [a, b, c] = await freePorts(3);
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(a, backend.port)] });
  await proxy.start();
  await Promise.all([proxy.updateRoutes([forward(b, backend.port)]), proxy.updateRoutes([forward(c, backend.port)])]);
  expect(proxy.getListeningPorts()).toEqual([c]);
  await proxy.stop();
  await backend.close();
});

tap.test('a failing updateRoutes changes nothing', async () => {
  const backend = await startTaggedServer('kept');
  const [a, busyPort] = await freePorts(2);
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(busyPort, resolve));
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(a, backend.port)] });
  await proxy.start();
  let error: NodeJS.ErrnoException | undefined;
  try {
    await proxy.updateRoutes([forward([a, busyPort], backend.port)]);
  } catch (err) {
    error = err as NodeJS.ErrnoException;
  }
  expect(error?.code).toEqual('EADDRINUSE');
  expect(proxy.getListeningPorts()).toEqual([a]);
  expect((await connectAndRead(a)).data).toEqual('kept\n');
  blocker.close();
  await proxy.stop();
  await backend.close();
});

tap.test('addListeningPort and removeListeningPort', async () => {
  const backend = await startTaggedServer('p');
  const [a, extra] = await freePorts(2);
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward(a, backend.port)] });
  await proxy.start();
  await proxy.removeListeningPort(a);
  expect(proxy.getListeningPorts()).toEqual([]);
  expect((await connectAndRead(a)).closed).toBeTrue();
  await proxy.addListeningPort(a);
  expect((await connectAndRead(a)).data).toEqual('p\n');
  await proxy.addListeningPort(extra);
  expect(proxy.getListeningPorts()).toEqual([a, extra].sort((x, y) => x - y));
  // No route on the extra port: accepted, then closed.
  expect((await connectAndRead(extra)).closed).toBeTrue();
  await proxy.stop();
  expect(proxy.getListeningPorts()).toEqual([]);
  await backend.close();
});

tap.test('start rejects with EADDRINUSE naming the port, and binds nothing', async () => {
  const [free, busyPort] = await freePorts(2);
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(busyPort, resolve));
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [forward([free, busyPort], 9)] });
  let error: (NodeJS.ErrnoException & { port?: number }) | undefined;
  try {
    await proxy.start();
  } catch (err) {
    error = err as NodeJS.ErrnoException & { port?: number };
  }
  expect(error?.code).toEqual('EADDRINUSE');
  expect(error?.port).toEqual(busyPort);
  expect(error?.message ?? '').toInclude(String(busyPort));
  expect(proxy.getListeningPorts()).toEqual([]);
  const probe = net.createServer();
  await new Promise<void>((resolve, reject) => {
    probe.once('error', reject);
    probe.listen(free, '127.0.0.1', () => resolve());
  });
  probe.close();
  blocker.close();
});

tap.test('config errors name the route index, its name and the field', async () => {
  const cases: Array<[unknown, RegExp]> = [
    [{ routes: [forward(80, 1), forward(70000, 1, 'api')] }, /^routes\[1\] "api": match\.ports.*70000/],
    [{ routes: [{ name: 'x', match: { ports: 80 }, action: { type: 'forward', target: { host: 'h', port: 1 } }, security: { ipAllowList: ['10.0.0.0/33'] } }] },
      /^routes\[0\] "x": security\.ipAllowList\[0\]: /],
    [{ routes: [{ match: { ports: 80, domains: ['bad domain'] }, action: { type: 'forward', target: { host: 'h', port: 1 } } }] },
      /^routes\[0\]: match\.domains\[0\]: /],
    [{ routes: [{ name: 'sh', match: { ports: 80 }, action: { type: 'socket-handler', socketHandler: 42 } }] },
      /^routes\[0\] "sh": action\.socketHandler: /],
  ];
  for (const [options, pattern] of cases) {
    let error: Error | undefined;
    try {
      new SmartProxy(options as ConstructorParameters<typeof SmartProxy>[0]);
    } catch (err) {
      error = err as Error;
    }
    expect(error instanceof SmartProxyConfigError).toBeTrue();
    expect(error?.message ?? '').toMatch(pattern);
  }
});

tap.test('stop closes open connections after gracefulShutdownTimeout', async () => {
  const echo = await startEchoServer();
  const port = await freePort();
  const proxy = new SmartProxy({ gracefulShutdownTimeout: 200, routes: [forward(port, echo.port)] });
  await proxy.start();
  const socket = net.connect(port, '127.0.0.1');
  await new Promise<void>((resolve) => socket.on('connect', () => resolve()));
  await waitFor(() => proxy.getStatistics().activeConnections === 1);
  const closed = waitForClose(socket);
  await proxy.stop();
  await closed;
  expect(proxy.getStatistics().activeConnections).toEqual(0);
  await echo.close();
});

tap.test('the Node process stays alive while started and exits promptly after stop()', async () => {
  const backend = await startTaggedServer('alive');
  const port = await freePort();
  // Nothing in the child holds the event loop but the proxy: its stdin is unref'd.
  const script = `
    import { SmartProxy } from './ts/index.js';
    const proxy = new SmartProxy({ gracefulShutdownTimeout: 300, routes: [{ match: { ports: ${port} }, action: { type: 'forward', target: { host: '127.0.0.1', port: ${backend.port} } } }] });
    await proxy.start();
    process.stdin.once('data', async () => { await proxy.stop(); console.log('stopped'); });
    process.stdin.unref();
    console.log('started');
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: path.resolve(import.meta.dirname, '..'),
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await waitFor(() => output.includes('started'), 15000, 'the child to start');
  await new Promise((r) => setTimeout(r, 500));
  expect(child.exitCode).toEqual(null);
  expect((await connectAndRead(port)).data).toEqual('alive\n');
  const stopAt = Date.now();
  child.stdin!.write('stop\n');
  const code = await exited;
  expect(code).toEqual(0);
  expect(output).toInclude('stopped');
  console.log(`child exited ${Date.now() - stopAt} ms after it was asked to stop`);
  await backend.close();
});

tap.start({ throwOnError: true });
