// The public SmartProxy class: validates and normalises options (synchronously, in the
// constructor), drives the native engine, and keeps the Node process alive while started.
import { EventEmitter } from 'node:events';
import { X509Certificate } from 'node:crypto';

import { ScriptBridge } from './bridge.js';
import { NativeEngine } from './native.js';
import { createMetrics } from './metrics.js';
import type { ICertStatus, IMetrics, ISmartProxyOptions, IStatistics } from './models/options.js';
import type { IRouteConfig } from './models/route-types.js';
import type { INativeAcme, INativeConfig } from './models/native-config.js';
import { FunctionRegistry, normalizeOptions, SmartProxyConfigError } from './utils/normalize-options.js';
import type { INormalizedOptions } from './utils/normalize-options.js';

// A timer this long never fires; it only holds the event loop open while the proxy runs, because
// the engine's own threads do not.
const KEEP_ALIVE_INTERVAL_MS = 2 ** 30;

/** Events produced only while someone listens (ext). */
const OPTIONAL_EVENTS = ['connection', 'route-matched'] as const;

export class SmartProxy extends EventEmitter {
  public settings: ISmartProxyOptions;
  private readonly engine: NativeEngine;
  private readonly bridge: ScriptBridge;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  /** Serialises route updates: each waits for the previous one. */
  private routeUpdates: Promise<void> = Promise.resolve();
  /** The config the engine runs (what the current routes became). */
  private nativeConfig: INativeConfig;
  /**
   * Routes (by certName) whose `certProvisionFunction` failed in its last round with no ACME order
   * to follow (`certProvisionFallbackToAcme: false`). The engine only hears of certificates that
   * were installed, so it would report such a route as 'pending' forever.
   */
  private readonly customFailures = new Map<string, { domain: string; error: string }>();

  constructor(options: ISmartProxyOptions) {
    super();
    this.bridge = new ScriptBridge(this, () => this.callTimeoutMs(), () => this.settings.logger);
    const { config } = normalizeAndWarn(options, this.bridge.functions);
    this.settings = options;
    this.nativeConfig = config;
    this.engine = createEngine(config, this.bridge);
    this.watchListeners();
  }

  /**
   * Binds every route port (all or none) and starts proxying. Automatic certificates: stored ones
   * are served at once, missing ones are ordered in the background once the ports listen; with
   * `certProvisionFunction`, its certificates are installed before this resolves.
   */
  public async start(): Promise<void> {
    try {
      await this.engine.start();
    } catch (err) {
      throw withErrnoCode(err);
    }
    this.keepAliveTimer ??= setInterval(() => undefined, KEEP_ALIVE_INTERVAL_MS);
    await this.provisionCustom(autoCertificates(this.nativeConfig));
  }

  /** Stops accepting, lets open connections finish within `gracefulShutdownTimeout`, then closes. */
  public async stop(): Promise<void> {
    try {
      await this.routeUpdates;
      await this.engine.stop();
    } finally {
      this.bridge.closeAll();
      if (this.keepAliveTimer !== undefined) {
        clearInterval(this.keepAliveTimer);
        this.keepAliveTimer = undefined;
      }
    }
  }

  /** Swaps the routes atomically; calls are applied one after another in call order. */
  public updateRoutes(routes: IRouteConfig[]): Promise<void> {
    const next = this.routeUpdates.then(async () => {
      const options = { ...this.settings, routes };
      const { config } = normalizeAndWarn(options, this.bridge.functions);
      try {
        await this.engine.updateRoutes(config);
        const known = new Set(autoCertificates(this.nativeConfig).map((acme) => acme.certName));
        this.settings = options;
        this.nativeConfig = config;
        const live = new Set(autoCertificates(config).map((acme) => acme.certName));
        for (const name of this.customFailures.keys()) if (!live.has(name)) this.customFailures.delete(name);
        if (this.keepAliveTimer !== undefined) await this.provisionCustom(autoCertificates(config).filter((acme) => !known.has(acme.certName)));
      } catch (err) {
        throw withErrnoCode(asConfigError(err));
      } finally {
        // Functions no table in use refers to any more (connections keep the table they began with).
        this.bridge.functions.retain(new Set(this.engine.liveFunctionIds()));
      }
    });
    // A failed update must not poison the ones queued after it.
    this.routeUpdates = next.catch(() => undefined);
    return next;
  }

  public async addListeningPort(port: number): Promise<void> {
    try {
      await this.engine.addListeningPort(port);
    } catch (err) {
      throw withErrnoCode(err);
    }
  }

  public async removeListeningPort(port: number): Promise<void> {
    await this.engine.removeListeningPort(port);
  }

  public getListeningPorts(): number[] {
    return this.engine.listeningPorts();
  }

  public getStatistics(): IStatistics {
    return this.engine.statistics() as IStatistics;
  }

  public getMetrics(): IMetrics {
    return createMetrics(this.engine);
  }

  /**
   * (ext) The engine's counters in the Prometheus text exposition format (0.0.4), names starting
   * with `smartproxy_`: what `metrics.prometheus` serves.
   */
  public getPrometheusMetrics(): string {
    return this.engine.prometheusMetrics();
  }

  /**
   * (ext) Reopens the access log's file by its path, once the lines already queued are written:
   * what logrotate's `postrotate` asks for after renaming the file (the CLI does it on SIGUSR1).
   */
  public reopenLogs(): void {
    this.engine.reopenLogs();
  }

  /**
   * Gets the route's certificate now: from `certProvisionFunction` when set, else (or when it
   * answers 'http01') from ACME. Rejects with the reason when that fails.
   */
  public async provisionCertificate(routeName: string): Promise<void> {
    const acme = this.autoCertificate(routeName);
    if (this.settings.certProvisionFunction !== undefined && !(await this.provisionCustom([acme], false))) {
      const failure = this.customFailures.get(acme.certName);
      if (failure !== undefined) throw new Error(failure.error);
      return;
    }
    await this.engine.orderCertificate(acme.certName);
  }

  /** Orders a new ACME certificate for the route now; open connections keep the old one. */
  public async renewCertificate(routeName: string): Promise<void> {
    const acme = this.autoCertificate(routeName);
    // From here on ACME decides the route's status.
    this.customFailures.delete(acme.certName);
    await this.engine.orderCertificate(acme.certName);
  }

  /** The certificate state of a route: automatic ones from the engine, static ones from their PEM. */
  public getCertificateStatus(routeName: string): ICertStatus | undefined {
    const route = this.nativeConfig.routes.find((r) => r.name === routeName || r.action.tls?.acme?.certName === routeName);
    const tls = route?.action.tls;
    if (tls?.acme) {
      const status = this.engine.certificateStatus(tls.acme.certName) as INativeCertStatus | null;
      if (status === null) return undefined;
      const result: ICertStatus = { domain: status.domain, status: status.status, source: status.source };
      if (status.expiryDate !== null) result.expiryDate = new Date(status.expiryDate);
      if (status.issueDate !== null) result.issueDate = new Date(status.issueDate);
      if (status.error !== null) result.error = status.error;
      // Nothing installed yet, or not for every domain, because certProvisionFunction failed: an
      // error, not a wait. A certificate ACME installed since then is the engine's to report.
      const failure = this.customFailures.get(tls.acme.certName);
      if (failure !== undefined && (status.status === 'pending' || (status.status === 'valid' && status.source === 'custom'))) {
        result.status = 'error';
        result.error = failure.error;
      }
      return result;
    }
    if (!tls?.certificate) return undefined;
    try {
      const cert = new X509Certificate(tls.certificate.cert);
      const expiryDate = new Date(cert.validTo);
      const status = expiryDate.getTime() <= Date.now() ? 'expired' : 'valid';
      return { domain: route?.match.domains[0] ?? '', status, expiryDate, issueDate: new Date(cert.validFrom), source: 'static' };
    } catch {
      return { domain: route?.match.domains[0] ?? '', status: 'error', source: 'static', error: 'the certificate PEM cannot be read' };
    }
  }

  /** The names automatic certificates are obtained for (wildcards excluded: HTTP-01 cannot prove them). */
  public getEligibleDomainsForCertificates(): string[] {
    return [...new Set(autoCertificates(this.nativeConfig).flatMap((acme) => acme.domains))];
  }

  private autoCertificate(routeName: string): INativeAcme {
    const acme = autoCertificates(this.nativeConfig).find((a) => a.certName === routeName);
    if (acme === undefined) throw new Error(`no route named ${JSON.stringify(routeName)} has certificate: 'auto'`);
    return acme;
  }

  /**
   * Asks `certProvisionFunction` for each domain of these routes and installs what it returns.
   * Routes where it answered 'http01' (or failed, with fallback) are ordered over ACME: in the
   * background when `background`, else reported by the return value (true: ACME is needed).
   */
  private async provisionCustom(routes: INativeAcme[], background = true): Promise<boolean> {
    const provision = this.settings.certProvisionFunction;
    if (provision === undefined) return true;
    const fallback = this.settings.certProvisionFallbackToAcme !== false;
    let acmeNeeded = false;
    for (const acme of routes) {
      let needsAcme = false;
      let failure: { domain: string; error: string } | undefined;
      for (const domain of acme.domains) {
        try {
          const answer = await withTimeout(Promise.resolve(provision(domain)), this.callTimeoutMs());
          if (answer === 'http01') {
            needsAcme = true;
            continue;
          }
          if (typeof answer !== 'object' || answer === null || typeof answer.publicKey !== 'string' || typeof answer.privateKey !== 'string') {
            throw new Error(`certProvisionFunction answered neither 'http01' nor a certificate object for ${domain}`);
          }
          this.engine.installCertificate(acme.certName, domain, answer.publicKey, answer.privateKey);
        } catch (err) {
          const error = err instanceof Error ? err.message : String(err);
          if (fallback) needsAcme = true;
          else {
            failure ??= { domain, error: `certProvisionFunction failed for ${domain}: ${error}` };
            // Recorded before the event, so a listener already sees the route's 'error' status.
            this.customFailures.set(acme.certName, failure);
            this.emit('certificate-failed', { routeName: acme.certName, domain, error });
          }
        }
      }
      // An ACME order covers every domain of the route, the failed ones too.
      if (failure === undefined || needsAcme) this.customFailures.delete(acme.certName);
      if (!needsAcme) continue;
      const status = this.engine.certificateStatus(acme.certName) as INativeCertStatus | null;
      if (status?.status === 'valid' && status.source === 'acme') continue;
      if (background) this.engine.orderCertificateInBackground(acme.certName);
      acmeNeeded = true;
    }
    return acmeNeeded;
  }

  private callTimeoutMs(): number {
    const timeout = this.settings.jsCallTimeout;
    return typeof timeout === 'number' && Number.isFinite(timeout) && timeout > 0 ? timeout : 30000;
  }

  /** Also brings back the listener watch when every listener, the watch's own included, is removed. */
  public override removeAllListeners(event?: string | symbol): this {
    super.removeAllListeners(event);
    if (event === undefined || event === 'newListener' || event === 'removeListener') this.watchListeners();
    this.updateEventInterest();
    return this;
  }

  private watchListeners(): void {
    if (!this.listeners('newListener').includes(this.onNewListener)) this.on('newListener', this.onNewListener);
    if (!this.listeners('removeListener').includes(this.onRemoveListener)) this.on('removeListener', this.onRemoveListener);
  }

  private readonly onNewListener = (event: string | symbol): void => this.updateEventInterest(event);
  private readonly onRemoveListener = (): void => this.updateEventInterest();

  /** 'newListener' fires before the listener is added, so the event it names counts as listened. */
  private updateEventInterest(adding?: string | symbol): void {
    const listened = (event: (typeof OPTIONAL_EVENTS)[number]): boolean => adding === event || this.listenerCount(event) > 0;
    this.engine.setEventInterest(listened('connection'), listened('route-matched'));
  }
}

function normalizeAndWarn(options: ISmartProxyOptions, functions: FunctionRegistry): INormalizedOptions {
  const normalized = normalizeOptions(options, functions);
  for (const warning of normalized.warnings) {
    process.emitWarning(warning, { code: 'SMARTPROXY_CONFIG' });
  }
  return normalized;
}

function createEngine(config: INativeConfig, bridge: ScriptBridge): NativeEngine {
  try {
    const engine = new NativeEngine(config, bridge.onSocket, bridge.resolveTarget, bridge.onEvent, bridge.onDatagram);
    bridge.attachEngine(engine);
    return engine;
  } catch (err) {
    throw asConfigError(err);
  }
}

/** The engine's own config checks (patterns, ports) surface as the wrapper's config errors. */
function asConfigError(err: unknown): unknown {
  if (err instanceof Error && (err as NodeJS.ErrnoException).code === 'InvalidArg') {
    const routePath = /^(routes\[\d+\](?: "[^"]*")?|options)/.exec(err.message);
    return new SmartProxyConfigError(err.message, routePath?.[1] ?? '');
  }
  return err;
}

/** `EADDRINUSE: port 80 is already in use` gets `code: 'EADDRINUSE'` and `port: 80`, as Node's own. */
function withErrnoCode(err: unknown): unknown {
  if (err instanceof Error) {
    const match = /^(E[A-Z]+): .*?port (\d+)/.exec(err.message);
    if (match) {
      const errno = err as NodeJS.ErrnoException & { port?: number };
      errno.code = match[1];
      errno.port = Number(match[2]);
    }
  }
  return err;
}

interface INativeCertStatus {
  domain: string;
  status: 'valid' | 'pending' | 'expired' | 'error';
  expiryDate: number | null;
  issueDate: number | null;
  source: 'acme' | 'custom';
  error: string | null;
}

function autoCertificates(config: INativeConfig): INativeAcme[] {
  return config.routes.flatMap((route) => (route.action.tls?.acme ? [route.action.tls.acme] : []));
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`certProvisionFunction did not settle within ${ms} ms (jsCallTimeout)`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
