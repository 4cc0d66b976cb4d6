// A real HTTP/3 client for the tests: test/helpers/h3-client.py (aioquic) in the project's venv
// `.venv-h3` (made by .ci/run; SMARTPROXY_H3_PYTHON names another Python with aioquic). One call is
// one QUIC connection carrying all the requests given (concurrently unless `sequential`).
// A protocol outcome (handshake refused, timeout, connection closed) resolves with `ok: false`;
// only a broken harness (no Python, unreadable output, the client killed) rejects.
import { spawn, spawnSync } from 'node:child_process';
import { createHash, X509Certificate } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HELPERS_DIR = path.dirname(fileURLToPath(import.meta.url));
const REPO_ROOT = path.resolve(HELPERS_DIR, '..', '..');
export const H3_CLIENT_SCRIPT = path.join(HELPERS_DIR, 'h3-client.py');
export const H3_PYTHON = process.env.SMARTPROXY_H3_PYTHON ?? path.join(REPO_ROOT, '.venv-h3', 'bin', 'python');

/** Header lists keep order and repeats: `[name, value]` pairs. */
export type TH3Headers = Array<[string, string]>;

export interface IH3RequestSpec {
  /** Default GET. */
  method?: string;
  /** Default `/`. */
  path?: string;
  /** `:authority`; default the connection's `serverName`, else `host`. */
  authority?: string;
  /** `:scheme`; default https. */
  scheme?: string;
  headers?: TH3Headers;
  /** A UTF-8 text body. */
  body?: string | null;
  /** Instead of `body`: this many bytes of the pattern `i % 251` (see `h3PatternBody`). */
  bodySize?: number;
  /** A body gets a content-length header unless this is set (or `headers` has one). */
  omitContentLength?: boolean;
  /** Sends this request this many times, concurrently (each its own stream and response entry). */
  streams?: number;
}

export interface IH3ClientInput {
  /** Default 127.0.0.1. */
  host?: string;
  port: number;
  /** SNI (and default `:authority`). Without it an IP host sends no SNI. */
  serverName?: string;
  /** PEM file of the CA to trust (the server name is checked too). */
  caFile?: string;
  /** Without `caFile`: no certificate verification at all. */
  insecure?: boolean;
  /** Default ['h3']. */
  alpn?: string[];
  /** For the whole run (handshake and every request); default 10000. */
  timeoutMs?: number;
  /** One request after the other (each waits for the previous response); default concurrently. */
  sequential?: boolean;
  requests: IH3RequestSpec[];
}

interface IH3ResponseCommon {
  bodyLength: number;
  bodySha256: string;
  /** The first 4096 bytes of the body, UTF-8 (invalid bytes replaced). */
  bodyText: string;
  /** When a body was sent: its length and sha256. */
  sentLength?: number;
  sentSha256?: string;
  /** 1xx responses before the final one. */
  interim?: Array<{ status: number; headers: TH3Headers }>;
  trailers?: TH3Headers;
  /** The server sent STOP_SENDING with this code (the rest of the body was not sent). */
  stopSending?: number;
  /** Sending the request failed on this stream. */
  sendError?: string;
}

/** A response that ended normally (`headers` include `:status`). */
export interface IH3Answer extends IH3ResponseCommon {
  reset?: undefined;
  status: number | null;
  headers: TH3Headers;
}

/** The server reset the stream (RESET_STREAM), with what arrived before. */
export interface IH3Reset extends IH3ResponseCommon {
  reset: true;
  errorCode: number;
  status?: number | null;
  headers?: TH3Headers;
}

export type TH3Response = IH3Answer | IH3Reset;

export interface IH3Success {
  ok: true;
  alpn: string | null;
  /** sha256 (hex) of the DER of the certificate the server presented. */
  peerCertSha256: string | null;
  /** In request order, each request repeated by its `streams`. */
  responses: TH3Response[];
}

export interface IH3Failure {
  ok: false;
  error: string;
  stage?: 'connect' | 'handshake' | 'requests';
  /** From the CONNECTION_CLOSE, when there was one. `closeFrameType` null: an application (HTTP/3) close. */
  closeErrorCode?: number;
  closeFrameType?: number | null;
  closeReason?: string;
  closedByPeer?: boolean;
  /** The TLS alert carried by a CRYPTO_ERROR close (120: no_application_protocol, 42: bad_certificate ...). */
  tlsAlert?: number;
  alpn?: string;
  peerCertSha256?: string;
  completed?: number;
  requested?: number;
  /** What the client printed on stderr (aioquic's log). */
  stderr: string;
}

export type IH3ClientOutput = IH3Success | IH3Failure;

let available: boolean | undefined;

/** Whether the Python with aioquic is there (tests skip HTTP/3 otherwise). */
export function h3ClientAvailable(): boolean {
  if (available === undefined) {
    available =
      existsSync(H3_PYTHON) &&
      spawnSync(H3_PYTHON, ['-c', 'import aioquic.h3.connection'], { stdio: 'ignore', timeout: 20000 }).status === 0;
  }
  return available;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Runs the client once: one QUIC connection, all of `input.requests`. */
export function h3Request(input: IH3ClientInput): Promise<IH3ClientOutput> {
  // The client bounds itself by timeoutMs; this limit only catches a hung interpreter.
  const limitMs = (input.timeoutMs ?? 10000) + 20000;
  return new Promise<IH3ClientOutput>((resolve, reject) => {
    const child = spawn(H3_PYTHON, [H3_CLIENT_SCRIPT], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      child.kill('SIGKILL');
    }, limitMs);
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => undefined);
    child.on('error', (e: Error) => {
      clearTimeout(timer);
      reject(new Error(`h3 client could not start (${H3_PYTHON}): ${e.message}`));
    });
    child.on('close', (code: number | null, signal: NodeJS.Signals | null) => {
      clearTimeout(timer);
      const stdout = Buffer.concat(out).toString('utf8').trim();
      const stderr = Buffer.concat(err).toString('utf8');
      if (killed) {
        reject(new Error(`h3 client killed after ${limitMs} ms; stderr: ${stderr}`));
        return;
      }
      let parsed: unknown;
      try {
        parsed = JSON.parse(stdout);
      } catch {
        reject(new Error(`h3 client printed no JSON (exit ${code ?? signal}): ${stdout.slice(0, 500)} stderr: ${stderr}`));
        return;
      }
      if (!isRecord(parsed) || typeof parsed.ok !== 'boolean') {
        reject(new Error(`h3 client printed unexpected JSON: ${stdout.slice(0, 500)}`));
        return;
      }
      if (parsed.ok) {
        if (code !== 0 || !Array.isArray(parsed.responses)) {
          reject(new Error(`h3 client: ok output with exit ${code ?? signal}: ${stdout.slice(0, 500)}`));
          return;
        }
        resolve(parsed as unknown as IH3Success);
      } else {
        resolve({ ...(parsed as unknown as Omit<IH3Failure, 'stderr'>), stderr });
      }
    });
    child.stdin.end(JSON.stringify(input));
  });
}

export const QUIC_INITIALS_SCRIPT = path.join(HELPERS_DIR, 'quic-initials.py');

export interface IHalfOpenHandshakes {
  /** First flights sent (one connection each). */
  sent: number;
  /** Ends the helper (its sockets close). */
  kill(): void;
}

/**
 * `count` QUIC handshakes begun and abandoned (test/helpers/quic-initials.py): each connection's
 * Initial packets from a socket of its own, then silence for `holdMs`. Resolves once all are sent.
 */
export function startHalfOpenHandshakes(opts: { host?: string; port: number; serverName: string; count: number; holdMs: number }): Promise<IHalfOpenHandshakes> {
  const args = [QUIC_INITIALS_SCRIPT, opts.host ?? '127.0.0.1', String(opts.port), opts.serverName, String(opts.count), String(opts.holdMs)];
  return new Promise((resolve, reject) => {
    const child = spawn(H3_PYTHON, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const kill = (): void => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    };
    const timer = setTimeout(() => {
      kill();
      reject(new Error(`quic-initials.py sent nothing within 20 s; stderr: ${err}`));
    }, 20000);
    child.stderr.on('data', (d: Buffer) => (err += d.toString('utf8')));
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString('utf8');
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line === undefined) return;
      clearTimeout(timer);
      const parsed: unknown = JSON.parse(line);
      resolve({ sent: isRecord(parsed) && typeof parsed.sent === 'number' ? parsed.sent : 0, kill });
    });
    child.on('error', (e: Error) => {
      clearTimeout(timer);
      reject(new Error(`quic-initials.py could not start (${H3_PYTHON}): ${e.message}`));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      if (!out.includes('{')) reject(new Error(`quic-initials.py exited ${code} before sending: ${err}`));
    });
  });
}

/** Like `h3Request`, but a failure throws (with the client's error and log). */
export async function h3RequestOk(input: IH3ClientInput): Promise<IH3Success> {
  const result = await h3Request(input);
  if (!result.ok) throw new Error(`HTTP/3 request failed: ${result.error}\n${result.stderr}`);
  return result;
}

/** The response header `name` (first one, case-insensitive), or undefined. */
export function h3Header(headers: TH3Headers | undefined, name: string): string | undefined {
  const lower = name.toLowerCase();
  return headers?.find(([n]) => n.toLowerCase() === lower)?.[1];
}

/** The body `bodySize: size` sends: byte i is i % 251 (for a backend to serve or compare). */
export function h3PatternBody(size: number): Buffer {
  const body = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) body[i] = i % 251;
  return body;
}

/** sha256 (hex) of `data`, as the client reports bodies. */
export function sha256Hex(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

// A real HTTP/3 server for the tests: test/helpers/h3-server.py (aioquic), in the same Python as the
// client. It answers GET (and any method but POST/PUT) with `<tag> <:authority> <:path>` as
// text/plain, and POST/PUT by echoing the body; each response carries x-h3-tag, x-h3-connection
// (the connection's number, from 1) and x-h3-connections (connections accepted so far).
export const H3_SERVER_SCRIPT = path.join(HELPERS_DIR, 'h3-server.py');

export interface IH3ServerOptions {
  /** First word of every GET response body. */
  tag: string;
  /** PEM text of the certificate (chain) the server presents. */
  cert: string;
  /** PEM text of its private key. */
  key: string;
  /** Default 127.0.0.1. */
  host?: string;
  /** UDP port; default 0 (a free one). */
  port?: number;
}

export interface IH3Server {
  /** The UDP port it listens on. */
  port: number;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it to exit; idempotent. */
  close(): Promise<void>;
  /** Kills the server at once (SIGKILL): its connections end without a word to their peers. */
  kill(): Promise<void>;
}

const H3_SERVER_START_TIMEOUT_MS = 15000;
const H3_SERVER_STOP_TIMEOUT_MS = 5000;
/** How much of the server's stderr (its log) is kept for error messages. */
const H3_SERVER_LOG_LIMIT = 64 * 1024;

/** Starts h3-server.py on a free UDP port; resolves once it listens (rejects with its log after 15 s). */
export async function startH3Server(opts: IH3ServerOptions): Promise<IH3Server> {
  const dir = await mkdtemp(path.join(tmpdir(), 'smartproxy-h3-server-'));
  // Removed at close or kill; at exit too, for a server a failed test never closed.
  const removeDirAtExit = (): void => rmSync(dir, { recursive: true, force: true });
  process.on('exit', removeDirAtExit);
  const certFile = path.join(dir, 'cert.pem');
  const keyFile = path.join(dir, 'key.pem');
  await writeFile(certFile, opts.cert);
  await writeFile(keyFile, opts.key, { mode: 0o600 });
  const args = [H3_SERVER_SCRIPT, '--cert', certFile, '--key', keyFile, '--tag', opts.tag, '--host', opts.host ?? '127.0.0.1', '--port', String(opts.port ?? 0)];
  // stdin stays open: when this process dies, the server sees its end and exits too.
  const child = spawn(H3_PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let log = '';
  child.stderr.on('data', (d: Buffer) => {
    log = (log + d.toString('utf8')).slice(-H3_SERVER_LOG_LIMIT);
  });
  child.stdin.on('error', () => undefined);
  const exited = new Promise<void>((resolve) => {
    child.once('close', () => resolve());
  });

  let port: number;
  try {
    port = await new Promise<number>((resolve, reject) => {
      let out = '';
      const fail = (why: string): void => {
        cleanup();
        child.kill('SIGKILL');
        reject(new Error(`h3 server (${opts.tag}) ${why}; stderr: ${log}`));
      };
      const onData = (d: Buffer): void => {
        out += d.toString('utf8');
        const newline = out.indexOf('\n');
        if (newline < 0) return;
        const line = out.slice(0, newline).trim();
        let parsed: unknown;
        try {
          parsed = JSON.parse(line);
        } catch {
          fail(`printed ${JSON.stringify(line)} instead of {"port": N}`);
          return;
        }
        const value = isRecord(parsed) ? parsed.port : undefined;
        if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65535) {
          fail(`printed ${JSON.stringify(line)} instead of {"port": N}`);
          return;
        }
        cleanup();
        resolve(value);
      };
      const onError = (e: Error): void => fail(`could not start (${H3_PYTHON}): ${e.message}`);
      const onClose = (code: number | null, signal: NodeJS.Signals | null): void => fail(`exited (${code ?? signal}) before listening`);
      const timer = setTimeout(() => fail(`did not listen within ${H3_SERVER_START_TIMEOUT_MS} ms`), H3_SERVER_START_TIMEOUT_MS);
      const cleanup = (): void => {
        clearTimeout(timer);
        child.stdout.off('data', onData);
        child.off('error', onError);
        child.off('close', onClose);
        // Nothing else is printed on stdout, but a pipe left unread could fill.
        child.stdout.resume();
      };
      child.stdout.on('data', onData);
      child.on('error', onError);
      child.on('close', onClose);
    });
  } catch (e) {
    await Promise.race([exited, new Promise<void>((resolve) => setTimeout(resolve, H3_SERVER_STOP_TIMEOUT_MS))]);
    process.off('exit', removeDirAtExit);
    await rm(dir, { recursive: true, force: true });
    throw e;
  }

  let closing: Promise<void> | undefined;
  const stop = (signal: 'SIGTERM' | 'SIGKILL'): Promise<void> => {
    closing ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        if (signal === 'SIGTERM') child.stdin.end();
        child.kill(signal);
        const timer = setTimeout(() => child.kill('SIGKILL'), H3_SERVER_STOP_TIMEOUT_MS);
        await exited;
        clearTimeout(timer);
      }
      process.off('exit', removeDirAtExit);
      await rm(dir, { recursive: true, force: true });
    })();
    return closing;
  };
  return { port, close: () => stop('SIGTERM'), kill: () => stop('SIGKILL') };
}

/** sha256 (hex) of a PEM certificate's DER, as `peerCertSha256` reports the one served. */
export function certSha256(pem: string): string {
  return createHash('sha256').update(new X509Certificate(pem).raw).digest('hex');
}

/** The response entry as an answer; throws when the stream was reset or the entry is missing. */
export function h3Answer(response: TH3Response | undefined): IH3Answer {
  if (response === undefined || 'reset' in response) throw new Error(`expected an answer, got ${JSON.stringify(response)}`);
  return response;
}
