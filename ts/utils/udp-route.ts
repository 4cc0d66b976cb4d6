// UDP routes (API.md "HTTP/3, QUIC and UDP"): `match.transport`, `action.udp`, and what a route
// taking UDP cannot ask for. Both validators run these checks (normalizeOptions fails on the first
// problem, validateRouteConfig lists them all), so they refuse the same routes in the same words.
// The handlers of a `socket-handler` route are checked here too: `socketHandler` takes TCP
// connections ('tcp', 'all'), `datagramHandler` takes datagrams ('udp', 'all').
import type { TTransport } from '../models/route-types.js';
import type { INativeUdp } from '../models/native-config.js';
import { TRANSPORTS, UDP_DEFAULTS } from '../models/option-schema.js';
import { isRecord, type TRecord, show, U32_MAX } from './check-values.js';

export interface IUdpRouteCheck {
  /** The route's transport ('tcp' when unset); null when the value is not one. */
  transport: TTransport | null;
  /** `action.udp` with its defaults, for a route taking UDP without problems; otherwise null. */
  udp: INativeUdp | null;
  /** Each problem with the field it is about (`match.transport`, `action.udp.maxDatagramSize`, ...), in the order found. */
  problems: Array<{ field: string; reason: string }>;
}

/**
 * What a datagram does not carry, for each match field a route taking UDP may not set. `domains`
 * is the exception of QUIC passthrough (`action.tls.mode` 'passthrough'): the proxy reads the SNI
 * from the client's Initial packets, as TCP passthrough reads it from the ClientHello.
 */
const NOT_IN_DATAGRAMS: ReadonlyArray<readonly [string, string]> = [
  ['domains', `they carry no domain unless the route passes QUIC through by SNI: set action.tls.mode 'passthrough'`],
  ['path', 'they carry no HTTP path to match'],
  ['headers', 'they carry no HTTP headers to match'],
  ['tlsVersion', 'they carry no TLS handshake to match'],
];

/**
 * The UDP side of a route: its transport (default 'tcp'), the problems of its UDP settings, and the
 * native `action.udp` (defaults filled in) when it takes UDP. `match` and `action` are the route's
 * as the user wrote them; values of the wrong shape elsewhere are left to the other checks.
 */
export function checkUdpRoute(match: unknown, action: unknown): IUdpRouteCheck {
  const problems: IUdpRouteCheck['problems'] = [];
  const add = (field: string, reason: string): void => {
    problems.push({ field, reason });
  };
  const m = isRecord(match) ? match : {};
  const a = isRecord(action) ? action : {};

  const given = m.transport === undefined ? 'tcp' : m.transport;
  let transport: TTransport | null = null;
  if (typeof given === 'string' && TRANSPORTS.includes(given)) transport = given as TTransport;
  else add('match.transport', `expected 'tcp', 'udp' or 'all', got ${show(m.transport)}`);
  const takesUdp = transport === 'udp' || transport === 'all';

  // Which handler takes what: a TCP route has no datagrams to hand over; a 'udp' socket-handler
  // route no connections; an 'all' one both (the socketHandler a TCP route needs is the action
  // checks' to ask for, as on any route taking TCP).
  const datagramHandler = a.datagramHandler;
  if (transport === 'tcp') {
    if (datagramHandler !== undefined) add('action.datagramHandler', `needs match.transport 'udp' or 'all' (this route takes TCP only)`);
  } else if (takesUdp && a.type === 'socket-handler') {
    if (transport === 'udp' && a.socketHandler !== undefined) {
      add('action.socketHandler', `a 'socket-handler' route with match.transport 'udp' takes datagrams only: they go to its datagramHandler (a socketHandler takes TCP connections: match.transport 'tcp' or 'all')`);
    }
    if (typeof datagramHandler !== 'function') {
      const forWhat = transport === 'all' ? ' for its datagrams (its socketHandler takes the TCP connections)' : '';
      add('action.datagramHandler', `a 'socket-handler' route with match.transport '${transport}' needs a datagramHandler function${forWhat}, got ${show(datagramHandler)}`);
    }
    // Datagrams go to the handler as they come: there is no hello whose SNI could pick the route.
    const namesDomains = Array.isArray(m.domains) ? m.domains.length > 0 : m.domains !== undefined;
    if (a.tls !== undefined || namesDomains) {
      add('action.tls', `UDP routes relay datagrams: a datagram handler gets the client's datagrams as they come: no TLS, no domains`);
    }
  } else if (takesUdp && datagramHandler !== undefined && a.type === 'forward') {
    add('action.datagramHandler', `a 'forward' route relays datagrams to its targets: only a 'socket-handler' route takes a datagramHandler`);
  }

  if (takesUdp) {
    const relay = (what: string): string => `UDP routes relay datagrams${transport === 'all' ? ` (match.transport 'all' takes UDP too)` : ''}: ${what}`;
    // A passthrough route takes QUIC by the SNI of its Initial packets (and, with 'all', TLS over
    // TCP by its ClientHello): it may name domains and carry `action.tls` in that mode only.
    const tls = isRecord(a.tls) ? a.tls : undefined;
    const passesQuic = tls?.mode === 'passthrough';
    for (const [key, what] of NOT_IN_DATAGRAMS) {
      if (key === 'domains' && passesQuic) continue;
      // An empty list asks for nothing, as the engine reads it.
      const value = m[key];
      if (value !== undefined && !(Array.isArray(value) && value.length === 0)) add(`match.${key}`, relay(what));
    }
    const balancing = isRecord(a.loadBalancing) ? a.loadBalancing : {};
    if (transport === 'udp' && balancing.healthCheck !== undefined) {
      add('action.loadBalancing.healthCheck', relay('health checks probe over TCP or HTTP, which a UDP backend may not answer'));
    }
    // Other values of action.tls (not an object, an unknown mode) are the TLS checks' to refuse.
    if (tls?.mode === 'terminate' || tls?.mode === 'terminate-and-reencrypt') {
      add('action.tls', relay(`the proxy does not terminate TLS on them (only 'passthrough', routing QUIC by SNI); HTTP/3 termination is action.http3 on a TCP route`));
    }
    if (a.forwardingEngine === 'nftables') add('action.forwardingEngine', relay('kernel forwarding takes UDP by action.nftables.protocol, not match.transport'));
    // Each flow is bound to its upstream when it starts: the engine takes fixed targets only.
    const targets: Array<[unknown, string]> = Array.isArray(a.targets)
      ? a.targets.map((t: unknown, i: number): [unknown, string] => [t, `action.targets[${i}]`])
      : a.target !== undefined ? [[a.target, 'action.target']] : [];
    for (const [t, field] of targets) {
      if (!isRecord(t)) continue;
      if (typeof t.host === 'function') add(`${field}.host`, relay('a target host is a name or address (or a list of them), not a function'));
      if (typeof t.port === 'function' || t.port === 'preserve') add(`${field}.port`, relay(`a target port is a number, not ${t.port === 'preserve' ? `'preserve'` : 'a function'}`));
    }
  }

  let settings: TRecord = {};
  if (a.udp !== undefined) {
    if (transport === 'tcp') add('action.udp', `needs match.transport 'udp' or 'all' (this route takes TCP only)`);
    if (isRecord(a.udp)) settings = a.udp;
    else add('action.udp', `expected an object, got ${show(a.udp)}`);
  }
  const { sessionTimeout, maxSessionsPerIP, maxDatagramSize } = settings;
  if (sessionTimeout !== undefined && (typeof sessionTimeout !== 'number' || !Number.isSafeInteger(sessionTimeout) || sessionTimeout < 1000)) {
    add('action.udp.sessionTimeout', `expected an integer number of milliseconds, at least 1000, got ${show(sessionTimeout)}`);
  }
  if (maxSessionsPerIP !== undefined && (typeof maxSessionsPerIP !== 'number' || !Number.isInteger(maxSessionsPerIP) || maxSessionsPerIP < 1 || maxSessionsPerIP > U32_MAX)) {
    add('action.udp.maxSessionsPerIP', `expected a positive integer (at most ${U32_MAX}), got ${show(maxSessionsPerIP)}`);
  }
  if (maxDatagramSize !== undefined && (typeof maxDatagramSize !== 'number' || !Number.isInteger(maxDatagramSize) || maxDatagramSize < 1 || maxDatagramSize > 65535)) {
    add('action.udp.maxDatagramSize', `expected an integer from 1 to 65535, got ${show(maxDatagramSize)}`);
  }

  const udp: INativeUdp | null =
    takesUdp && problems.length === 0
      ? {
          sessionTimeoutMs: (sessionTimeout as number | undefined) ?? UDP_DEFAULTS.sessionTimeout,
          maxSessionsPerIp: (maxSessionsPerIP as number | undefined) ?? UDP_DEFAULTS.maxSessionsPerIP,
          maxDatagramSize: (maxDatagramSize as number | undefined) ?? UDP_DEFAULTS.maxDatagramSize,
        }
      : null;
  return { transport, udp, problems };
}
