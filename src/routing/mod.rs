//! Route matching: the immutable `RouteTable` snapshot the engine swaps atomically, built from the
//! shared matchers (`crate::matchers`), and target selection. Knows nothing of sockets, napi or how a
//! connection is relayed; it answers "which route and which backend" from connection facts.

pub mod table;

pub use table::{ConnectionFacts, Protocol, RouteTable};
