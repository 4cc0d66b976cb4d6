//! The HTTP engine: the edge rules and the one reading of a plain connection's first request head, and the reverse proxy behind terminated TLS
//! or on plain ports (our own HTTP/1.x codec on both sides (`h1`), the `h2` crate for HTTP/2 clients (`h2`) and hyper for HTTP/2 backends; per-request routing, header rewriting, pooled
//! upstream connections, WebSocket tunnels). Knows nothing of napi or of how a connection was
//! accepted; the session hands it a stream and a context.

pub mod alt_svc;
pub mod body;
pub mod edge;
pub mod h1;
pub mod h2;
pub mod h3;
pub mod head;
pub mod headers;
pub mod io;
pub mod pool;
pub mod pipeline;
pub mod read_buffer;
pub mod server;
pub mod watchdog;
pub mod websocket;
