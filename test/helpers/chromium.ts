// Headless Chromium (Debian's `chromium`) driven over the DevTools protocol with `ws`: load a page,
// collect its console errors and uncaught exceptions, evaluate expressions, take a screenshot.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import WebSocket from 'ws';

export const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

export interface IBrowserPage {
  /** Console errors and uncaught exceptions seen so far. */
  errors: string[];
  evaluate<T>(expression: string): Promise<T>;
  /** A PNG of the viewport. */
  screenshot(): Promise<Buffer>;
  close(): Promise<void>;
}

/** Opens `url` in a fresh headless Chromium and resolves once its load event fired. */
export async function openPage(url: string, size = { width: 1280, height: 1150 }): Promise<IBrowserPage> {
  const profile = mkdtempSync(path.join(tmpdir(), 'smartproxy-chromium-'));
  // The flags keep Chromium off the network (this machine's is closed) and out of the sandbox it
  // cannot set up as root.
  const child: ChildProcess = spawn(
    CHROMIUM,
    [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--hide-scrollbars', `--user-data-dir=${profile}`,
      `--window-size=${size.width},${size.height}`, '--remote-debugging-port=0', 'about:blank',
    ],
    // Its own process group, so that closing takes its renderer and helper processes too.
    { stdio: ['ignore', 'ignore', 'pipe'], detached: true },
  );
  // Removed by close(); at exit too (with Chromium, which would write on into it), should Chromium
  // fail to start or a test end before closing it.
  const removeProfileAtExit = (): void => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // not running
    }
    rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  };
  process.on('exit', removeProfileAtExit);
  const endpoint = await new Promise<string>((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => reject(new Error(`chromium printed no DevTools address: ${seen}`)), 20000);
    child.stderr!.on('data', (chunk: Buffer) => {
      seen += chunk.toString();
      const match = /DevTools listening on (ws:\/\/\S+)/.exec(seen);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    child.once('exit', (code) => reject(new Error(`chromium exited (${code}): ${seen}`)));
  });
  // The browser endpoint: find the blank page's target and attach to it.
  const browser = new WebSocket(endpoint);
  await new Promise((resolve, reject) => browser.once('open', resolve).once('error', reject));
  let nextId = 1;
  const pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void }>();
  const errors: string[] = [];
  let onLoad: (() => void) | undefined;
  browser.on('message', (data: Buffer) => {
    const message = JSON.parse(data.toString());
    if (message.id !== undefined) {
      const waiter = pending.get(message.id);
      pending.delete(message.id);
      if (message.error) waiter?.reject(new Error(message.error.message));
      else waiter?.resolve(message.result);
      return;
    }
    if (message.method === 'Runtime.consoleAPICalled' && message.params.type === 'error') {
      errors.push(message.params.args.map((a: { value?: unknown; description?: string }) => a.value ?? a.description).join(' '));
    } else if (message.method === 'Runtime.exceptionThrown') {
      errors.push(message.params.exceptionDetails.exception?.description ?? message.params.exceptionDetails.text);
    } else if (message.method === 'Log.entryAdded' && message.params.entry.level === 'error') {
      errors.push(`${message.params.entry.source}: ${message.params.entry.text}`);
    } else if (message.method === 'Page.loadEventFired') {
      onLoad?.();
    }
  });
  const send = (method: string, params: object = {}, sessionId?: string): Promise<any> =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve, reject });
      browser.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    });
  const { targetInfos } = await send('Target.getTargets');
  const target = targetInfos.find((t: { type: string }) => t.type === 'page');
  const { sessionId } = await send('Target.attachToTarget', { targetId: target.targetId, flatten: true });
  const call = (method: string, params: object = {}) => send(method, params, sessionId);
  await call('Runtime.enable');
  await call('Log.enable');
  await call('Page.enable');
  const loaded = new Promise<void>((resolve) => (onLoad = resolve));
  await call('Page.navigate', { url });
  await loaded;
  return {
    errors,
    evaluate: async <T>(expression: string): Promise<T> => {
      const { result, exceptionDetails } = await call('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true });
      if (exceptionDetails) throw new Error(exceptionDetails.exception?.description ?? exceptionDetails.text);
      return result.value as T;
    },
    screenshot: async () => Buffer.from((await call('Page.captureScreenshot', { format: 'png' })).data, 'base64'),
    close: async () => {
      browser.close();
      const exited = new Promise((resolve) => (child.exitCode !== null ? resolve(null) : child.once('exit', resolve)));
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
      await exited;
      // A helper process may still be writing its last files for a moment.
      process.off('exit', removeProfileAtExit);
      rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
    },
  };
}
