// The native engine, loaded through the loader `napi build --esm` generates at the package root.
// Nothing else in the wrapper imports the binding directly.
import { NativeEngine as GeneratedEngine } from '../index.js';
import type { SocketHandoff, SocketReport, TargetAnswer, TargetCall } from '../index.js';

export type { RouteContext, SocketHandoff, SocketReport, TargetAnswer, TargetCall } from '../index.js';

/**
 * A datagram for a `datagramHandler`: `handler` is the function's registry id, the rest where it
 * came from (the client's address and port, the route port it arrived on, the route's name).
 * Declared here, not taken from the generated index.d.ts, so that the wrapper compiles against a
 * binding built before the engine had it.
 */
export interface DatagramCall {
  handler: number;
  data: Buffer;
  clientIp: string;
  clientPort: number;
  port: number;
  routeName?: string | null;
}

/** The engine's methods, with those of UDP handler routes the generated declarations may not list yet. */
export interface NativeEngine extends GeneratedEngine {
  /**
   * Sends `data` from the route's UDP `port` to the client at `clientIp`:`clientPort`; false when
   * that client's flow is gone (idle past its sessionTimeout, or the engine stopped) or the
   * datagram could not be sent.
   */
  udpReply(port: number, clientIp: string, clientPort: number, data: Buffer): boolean;
}

/** The constructor, with `onDatagram` (datagrams for handler routes, fire and forget) after `onEvent`. */
export interface NativeEngineConstructor {
  new (
    config: object,
    onSocket: (handoff: SocketHandoff) => Promise<SocketReport>,
    resolveTarget: (call: TargetCall) => TargetAnswer | Promise<TargetAnswer>,
    onEvent: (message: { type: string; data: object }) => void,
    onDatagram: (call: DatagramCall) => void,
  ): NativeEngine;
}

export const NativeEngine: NativeEngineConstructor = GeneratedEngine as unknown as NativeEngineConstructor;
