// The native engine, loaded through the loader `napi build --esm` generates at the package root.
// Nothing else in the wrapper imports the binding directly.
export { NativeEngine } from '../index.js';
export type { RouteContext, SocketHandoff, SocketReport, TargetAnswer, TargetCall } from '../index.js';
