// 64-byte echo round trips for the raw TCP latency scenario.
//   node bench/echo.mjs server <port>
//       an echo backend on 127.0.0.1 (TCP_NODELAY), printing `ready` once it listens;
//   node bench/echo.mjs client <port> <roundTrips> [maxSeconds]
//       one connection, then <roundTrips> sequential round trips of 64 bytes (write 64, wait for the
//       64 to come back), after 1,000 unmeasured warm-up trips; stops early after maxSeconds.
//       Prints JSON: { count, p50us, p99us, meanus }.
import net from 'node:net';

const [mode, portArg, countArg, secondsArg] = process.argv.slice(2);
const port = Number(portArg);

if (mode === 'server') {
  const server = net.createServer((socket) => {
    socket.setNoDelay(true);
    socket.on('error', () => undefined);
    socket.pipe(socket);
  });
  server.listen(port, '127.0.0.1', () => console.log('ready'));
  process.on('SIGTERM', () => process.exit(0));
} else if (mode === 'client') {
  const count = Number(countArg ?? 20000);
  const deadline = Date.now() + Number(secondsArg ?? 30) * 1000;
  const payload = Buffer.alloc(64, 0x61);
  const socket = net.connect(port, '127.0.0.1');
  socket.setNoDelay(true);
  await new Promise((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
  let pending = 0;
  let wake = null;
  socket.on('data', (chunk) => {
    pending -= chunk.length;
    if (pending <= 0 && wake) { const w = wake; wake = null; w(); }
  });
  socket.on('error', (err) => { console.error(err.message); process.exit(1); });
  socket.on('close', () => { if (wake) { console.error('connection closed mid-run'); process.exit(1); } });
  const roundTrip = () => new Promise((resolve) => { pending += 64; wake = resolve; socket.write(payload); });
  for (let i = 0; i < 1000; i++) await roundTrip();
  const samples = new Float64Array(count);
  let n = 0;
  while (n < count && Date.now() < deadline) {
    const t0 = process.hrtime.bigint();
    await roundTrip();
    samples[n++] = Number(process.hrtime.bigint() - t0) / 1000;
  }
  socket.destroy();
  const sorted = samples.subarray(0, n).sort();
  const pick = (q) => sorted[Math.min(n - 1, Math.floor(q * n))];
  const mean = sorted.reduce((a, b) => a + b, 0) / n;
  console.log(JSON.stringify({ count: n, p50us: pick(0.5), p99us: pick(0.99), meanus: mean }));
} else {
  console.error('usage: echo.mjs server <port> | client <port> <roundTrips> [maxSeconds]');
  process.exit(2);
}
