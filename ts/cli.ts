// `smartproxy [config.json]`: runs the proxy from a JSON file of ISmartProxyOptions, or, without
// one, on an embedded demo config: a local port forwarded to a small backend started here.
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from './smart-proxy.js';
import type { ISmartProxyOptions } from './models/options.js';

const DEMO_PROXY_PORT = Number(process.env.SMARTPROXY_DEMO_PORT ?? 8080);

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
  try {
    return JSON.parse(text) as ISmartProxyOptions;
  } catch (err) {
    throw new Error(`${file} is not valid JSON: ${(err as Error).message}`);
  }
}

async function main(): Promise<void> {
  const file = process.argv[2];
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
  if (file === undefined) {
    console.log(`try it:  curl http://127.0.0.1:${DEMO_PROXY_PORT}/hello`);
  }
  console.log('press Ctrl+C to stop');
  const shutdown = async (): Promise<void> => {
    await proxy.stop();
    backend?.close();
  };
  process.once('SIGINT', () => void shutdown());
  process.once('SIGTERM', () => void shutdown());
}

main().catch((err: unknown) => {
  console.error(`smartproxy: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
