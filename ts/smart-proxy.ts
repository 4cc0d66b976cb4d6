// The public SmartProxy class: validates and normalises options (synchronously, in the
// constructor), drives the native engine, and keeps the Node process alive while started.
import { EventEmitter } from 'node:events';

import { ScriptBridge } from './bridge.js';
import { NativeEngine } from './native.js';
import { createMetrics } from './metrics.js';
import type { IMetrics, ISmartProxyOptions, IStatistics } from './models/options.js';
import type { IRouteConfig } from './models/route-types.js';
import type { INativeConfig } from './models/native-config.js';
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

  constructor(options: ISmartProxyOptions) {
    super();
    this.bridge = new ScriptBridge(this, () => this.callTimeoutMs());
    const { config } = normalizeAndWarn(options, this.bridge.functions);
    this.settings = options;
    this.engine = createEngine(config, this.bridge);
    this.watchListeners();
  }

  /** Binds every route port (all or none) and starts proxying. */
  public async start(): Promise<void> {
    try {
      await this.engine.start();
    } catch (err) {
      throw withErrnoCode(err);
    }
    this.keepAliveTimer ??= setInterval(() => undefined, KEEP_ALIVE_INTERVAL_MS);
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
        this.settings = options;
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
    return new NativeEngine(config, bridge.onSocket, bridge.resolveTarget, bridge.onEvent);
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
