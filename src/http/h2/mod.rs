//! HTTP/2 towards clients, with the `h2` crate (RFC 9113): a client's connection and its streams
//! (`server`), each stream's request going through the shared pipeline. Backends that speak HTTP/2
//! are reached through hyper's client (`http::pool`).

pub mod server;
