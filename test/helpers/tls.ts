// Test certificates made with openssl at run time: one CA and leaf certificates signed by it, so a
// TLS client can verify a backend end to end through SNI passthrough.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import * as tls from 'node:tls';
import type { AddressInfo } from 'node:net';

export interface ITestCa {
  cert: string;
  issue(hostnames: string[]): { key: string; cert: string };
}

/**
 * Runs `fn` in a fresh temporary directory holding `files`, for openssl to work in; the directory
 * is removed before this returns (or throws): what the caller needs is read back into memory.
 */
function inTempDir<T>(files: Record<string, string>, fn: (dir: string, run: (args: string[]) => void) => T): T {
  const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-ca-'));
  try {
    for (const [name, content] of Object.entries(files)) writeFileSync(path.join(dir, name), content, { mode: 0o600 });
    return fn(dir, (args) => {
      execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export function createTestCa(): ITestCa {
  const ca = inTempDir({}, (dir, run) => {
    run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
      '-subj', '/CN=smartproxy test CA', '-keyout', 'ca.key', '-out', 'ca.pem']);
    return { key: readFileSync(path.join(dir, 'ca.key'), 'utf8'), cert: readFileSync(path.join(dir, 'ca.pem'), 'utf8') };
  });
  return {
    cert: ca.cert,
    issue(hostnames) {
      return inTempDir({ 'ca.key': ca.key, 'ca.pem': ca.cert, 'leaf.ext': `subjectAltName=${hostnames.map((h) => `DNS:${h}`).join(',')}\n` }, (dir, run) => {
        run(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${hostnames[0]}`,
          '-keyout', 'leaf.key', '-out', 'leaf.csr']);
        // A fresh serial file each time: openssl starts it at a random number.
        run(['x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
          '-extfile', 'leaf.ext', '-out', 'leaf.pem']);
        return {
          key: readFileSync(path.join(dir, 'leaf.key'), 'utf8'),
          cert: readFileSync(path.join(dir, 'leaf.pem'), 'utf8'),
        };
      });
    },
  };
}

/** A TLS server that answers each connection with `<tag>:<servername>\n` and then echoes. */
export async function startTlsBackend(tag: string, creds: { key: string; cert: string }): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<tls.TLSSocket>();
  const server = tls.createServer({ key: creds.key, cert: creds.cert }, (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write(`${tag}:${(socket as tls.TLSSocket & { servername?: string }).servername ?? ''}\n`);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Connects with TLS verifying against `ca` for `servername`; resolves with the first line. */
export function tlsFirstLine(port: number, servername: string | undefined, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const options: tls.ConnectionOptions = { port, host: '127.0.0.1', servername, ca, rejectUnauthorized: true };
    // Without SNI, Node would check the certificate against "127.0.0.1": the chain is still verified.
    if (servername === undefined) options.checkServerIdentity = () => undefined;
    const socket = tls.connect(options);
    let data = '';
    socket.on('data', (d: Buffer) => {
      data += d.toString();
      const nl = data.indexOf('\n');
      if (nl >= 0) {
        socket.end();
        resolve(data.slice(0, nl));
      }
    });
    socket.on('error', reject);
    socket.on('close', () => reject(new Error(`closed before a line arrived (got ${JSON.stringify(data)})`)));
  });
}
