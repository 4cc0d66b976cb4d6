// Runs our proxy for the benchmark: one TCP forward route, one tokio worker thread.
// Usage: node bench/proxy-smartproxy.mjs <listenPort> <backendPort>
import { SmartProxy } from '../dist_ts/index.js';

const [listenPort, backendPort] = process.argv.slice(2).map(Number);
const proxy = new SmartProxy({
  workerThreads: 1,
  routes: [{ name: 'bench-tcp', match: { ports: listenPort }, action: { type: 'forward', target: { host: '127.0.0.1', port: backendPort } } }],
});
await proxy.start();
console.log('ready');
process.on('SIGTERM', async () => {
  await proxy.stop();
  process.exit(0);
});
