//! `enableDetailedLogging`: one process-wide tracing subscriber writing to stderr, installed by the
//! first engine that asks for it. Without it, the engine's tracing events cost a disabled check.

use std::sync::Once;

static INSTALL: Once = Once::new();

pub fn enable_detailed_logging() {
    INSTALL.call_once(|| {
        // Another subscriber may already be installed by the embedding process: keep it.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::stderr)
            .with_target(false)
            .try_init();
    });
}
