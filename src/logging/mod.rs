//! The engine's log: one process-wide `tracing` subscriber that takes this crate's events (`info`
//! and above; `debug` too while a running engine has `enableDetailedLogging`), makes each one a
//! `LogEntry` once, and hands it to the sinks of the running engines: the `logger` option's
//! (batched, at most `LOGGER_EVENTS_PER_SECOND`, the excess counted and summed up in one entry),
//! or standard error, one line each, for engines without one and when no engine runs. Events of
//! other crates (h2's, for one) are not ours to report. Knows nothing of napi: entries reach
//! JavaScript through `hooks::Scripts`.
//!
//! Tracing has no notion of which engine an event belongs to, so in a process that runs several,
//! every sink receives the events of all of them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::hooks::{EngineEvent, Scripts};

/// Entries a `logger` receives per second at most.
pub const LOGGER_EVENTS_PER_SECOND: u32 = 100;
/// How long entries gather before they go to JavaScript in one call.
const BATCH_DELAY: Duration = Duration::from_millis(50);
/// Only events of this crate are reported.
const OUR_TARGET: &str = env!("CARGO_CRATE_NAME");

/// One event, as the `logger` option receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }

    fn of(level: &Level) -> LogLevel {
        match *level {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            _ => LogLevel::Debug,
        }
    }
}

/// Where a running engine's log goes.
pub enum LogSink {
    /// The `logger` option, through the engine's JavaScript bridge.
    Logger(Arc<LoggerSink>),
    StandardError,
}

/// An engine's registration; its sink is removed when this is dropped (at stop).
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sinks = REGISTRY.sinks.write();
        sinks.retain(|(id, _, _)| *id != self.id);
        update_level(&sinks);
    }
}

/// Registers a started engine's sink; `detailed` lets `debug` events through while it runs.
pub fn register(sink: LogSink, detailed: bool) -> Registration {
    install();
    let id = REGISTRY.next_id.fetch_add(1, Ordering::Relaxed);
    let mut sinks = REGISTRY.sinks.write();
    sinks.push((id, sink, detailed));
    update_level(&sinks);
    Registration { id }
}

struct Registry {
    sinks: RwLock<Vec<(u64, LogSink, bool)>>,
    next_id: AtomicU64,
    /// `LevelFilter` as a number (0 = off … 5 = trace): what the subscriber lets through.
    max_level: AtomicUsize,
}

static REGISTRY: Registry = Registry { sinks: RwLock::new(Vec::new()), next_id: AtomicU64::new(1), max_level: AtomicUsize::new(INFO) };
static INSTALL: Once = Once::new();
const INFO: usize = 3;
const DEBUG: usize = 4;

fn install() {
    INSTALL.call_once(|| {
        // Another subscriber may already be installed by the embedding process: keep it.
        let _ = tracing::subscriber::set_global_default(EngineSubscriber);
    });
}

fn update_level(sinks: &[(u64, LogSink, bool)]) {
    let level = if sinks.iter().any(|(_, _, detailed)| *detailed) { DEBUG } else { INFO };
    if REGISTRY.max_level.swap(level, Ordering::AcqRel) != level {
        // Callsites cache whether they are enabled: they ask again.
        tracing::callsite::rebuild_interest_cache();
    }
}

fn max_level() -> LevelFilter {
    match REGISTRY.max_level.load(Ordering::Acquire) {
        DEBUG => LevelFilter::DEBUG,
        _ => LevelFilter::INFO,
    }
}

/// The subscriber: events only (the crate makes no spans).
struct EngineSubscriber;

impl Subscriber for EngineSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && metadata.level() <= &max_level() && metadata.target().starts_with(OUR_TARGET)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(max_level())
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        dispatch(entry_of(event));
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

fn entry_of(event: &Event<'_>) -> LogEntry {
    let mut visitor = EntryVisitor::default();
    event.record(&mut visitor);
    LogEntry { level: LogLevel::of(event.metadata().level()), message: visitor.message, fields: visitor.fields }
}

fn dispatch(entry: LogEntry) {
    let sinks = REGISTRY.sinks.read();
    let mut to_stderr = sinks.is_empty();
    for (_, sink, _) in sinks.iter() {
        match sink {
            LogSink::Logger(logger) => logger.offer(&entry),
            LogSink::StandardError => to_stderr = true,
        }
    }
    drop(sinks);
    if to_stderr {
        write_stderr(&entry);
    }
}

/// `2026-12-05T22:10:03.042Z WARN smartproxy: backend marked down host=10.0.0.2 port=8080`
fn write_stderr(entry: &LogEntry) {
    let mut line = Vec::with_capacity(128);
    crate::access_log::write_rfc3339(SystemTime::now(), &mut line);
    let mut text = format!(" {} smartproxy: {}", entry.level.as_str().to_uppercase(), entry.message);
    for (key, value) in &entry.fields {
        match value {
            serde_json::Value::String(s) if !s.is_empty() && !s.contains([' ', '"', '=']) => {
                let _ = write!(text, " {key}={s}");
            }
            value => {
                let _ = write!(text, " {key}={value}");
            }
        }
    }
    line.extend_from_slice(text.replace('\n', "\\n").as_bytes());
    line.push(b'\n');
    let _ = std::io::stderr().lock().write_all(&line);
}

#[derive(Default)]
struct EntryVisitor {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl EntryVisitor {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for EntryVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, serde_json::Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, serde_json::Value::String(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, serde_json::Value::String(value.to_string()));
    }
}

/// The `logger` option's sink: entries gather for `BATCH_DELAY` and go to JavaScript in one call,
/// at most `LOGGER_EVENTS_PER_SECOND` of them per second; the rest are counted, and the next
/// batch after their second begins with one entry that says how many.
pub struct LoggerSink {
    scripts: Scripts,
    runtime: tokio::runtime::Handle,
    state: Mutex<LoggerState>,
    /// Itself, for the delivery tasks it schedules.
    this: Weak<LoggerSink>,
}

struct LoggerState {
    batch: Vec<LogEntry>,
    delivery_scheduled: bool,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl LoggerSink {
    pub fn new(scripts: Scripts, runtime: tokio::runtime::Handle) -> Arc<LoggerSink> {
        Arc::new_cyclic(|this| LoggerSink {
            scripts,
            runtime,
            state: Mutex::new(LoggerState { batch: Vec::new(), delivery_scheduled: false, window_start: Instant::now(), in_window: 0, suppressed: 0 }),
            this: this.clone(),
        })
    }

    fn offer(&self, entry: &LogEntry) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.roll_window(now);
        if state.in_window >= LOGGER_EVENTS_PER_SECOND {
            state.suppressed += 1;
        } else {
            state.in_window += 1;
            state.batch.push(entry.clone());
        }
        if !state.delivery_scheduled {
            state.delivery_scheduled = true;
            let delay = if state.batch.is_empty() { state.until_next_window(now) } else { BATCH_DELAY };
            drop(state);
            self.schedule(delay);
        }
    }

    /// A delivery after `delay`. The task holds the sink: what was logged before a stop is still
    /// delivered.
    fn schedule(&self, delay: Duration) {
        if let Some(sink) = self.this.upgrade() {
            self.runtime.spawn(async move {
                tokio::time::sleep(delay).await;
                sink.deliver();
            });
        }
    }

    fn deliver(&self) {
        let now = Instant::now();
        let (entries, next) = {
            let mut state = self.state.lock();
            state.roll_window(now);
            let entries = std::mem::take(&mut state.batch);
            // Entries held back this second are summed up when it ends, events or not.
            let next = (state.suppressed > 0).then(|| state.until_next_window(now));
            state.delivery_scheduled = next.is_some();
            (entries, next)
        };
        if !entries.is_empty() {
            self.scripts.emit(EngineEvent::Log { entries });
        }
        if let Some(delay) = next {
            self.schedule(delay);
        }
    }
}

impl LoggerState {
    /// A little past the end of the current second, so that a timer never fires just before it.
    fn until_next_window(&self, now: Instant) -> Duration {
        (self.window_start + Duration::from_secs(1)).saturating_duration_since(now) + Duration::from_millis(1)
    }

    /// A new second: what was suppressed in the last is summed up first.
    fn roll_window(&mut self, now: Instant) {
        if now.duration_since(self.window_start) < Duration::from_secs(1) {
            return;
        }
        self.window_start = now;
        self.in_window = 0;
        if self.suppressed > 0 {
            let mut fields = serde_json::Map::new();
            fields.insert("suppressed".into(), self.suppressed.into());
            self.batch.push(LogEntry {
                level: LogLevel::Warn,
                message: format!("{} log events were not delivered: more than {LOGGER_EVENTS_PER_SECOND} in one second", self.suppressed),
                fields,
            });
            self.in_window = 1;
            self.suppressed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_over_the_limit_is_summed_up_in_the_next() {
        let start = Instant::now();
        let mut state = LoggerState { batch: Vec::new(), delivery_scheduled: false, window_start: start, in_window: LOGGER_EVENTS_PER_SECOND, suppressed: 7 };
        state.roll_window(start + Duration::from_millis(500));
        assert!(state.batch.is_empty());
        state.roll_window(start + Duration::from_millis(1500));
        assert_eq!(state.batch.len(), 1);
        assert_eq!(state.batch[0].level, LogLevel::Warn);
        assert_eq!(state.batch[0].fields["suppressed"], 7);
        assert_eq!((state.in_window, state.suppressed), (1, 0));
    }

    #[test]
    fn fields_keep_their_types_and_the_message_is_apart() {
        let subscriber = Collect::default();
        tracing::subscriber::with_default(subscriber.clone(), || {
            tracing::warn!(host = "10.0.0.2", port = 8080u16, healthy = false, "backend marked down");
        });
        let entry = subscriber.take();
        assert_eq!(entry.message, "backend marked down");
        assert_eq!(entry.level, LogLevel::Warn);
        assert_eq!(entry.fields["host"], "10.0.0.2");
        assert_eq!(entry.fields["port"], 8080);
        assert_eq!(entry.fields["healthy"], false);
    }

    /// A subscriber that keeps the last event as an entry (the test's own, not the global one).
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Option<LogEntry>>>);

    impl Collect {
        fn take(&self) -> LogEntry {
            self.0.lock().take().expect("an event")
        }
    }

    impl Subscriber for Collect {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            *self.0.lock() = Some(entry_of(event));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}
