//! Moving bytes between two established TCP connections: a bidirectional relay with half-close,
//! client-side byte accounting, idle and lifetime limits. Knows nothing of routes or protocols.

mod activity;
mod relay;

pub use activity::Activity;
pub use relay::{relay, relay_streams, ByteSinks, Held, RelayEnd, RelayLimits};
