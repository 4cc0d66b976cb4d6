// Automatic certificates over ACME HTTP-01 against a real ACME server (pebble, test/helpers/pebble.ts):
// the proxy answers pebble's HTTP-01 requests on its challenge port itself, stores what it gets and
// serves it; clients verify against pebble's root only. Also: handshakes before a certificate exists,
// restart from the store, forced renewal under an open connection, failed orders (validation,
// unreachable directory), certProvisionFunction (certificate object, 'http01', throw) and config errors.
import { tap, expect } from '@push.rocks/tapbundle';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { SmartProxy } from '../ts/index.js';
import type { IAcmeOptions, IRouteConfig, ISmartProxyOptions } from '../ts/index.js';
import { freePort, freePorts, rejection, sleep, waitFor } from './helpers/net.js';
import { startPebble, type Pebble } from './helpers/pebble.js';
import { h3Answer, h3ClientAvailable, h3RequestOk } from './helpers/h3.js';

const ISSUE_TIMEOUT_MS = 30000;
const CERT_EVENTS = ['certificate-issued', 'certificate-renewed', 'certificate-failed', 'certificate-expiring'] as const;

// ---------------------------------------------------------------------------------------------
// Fixtures: pebble on the challenge port every proxy here answers on, a backend, certificates
// ---------------------------------------------------------------------------------------------

const workDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-acme-'));
process.on('exit', () => rmSync(workDir, { recursive: true, force: true }));
const challengePort = await freePort();
const pebble: Pebble = await startPebble({ httpPort: challengePort });
const rootPem = await pebble.rootPem();
const rootPemFile = path.join(workDir, 'acme-root.pem');
writeFileSync(rootPemFile, rootPem);

/** A self-signed certificate (usable as its own trust anchor) for `name`, made with openssl. */
function selfSigned(name: string): { key: string; cert: string } {
  const dir = mkdtempSync(path.join(workDir, 'self-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
    '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`, '-keyout', 'key.pem', '-out', 'cert.pem'], { cwd: dir, stdio: 'ignore' });
  return { key: readFileSync(path.join(dir, 'key.pem'), 'utf8'), cert: readFileSync(path.join(dir, 'cert.pem'), 'utf8') };
}

const staticCert = selfSigned('static.test');
const customCert = selfSigned('c.test');
const fingerprintOf = (pem: string): string => new X509Certificate(pem).fingerprint256;
/** A fingerprint256 (`AB:CD:…`) as the HTTP/3 client reports the certificate it was served (hex). */
const hexOf = (fingerprint: string): string => fingerprint.replace(/:/g, '').toLowerCase();

/** Answers every request with JSON naming itself and what it received. */
async function startBackend(name: string): Promise<{ port: number; requests: number; close(): Promise<void> }> {
  const result = { port: 0, requests: 0, close: async () => undefined as void };
  const server = http.createServer((req, res) => {
    result.requests++;
    req.resume();
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ name, url: req.url, host: req.headers.host ?? null }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  result.port = (server.address() as net.AddressInfo).port;
  result.close = async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return result;
}

const backend = await startBackend('site');

// ---------------------------------------------------------------------------------------------
// Routes, options, events
// ---------------------------------------------------------------------------------------------

function acmeOptions(store: string, extra: Partial<IAcmeOptions> = {}): IAcmeOptions {
  return {
    email: 'ops@example.com',
    port: challengePort,
    directoryUrl: pebble.directoryUrl,
    directoryCaFile: pebble.caFile,
    certificateStore: store,
    renewThresholdDays: 30,
    autoRenew: true,
    renewCheckIntervalHours: 24,
    useProduction: false,
    ...extra,
  };
}

/** With `http3`, the route also serves HTTP/3 (QUIC on the port's UDP side) with the same certificate. */
function autoRoute(name: string, domain: string, port: number, { http3 = false } = {}): IRouteConfig {
  return {
    name,
    match: { ports: port, domains: domain },
    action: {
      type: 'forward',
      target: { host: '127.0.0.1', port: backend.port },
      tls: { mode: 'terminate', certificate: 'auto' },
      ...(http3 ? { http3: { enabled: true } } : {}),
    },
  };
}

function staticRoute(port: number): IRouteConfig {
  return {
    name: 'static-site',
    match: { ports: port, domains: 'static.test' },
    action: { type: 'forward', target: { host: '127.0.0.1', port: backend.port }, tls: { mode: 'terminate', certificate: staticCert } },
  };
}

function newProxy(options: Omit<ISmartProxyOptions, 'gracefulShutdownTimeout'>): SmartProxy {
  return new SmartProxy({ gracefulShutdownTimeout: 200, ...options });
}

interface ICertEvent {
  type: string;
  data: any;
}

/** Records every certificate event of `proxy` (attach before start: provisioning begins right after). */
function recordEvents(proxy: SmartProxy): ICertEvent[] {
  const events: ICertEvent[] = [];
  for (const type of CERT_EVENTS) proxy.on(type, (data: unknown) => events.push({ type, data }));
  return events;
}

/**
 * Waits (bounded) for `type` about `routeName`. Waiting for a certificate, a 'certificate-failed'
 * for the route ends the wait at once (the next automatic attempt is minutes away).
 */
async function waitEvent(events: ICertEvent[], type: string, routeName: string, timeoutMs = ISSUE_TIMEOUT_MS): Promise<any> {
  const find = (t: string): ICertEvent | undefined => events.find((e) => e.type === t && e.data?.routeName === routeName);
  const failFast = type === 'certificate-issued' || type === 'certificate-renewed';
  try {
    await waitFor(() => find(type) !== undefined || (failFast && find('certificate-failed') !== undefined), timeoutMs, `'${type}' for ${routeName}`);
  } catch (err) {
    throw new Error(`${(err as Error).message}; events so far: ${JSON.stringify(events)}`);
  }
  const found = find(type);
  if (found === undefined) throw new Error(`'certificate-failed' instead of '${type}' for ${routeName}: ${JSON.stringify(find('certificate-failed')!.data)}`);
  return found.data;
}

/** A test that prints pebble's output when it fails. */
function acmeTest(name: string, body: () => Promise<void>): void {
  tap.test(name, async () => {
    try {
      await body();
    } catch (err) {
      pebble.dumpLogs();
      throw err;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

interface IProbe {
  authorized: boolean;
  fingerprint: string;
  subjectaltname: string;
}

/** A TLS handshake verified against `ca` only; rejects when the handshake fails. */
function tlsProbe(port: number, servername: string, ca: string): Promise<IProbe> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername, ca, rejectUnauthorized: true });
    let settled = false;
    const timer = setTimeout(() => socket.destroy(new Error('client timeout')), 10000);
    const finish = (err: Error | null, result?: IProbe): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(result!);
    };
    socket.on('secureConnect', () => {
      const peer = socket.getPeerCertificate();
      finish(null, { authorized: socket.authorized, fingerprint: peer.fingerprint256, subjectaltname: peer.subjectaltname ?? '' });
      socket.end();
    });
    socket.on('error', (err) => finish(err));
    socket.on('close', () => finish(new Error('closed before the handshake completed')));
  });
}

interface IHttpsResult {
  status: number;
  json: any;
  localPort: number;
  fingerprint: string;
}

/** An HTTPS GET through the proxy for `servername`, verified against `ca` only. */
function httpsGet(port: number, servername: string, ca: string, reqPath = '/', agent: https.Agent | false = false): Promise<IHttpsResult> {
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1',
      port,
      servername,
      ca,
      rejectUnauthorized: true,
      path: reqPath,
      agent,
      headers: { host: `${servername}:${port}` },
    }, (res) => {
      const socket = res.socket as tls.TLSSocket;
      const localPort = socket.localPort ?? 0;
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        let json: any = null;
        try {
          json = JSON.parse(text);
        } catch {
          json = null;
        }
        resolve({ status: res.statusCode ?? 0, json, localPort, fingerprint });
      });
      res.on('error', reject);
    });
    req.setTimeout(10000, () => req.destroy(new Error('client timeout')));
    req.on('error', reject);
    req.end();
  });
}

async function expectStaticServes(port: number, reqPath: string): Promise<void> {
  const res = await httpsGet(port, 'static.test', staticCert.cert, reqPath);
  expect(res.status).toEqual(200);
  expect(res.json.name).toEqual('site');
  expect(res.json.url).toEqual(reqPath);
  expect(res.fingerprint).toEqual(fingerprintOf(staticCert.cert));
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

const mainStore = path.join(workDir, 'store-main');
let firstFingerprint = '';

acmeTest('an auto route gets a certificate from the ACME server; clients trusting only its root are served', async () => {
  const [port] = await freePorts(1);
  const proxy = newProxy({ acme: acmeOptions(mainStore), routes: [autoRoute('auto-site', 'a.test', port)] });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    const issued = await waitEvent(events, 'certificate-issued', 'auto-site');
    expect(issued.domain).toEqual('a.test');
    expect(issued.expiryDate).toBeInstanceOf(Date);
    expect(issued.expiryDate.getTime()).toBeGreaterThan(Date.now());

    const probe = await tlsProbe(port, 'a.test', rootPem);
    expect(probe.authorized).toBeTrue();
    expect(probe.subjectaltname).toInclude('DNS:a.test');
    firstFingerprint = probe.fingerprint;

    const res = await httpsGet(port, 'a.test', rootPem, '/hello?x=1');
    expect(res.status).toEqual(200);
    expect(res.json.name).toEqual('site');
    expect(res.json.url).toEqual('/hello?x=1');
    expect(res.fingerprint).toEqual(firstFingerprint);

    const status = proxy.getCertificateStatus('auto-site');
    expect(status?.domain).toEqual('a.test');
    expect(status?.status).toEqual('valid');
    expect(status?.source).toEqual('acme');
    expect(status?.expiryDate).toBeInstanceOf(Date);
    expect(status!.expiryDate!.getTime()).toBeGreaterThan(Date.now());
    expect(status?.error).toBeUndefined();
    expect(proxy.getEligibleDomainsForCertificates()).toEqual(['a.test']);

    const dir = path.join(mainStore, 'auto-site');
    expect(statSync(path.join(dir, 'key.pem')).mode & 0o777).toEqual(0o600);
    expect(existsSync(path.join(dir, 'cert.pem'))).toBeTrue();
    expect(existsSync(path.join(dir, 'meta.json'))).toBeTrue();
    // The stored leaf is the one served.
    expect(fingerprintOf(readFileSync(path.join(dir, 'cert.pem'), 'utf8'))).toEqual(firstFingerprint);
    // Only one order: no failures, no renewals.
    expect(events.filter((e) => e.type !== 'certificate-issued')).toEqual([]);

    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest('before its certificate exists an auto route fails the handshake cleanly; a static route on the port keeps serving', async () => {
  const [port] = await freePorts(1);
  const store = path.join(workDir, 'store-pending');
  // slow.*: pebble's DNS lookups get no answer, so the order stays pending for several seconds.
  const proxy = newProxy({ acme: acmeOptions(store), routes: [autoRoute('pending-site', 'slow.test', port), staticRoute(port)] });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    expect(proxy.getCertificateStatus('pending-site')?.status).not.toEqual('valid');
    for (let i = 0; i < 3; i++) {
      const err = await rejection(tlsProbe(port, 'slow.test', rootPem));
      expect(err).toBeInstanceOf(Error);
      if (i === 0) console.log('handshake without a certificate:', err?.message);
      await expectStaticServes(port, `/static-${i}`);
    }
    // Without verification either: no certificate is presented at all.
    const insecure = await rejection(new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port, servername: 'slow.test', rejectUnauthorized: false });
      s.on('secureConnect', () => {
        s.destroy();
        resolve(undefined);
      });
      s.on('error', reject);
    }));
    expect(insecure).toBeInstanceOf(Error);
    const status = proxy.getCertificateStatus('pending-site');
    expect(['pending', 'error']).toContain(status?.status);
    expect(events.filter((e) => e.type === 'certificate-issued')).toEqual([]);
    expect(proxy.getListeningPorts()).toContain(port);
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest('a restart with the same store serves the stored certificate at once, without a new order', async () => {
  expect(firstFingerprint).not.toEqual('');
  const [port] = await freePorts(1);
  const proxy = newProxy({ acme: acmeOptions(mainStore), routes: [autoRoute('auto-site', 'a.test', port)] });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    const status = proxy.getCertificateStatus('auto-site');
    expect(status?.status).toEqual('valid');
    expect(status?.source).toEqual('acme');
    expect(status!.expiryDate!.getTime()).toBeGreaterThan(Date.now());
    const probe = await tlsProbe(port, 'a.test', rootPem);
    expect(probe.authorized).toBeTrue();
    expect(probe.fingerprint).toEqual(firstFingerprint);
    await sleep(1500);
    expect(events).toEqual([]);
    expect((await httpsGet(port, 'a.test', rootPem, '/restarted')).status).toEqual(200);
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

/** One HTTP/3 GET to a.test on `port`, verified against the ACME root: the certificate served (hex sha256). */
async function h3Get(port: number, reqPath: string): Promise<string | null> {
  const result = await h3RequestOk({ port, serverName: 'a.test', caFile: rootPemFile, requests: [{ path: reqPath }] });
  const answer = h3Answer(result.responses[0]);
  expect(answer.status).toEqual(200);
  expect(JSON.parse(answer.bodyText).url).toEqual(reqPath);
  return result.peerCertSha256;
}

acmeTest('renewCertificate: a new certificate for new connections, over TCP and QUIC; an open keep-alive connection keeps working', async () => {
  if (!h3ClientAvailable()) throw new Error('the HTTP/3 test client is missing: run .ci/run (it makes .venv-h3 with aioquic)');
  const [port] = await freePorts(1);
  const proxy = newProxy({ acme: acmeOptions(mainStore), routes: [autoRoute('auto-site', 'a.test', port, { http3: true })] });
  const events = recordEvents(proxy);
  await proxy.start();
  const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const before = await httpsGet(port, 'a.test', rootPem, '/before', agent);
    expect(before.status).toEqual(200);
    const oldFingerprint = before.fingerprint;
    expect(oldFingerprint).toEqual(firstFingerprint);
    // The 'auto' certificate serves QUIC handshakes too, verified against the ACME root.
    expect(await h3Get(port, '/h3-before')).toEqual(hexOf(oldFingerprint));

    await proxy.renewCertificate('auto-site');
    await waitFor(() => events.some((e) => e.type === 'certificate-renewed'), 2000, "'certificate-renewed'");
    const renewed = events.find((e) => e.type === 'certificate-renewed')!.data;
    expect(renewed.routeName).toEqual('auto-site');
    expect(renewed.domain).toEqual('a.test');
    expect(renewed.expiryDate).toBeInstanceOf(Date);
    expect(events.filter((e) => e.type === 'certificate-failed')).toEqual([]);

    // The same connection (same local port) still serves.
    const after = await httpsGet(port, 'a.test', rootPem, '/after', agent);
    expect(after.status).toEqual(200);
    expect(after.json.url).toEqual('/after');
    expect(after.localPort).toEqual(before.localPort);
    expect(after.fingerprint).toEqual(oldFingerprint);

    // A new connection gets the new certificate, the one now in the store.
    const fresh = await httpsGet(port, 'a.test', rootPem, '/fresh');
    expect(fresh.status).toEqual(200);
    expect(fresh.localPort).not.toEqual(before.localPort);
    expect(fresh.fingerprint).not.toEqual(oldFingerprint);
    expect(fingerprintOf(readFileSync(path.join(mainStore, 'auto-site', 'cert.pem'), 'utf8'))).toEqual(fresh.fingerprint);
    expect(proxy.getCertificateStatus('auto-site')?.status).toEqual('valid');
    // A new QUIC connection gets the renewed certificate as well.
    expect(await h3Get(port, '/h3-fresh')).toEqual(hexOf(fresh.fingerprint));
  } finally {
    agent.destroy();
  }
  try {
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest('a failed validation: certificate-failed, status error with the reason; the static route keeps serving', async () => {
  const [port] = await freePorts(1);
  const store = path.join(workDir, 'store-fail');
  const proxy = newProxy({ acme: acmeOptions(store), routes: [autoRoute('fail-site', 'fail.test', port), staticRoute(port)] });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    const failed = await waitEvent(events, 'certificate-failed', 'fail-site');
    console.log('failed validation reported as:', failed.error);
    expect(failed.domain).toEqual('fail.test');
    expect(typeof failed.error).toEqual('string');
    expect(failed.error.length).toBeGreaterThan(0);
    const status = proxy.getCertificateStatus('fail-site');
    expect(status?.status).toEqual('error');
    expect(status?.source).toEqual('acme');
    expect(typeof status?.error).toEqual('string');
    expect(status!.error!.length).toBeGreaterThan(0);
    expect(await rejection(tlsProbe(port, 'fail.test', rootPem))).toBeInstanceOf(Error);
    await expectStaticServes(port, '/still-here');
    // provisionCertificate orders again now and rejects with the reason.
    const again = await rejection(proxy.provisionCertificate('fail-site'));
    expect(again).toBeInstanceOf(Error);
    expect(again!.message.length).toBeGreaterThan(0);
    expect(events.filter((e) => e.type === 'certificate-issued')).toEqual([]);
    await expectStaticServes(port, '/still-here-2');
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest('an unreachable ACME directory: certificate-failed, status error', async () => {
  const [port, closedPort, otherChallengePort] = await freePorts(3);
  const store = path.join(workDir, 'store-nodir');
  const proxy = newProxy({
    acme: acmeOptions(store, { directoryUrl: `https://127.0.0.1:${closedPort}/dir`, port: otherChallengePort }),
    routes: [autoRoute('nodir-site', 'nodir.test', port), staticRoute(port)],
  });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    const failed = await waitEvent(events, 'certificate-failed', 'nodir-site', 20000);
    console.log('unreachable directory reported as:', failed.error);
    expect(failed.domain).toEqual('nodir.test');
    expect(typeof failed.error).toEqual('string');
    expect(failed.error.length).toBeGreaterThan(0);
    const status = proxy.getCertificateStatus('nodir-site');
    expect(status?.status).toEqual('error');
    expect(typeof status?.error).toEqual('string');
    expect(await rejection(tlsProbe(port, 'nodir.test', rootPem))).toBeInstanceOf(Error);
    await expectStaticServes(port, '/nodir');
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest("certProvisionFunction: a returned certificate is served (source 'custom'); 'http01' and a throw use ACME", async () => {
  const [port] = await freePorts(1);
  // The store of the first tests: its ACME account exists already (fresh stores: the next test).
  const store = mainStore;
  const asked: string[] = [];
  const proxy = newProxy({
    acme: acmeOptions(store),
    certProvisionFunction: async (domain: string) => {
      asked.push(domain);
      if (domain === 'c.test') {
        return { domainName: 'c.test', privateKey: customCert.key, publicKey: customCert.cert, validUntil: Date.now() + 2 * 86400000, created: Date.now(), id: 'custom-1' };
      }
      if (domain === 'd.test') throw new Error('no certificate here, use ACME');
      return 'http01';
    },
    routes: [autoRoute('custom-site', 'c.test', port), autoRoute('custom-acme-site', 'b.test', port), autoRoute('fallback-site', 'd.test', port)],
  });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    expect([...asked].sort()).toEqual(['b.test', 'c.test', 'd.test']);
    // The returned certificate is installed by the time start() resolves.
    const custom = proxy.getCertificateStatus('custom-site');
    expect(custom?.status).toEqual('valid');
    expect(custom?.source).toEqual('custom');
    expect(custom?.domain).toEqual('c.test');
    const probe = await tlsProbe(port, 'c.test', customCert.cert);
    expect(probe.authorized).toBeTrue();
    expect(probe.fingerprint).toEqual(fingerprintOf(customCert.cert));
    const res = await httpsGet(port, 'c.test', customCert.cert, '/custom');
    expect(res.status).toEqual(200);
    expect(res.json.url).toEqual('/custom');

    const issued = await waitEvent(events, 'certificate-issued', 'custom-acme-site');
    expect(issued.domain).toEqual('b.test');
    const acmeProbe = await tlsProbe(port, 'b.test', rootPem);
    expect(acmeProbe.authorized).toBeTrue();
    expect(acmeProbe.subjectaltname).toInclude('DNS:b.test');
    expect(proxy.getCertificateStatus('custom-acme-site')?.source).toEqual('acme');
    expect((await httpsGet(port, 'b.test', rootPem, '/b')).status).toEqual(200);

    const fallback = await waitEvent(events, 'certificate-issued', 'fallback-site');
    expect(fallback.domain).toEqual('d.test');
    expect((await tlsProbe(port, 'd.test', rootPem)).authorized).toBeTrue();
    expect(proxy.getCertificateStatus('fallback-site')?.source).toEqual('acme');

    // No ACME order replaced the returned certificate, and none failed ('certificate-issued' for the
    // custom route, reporting the installed certificate, is allowed).
    expect(events.filter((e) => e.type === 'certificate-failed' || e.type === 'certificate-renewed')).toEqual([]);
    const customIssued = events.find((e) => e.type === 'certificate-issued' && e.data.routeName === 'custom-site');
    if (customIssued !== undefined) expect(customIssued.data.domain).toEqual('c.test');
    expect((await tlsProbe(port, 'c.test', customCert.cert)).fingerprint).toEqual(fingerprintOf(customCert.cert));
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest('several auto routes ordering at once with a fresh store: each gets its certificate, one account file', async () => {
  const [port] = await freePorts(1);
  const store = path.join(workDir, 'store-many');
  const names = ['m1', 'm2', 'm3', 'm4'];
  const proxy = newProxy({ acme: acmeOptions(store), routes: names.map((n) => autoRoute(`${n}-site`, `${n}.test`, port)) });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    for (const n of names) {
      const issued = await waitEvent(events, 'certificate-issued', `${n}-site`);
      expect(issued.domain).toEqual(`${n}.test`);
    }
    expect(events.filter((e) => e.type === 'certificate-failed')).toEqual([]);
    for (const n of names) {
      const probe = await tlsProbe(port, `${n}.test`, rootPem);
      expect(probe.authorized).toBeTrue();
      expect(probe.subjectaltname).toInclude(`DNS:${n}.test`);
      expect(proxy.getCertificateStatus(`${n}-site`)?.status).toEqual('valid');
    }
    expect(readdirSync(store).filter((f) => f.startsWith('account-') && f.endsWith('.json')).length).toEqual(1);
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

acmeTest("certProvisionFunction throwing with certProvisionFallbackToAcme false: certificate-failed, status 'error', no ACME order", async () => {
  const [port] = await freePorts(1);
  const store = path.join(workDir, 'store-nofallback');
  const proxy = newProxy({
    acme: acmeOptions(store),
    certProvisionFunction: async () => {
      throw new Error('provisioner is down');
    },
    certProvisionFallbackToAcme: false,
    routes: [autoRoute('nofallback-site', 'e.test', port), staticRoute(port)],
  });
  const events = recordEvents(proxy);
  await proxy.start();
  try {
    const failed = await waitEvent(events, 'certificate-failed', 'nofallback-site', 5000);
    expect(failed.domain).toEqual('e.test');
    expect(failed.error).toInclude('provisioner is down');
    // Nothing is pending: no certificate will come unless someone acts.
    const status = proxy.getCertificateStatus('nofallback-site');
    expect(status?.status).toEqual('error');
    expect(status?.domain).toEqual('e.test');
    expect(status?.error).toInclude('provisioner is down');
    // Asking again asks the function again, and rejects with its reason.
    const again = await rejection(proxy.provisionCertificate('nofallback-site'));
    expect(again).toBeInstanceOf(Error);
    expect(again!.message).toInclude('provisioner is down');
    await sleep(1000);
    expect(proxy.getCertificateStatus('nofallback-site')?.status).toEqual('error');
    expect(events.filter((e) => e.type === 'certificate-issued')).toEqual([]);
    expect(await rejection(tlsProbe(port, 'e.test', rootPem))).toBeInstanceOf(Error);
    await expectStaticServes(port, '/nofallback');
    await waitFor(() => proxy.getStatistics().activeConnections === 0, 5000, 'connections to close');
  } finally {
    await proxy.stop();
  }
});

tap.test("config: an 'auto' route without an ACME email is refused by the constructor, naming the route", async () => {
  const [port] = await freePorts(1);
  let error: Error | undefined;
  try {
    new SmartProxy({ gracefulShutdownTimeout: 200, routes: [staticRoute(port), autoRoute('no-email-site', 'a.test', port)] });
  } catch (err) {
    error = err as Error;
  }
  expect(error).toBeInstanceOf(Error);
  expect(error!.message).toInclude('no-email-site');
  expect(error!.message.toLowerCase()).toInclude('email');

  // Eligible domains: those of 'auto' routes, without wildcards or static routes' names.
  const proxy = new SmartProxy({
    gracefulShutdownTimeout: 200,
    acme: acmeOptions(path.join(workDir, 'store-config')),
    routes: [
      { ...autoRoute('multi-site', 'x.test', port), match: { ports: port, domains: ['x.test', '*.wild.test', 'y.test'] } },
      staticRoute(port),
    ],
  });
  expect([...proxy.getEligibleDomainsForCertificates()].sort()).toEqual(['x.test', 'y.test']);
});

tap.test('stop', async () => {
  await backend.close();
  await pebble.stop();
  rmSync(workDir, { recursive: true, force: true });
});

tap.start({ throwOnError: true });
