// The package's public surface: the SmartProxy class and its types (see API.md).
export { SmartProxy } from './smart-proxy.js';
export { SmartProxyConfigError } from './utils/normalize-options.js';
export { isValidPort } from './utils/port-range.js';
export type * from './models/route-types.js';
export type * from './models/options.js';

// Route helpers, matchers, validators and socket handlers (API.md "Helpers").
export {
  createHttpRoute,
  createHttpsTerminateRoute,
  createHttpsPassthroughRoute,
  createHttpToHttpsRedirect,
  createCompleteHttpsServer,
  createLoadBalancerRoute,
  createApiRoute,
  createWebSocketRoute,
  createSocketHandlerRoute,
  createPortMappingRoute,
  createOffsetPortMappingRoute,
  createDynamicRoute,
  createUdpForwardRoute,
  createUdpHandlerRoute,
  createApiGatewayRoute,
  createNfTablesRoute,
  createNfTablesTerminateRoute,
  createCompleteNfTablesHttpsServer,
  addRateLimiting,
  addBasicAuth,
  addJwtAuth,
  mergeRouteConfigs,
} from './utils/route-helpers.js';
export type {
  TDomains,
  THelperTarget,
  THelperCertificate,
  TRouteOverrides,
  IHttpsTerminateRouteOptions,
  ICompleteHttpsServerOptions,
  IApiRouteOptions,
  IWebSocketRouteOptions,
  ISocketHandlerRouteOptions,
  IPortMappingRouteOptions,
  IOffsetPortMappingRouteOptions,
  IDynamicRouteOptions,
  IUdpForwardRouteOptions,
  IUdpHandlerRouteOptions,
  INfTablesRouteOptions,
  INfTablesTerminateRouteOptions,
  ICompleteNfTablesHttpsServerOptions,
  IRateLimitOptions,
  IBasicAuthOptions,
  IJwtAuthOptions,
} from './utils/route-helpers.js';
export {
  routeMatchesDomain,
  routeMatchesPort,
  routeMatchesPath,
  findMatchingRoutes,
  findBestMatchingRoute,
  isValidDomain,
  validateRouteConfig,
  validateRoutes,
  assertValidRoute,
} from './utils/route-utils.js';
export type { IRouteMatchQuery, IRouteValidationResult } from './utils/route-utils.js';
export { SocketHandlers, NATIVE_SOCKET_HANDLER, nativeSpecOf } from './utils/socket-handlers.js';
export type {
  TNativeSocketHandlerSpec,
  IHttpServerRequest,
  IHttpServerResponse,
  THttpServerHandler,
  TLineHandler,
} from './utils/socket-handlers.js';
