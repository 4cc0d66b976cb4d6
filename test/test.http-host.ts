// Plain HTTP on a port whose routes have domains: the HTTP engine routes each request by its Host
// header; bytes that are not HTTP go to the route without domains as a raw relay.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

import { SmartProxy } from '../ts/index.js';
import { exchange, freePort, startTcpServer } from './helpers/net.js';

async function httpBackend(name: string): Promise<{ port: number; close(): Promise<void> }> {
  const server = http.createServer((req, res) => res.end(`${name} ${req.headers.host} ${req.url}`));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as AddressInfo).port, close: () => new Promise((r) => server.close(() => r())) };
}

function get(port: number, host: string, path = '/'): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.request({ port, host: '127.0.0.1', path, headers: { host }, agent: false }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
    req.end();
  });
}

const api = await httpBackend('api');
const web = await httpBackend('web');
// Answers HTTP requests as a tiny HTTP server and anything else as a tagged echo, so one route
// without domains can serve both kinds of traffic.
const raw = await startTcpServer((socket) => {
  socket.once('data', (first: Buffer) => {
    const text = first.toString();
    if (/^[A-Z]+ \S+ HTTP\/1\.1\r\n/.test(text)) {
      const host = /\r\nhost: ([^\r]*)/i.exec(text)?.[1] ?? '-';
      const body = `other ${host}`;
      socket.end(`HTTP/1.1 200 OK\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    } else {
      socket.write('raw\n');
      socket.write(first);
      socket.pipe(socket);
    }
  });
});
const port = await freePort();
const proxy = new SmartProxy({
  routes: [
    { name: 'api', match: { ports: port, domains: 'api.example.com' }, action: { type: 'forward', target: { host: '127.0.0.1', port: api.port } } },
    { name: 'web', match: { ports: port, domains: ['*.example.com', 'example.com'] }, action: { type: 'forward', target: { host: '127.0.0.1', port: web.port } } },
    { name: 'other', match: { ports: port }, action: { type: 'forward', target: { host: '127.0.0.1', port: raw.port } } },
  ],
});

tap.test('start', async () => {
  await proxy.start();
});

tap.test('the Host header picks the route', async () => {
  expect(await get(port, 'api.example.com', '/v1')).toEqual('api api.example.com /v1');
  expect(await get(port, 'www.example.com:8080', '/x')).toEqual('web www.example.com:8080 /x');
  expect(await get(port, 'EXAMPLE.com.')).toEqual('web EXAMPLE.com. /');
});

tap.test('a request for an unknown host goes to the route without domains', async () => {
  expect(await get(port, 'elsewhere.test')).toEqual('other elsewhere.test');
});

tap.test('bytes that are not HTTP go to the route without domains', async () => {
  // A line of tokens could still be an HTTP request line until it ends without an HTTP version.
  const reply = await exchange(port, 'HELLO there\r\n');
  expect(reply.toString()).toEqual('raw\nHELLO there\r\n');
  // A byte no request line starts with decides at once.
  expect((await exchange(port, '\u0001binary')).toString()).toEqual('raw\n\u0001binary');
});

tap.test('stop', async () => {
  await proxy.stop();
  await api.close();
  await web.close();
  await raw.close();
});

tap.start({ throwOnError: true });
