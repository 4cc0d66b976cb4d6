// node-http-proxy (the npm `http-proxy` package) for the benchmark: one Node process, so one
// JavaScript thread, with a keep-alive agent to the backend (upstream connection reuse).
// Usage: node bench/proxy-node-http-proxy.mjs <listenPort> <backendPort> [http|https] [certFile keyFile]
//   http:  plain HTTP/1.1 server in front of the backend;
//   https: the same behind TLS terminated by node:https (PEM from certFile/keyFile or the environment
//          variables BENCH_TLS_CERT/BENCH_TLS_KEY). HTTP/1.1 only: node:https speaks no HTTP/2.
// Raw TCP is not something http-proxy does: the bench reports n/a there.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import httpProxy from 'http-proxy';

const [listenPort, backendPort] = process.argv.slice(2, 4).map(Number);
const mode = process.argv[4] ?? 'http';
const [certFile = process.env.BENCH_TLS_CERT, keyFile = process.env.BENCH_TLS_KEY] = process.argv.slice(5, 7);
if (mode !== 'http' && mode !== 'https') throw new Error(`mode ${mode}: only http and https`);

const agent = new http.Agent({ keepAlive: true, maxSockets: 64, maxFreeSockets: 64 });
// xfwd: X-Forwarded-For/-Port/-Proto like the other proxies' forwarding headers.
const proxy = httpProxy.createProxyServer({ target: `http://127.0.0.1:${backendPort}`, agent, xfwd: true });
proxy.on('error', (err, req, res) => {
  if (res && !res.headersSent && typeof res.writeHead === 'function') {
    res.writeHead(502, { 'content-type': 'text/plain' });
  }
  res?.end?.(`bad gateway: ${err.message}`);
});
const handler = (req, res) => proxy.web(req, res);
const server = mode === 'https'
  ? https.createServer({ key: readFileSync(keyFile), cert: readFileSync(certFile) }, handler)
  : http.createServer(handler);
// Idle keep-alive clients are kept as long as by the other proxies (HAProxy `timeout client 60s`,
// nginx keepalive_timeout 75s); Node's default of 5 s would close them under the memory scenario.
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;
server.requestTimeout = 0;
server.maxRequestsPerSocket = 0;
server.listen(listenPort, '127.0.0.1', () => console.log('ready'));
process.on('SIGTERM', () => {
  server.close();
  server.closeAllConnections?.();
  agent.destroy();
  process.exit(0);
});
