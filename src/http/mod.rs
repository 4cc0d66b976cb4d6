//! The HTTP engine: plain-HTTP sniffing for routing, and the reverse proxy behind terminated TLS
//! or on plain ports (hyper server per connection, per-request routing, header rewriting, pooled
//! upstream connections, WebSocket tunnels). Knows nothing of napi or of how a connection was
//! accepted; the session hands it a stream and a context.

pub mod body;
pub mod headers;
pub mod io;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod sniff;
pub mod watchdog;
pub mod websocket;
