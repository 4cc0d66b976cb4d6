// A real ACME server for the tests: Debian's pebble (/usr/bin/pebble) with real HTTP-01 validation.
// Pebble's own HTTPS runs on a certificate for 127.0.0.1 signed by a throwaway CA (`caFile`), and it
// resolves every name through a tiny DNS responder here: A 127.0.0.1 for every name, so validation
// fetches http://<domain>:<httpPort>/.well-known/acme-challenge/<token> from the proxy; names marked
// failing (setFailing, or any name starting with `fail.`) get an empty answer, so validation fails;
// names starting with `slow.` get no answer at all, so their validation stays pending for a while
// (pebble's resolver times out after several seconds) and then fails.
// Pebble's output is kept and printed only on demand (dumpLogs) or live with DEBUG_PEBBLE set.
import * as dgram from 'node:dgram';
import * as https from 'node:https';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { freePorts, sleep } from './net.js';

export interface Pebble {
  /** `https://127.0.0.1:A/dir`. */
  directoryUrl: string;
  /** PEM file of the CA that signed pebble's own HTTPS certificate (for `acme.directoryCaFile`). */
  caFile: string;
  /** The port pebble's VA connects to for HTTP-01 (the proxy's `acme.port`). */
  httpPort: number;
  /** The root that issued certificates chain to (GET /roots/0 on the management port). */
  rootPem(): Promise<string>;
  /** The intermediate that signs issued certificates (GET /intermediates/0). */
  intermediatePem(): Promise<string>;
  /** Names (exact, case-insensitive) that get no A record from now on, so their validation fails. */
  setFailing(names: string[]): void;
  /** Everything pebble printed so far. */
  logs(): string;
  /** Prints pebble's output to stderr (for a failed test). */
  dumpLogs(): void;
  stop(): Promise<void>;
}

/** GET over HTTPS trusting `ca` only; resolves with status and body. */
export function httpsGetText(url: string, ca: string, timeoutMs = 5000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = https.get(url, { ca, agent: false, rejectUnauthorized: true }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
  });
}

/** A CA and a server certificate for 127.0.0.1 / localhost signed by it, made with openssl. */
function makeServerCertificate(dir: string): { caFile: string; certFile: string; keyFile: string } {
  const run = (args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  };
  run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', '/CN=pebble test CA', '-keyout', 'ca.key', '-out', 'ca.pem']);
  writeFileSync(path.join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  run(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=127.0.0.1',
    '-keyout', 'server.key', '-out', 'server.csr']);
  run(['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
    '-extfile', 'server.ext', '-out', 'server.pem']);
  return { caFile: path.join(dir, 'ca.pem'), certFile: path.join(dir, 'server.pem'), keyFile: path.join(dir, 'server.key') };
}

// ---------------------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------------------

const TYPE_A = 1;

/** Reads the question of a DNS query: its name, type, and where the question section ends. */
function parseQuestion(msg: Buffer): { name: string; qtype: number; end: number } | null {
  if (msg.length < 12 || msg.readUInt16BE(4) < 1) return null;
  let offset = 12;
  const labels: string[] = [];
  for (;;) {
    if (offset >= msg.length) return null;
    const len = msg[offset];
    if (len === 0) {
      offset++;
      break;
    }
    if (len & 0xc0) return null; // no compression in a question we are asked
    labels.push(msg.subarray(offset + 1, offset + 1 + len).toString('latin1'));
    offset += 1 + len;
  }
  if (offset + 4 > msg.length) return null;
  return { name: labels.join('.').toLowerCase(), qtype: msg.readUInt16BE(offset), end: offset + 4 };
}

/** The answer to `query`: A 127.0.0.1 when `answerA`, else empty; always NOERROR, AA and RA set. */
function buildAnswer(query: Buffer, question: { qtype: number; end: number }, answerA: boolean): Buffer {
  const header = Buffer.alloc(12);
  query.copy(header, 0, 0, 2); // id
  const opcode = (query[2] >> 3) & 0x0f;
  const rd = query[2] & 0x01;
  header[2] = 0x80 | (opcode << 3) | 0x04 | rd; // QR, opcode, AA, RD
  header[3] = 0x80; // RA, rcode 0
  header.writeUInt16BE(1, 4); // one question
  header.writeUInt16BE(answerA ? 1 : 0, 6);
  const questionBytes = query.subarray(12, question.end);
  if (!answerA) return Buffer.concat([header, questionBytes]);
  const answer = Buffer.from([0xc0, 0x0c, 0x00, TYPE_A, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3c, 0x00, 0x04, 127, 0, 0, 1]);
  return Buffer.concat([header, questionBytes, answer]);
}

async function startDns(isFailing: (name: string) => boolean, isSilent: (name: string) => boolean, log: (line: string) => void): Promise<{ port: number; close(): Promise<void> }> {
  const socket = dgram.createSocket('udp4');
  socket.on('message', (msg, rinfo) => {
    const question = parseQuestion(msg);
    if (question === null) return;
    if (isSilent(question.name)) {
      log(`dns: ${question.name} type ${question.qtype} -> dropped`);
      return;
    }
    const answerA = question.qtype === TYPE_A && !isFailing(question.name);
    log(`dns: ${question.name} type ${question.qtype} -> ${answerA ? '127.0.0.1' : 'no records'}`);
    socket.send(buildAnswer(msg, question, answerA), rinfo.port, rinfo.address);
  });
  socket.on('error', (err) => log(`dns: socket error ${err.message}`));
  await new Promise<void>((resolve, reject) => {
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      socket.off('error', reject);
      resolve();
    });
  });
  return {
    port: socket.address().port,
    close: () => new Promise<void>((resolve) => socket.close(() => resolve())),
  };
}

// ---------------------------------------------------------------------------------------------
// Pebble
// ---------------------------------------------------------------------------------------------

export async function startPebble(options: { httpPort: number; binary?: string }): Promise<Pebble> {
  const binary = options.binary ?? process.env.PEBBLE_BIN ?? 'pebble';
  const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-pebble-'));
  // Removed by cleanup (stop()); at exit too, should a test end first.
  const removeDirAtExit = (): void => rmSync(dir, { recursive: true, force: true });
  process.on('exit', removeDirAtExit);
  const output: string[] = [];
  const debug = Boolean(process.env.DEBUG_PEBBLE);
  const log = (line: string): void => {
    output.push(line);
    if (debug) process.stderr.write(`[pebble] ${line}\n`);
  };

  const { caFile, certFile, keyFile } = makeServerCertificate(dir);
  const ca = readFileSync(caFile, 'utf8');

  const failing = new Set<string>();
  const isFailing = (name: string): boolean => failing.has(name) || name.startsWith('fail.');
  const isSilent = (name: string): boolean => name.startsWith('slow.');
  const dns = await startDns(isFailing, isSilent, log);

  const [listenPort, managementPort, tlsPort] = await freePorts(3);
  const configFile = path.join(dir, 'pebble-config.json');
  writeFileSync(configFile, JSON.stringify({
    pebble: {
      listenAddress: `127.0.0.1:${listenPort}`,
      managementListenAddress: `127.0.0.1:${managementPort}`,
      certificate: certFile,
      privateKey: keyFile,
      httpPort: options.httpPort,
      tlsPort,
      ocspResponderURL: '',
      externalAccountBindingRequired: false,
    },
  }, null, 2));

  const env: NodeJS.ProcessEnv = { ...process.env, PEBBLE_VA_NOSLEEP: '1', PEBBLE_WFE_NONCEREJECT: '0' };
  delete env.PEBBLE_VA_ALWAYS_VALID;
  const child: ChildProcess = spawn(binary, ['-config', configFile, '-dnsserver', `127.0.0.1:${dns.port}`], {
    cwd: dir,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let exited: string | null = null;
  let spawnError: Error | null = null;
  const exitPromise = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exited = `exit ${code ?? signal}`;
      log(`pebble ${exited}`);
      resolve();
    });
    child.once('error', (err: NodeJS.ErrnoException) => {
      spawnError = err.code === 'ENOENT'
        ? new Error(`pebble not found (${binary}): install it with \`apt-get install -y pebble\` or set PEBBLE_BIN`)
        : err;
      exited = `spawn error ${err.message}`;
      resolve();
    });
  });
  const feed = (stream: NodeJS.ReadableStream | null): void => {
    let buf = '';
    stream?.setEncoding('utf8');
    stream?.on('data', (d: string) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        log(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    });
    stream?.on('end', () => {
      if (buf) log(buf);
    });
  };
  feed(child.stdout);
  feed(child.stderr);

  const cleanup = async (): Promise<void> => {
    if (exited === null) {
      child.kill('SIGTERM');
      const killTimer = setTimeout(() => child.kill('SIGKILL'), 2000);
      await exitPromise;
      clearTimeout(killTimer);
    }
    await dns.close();
    process.off('exit', removeDirAtExit);
    rmSync(dir, { recursive: true, force: true });
  };

  const directoryUrl = `https://127.0.0.1:${listenPort}/dir`;
  const deadline = Date.now() + 15000;
  for (;;) {
    if (spawnError !== null || exited !== null) {
      await cleanup();
      if (spawnError !== null) throw spawnError;
      throw new Error(`pebble ended before it served its directory (${exited}):\n${output.join('\n')}`);
    }
    try {
      const res = await httpsGetText(directoryUrl, ca, 1000);
      if (res.status === 200 && res.body.includes('newOrder')) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await cleanup();
      throw new Error(`pebble did not serve ${directoryUrl} within 15 s:\n${output.join('\n')}`);
    }
    await sleep(100);
  }

  const management = async (what: string): Promise<string> => {
    const res = await httpsGetText(`https://127.0.0.1:${managementPort}/${what}`, ca);
    if (res.status !== 200) throw new Error(`pebble /${what}: HTTP ${res.status}`);
    return res.body;
  };

  let stopped = false;
  return {
    directoryUrl,
    caFile,
    httpPort: options.httpPort,
    rootPem: () => management('roots/0'),
    intermediatePem: () => management('intermediates/0'),
    setFailing(names) {
      failing.clear();
      for (const name of names) failing.add(name.toLowerCase().replace(/\.$/, ''));
    },
    logs: () => output.join('\n'),
    dumpLogs() {
      process.stderr.write(`----- pebble output (${output.length} lines) -----\n${output.join('\n')}\n----- end of pebble output -----\n`);
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      await cleanup();
    },
  };
}
