//! TLS: the ClientHello parser used for SNI routing and passthrough; the acceptor configs that
//! terminate TLS with a route's certificate; the connector configs that re-encrypt to upstreams.
//! Automatic certificates live in `dynamic` slots the acceptors resolve from at each handshake.
//! Knows nothing of routes or sessions: it turns PEM and settings into rustls configs.

pub mod client_hello;
pub mod config;
pub mod dynamic;
