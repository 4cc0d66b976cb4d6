//! Moving bytes between two established TCP connections: a bidirectional relay with half-close,
//! client-side byte accounting, idle and lifetime limits. Knows nothing of routes or protocols.

mod relay;

pub use relay::{relay, relay_streams, ByteSinks, RelayEnd, RelayLimits};
