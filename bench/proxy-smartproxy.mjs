// Runs our proxy for the benchmark with one tokio worker thread.
// Usage: node bench/proxy-smartproxy.mjs <listenPort> <backendPort> [tcp|http]
//   tcp:  a plain forward route (raw TCP relay);
//   http: the same route with `domains: '*'`, so every request goes through the HTTP engine
//         (per-request routing, header rewriting, pooled upstream keep-alive).
import { SmartProxy } from '../dist_ts/index.js';

const [listenPort, backendPort] = process.argv.slice(2, 4).map(Number);
const mode = process.argv[4] ?? 'tcp';
const match = mode === 'http' ? { ports: listenPort, domains: '*' } : { ports: listenPort };
const proxy = new SmartProxy({
  workerThreads: 1,
  routes: [{ name: `bench-${mode}`, match, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } }],
});
await proxy.start();
console.log('ready');
process.on('SIGTERM', async () => {
  await proxy.stop();
  process.exit(0);
});
