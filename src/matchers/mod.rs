//! The patterns that routing and security both match against: domain patterns (exact, wildcard),
//! client IP lists (addresses, CIDR, ranges, wildcards) and path patterns. A leaf: it imports
//! nothing else of the crate, so that routing and security can share it without depending on each
//! other for it.

pub mod domain;
pub mod ip;
pub mod path;
