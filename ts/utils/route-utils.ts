// Route matching and validation in JavaScript (API.md "Matching (exact semantics)" and the
// Helpers section). The matchers follow the Rust core's own (src/routing/{domain,path,ip}.rs), so
// what these say matches is what the engine routes; the validators accept what the engine accepts.
import * as net from 'node:net';

import type { IRouteConfig, IRouteSecurity, TPortRange } from '../models/route-types.js';
import { isValidPortNumber } from './port-range.js';
import { headerRegExpProblem } from './header-match.js';
import {
  AFFINITY_KEY,
  BACKEND_PROTOCOLS,
  LB_ALGORITHMS,
  RATE_LIMIT_KEYS_BY,
  ROUTE_SCHEMA,
  TLS_MODES,
  TLS_VERSIONS,
  keyProblems,
} from '../models/option-schema.js';
import { SmartProxyConfigError } from './normalize-options.js';
import { checkUdpRoute } from './udp-route.js';
import { checkHttp3Route } from './http3-route.js';
import { checkHttp3Backend } from './http3-backend.js';

/** What a connection or request is known by, for `findMatchingRoutes`. */
export interface IRouteMatchQuery {
  port: number;
  domain?: string;
  path?: string;
  clientIp?: string;
  /** (ext) 'tcp' (default): a connection, which routes with transport 'tcp' or 'all' take; 'udp': a datagram. */
  transport?: 'tcp' | 'udp';
}

export interface IRouteValidationResult {
  valid: boolean;
  errors: string[];
}

type TRecord = Record<string, unknown>;

const isRecord = (v: unknown): v is TRecord => typeof v === 'object' && v !== null && !Array.isArray(v);
const show = (v: unknown): string => (typeof v === 'function' ? 'a function' : v instanceof RegExp ? String(v) : JSON.stringify(v) ?? String(v));

// ---------------------------------------------------------------------------------------------
// Domains: case-insensitive, trailing dot ignored, `*` = any run of characters (dots included).

const MAX_DOMAIN_LENGTH = 253;

/** A valid `match.domains` entry: letters, digits, `-`, `_`, `.`, `*`; no empty label; a trailing dot allowed. */
export function isValidDomain(domain: unknown): domain is string {
  return typeof domain === 'string' && domainProblem(domain) === undefined;
}

function domainProblem(domain: string): string | undefined {
  const trimmed = domain.trim();
  const name = trimmed.endsWith('.') ? trimmed.slice(0, -1) : trimmed;
  if (name === '') return 'it is empty';
  if (name.length > MAX_DOMAIN_LENGTH) return `longer than ${MAX_DOMAIN_LENGTH} characters`;
  const bad = /[^A-Za-z0-9\-_.*]/.exec(name);
  if (bad !== null) return `${JSON.stringify(bad[0])} is not allowed (use punycode for international names)`;
  if (name.startsWith('.') || name.includes('..')) return 'it has an empty label';
  return undefined;
}

function normalizeDomainPattern(pattern: string): string {
  const trimmed = pattern.trim().toLowerCase();
  return (trimmed.endsWith('.') ? trimmed.slice(0, -1) : trimmed).replace(/\*+/g, '*');
}

/** Greedy wildcard walk: `*` absorbs one more character on a mismatch; only the last star backtracks. */
function wildcardMatch(pattern: string, text: string, anyChar?: string): boolean {
  let p = 0;
  let t = 0;
  let starP = -1;
  let starT = 0;
  while (t < text.length) {
    if (p < pattern.length && pattern[p] === '*') {
      starP = p;
      starT = t;
      p++;
    } else if (p < pattern.length && (pattern[p] === text[t] || (anyChar !== undefined && pattern[p] === anyChar))) {
      p++;
      t++;
    } else if (starP >= 0) {
      p = starP + 1;
      starT++;
      t = starT;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === '*') p++;
  return p === pattern.length;
}

function domainMatches(pattern: string, domain: string): boolean {
  if (!isValidDomain(pattern)) return false;
  let name = domain.trim().toLowerCase();
  if (name.endsWith('.')) name = name.slice(0, -1);
  if (name === '') return false;
  return wildcardMatch(normalizeDomainPattern(pattern), name);
}

function domainList(route: IRouteConfig): string[] {
  const domains = route.match?.domains;
  if (domains === undefined) return [];
  return typeof domains === 'string' ? [domains] : domains;
}

/** A route without `domains` matches everything; one with `domains` never matches a missing domain. */
export function routeMatchesDomain(route: IRouteConfig, domain?: string): boolean {
  const patterns = domainList(route);
  if (patterns.length === 0) return true;
  if (domain === undefined || domain === '') return false;
  return patterns.some((pattern) => domainMatches(pattern, domain));
}

// ---------------------------------------------------------------------------------------------
// Ports

function portsContain(spec: TPortRange | undefined, port: number): boolean {
  if (spec === undefined) return false;
  for (const item of Array.isArray(spec) ? spec : [spec]) {
    if (typeof item === 'number' ? item === port : isRecord(item) && port >= item.from && port <= item.to) return true;
  }
  return false;
}

export function routeMatchesPort(route: IRouteConfig, port: number): boolean {
  return portsContain(route.match?.ports, port);
}

// ---------------------------------------------------------------------------------------------
// Paths: `/api` exact; a trailing `/` or a `*` makes a prefix or glob; `:name` one segment.

type TPathToken = { kind: 'literal'; text: string } | { kind: 'param' } | { kind: 'star' };

/** The tokens of a path pattern, or the reason it is not one. */
function parsePathPattern(pattern: string): TPathToken[] | string {
  if (!pattern.startsWith('/') && pattern !== '*') return `${JSON.stringify(pattern)} is not a path pattern: it must start with '/'`;
  if (pattern.includes('?') || pattern.includes('#')) {
    return `${JSON.stringify(pattern)} is not a path pattern: queries and fragments are not matched`;
  }
  const tokens: TPathToken[] = [];
  let literal = '';
  const flush = (): void => {
    if (literal !== '') tokens.push({ kind: 'literal', text: literal });
    literal = '';
  };
  let i = 0;
  while (i < pattern.length) {
    const c = pattern[i];
    const atSegmentStart = i > 0 && pattern[i - 1] === '/';
    if (c === '*') {
      flush();
      if (tokens[tokens.length - 1]?.kind !== 'star') tokens.push({ kind: 'star' });
      i++;
    } else if (c === ':' && atSegmentStart) {
      const slash = pattern.indexOf('/', i + 1);
      const name = pattern.slice(i + 1, slash < 0 ? pattern.length : slash);
      if (!/^[A-Za-z0-9_]+$/.test(name)) return `${JSON.stringify(pattern)}: ':${name}' is not a valid parameter name`;
      flush();
      tokens.push({ kind: 'param' });
      i += 1 + name.length;
    } else {
      literal += c;
      i++;
    }
  }
  const endsWithSlash = literal.endsWith('/');
  flush();
  if (endsWithSlash && pattern.length > 1) tokens.push({ kind: 'star' });
  return tokens;
}

function pathMatches(pattern: string, rawPath: string): boolean {
  const tokens = parsePathPattern(pattern);
  if (typeof tokens === 'string') return false;
  const queryAt = rawPath.indexOf('?');
  const path = queryAt >= 0 ? rawPath.slice(0, queryAt) : rawPath;
  let t = 0;
  let p = 0;
  let star: { after: number; absorbed: number } | undefined;
  for (;;) {
    if (t === tokens.length && p === path.length) return true;
    const token = tokens[t];
    let step: number | undefined;
    if (token?.kind === 'star') {
      star = { after: t + 1, absorbed: p };
      t++;
      continue;
    } else if (token?.kind === 'literal') {
      step = path.startsWith(token.text, p) ? token.text.length : undefined;
    } else if (token?.kind === 'param') {
      const slash = path.indexOf('/', p);
      const len = (slash < 0 ? path.length : slash) - p;
      step = len > 0 ? len : undefined;
    }
    if (step !== undefined) {
      p += step;
      t++;
    } else if (star !== undefined && star.absorbed < path.length) {
      star = { after: star.after, absorbed: star.absorbed + 1 };
      t = star.after;
      p = star.absorbed;
    } else {
      return false;
    }
  }
}

/** A route without `match.path` matches every path (and no path); one with it needs a matching path. */
export function routeMatchesPath(route: IRouteConfig, path?: string): boolean {
  const pattern = route.match?.path;
  if (pattern === undefined) return true;
  if (path === undefined) return false;
  return pathMatches(pattern, path);
}

// ---------------------------------------------------------------------------------------------
// Client IPs: exact, CIDR, glob over the text form, `*`; `::ffff:a.b.c.d` is `a.b.c.d`.

type TIp = { v: 4; n: number } | { v: 6; n: bigint };
type TIpPattern =
  | { kind: 'any' }
  | { kind: 'exact'; ip: TIp }
  | { kind: 'v4net'; network: number; prefix: number }
  | { kind: 'v6net'; network: bigint; prefix: number }
  | { kind: 'glob'; glob: string };

const V6_ALL = (1n << 128n) - 1n;

function parseV4(text: string): number {
  return text.split('.').reduce((acc, octet) => acc * 256 + Number(octet), 0);
}

function parseIp(text: string): TIp | undefined {
  const family = net.isIP(text);
  if (family === 4) return { v: 4, n: parseV4(text) };
  if (family !== 6 || text.includes('%')) return undefined;
  let body = text;
  let tail: number[] = [];
  const lastColon = text.lastIndexOf(':');
  if (text.slice(lastColon + 1).includes('.')) {
    // An embedded IPv4 tail (`::ffff:1.2.3.4`) is the last two groups; keep a `::` right before it.
    const v4 = parseV4(text.slice(lastColon + 1));
    tail = [v4 >>> 16, v4 & 0xffff];
    body = text[lastColon - 1] === ':' ? text.slice(0, lastColon + 1) : text.slice(0, lastColon);
  }
  const [head, rest] = body.includes('::') ? body.split('::') : [body, undefined];
  const parse = (part: string): number[] => (part === '' ? [] : part.split(':').map((g) => parseInt(g, 16)));
  const left = parse(head);
  const right = rest === undefined ? [] : parse(rest);
  const fill = 8 - tail.length - left.length - right.length;
  const groups = rest === undefined ? [...left, ...tail] : [...left, ...new Array<number>(fill).fill(0), ...right, ...tail];
  if (groups.length !== 8) return undefined;
  return { v: 6, n: groups.reduce((acc, g) => (acc << 16n) | BigInt(g), 0n) };
}

/** IPv4-mapped IPv6 becomes plain IPv4. */
function canonicalIp(ip: TIp): TIp {
  if (ip.v === 6 && ip.n >> 32n === 0xffffn) return { v: 4, n: Number(ip.n & 0xffffffffn) };
  return ip;
}

function ipText(ip: TIp): string {
  if (ip.v === 4) return [24, 16, 8, 0].map((shift) => (ip.n >>> shift) & 0xff).join('.');
  const groups: number[] = [];
  for (let i = 7; i >= 0; i--) groups.push(Number((ip.n >> BigInt(i * 16)) & 0xffffn));
  // RFC 5952: the longest run (at least two) of zero groups becomes `::`, the first on a tie.
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (gs: number[]): string => gs.map((g) => g.toString(16)).join(':');
  if (bestStart < 0) return hex(groups);
  return `${hex(groups.slice(0, bestStart))}::${hex(groups.slice(bestStart + bestLen))}`;
}

function v4Mask(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

function v6Mask(prefix: number): bigint {
  return prefix === 0 ? 0n : (V6_ALL << BigInt(128 - prefix)) & V6_ALL;
}

function parseIpPattern(input: string): TIpPattern | string {
  const s = input.trim();
  if (s === '*') return { kind: 'any' };
  if (s === '') return 'an empty string is not an IP address, CIDR range or glob';
  const slash = s.indexOf('/');
  if (slash >= 0) {
    const address = s.slice(0, slash);
    const prefixText = s.slice(slash + 1);
    const ip = parseIp(address);
    if (ip === undefined) return `${JSON.stringify(input)} is not a CIDR range: ${JSON.stringify(address)} is not an IP address`;
    if (!/^\d{1,3}$/.test(prefixText)) return `${JSON.stringify(input)} is not a CIDR range: ${JSON.stringify(prefixText)} is not a prefix length`;
    const prefix = Number(prefixText);
    if (ip.v === 4) {
      if (prefix > 32) return `${JSON.stringify(input)}: prefix length ${prefix} is larger than 32`;
      return { kind: 'v4net', network: (ip.n & v4Mask(prefix)) >>> 0, prefix };
    }
    if (prefix > 128) return `${JSON.stringify(input)}: prefix length ${prefix} is larger than 128`;
    const mapped = canonicalIp(ip);
    if (mapped.v === 4 && prefix >= 96) return { kind: 'v4net', network: (mapped.n & v4Mask(prefix - 96)) >>> 0, prefix: prefix - 96 };
    return { kind: 'v6net', network: ip.n & v6Mask(prefix), prefix };
  }
  const ip = parseIp(s);
  if (ip !== undefined) return { kind: 'exact', ip: canonicalIp(ip) };
  if ((s.includes('*') || s.includes('?')) && /^[0-9A-Fa-f.:*?]+$/.test(s)) {
    let glob = s.toLowerCase();
    if (glob.startsWith('::ffff:') && glob.slice(7).includes('.')) glob = glob.slice(7);
    return { kind: 'glob', glob };
  }
  return `${JSON.stringify(input)} is not an IP address, CIDR range (10.0.0.0/8) or glob (192.168.*)`;
}

function ipMatches(pattern: TIpPattern, ip: TIp): boolean {
  const client = canonicalIp(ip);
  switch (pattern.kind) {
    case 'any':
      return true;
    case 'exact':
      return pattern.ip.v === client.v && pattern.ip.n === client.n;
    case 'v4net':
      return client.v === 4 && ((client.n & v4Mask(pattern.prefix)) >>> 0) === pattern.network;
    case 'v6net':
      return client.v === 6 && (client.n & v6Mask(pattern.prefix)) === pattern.network;
    case 'glob':
      return wildcardMatch(pattern.glob, ipText(client), '?');
  }
}

function routeMatchesClientIp(route: IRouteConfig, clientIp?: string): boolean {
  const patterns = route.match?.clientIp;
  if (patterns === undefined || patterns.length === 0) return true;
  if (clientIp === undefined) return false;
  const ip = parseIp(clientIp.trim());
  if (ip === undefined) return false;
  return patterns.some((text) => {
    const pattern = typeof text === 'string' ? parseIpPattern(text) : 'not a string';
    return typeof pattern !== 'string' && ipMatches(pattern, ip);
  });
}

// ---------------------------------------------------------------------------------------------
// Transport: a route takes TCP unless its `match.transport` says 'udp' or 'all'.

function routeMatchesTransport(route: IRouteConfig, transport: 'tcp' | 'udp'): boolean {
  const own: unknown = route.match?.transport ?? 'tcp';
  return own === 'all' || own === transport;
}

// ---------------------------------------------------------------------------------------------
// Route selection

function priorityOf(route: IRouteConfig): number {
  return typeof route.priority === 'number' && Number.isFinite(route.priority) ? route.priority : 0;
}

/**
 * Every enabled route matching the query, in the order the engine tries them: priority descending,
 * then array order. A route's `clientIp` is checked only against a query that has one; a query
 * without `transport` is a TCP connection (routes with transport 'udp' do not take it).
 */
export function findMatchingRoutes(routes: readonly IRouteConfig[], query: IRouteMatchQuery): IRouteConfig[] {
  return routes
    .map((route, index) => ({ route, index }))
    .filter(({ route }) =>
      isRecord(route) &&
      route.enabled !== false &&
      routeMatchesPort(route, query.port) &&
      routeMatchesDomain(route, query.domain) &&
      routeMatchesPath(route, query.path) &&
      routeMatchesClientIp(route, query.clientIp) &&
      routeMatchesTransport(route, query.transport ?? 'tcp'),
    )
    .sort((a, b) => priorityOf(b.route) - priorityOf(a.route) || a.index - b.index)
    .map(({ route }) => route);
}

/** The route the engine would pick for the query (the first of findMatchingRoutes), if any. */
export function findBestMatchingRoute(routes: readonly IRouteConfig[], query: IRouteMatchQuery): IRouteConfig | undefined {
  return findMatchingRoutes(routes, query)[0];
}

// ---------------------------------------------------------------------------------------------
// Validation: every problem of a route, each message starting with the field it is about.

class Problems {
  readonly errors: string[] = [];
  add(field: string, reason: string): void {
    this.errors.push(`${field}: ${reason}`);
  }
}

function checkPorts(spec: unknown, field: string, out: Problems): void {
  if (spec === undefined) {
    out.add(field, 'required');
    return;
  }
  const items = Array.isArray(spec) ? spec : [spec];
  if (items.length === 0) out.add(field, 'at least one port is required');
  items.forEach((item, i) => {
    const itemField = Array.isArray(spec) ? `${field}[${i}]` : field;
    if (isRecord(item)) {
      const fromOk = isValidPortNumber(item.from);
      const toOk = isValidPortNumber(item.to);
      if (!fromOk) out.add(`${itemField}.from`, `${show(item.from)} is not a valid port (1-65535)`);
      if (!toOk) out.add(`${itemField}.to`, `${show(item.to)} is not a valid port (1-65535)`);
      if (fromOk && toOk && (item.from as number) > (item.to as number)) {
        out.add(itemField, `range from ${show(item.from)} to ${show(item.to)} is empty (from > to)`);
      }
    } else if (!isValidPortNumber(item)) {
      out.add(itemField, `${show(item)} is not a valid port (1-65535)`);
    }
  });
}

function checkStringList(value: unknown, field: string, out: Problems, each?: (item: string, itemField: string) => void): void {
  if (!Array.isArray(value)) {
    out.add(field, `expected an array of strings, got ${show(value)}`);
    return;
  }
  value.forEach((item, i) => {
    if (typeof item !== 'string' || item === '') out.add(`${field}[${i}]`, `expected a non-empty string, got ${show(item)}`);
    else each?.(item, `${field}[${i}]`);
  });
}

function checkIpList(value: unknown, field: string, out: Problems): void {
  checkStringList(value, field, out, (item, itemField) => {
    const pattern = parseIpPattern(item);
    if (typeof pattern === 'string') out.add(itemField, pattern);
  });
}

function checkPath(value: unknown, field: string, out: Problems): void {
  if (typeof value !== 'string') {
    out.add(field, `expected a path pattern starting with '/', got ${show(value)}`);
    return;
  }
  const parsed = parsePathPattern(value);
  if (typeof parsed === 'string') out.add(field, parsed);
}

function checkHeaderMatches(value: unknown, field: string, out: Problems): void {
  if (!isRecord(value)) {
    out.add(field, `expected an object of header names to values, got ${show(value)}`);
    return;
  }
  for (const [name, v] of Object.entries(value)) {
    if (v instanceof RegExp) {
      const problem = headerRegExpProblem(v);
      if (problem !== undefined) out.add(`${field}.${name}`, problem);
    } else if (typeof v !== 'string') out.add(`${field}.${name}`, `expected a string or a RegExp, got ${show(v)}`);
  }
}

function checkHeaderTemplates(value: unknown, field: string, out: Problems): void {
  if (!isRecord(value)) {
    out.add(field, `expected { request?, response? }, got ${show(value)}`);
    return;
  }
  for (const side of ['request', 'response']) {
    const map = value[side];
    if (map === undefined) continue;
    if (!isRecord(map)) {
      out.add(`${field}.${side}`, `expected an object of header names to values, got ${show(map)}`);
      continue;
    }
    for (const [name, v] of Object.entries(map)) {
      if (typeof v !== 'string') out.add(`${field}.${side}.${name}`, `expected a string, got ${show(v)}`);
    }
  }
}

function checkMatch(match: unknown, out: Problems): void {
  if (match === undefined) {
    out.add('match', 'required (an object with at least ports)');
    return;
  }
  if (!isRecord(match)) {
    out.add('match', `expected an object with ports, got ${show(match)}`);
    return;
  }
  checkPorts(match.ports, 'match.ports', out);
  if (match.domains !== undefined) {
    const single = typeof match.domains === 'string';
    const list: unknown = single ? [match.domains] : match.domains;
    if (!Array.isArray(list)) {
      out.add('match.domains', `expected a string or an array of strings, got ${show(match.domains)}`);
    } else {
      list.forEach((domain, i) => {
        const field = single ? 'match.domains' : `match.domains[${i}]`;
        if (typeof domain !== 'string') out.add(field, `expected a string, got ${show(domain)}`);
        else {
          const problem = domainProblem(domain);
          if (problem !== undefined) out.add(field, `${JSON.stringify(domain)} is not a valid domain pattern: ${problem}`);
        }
      });
    }
  }
  if (match.path !== undefined) checkPath(match.path, 'match.path', out);
  if (match.clientIp !== undefined) checkIpList(match.clientIp, 'match.clientIp', out);
  if (match.tlsVersion !== undefined) {
    checkStringList(match.tlsVersion, 'match.tlsVersion', out, (v, field) => {
      if (!TLS_VERSIONS.includes(v)) out.add(field, `${JSON.stringify(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
    });
  }
  if (match.headers !== undefined) checkHeaderMatches(match.headers, 'match.headers', out);
}

function checkTarget(target: unknown, field: string, out: Problems): void {
  if (!isRecord(target)) {
    out.add(field, `expected a target object { host, port }, got ${show(target)}`);
    return;
  }
  const host = target.host;
  const hostOk =
    typeof host === 'function' ||
    (typeof host === 'string' && host.trim() !== '') ||
    (Array.isArray(host) && host.length > 0 && host.every((h) => typeof h === 'string' && h.trim() !== ''));
  if (!hostOk) out.add(`${field}.host`, `expected a host name, a non-empty array of them or a function, got ${show(host)}`);
  const port = target.port;
  if (typeof port !== 'function' && port !== 'preserve' && !isValidPortNumber(port)) {
    out.add(`${field}.port`, `${show(port)} is not a valid port (1-65535), 'preserve' or a function`);
  }
  if (target.match !== undefined) {
    if (!isRecord(target.match)) out.add(`${field}.match`, `expected an object, got ${show(target.match)}`);
    else {
      if (target.match.ports !== undefined) checkPorts(target.match.ports, `${field}.match.ports`, out);
      if (target.match.path !== undefined) checkPath(target.match.path, `${field}.match.path`, out);
      if (target.match.headers !== undefined) checkHeaderMatches(target.match.headers, `${field}.match.headers`, out);
      if (target.match.method !== undefined) checkStringList(target.match.method, `${field}.match.method`, out);
    }
  }
  if (target.priority !== undefined && (typeof target.priority !== 'number' || !Number.isFinite(target.priority))) {
    out.add(`${field}.priority`, `expected a number, got ${show(target.priority)}`);
  }
  if (target.weight !== undefined && (typeof target.weight !== 'number' || !Number.isInteger(target.weight) || target.weight < 1 || target.weight > 1000)) {
    out.add(`${field}.weight`, `expected an integer from 1 to 1000, got ${show(target.weight)}`);
  }
  if (target.headers !== undefined) checkHeaderTemplates(target.headers, `${field}.headers`, out);
  if (target.tls !== undefined) checkTargetTls(target.tls, `${field}.tls`, out);
  checkProxyProtocol(target.sendProxyProtocol, `${field}.sendProxyProtocol`, out);
}

/** A target's `tls`: only the connection to that target (the client-facing TLS is the route's). */
function checkTargetTls(tls: unknown, field: string, out: Problems): void {
  if (!isRecord(tls)) {
    out.add(field, `expected an object with a mode, got ${show(tls)}`);
    return;
  }
  if (tls.mode === 'passthrough') {
    out.add(`${field}.mode`, `a target cannot pass TLS through: the route decides what reaches its targets; use 'terminate-and-reencrypt' (TLS to this target) or 'terminate' (plain)`);
  } else if (tls.mode !== 'terminate' && tls.mode !== 'terminate-and-reencrypt') {
    out.add(`${field}.mode`, `expected 'terminate' or 'terminate-and-reencrypt', got ${show(tls.mode)}`);
  }
  const cert = tls.certificate;
  if (cert === 'auto') out.add(`${field}.certificate`, `a target obtains no certificate: the route's certificate is the one clients see`);
  else if (cert !== undefined && !isRecord(cert)) out.add(`${field}.certificate`, `expected { ca } with PEM text, got ${show(cert)}`);
  else if (isRecord(cert) && cert.ca !== undefined && typeof cert.ca !== 'string') out.add(`${field}.certificate.ca`, `expected PEM text, got ${show(cert.ca)}`);
  if (tls.versions !== undefined) {
    checkStringList(tls.versions, `${field}.versions`, out, (v, vField) => {
      if (!TLS_VERSIONS.includes(v)) out.add(vField, `${JSON.stringify(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
    });
  }
  checkFlag(tls.rejectUnauthorized, `${field}.rejectUnauthorized`, out);
}

function checkProxyProtocol(value: unknown, field: string, out: Problems): void {
  if (value !== undefined && ![true, false, 1, 2].includes(value as never)) out.add(field, `expected true, false, 1 or 2, got ${show(value)}`);
}

function checkTls(tls: unknown, field: string, out: Problems): void {
  if (!isRecord(tls)) {
    out.add(field, `expected an object with a mode, got ${show(tls)}`);
    return;
  }
  if (typeof tls.mode !== 'string' || !TLS_MODES.includes(tls.mode)) {
    out.add(`${field}.mode`, `expected one of ${TLS_MODES.join(', ')}, got ${show(tls.mode)}`);
  }
  const cert = tls.certificate;
  if (cert !== undefined && cert !== 'auto') {
    if (!isRecord(cert)) out.add(`${field}.certificate`, `expected 'auto' or { key, cert } (PEM text), got ${show(cert)}`);
    else {
      for (const key of ['key', 'cert']) {
        if (typeof cert[key] !== 'string' || cert[key] === '') out.add(`${field}.certificate.${key}`, `expected PEM text, got ${show(cert[key])}`);
      }
      if (cert.ca !== undefined && typeof cert.ca !== 'string') out.add(`${field}.certificate.ca`, `expected PEM text, got ${show(cert.ca)}`);
    }
  } else if (cert === undefined && (tls.mode === 'terminate' || tls.mode === 'terminate-and-reencrypt') && field === 'action.tls') {
    out.add(`${field}.certificate`, `a '${tls.mode}' route needs a certificate ('auto' or { key, cert })`);
  }
  if (tls.versions !== undefined) {
    checkStringList(tls.versions, `${field}.versions`, out, (v, vField) => {
      if (!TLS_VERSIONS.includes(v)) out.add(vField, `${JSON.stringify(v)} is not one of ${TLS_VERSIONS.join(', ')}`);
    });
  }
  if (tls.acme !== undefined) {
    if (!isRecord(tls.acme)) out.add(`${field}.acme`, `expected an object, got ${show(tls.acme)}`);
    else if (typeof tls.acme.email !== 'string' || !tls.acme.email.includes('@')) {
      out.add(`${field}.acme.email`, `expected an e-mail address, got ${show(tls.acme.email)}`);
    }
  }
  if (tls.rejectUnauthorized !== undefined && typeof tls.rejectUnauthorized !== 'boolean') {
    out.add(`${field}.rejectUnauthorized`, `expected true or false, got ${show(tls.rejectUnauthorized)}`);
  }
}

function checkPositiveInt(value: unknown, field: string, out: Problems): void {
  if (value !== undefined && (typeof value !== 'number' || !Number.isInteger(value) || value < 1)) {
    out.add(field, `expected a positive integer, got ${show(value)}`);
  }
}

function checkFlag(value: unknown, field: string, out: Problems): void {
  if (value !== undefined && typeof value !== 'boolean') out.add(field, `expected true or false, got ${show(value)}`);
}

/** `maxKeys` (affinity, rate limit): a count of entries, so an integer the engine can hold. */
function checkMaxKeys(value: unknown, field: string, out: Problems): void {
  if (value !== undefined && (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1)) {
    out.add(field, `expected a positive integer, got ${show(value)}`);
  }
}

function checkSecurity(security: unknown, field: string, out: Problems, needsNoHttp: string | undefined): void {
  if (!isRecord(security)) {
    out.add(field, `expected an object, got ${show(security)}`);
    return;
  }
  const s = security as TRecord & IRouteSecurity;
  if (s.ipAllowList !== undefined) checkIpList(s.ipAllowList, `${field}.ipAllowList`, out);
  if (s.ipBlockList !== undefined) checkIpList(s.ipBlockList, `${field}.ipBlockList`, out);
  checkPositiveInt(s.maxConnections, `${field}.maxConnections`, out);
  if (s.rateLimit !== undefined) {
    const rl: unknown = s.rateLimit;
    if (!isRecord(rl)) out.add(`${field}.rateLimit`, `expected an object, got ${show(rl)}`);
    else {
      if (rl.maxRequests === undefined) out.add(`${field}.rateLimit.maxRequests`, 'required');
      else checkPositiveInt(rl.maxRequests, `${field}.rateLimit.maxRequests`, out);
      if (typeof rl.window !== 'number' || !(rl.window > 0)) out.add(`${field}.rateLimit.window`, `expected a positive number of seconds, got ${show(rl.window)}`);
      if (rl.keyBy !== undefined && !RATE_LIMIT_KEYS_BY.includes(rl.keyBy as string)) {
        out.add(`${field}.rateLimit.keyBy`, `expected 'ip', 'path' or 'header', got ${show(rl.keyBy)}`);
      }
      if (rl.keyBy === 'header' && (typeof rl.headerName !== 'string' || rl.headerName === '')) {
        out.add(`${field}.rateLimit.headerName`, `required when keyBy is 'header'`);
      }
      checkMaxKeys(rl.maxKeys, `${field}.rateLimit.maxKeys`, out);
    }
  }
  if (s.basicAuth !== undefined) {
    const ba: unknown = s.basicAuth;
    if (!isRecord(ba)) out.add(`${field}.basicAuth`, `expected an object, got ${show(ba)}`);
    else if (!Array.isArray(ba.users)) out.add(`${field}.basicAuth.users`, `expected an array of { username, password }, got ${show(ba.users)}`);
    else {
      ba.users.forEach((user: unknown, i: number) => {
        if (!isRecord(user) || typeof user.username !== 'string' || user.username === '' || user.username.includes(':') || typeof user.password !== 'string') {
          out.add(`${field}.basicAuth.users[${i}]`, 'expected { username, password } strings (a username without ":")');
        }
      });
      if (ba.excludePaths !== undefined) checkStringList(ba.excludePaths, `${field}.basicAuth.excludePaths`, out, (p, pField) => checkPath(p, pField, out));
    }
  }
  if (s.jwtAuth !== undefined) {
    const jwt: unknown = s.jwtAuth;
    if (!isRecord(jwt)) out.add(`${field}.jwtAuth`, `expected an object, got ${show(jwt)}`);
    else {
      if (typeof jwt.secret !== 'string' || jwt.secret === '') out.add(`${field}.jwtAuth.secret`, `expected a non-empty string, got ${show(jwt.secret)}`);
      if (jwt.excludePaths !== undefined) checkStringList(jwt.excludePaths, `${field}.jwtAuth.excludePaths`, out, (p, pField) => checkPath(p, pField, out));
      checkFlag(jwt.requireExp, `${field}.jwtAuth.requireExp`, out);
    }
  }
  checkFlag(s.forwardAuthorization, `${field}.forwardAuthorization`, out);
  if (needsNoHttp !== undefined) {
    for (const key of ['rateLimit', 'basicAuth', 'jwtAuth']) {
      if (s[key] !== undefined) out.add(`${field}.${key}`, `needs HTTP, but ${needsNoHttp}`);
    }
  }
}

/**
 * `udpOnly`: the route's transport is 'udp', where a socket-handler route takes datagrams only:
 * its handler is a datagramHandler, and a socketHandler is refused (both checked by checkUdpRoute).
 */
function checkAction(action: unknown, out: Problems, udpOnly: boolean): TRecord | undefined {
  if (action === undefined) {
    out.add('action', "required (an object with type 'forward' or 'socket-handler')");
    return undefined;
  }
  if (!isRecord(action)) {
    out.add('action', `expected an object, got ${show(action)}`);
    return undefined;
  }
  if (action.type === 'forward') {
    if (action.targets !== undefined) {
      if (!Array.isArray(action.targets)) out.add('action.targets', `expected an array of targets, got ${show(action.targets)}`);
      else if (action.targets.length === 0) out.add('action.targets', 'a forward route needs at least one target');
      else action.targets.forEach((t: unknown, i: number) => checkTarget(t, `action.targets[${i}]`, out));
    } else if (action.target !== undefined) {
      checkTarget(action.target, 'action.target', out);
    } else {
      out.add('action.targets', 'a forward route needs at least one target');
    }
  } else if (action.type === 'socket-handler') {
    if (typeof action.socketHandler !== 'function' && !udpOnly) {
      out.add('action.socketHandler', `a 'socket-handler' route needs a socketHandler function, got ${show(action.socketHandler)}`);
    }
  } else {
    out.add('action.type', `expected 'forward' or 'socket-handler', got ${show(action.type)}`);
  }
  if (action.tls !== undefined) checkTls(action.tls, 'action.tls', out);
  if (action.websocket !== undefined) {
    const ws = action.websocket;
    if (!isRecord(ws)) out.add('action.websocket', `expected an object, got ${show(ws)}`);
    else {
      if (ws.enabled !== undefined && typeof ws.enabled !== 'boolean') out.add('action.websocket.enabled', `expected true or false, got ${show(ws.enabled)}`);
      for (const key of ['pingInterval', 'pingTimeout', 'maxPayloadSize']) checkPositiveInt(ws[key], `action.websocket.${key}`, out);
    }
  }
  if (action.loadBalancing !== undefined) {
    const lb = action.loadBalancing;
    if (!isRecord(lb)) out.add('action.loadBalancing', `expected an object, got ${show(lb)}`);
    else {
      if (lb.algorithm !== undefined && !LB_ALGORITHMS.includes(lb.algorithm as string)) {
        out.add('action.loadBalancing.algorithm', `expected one of ${LB_ALGORITHMS.join(', ')}, got ${show(lb.algorithm)}`);
      }
      if (lb.healthCheck !== undefined) checkHealthCheck(lb.healthCheck, out);
      if (lb.affinity !== undefined) checkAffinity(lb.affinity, out);
    }
  }
  if (action.forwardingEngine !== undefined && action.forwardingEngine !== 'node' && action.forwardingEngine !== 'nftables') {
    out.add('action.forwardingEngine', `expected 'node' or 'nftables', got ${show(action.forwardingEngine)}`);
  }
  checkProxyProtocol(action.sendProxyProtocol, 'action.sendProxyProtocol', out);
  if (action.options !== undefined) {
    const o = action.options;
    if (!isRecord(o)) out.add('action.options', `expected an object, got ${show(o)}`);
    else {
      if (o.backendProtocol !== undefined && !BACKEND_PROTOCOLS.includes(o.backendProtocol as string)) {
        out.add('action.options.backendProtocol', `expected 'auto', 'http1', 'http2' or 'http3', got ${show(o.backendProtocol)}`);
      }
      if (o.raw !== undefined && typeof o.raw !== 'boolean') out.add('action.options.raw', `expected true or false, got ${show(o.raw)}`);
    }
  }
  checkFlag(action.normalizePath, 'action.normalizePath', out);
  return action;
}

function checkHealthCheck(check: unknown, out: Problems): void {
  const field = 'action.loadBalancing.healthCheck';
  if (!isRecord(check)) {
    out.add(field, `expected an object, got ${show(check)}`);
    return;
  }
  if (check.path !== undefined && (typeof check.path !== 'string' || !check.path.startsWith('/'))) {
    out.add(`${field}.path`, `expected a path starting with '/', got ${show(check.path)}`);
  }
  for (const key of ['interval', 'timeout', 'unhealthyThreshold', 'healthyThreshold']) checkPositiveInt(check[key], `${field}.${key}`, out);
}

function checkAffinity(affinity: unknown, out: Problems): void {
  const field = 'action.loadBalancing.affinity';
  if (!isRecord(affinity)) {
    out.add(field, `expected an object, got ${show(affinity)}`);
    return;
  }
  if (typeof affinity.key !== 'string' || !AFFINITY_KEY.test(affinity.key)) {
    out.add(`${field}.key`, `expected 'ip', 'header:NAME' or 'cookie:NAME', got ${show(affinity.key)}`);
  }
  checkPositiveInt(affinity.ttlSeconds, `${field}.ttlSeconds`, out);
  if (affinity.onUnknown !== undefined && affinity.onUnknown !== 'assign' && affinity.onUnknown !== 'reject') {
    out.add(`${field}.onUnknown`, `expected 'assign' or 'reject', got ${show(affinity.onUnknown)}`);
  }
  checkMaxKeys(affinity.maxKeys, `${field}.maxKeys`, out);
}

/** All problems of one route; `valid` when there are none. Each error starts with its field. */
export function validateRouteConfig(route: IRouteConfig): IRouteValidationResult {
  const out = new Problems();
  const raw: unknown = route;
  if (!isRecord(raw)) {
    out.add('route', `expected a route object, got ${show(raw)}`);
    return { valid: false, errors: out.errors };
  }
  // Fields the engine does not know (typos, or options of other versions) are refused, as the engine does.
  for (const problem of keyProblems(raw, ROUTE_SCHEMA)) out.add(problem.field, problem.reason);
  if (raw.name !== undefined && typeof raw.name !== 'string') out.add('name', `expected a string, got ${show(raw.name)}`);
  if (raw.id !== undefined && typeof raw.id !== 'string') out.add('id', `expected a string, got ${show(raw.id)}`);
  if (raw.description !== undefined && typeof raw.description !== 'string') out.add('description', `expected a string, got ${show(raw.description)}`);
  if (raw.tags !== undefined) checkStringList(raw.tags, 'tags', out);
  if (raw.priority !== undefined && (typeof raw.priority !== 'number' || !Number.isFinite(raw.priority))) {
    out.add('priority', `expected a number, got ${show(raw.priority)}`);
  }
  if (raw.enabled !== undefined && typeof raw.enabled !== 'boolean') out.add('enabled', `expected true or false, got ${show(raw.enabled)}`);
  checkMatch(raw.match, out);
  const action = checkAction(raw.action, out, isRecord(raw.match) && raw.match.transport === 'udp');
  const tls = action !== undefined && isRecord(action.tls) ? action.tls : undefined;
  const rawRelay = action !== undefined && isRecord(action.options) && action.options.raw === true;
  const noHttp = tls?.mode === 'passthrough' ? 'this route passes TLS through' : rawRelay ? 'this route relays raw TCP' : undefined;
  // The engine opens no TLS of its own towards the targets of these routes (as it reports too).
  const noOwnTls = tls?.mode === 'passthrough' ? "a passthrough route relays the client's own TLS" : rawRelay ? 'a raw route relays bytes as they come' : undefined;
  if (noOwnTls !== undefined && action !== undefined) {
    const targets: Array<[unknown, string]> = Array.isArray(action.targets)
      ? action.targets.map((t: unknown, i: number): [unknown, string] => [t, `action.targets[${i}]`])
      : [[action.target, 'action.target']];
    for (const [t, field] of targets) {
      if (isRecord(t) && t.tls !== undefined) out.add(`${field}.tls`, `${noOwnTls}: the proxy opens no TLS of its own to the target`);
    }
  }
  // `action.http3`, and what a route serving HTTP/3 must be (before the UDP checks, as normalizeOptions).
  for (const problem of checkHttp3Route(raw.match, raw.action).problems) out.add(problem.field, problem.reason);
  // `backendProtocol: 'http3'`: QUIC (TLS) to every target, none with a PROXY header of its own.
  for (const problem of checkHttp3Backend(raw.action).problems) out.add(problem.field, problem.reason);
  // `match.transport`, `action.udp`, and what a route taking UDP cannot have.
  for (const problem of checkUdpRoute(raw.match, raw.action).problems) out.add(problem.field, problem.reason);
  if (raw.security !== undefined) checkSecurity(raw.security, 'security', out, noHttp);
  else if (action?.security !== undefined) checkSecurity(action.security, 'action.security', out, noHttp);
  if (raw.headers !== undefined) checkHeaderTemplates(raw.headers, 'headers', out);
  return { valid: out.errors.length === 0, errors: out.errors };
}

function describeRoute(route: unknown, index?: number): string {
  const name = isRecord(route) && typeof route.name === 'string' ? ` ${JSON.stringify(route.name)}` : '';
  return index === undefined ? `route${name}` : `routes[${index}]${name}`;
}

/** All problems of every route, each prefixed with the route (`routes[2] "api": match.ports: ...`). */
export function validateRoutes(routes: readonly IRouteConfig[]): IRouteValidationResult {
  if (!Array.isArray(routes)) return { valid: false, errors: [`routes: expected an array of routes, got ${show(routes)}`] };
  const errors: string[] = [];
  routes.forEach((route, index) => {
    for (const error of validateRouteConfig(route).errors) errors.push(`${describeRoute(route, index)}: ${error}`);
  });
  const ids = new Map<string, number>();
  routes.forEach((route, index) => {
    if (!isRecord(route) || typeof route.id !== 'string') return;
    const first = ids.get(route.id);
    if (first !== undefined) errors.push(`${describeRoute(route, index)}: id: ${JSON.stringify(route.id)} is already used by routes[${first}]`);
    else ids.set(route.id, index);
  });
  return { valid: errors.length === 0, errors };
}

/** Throws a SmartProxyConfigError listing every problem of the route; returns when it is valid. */
export function assertValidRoute(route: IRouteConfig): void {
  const { valid, errors } = validateRouteConfig(route);
  if (valid) return;
  const where = describeRoute(route);
  throw new SmartProxyConfigError(`${where}: ${errors.join('; ')}`, where);
}
