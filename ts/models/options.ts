// ISmartProxyOptions and the shapes SmartProxy returns (API.md "ISmartProxyOptions", "IMetrics").
import type { IRouteConfig, IRouteSecurity, IRouteTarget } from './route-types.js';

/** The original's certificate object (`certProvisionFunction` may return one). */
export interface TSmartProxyCertProvisionObject {
  id?: string;
  domainName: string;
  created?: number;
  validUntil: number;
  privateKey: string;
  /** The certificate chain, PEM. */
  publicKey: string;
  csr?: string;
}

export interface IAcmeOptions {
  /** Required when any route uses `certificate: 'auto'`. Alias: `accountEmail`. */
  email?: string;
  accountEmail?: string;
  /** HTTP-01 challenge port (default 80). */
  port?: number;
  /** Default false (staging). */
  useProduction?: boolean;
  environment?: 'production' | 'staging';
  /** Default 30. */
  renewThresholdDays?: number;
  /** Default true. */
  autoRenew?: boolean;
  /** Default './certs'. */
  certificateStore?: string;
  /** Default 24. */
  renewCheckIntervalHours?: number;
  /** (ext) Any RFC 8555 directory. */
  directoryUrl?: string;
  /** (ext) PEM CA file to trust for the directory's HTTPS. */
  directoryCaFile?: string;
}

/** (ext) One event of the engine's log, as `logger` receives it. */
export interface ILogEntry {
  level: 'error' | 'warn' | 'info' | 'debug';
  message: string;
  /** Structured facts of the event (`route`, `host`, `port`, `error`, …), when it has any. */
  fields?: Record<string, string | number | boolean>;
}

export interface ISmartProxyOptions {
  routes: IRouteConfig[];
  defaults?: { target?: IRouteTarget; security?: IRouteSecurity; preserveSourceIP?: boolean };
  /** Default false. */
  acceptProxyProtocol?: boolean;
  /** Trusted PROXY-protocol senders. */
  proxyIPs?: string[];
  /** Default false. */
  sendProxyProtocol?: boolean | 1 | 2;
  /** ms; default 120000. */
  initialDataTimeout?: number;
  /** ms; default 3600000. */
  socketTimeout?: number;
  /** ms; default 14400000. */
  inactivityTimeout?: number;
  /** ms; default 86400000. */
  maxConnectionLifetime?: number;
  /** ms; default 30000. */
  gracefulShutdownTimeout?: number;
  /** Default 100. */
  maxConnectionsPerIP?: number;
  /** Default 300. */
  connectionRateLimitPerMinute?: number;
  /** Default true. */
  noDelay?: boolean;
  /** Default true. */
  keepAlive?: boolean;
  /** ms; default 10000. */
  keepAliveInitialDelay?: number;
  /** Bytes; default 10 MiB. */
  maxPendingDataSize?: number;
  /** Default false. With it, `debug` events are logged too (per connection: noisy). */
  enableDetailedLogging?: boolean;
  /**
   * (ext) Receives the engine's log events (`info` and above; `debug` too with
   * `enableDetailedLogging`): a backend marked down or up, a certificate issued or failed, Redis
   * lost and regained, routes updated, start and stop. Delivered in batches, at most 100 per
   * second (the excess is counted and reported in one `warn` entry). Without it, the events go to
   * standard error, one line each. A logger that throws loses that entry, nothing else.
   */
  logger?: (entry: ILogEntry) => void;
  acme?: IAcmeOptions;
  certProvisionFunction?: (domain: string) => Promise<TSmartProxyCertProvisionObject | 'http01'>;
  /** Default true. */
  certProvisionFallbackToAcme?: boolean;
  metrics?: {
    enabled?: boolean;
    sampleIntervalMs?: number;
    retentionSeconds?: number;
    /**
     * (ext) Serve the Prometheus text exposition (the same text as `getPrometheusMetrics()`) on
     * `host:port` (default host 127.0.0.1) at `path` (default /metrics) while started.
     */
    prometheus?: { port: number; host?: string; path?: string };
  };
  /**
   * (ext) The operator's listener while started: `/` a status page, `/api/status` (JSON),
   * `/metrics` (Prometheus), `/healthz` (200 running, 503 stopping). With `token`, `/api/status`,
   * `/metrics` and any other path need `Authorization: Bearer <token>`; `/healthz` and the page
   * (which holds no data, and reads the token from `#token=…` for its requests) do not.
   */
  admin?: { port: number; host?: string; token?: string };
  /**
   * (ext) One line per HTTP request and per TCP connection, appended to `path` (standard output
   * without one) as JSON (default) or Apache's combined format, by a writer off the request path:
   * lines that find its queue full are dropped and counted (`smartproxy_access_log_dropped_total`).
   * No query string and no credential is ever written. `reopenLogs()` reopens the file.
   */
  accessLog?: { enabled: boolean; path?: string; format?: 'json' | 'combined' };
  /** (ext) Tokio worker threads; default one per core. */
  workerThreads?: number;
  /**
   * (ext) Shared state across replicas: session affinity, `'auto'` certificates (one replica orders,
   * the others load the result), HTTP-01 challenge tokens and route rate limits.
   */
  redis?: {
    /** `redis://` or `rediss://` URL. */
    url: string;
    /** Prefix of every key this proxy writes; default `'smartproxy:'`. */
    keyPrefix?: string;
    /**
     * (ext) Base64 (standard alphabet, padding optional) of exactly 32 bytes: private keys stored in
     * Redis are sealed with AES-256-GCM under it. Every replica needs the same key; without one
     * they are stored in the clear.
     */
    encryptionKey?: string;
    /**
     * (ext) ms between two reads of the certificates in Redis, which catch any renewal the pub/sub
     * notice missed; an integer from 100 to 86400000, default 5000.
     */
    syncIntervalMs?: number;
  };
  /** (ext) ms; default 30000. */
  jsCallTimeout?: number;
  /** (ext) Largest HTTP request head in bytes; over it the answer is 431. Default 65536. */
  maxHeaderSize?: number;
  /** (ext) ms a request head may take from its first byte; default 30000. */
  headerTimeout?: number;
  /** (ext) HTTP/2 streams per client connection, advertised and enforced; default 256. */
  http2MaxConcurrentStreams?: number;
  /**
   * (ext) Keep a client's own `X-Forwarded-*`, `Forwarded` and `X-Real-IP` when its peer is in
   * `proxyIPs`; otherwise they are replaced, even from trusted peers. Default false.
   */
  trustForwardedHeaders?: boolean;
  /** (ext) ms a client connection may sit idle between HTTP requests before it is closed; default 120000. */
  httpKeepAliveTimeout?: number;
}

export interface ICertStatus {
  domain: string;
  status: 'valid' | 'pending' | 'expired' | 'error';
  expiryDate?: Date;
  issueDate?: Date;
  source: 'static' | 'acme' | 'custom';
  error?: string;
}

export interface IStatistics {
  activeConnections: number;
  tlsConnections: number;
  nonTlsConnections: number;
  /** (ext) Client connections the HTTP engine serves right now (plain HTTP or terminated TLS). */
  httpConnections: number;
  /** (ext) WebSocket tunnels open right now (each also counts in activeConnections and httpConnections). */
  websocketConnections: number;
  /** (ext) WebSocket tunnels opened since start. */
  websocketTotal: number;
  totalConnections: number;
  /** (ext) Requests the HTTP engine has handled. */
  httpRequests: number;
  /** (ext) Calls made into JavaScript: function targets and socket hand-offs (0 for routes without functions). */
  jsCalls: number;
  /** (ext) Read buffers lent to HTTP/1 connections that have bytes to work on right now, across every proxy in this process; idle connections hold none, so it is 0 when no connection is working. */
  readBuffersLent: number;
  /** (ext) 'connection' / 'route-matched' / 'error' events dropped because the JavaScript thread fell 10 000 behind. */
  droppedEvents: number;
  /** Enabled routes. */
  routes: number;
  listeningPorts: number[];
  /** (ext) The UDP ports routes take datagrams on (`match.transport` 'udp' or 'all'). */
  udpPorts: number[];
  /** (ext) The UDP ports HTTP/3 (QUIC) is served on (`action.http3`). */
  quicPorts: number[];
  /** How many connections ended for each reason (reasons never seen are absent). */
  terminationReasons: Record<string, number>;
  bytesIn: number;
  bytesOut: number;
  /** (ext) Per route name: requests refused by its rate limit (429), authentication (401) and IP lists (403). */
  refusals: Record<string, { rateLimited: number; unauthorized: number; forbidden: number }>;
  /** (ext) Per route with static targets: each backend's health (active and passive checks) and in-flight connections or requests. */
  backends: Record<string, Array<{ host: string; port: number; healthy: boolean; inFlight: number }>>;
  /** (ext) Session affinity since start: lookups, of them Redis round trips, Redis failures answered from memory, entries held in memory, entries evicted to keep routes within `affinity.maxKeys`. */
  affinity: { lookups: number; redisLookups: number; redisFallbacks: number; memoryEntries: number; evictions: number } | null;
  /** (ext) State shared through `options.redis` (certificates, rate limits) since start; null without `options.redis`. */
  sharedState: ISharedStateStats | null;
  /** (ext) UDP flows (client address and port ↔ one upstream socket) open right now, over every route taking UDP. */
  udpSessions: number;
  /** (ext) UDP relaying since start, over every route taking UDP; null when no route takes UDP. */
  udp: IUdpStats | null;
  /** (ext) QUIC (HTTP/3) client connections open right now; each is also one of `activeConnections` (and of `tlsConnections`). */
  quicConnections: number;
  /** (ext) QUIC since start; null when no route serves HTTP/3. */
  quic: IQuicStats | null;
  /** (ext) Rate-limit keys evicted to keep routes within `rateLimit.maxKeys` (the routes in force). */
  rateLimitEvictions: number;
  /**
   * (ext) Kernel forwarding (`forwardingEngine: 'nftables'`), null without such routes: whether the
   * engine's nftables table is in use, why not (its routes are then relayed by the Rust core), and
   * per route the packets and bytes of its flows as the kernel counted them (IP packets, read back
   * every second): both ways, and from and to the clients. Those bytes are in `bytesIn`/`bytesOut`
   * and the route's throughput too.
   */
  kernelForwarding: { active: boolean; table: string; unavailable: string | null; routes: Record<string, { packets: number; bytes: number; bytesIn: number; bytesOut: number }> } | null;
}

/**
 * (ext) `IStatistics.udp`: the UDP routes' traffic since start. `In` is from clients, `out` to
 * them (datagrams and their payload bytes); those bytes are in `bytesIn`/`bytesOut` too.
 */
export interface IUdpStats {
  /** Flows opened since start. */
  sessionsTotal: number;
  datagramsIn: number;
  datagramsOut: number;
  bytesIn: number;
  bytesOut: number;
  /** Datagrams not relayed: larger than `maxDatagramSize`, over a flow limit, refused by the route's security, or undeliverable. */
  dropped: number;
}

/** (ext) `IStatistics.quic`: QUIC connections of the routes serving HTTP/3 (`action.http3`). Their bytes (UDP payload, QUIC's own included) are in `bytesIn`/`bytesOut` once each connection ends. */
export interface IQuicStats {
  /** Connections whose handshake completed. */
  connectionsTotal: number;
  /** Handshakes that failed or timed out (no route for the SNI, no certificate, a client that left). */
  handshakeFailures: number;
  /** Attempts refused: the engine's IP lists and per-IP connection limits and rates (before any handshake work), and the route's IP lists (in the handshake, once the SNI chose the route). */
  refused: number;
  /** Clients sent a Retry to prove their address first (while many handshakes are in progress). */
  retries: number;
  /** Handshakes in progress now. */
  handshaking: number;
}

/** (ext) `IStatistics.sharedState`: this replica's use of the state shared through Redis. */
export interface ISharedStateStats {
  /** Whether the last call to Redis was answered. */
  redisReachable: boolean;
  /** Shared rate-limit checks sent to Redis (one per request of a route with rateLimit). */
  rateLimitCalls: number;
  /** GCRA script calls those checks took: checks of one key that arrive together share one. */
  rateLimitScriptCalls: number;
  /** Checks answered by this replica's own memory because Redis failed. */
  rateLimitFallbacks: number;
  /** Times this replica waited for another replica's certificate order (its lock). */
  lockWaits: number;
  /** Certificates installed from Redis (written by this or another replica). */
  certificatesLoaded: number;
  /** ACME orders this replica placed while holding the lock. */
  ordersPlaced: number;
}

/** Bytes per second, on the client side: `in` from clients, `out` to them. */
export interface IThroughput {
  in: number;
  out: number;
}

export interface IMetrics {
  connections: {
    active(): number;
    total(): number;
    byRoute(): Map<string, number>;
    byIP(): Map<string, number>;
    topIPs(limit?: number): Array<{ ip: string; count: number }>;
  };
  throughput: {
    /** Last second. */
    instant(): IThroughput;
    /** Last 10 s. */
    recent(): IThroughput;
    /** Last 60 s. */
    average(): IThroughput;
    custom(seconds: number): IThroughput;
    history(seconds: number): Array<{ timestamp: number } & IThroughput>;
    byRoute(windowSeconds?: number): Map<string, IThroughput>;
    byIP(windowSeconds?: number): Map<string, IThroughput>;
  };
  requests: {
    perSecond(): number;
    perMinute(): number;
    total(): number;
  };
  totals: {
    bytesIn(): number;
    bytesOut(): number;
    connections(): number;
  };
}
