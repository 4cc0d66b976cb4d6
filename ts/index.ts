// The package's public surface: the SmartProxy class and its types (see API.md).
export { SmartProxy } from './smart-proxy.js';
export { SmartProxyConfigError } from './utils/normalize-options.js';
export { isValidPort } from './utils/port-range.js';
export type * from './models/route-types.js';
export type * from './models/options.js';
