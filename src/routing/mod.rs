//! Route matching: compiled patterns (domains, client IPs), the immutable `RouteTable` snapshot the
//! engine swaps atomically, and target selection. Knows nothing of sockets, napi or how a
//! connection is relayed; it answers "which route and which backend" from connection facts.

pub mod domain;
pub mod ip;
pub mod path;
pub mod table;

pub use table::{ConnectionFacts, Protocol, RouteTable};
