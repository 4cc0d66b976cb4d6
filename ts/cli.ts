// `smartproxy [config.json]`: runs the proxy from a JSON file of ISmartProxyOptions, or, without
// one, on an embedded demo config: a local port forwarded to a small backend started here.
// `smartproxy --check config.json` validates the file and exits 0 (valid) or 1 (the error).
// Signals: SIGHUP re-reads the file and applies its routes as `updateRoutes` does (connections
// open meanwhile keep going; a file that does not read or validate is refused and the running
// config stays); SIGUSR1 reopens the access log's file (logrotate); SIGTERM and SIGINT stop
// gracefully (open connections get `gracefulShutdownTimeout` to finish).
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { isDeepStrictEqual } from 'node:util';

import { SmartProxy } from './smart-proxy.js';
import type { ISmartProxyOptions } from './models/options.js';

const DEMO_PROXY_PORT = Number(process.env.SMARTPROXY_DEMO_PORT ?? 8080);
const USAGE = 'usage: smartproxy [config.json] | smartproxy --check <config.json>';

async function startDemoBackend(): Promise<{ server: http.Server; port: number }> {
  const server = http.createServer((req, res) => {
    res.setHeader('content-type', 'text/plain');
    res.end(`hello from the smartproxy demo backend: ${req.method} ${req.url}\n`);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

function readConfig(file: string): ISmartProxyOptions {
  const text = readFileSync(file, 'utf8');
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file} is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new Error(`${file}: expected an object of options with "routes"`);
  }
  return parsed as ISmartProxyOptions;
}

const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** `--check`: the constructor validates everything a start would, without binding anything. */
function check(file: string | undefined): number {
  if (file === undefined) {
    console.error(USAGE);
    return 2;
  }
  try {
    const proxy = new SmartProxy(readConfig(file));
    console.log(`${file}: valid (${(proxy.settings.routes ?? []).length} routes)`);
    return 0;
  } catch (err) {
    console.error(`${file}: ${message(err)}`);
    return 1;
  }
}

/** Options other than `routes` take effect at a restart only: said once per reload that changes them. */
function otherOptionsChanged(running: ISmartProxyOptions, next: ISmartProxyOptions): boolean {
  const { routes: _runningRoutes, ...runningRest } = running;
  const { routes: _nextRoutes, ...nextRest } = next;
  return !isDeepStrictEqual(runningRest, nextRest);
}

async function run(file: string | undefined): Promise<void> {
  let backend: http.Server | undefined;
  let options: ISmartProxyOptions;
  if (file !== undefined) {
    options = readConfig(file);
  } else {
    const demo = await startDemoBackend();
    backend = demo.server;
    options = {
      routes: [
        {
          name: 'demo',
          match: { ports: DEMO_PROXY_PORT },
          action: { type: 'forward', target: { host: '127.0.0.1', port: demo.port } },
        },
      ],
    };
    console.log(`demo backend listening on 127.0.0.1:${demo.port}`);
  }
  const proxy = new SmartProxy(options);
  await proxy.start();
  console.log(`smartproxy listening on ports ${proxy.getListeningPorts().join(', ')}`);
  const { udpPorts, quicPorts } = proxy.getStatistics();
  if (udpPorts.length > 0) console.log(`UDP datagrams on ports ${udpPorts.join(', ')}`);
  if (quicPorts.length > 0) console.log(`HTTP/3 (QUIC) on UDP ports ${quicPorts.join(', ')}`);
  if (file === undefined) {
    console.log(`try it:  curl http://127.0.0.1:${DEMO_PROXY_PORT}/hello`);
  }
  console.log('press Ctrl+C to stop');

  // Reloads run one after another, in the order the signals came.
  let reloads = Promise.resolve();
  let stopping = false;
  const reload = (): void => {
    if (file === undefined) {
      console.log('SIGHUP: no config file to re-read (demo config)');
      return;
    }
    reloads = reloads.then(async () => {
      if (stopping) return;
      try {
        const next = readConfig(file);
        const routes = next.routes ?? [];
        await proxy.updateRoutes(routes);
        if (otherOptionsChanged(options, next)) {
          console.warn('smartproxy: options other than routes changed in the file; they take effect at the next start');
        }
        options = { ...options, routes };
        console.log(`reloaded ${file}: ${routes.length} routes, listening on ports ${proxy.getListeningPorts().join(', ')}`);
      } catch (err) {
        console.error(`smartproxy: reload of ${file} refused, the running config stays: ${message(err)}`);
      }
    });
  };
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    console.log(`${signal}: stopping`);
    void reloads
      .then(() => proxy.stop())
      .then(() => {
        backend?.close();
        console.log('stopped');
        process.removeListener('SIGHUP', reload);
        process.removeListener('SIGUSR1', reopenLogs);
      });
  };
  const reopenLogs = (): void => proxy.reopenLogs();
  process.on('SIGHUP', reload);
  process.on('SIGUSR1', reopenLogs);
  process.once('SIGINT', () => shutdown('SIGINT'));
  process.once('SIGTERM', () => shutdown('SIGTERM'));
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args[0] === '--help' || args[0] === '-h') {
    console.log(USAGE);
    return;
  }
  if (args[0] === '--check') {
    process.exitCode = check(args[1]);
    return;
  }
  if (args.length > 1 || args[0]?.startsWith('-')) {
    console.error(USAGE);
    process.exitCode = 2;
    return;
  }
  await run(args[0]);
}

main().catch((err: unknown) => {
  console.error(`smartproxy: ${message(err)}`);
  process.exit(1);
});
