// HTTP/3 on a route (API.md "HTTP/3, QUIC and UDP"): `action.http3`, and what a route serving it
// must be. Both validators run this check (normalizeOptions fails on the first problem,
// validateRouteConfig lists them all), so they refuse the same routes in the same words.
import type { INativeHttp3 } from '../models/native-config.js';
import { HTTP3_ALT_SVC_MAX_AGE } from '../models/option-schema.js';
import { isRecord, type TRecord, show, U32_MAX } from './check-values.js';

export interface IHttp3RouteCheck {
  /** `action.http3` with its defaults, for a route enabling it without problems; otherwise null. */
  http3: INativeHttp3 | null;
  /** Each problem with the field it is about (`action.http3`, `action.http3.altSvcMaxAge`, ...), in the order found. */
  problems: Array<{ field: string; reason: string }>;
}

/** Why HTTP/3 needs TLS ending in the proxy, in both validators' words. */
const NEEDS_TERMINATE = `HTTP/3 ends QUIC, and its TLS, in the proxy: the route needs action.tls.mode 'terminate' or 'terminate-and-reencrypt'`;

/**
 * The HTTP/3 side of a route: the problems of `action.http3` and, when it is enabled, of the route
 * serving it; and the native `action.http3` (defaults filled in) when it is enabled without
 * problems. `match` and `action` are the route's as the user wrote them (never changed); values of
 * the wrong shape elsewhere (`action.type`, `action.tls.mode`, `match.transport`) are left to the
 * other checks.
 */
export function checkHttp3Route(match: unknown, action: unknown): IHttp3RouteCheck {
  const problems: IHttp3RouteCheck['problems'] = [];
  const add = (field: string, reason: string): void => {
    problems.push({ field, reason });
  };
  const a = isRecord(action) ? action : {};
  if (a.http3 === undefined) return { http3: null, problems };
  if (!isRecord(a.http3)) {
    add('action.http3', `expected an object with enabled (true or false), got ${show(a.http3)}`);
    return { http3: null, problems };
  }
  const { enabled, altSvcMaxAge } = a.http3;
  if (enabled === undefined) add('action.http3.enabled', 'required (true or false)');
  else if (typeof enabled !== 'boolean') add('action.http3.enabled', `expected true or false, got ${show(enabled)}`);
  if (altSvcMaxAge !== undefined && (typeof altSvcMaxAge !== 'number' || !Number.isInteger(altSvcMaxAge) || altSvcMaxAge < 0 || altSvcMaxAge > U32_MAX)) {
    add('action.http3.altSvcMaxAge', `expected an integer number of seconds from 0 to ${U32_MAX}, got ${show(altSvcMaxAge)}`);
  }

  if (enabled === true) {
    const m = isRecord(match) ? match : {};
    // QUIC takes the route's UDP ports; a route relaying datagrams on them would want them too.
    if (m.transport === 'udp' || m.transport === 'all') {
      add(
        'action.http3',
        `HTTP/3 takes the route's UDP ports for QUIC, which match.transport '${m.transport}' would relay as datagrams: enable it on a route with match.transport 'tcp' (the default)`,
      );
    }
    if (a.type === 'socket-handler') {
      add('action.http3', `HTTP/3 requests go to the route's targets: a 'socket-handler' route hands connections to a function instead (use action.type 'forward')`);
    }
    // An unknown mode (or a `tls` of the wrong shape) is the TLS checks' to report.
    if (a.tls === undefined) add('action.http3', `${NEEDS_TERMINATE} (this route has no action.tls)`);
    else if (isRecord(a.tls) && a.tls.mode === 'passthrough') add('action.http3', `${NEEDS_TERMINATE}, not 'passthrough'`);
    if (isRecord(a.options) && a.options.raw === true) {
      add('action.http3', 'HTTP/3 carries HTTP requests, which a raw route (action.options.raw) does not read: it relays bytes as they come');
    }
    if (a.forwardingEngine === 'nftables') {
      add('action.http3', `HTTP/3 is served by the proxy itself: kernel forwarding (forwardingEngine: 'nftables') only moves packets`);
    }
  }

  const http3: INativeHttp3 | null =
    enabled === true && problems.length === 0 ? { altSvcMaxAge: (altSvcMaxAge as number | undefined) ?? HTTP3_ALT_SVC_MAX_AGE } : null;
  return { http3, problems };
}
