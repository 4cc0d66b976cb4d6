// Idle keep-alive client connections for the memory scenarios.
//   node bench/idle-conns.mjs <port> <count> [concurrency] [--tls]
// Opens <count> connections to 127.0.0.1:<port> (at most [concurrency], default 100, being set up at
// once); on each sends one `GET / HTTP/1.1` (Host: bench.test, keep-alive), reads the whole answer,
// and then leaves the connection idle and open. With --tls each connection first completes a TLS
// handshake (no SNI, no ALPN, as wrk and openssl s_time send to 127.0.0.1; the certificate is not
// checked) and the request goes over it. Prints `ready <open>` when all are set up, then waits:
// a line `close` on stdin prints `open <n>` (how many the peer has not closed meanwhile) and exits.
import net from 'node:net';
import tls from 'node:tls';
import readline from 'node:readline';

const args = process.argv.slice(2);
const useTls = args.includes('--tls');
const [port, count, concurrency = 100] = args.filter((a) => a !== '--tls').map(Number);
const sockets = [];
let closedByPeer = 0;
const request = Buffer.from('GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n');

/** Resolves once one full response (Content-Length or chunked) has arrived on a new connection. */
function openOne() {
  return new Promise((resolve, reject) => {
    const socket = useTls
      ? tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false })
      : net.connect(port, '127.0.0.1');
    let buffered = Buffer.alloc(0);
    let done = false;
    socket.once(useTls ? 'secureConnect' : 'connect', () => socket.write(request));
    socket.on('error', (err) => (done ? undefined : reject(err)));
    socket.on('close', () => { if (done) closedByPeer++; else reject(new Error('closed before the answer')); });
    socket.on('data', (chunk) => {
      if (done) return;
      buffered = Buffer.concat([buffered, chunk]);
      const end = buffered.indexOf('\r\n\r\n');
      if (end < 0) return;
      const head = buffered.subarray(0, end).toString('latin1');
      if (!/^HTTP\/1\.[01] 200/.test(head)) { reject(new Error(`answer: ${head.split('\r\n')[0]}`)); return; }
      const length = /\r\ncontent-length:\s*(\d+)/i.exec(head);
      const body = buffered.length - end - 4;
      const complete = length ? body >= Number(length[1]) : buffered.subarray(end + 4).includes('0\r\n\r\n');
      if (complete) { done = true; sockets.push(socket); resolve(); }
    });
  });
}

let next = 0;
async function worker() {
  while (next < count) {
    next++;
    await openOne();
  }
}
await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
console.log(`ready ${sockets.length - closedByPeer}`);
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (line.trim() !== 'close') return;
  console.log(`open ${sockets.length - closedByPeer}`);
  for (const s of sockets) s.destroy();
  process.exit(0);
});
rl.on('close', () => process.exit(0));
