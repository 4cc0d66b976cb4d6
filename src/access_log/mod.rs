//! The access log (`accessLog`): one line per HTTP request and per TCP connection. A line is
//! formatted where its request is handled (the opening when it arrives, the time and outcome when
//! it ends, under the buffer's lock) into a shared buffer, bounded in bytes; a thread of its own
//! takes the buffer and writes it out, so that the data path never waits on a disk or a pipe and hands nothing over
//! per line but bytes. A line that finds the buffer full is dropped and counted. The file is
//! reopened on request (`reopenLogs()`, SIGUSR1 in the CLI), for logrotate. Knows nothing of
//! sockets or napi; what goes into a line (and what never does: credentials, query strings) is
//! decided where the record is made.

mod format;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use format::{write_rfc3339, LogFormat, Opening};
use format::{format_opening, line_room, LineFinisher, Outcome, Splits};

/// Bytes of lines waiting for the writer at most; beyond it lines are dropped (and counted).
const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// A buffer the writer keeps between rounds at most: a burst's buffer is not held for good, and
/// a busy proxy's (a round's lines at tens of thousands of requests a second) is not given back
/// and faulted in again every round.
const KEPT_BUFFER: usize = 4 * 1024 * 1024;
/// How long the writer sleeps between rounds. It is never woken per line: a wake-up is a system
/// call and a context switch on the request path, which would cost more than the line.
const ROUND: Duration = Duration::from_millis(50);

/// What became of the lines: written, or dropped (the buffer full, or the output failing).
#[derive(Debug, Default)]
pub struct AccessLogCounters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// A line in the making: its opening, formatted when the request (or connection) arrived, and
/// the outcome's fields, filled in as it runs and formatted when it is submitted.
#[derive(Debug)]
pub struct AccessRecord {
    opening: Vec<u8>,
    /// Where in the opening the time and outcome go.
    splits: Splits,
    pub started: Instant,
    pub route: Option<Arc<str>>,
    pub status: Option<u16>,
    /// Body bytes from the client (HTTP), or bytes relayed from it (TCP).
    pub bytes_in: u64,
    /// Counted elsewhere while the exchange runs (a streamed request body); read when submitted.
    pub bytes_in_meter: Option<Arc<AtomicU64>>,
    /// Body bytes to the client (HTTP), or bytes relayed to it (TCP).
    pub bytes_out: u64,
    /// The backend's host and port.
    pub upstream: Option<(Arc<str>, u16)>,
    /// How it ended: `completed`, `client_aborted`, `upstream_error`, or a connection's
    /// termination reason.
    pub termination: &'static str,
}

/// Where lines go: a file (reopened on request) or the process's standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
}

/// Lines waiting for the writer, and what finishes them.
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
    finisher: LineFinisher,
}

impl Pending {
    fn new(format: LogFormat) -> Pending {
        Pending { bytes: Vec::new(), lines: 0, finisher: LineFinisher::new(format) }
    }
}

/// The wall clock as of an `Instant`, without asking the system for the time per line: the
/// writer sets the offset each round, so a line's time follows a clock step within a round.
struct WallClock {
    origin: Instant,
    /// Nanoseconds since the Unix epoch at `origin`.
    wall_at_origin: AtomicU64,
}

impl WallClock {
    fn new() -> WallClock {
        let clock = WallClock { origin: Instant::now(), wall_at_origin: AtomicU64::new(0) };
        clock.set();
        clock
    }

    fn set(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let wall_at_origin = now.saturating_sub(self.origin.elapsed());
        self.wall_at_origin.store(wall_at_origin.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Milliseconds since the Unix epoch at `instant`.
    fn unix_millis(&self, instant: Instant) -> u64 {
        let since_origin = instant.saturating_duration_since(self.origin);
        let nanos = since_origin.as_secs() * 1_000_000_000 + u64::from(since_origin.subsec_nanos());
        (self.wall_at_origin.load(Ordering::Relaxed) + nanos) / 1_000_000
    }
}

/// What the request path and the writer share.
struct Shared {
    pending: Mutex<Pending>,
    /// No line is taken once set: the writer has taken its last round, or is taking it.
    closed: AtomicBool,
    reopen: AtomicBool,
    clock: WallClock,
    counters: Arc<AccessLogCounters>,
}

/// A running access log: the buffer lines go to, and the writer thread.
pub struct AccessLog {
    shared: Arc<Shared>,
    format: LogFormat,
    /// To wake the writer for a reopen or the close.
    writer_thread: std::thread::Thread,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Opens the destination (an error names the file) and starts the writer.
    pub fn open(destination: Destination, format: LogFormat, counters: Arc<AccessLogCounters>) -> io::Result<AccessLog> {
        let output = open_output(&destination)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::new(format)),
            closed: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            clock: WallClock::new(),
            counters,
        });
        let writer = Writer { shared: shared.clone(), output, destination, taken: Vec::new(), failing: false, torn: false };
        let handle = std::thread::Builder::new().name("smartproxy-access-log".into()).spawn(move || writer.run())?;
        Ok(AccessLog { shared, format, writer_thread: handle.thread().clone(), writer: Mutex::new(Some(handle)) })
    }

    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// A record of what began at `started` (now, or a moment ago), its opening formatted.
    pub fn begin(&self, opening: &Opening<'_>, started: Instant) -> AccessRecord {
        let (line, splits) = format_opening(self.format, opening);
        AccessRecord {
            opening: line,
            splits,
            started,
            route: None,
            status: None,
            bytes_in: 0,
            bytes_in_meter: None,
            bytes_out: 0,
            upstream: None,
            termination: "completed",
        }
    }

    /// Ends the record's line (its duration runs until now) and adds it to the writer's buffer,
    /// or drops it if the writer is behind: never waits but for another line being added.
    pub fn submit(&self, record: &AccessRecord) {
        let bytes_in = record.bytes_in + record.bytes_in_meter.as_ref().map_or(0, |meter| meter.load(Ordering::Relaxed));
        let outcome = Outcome {
            route: record.route.as_ref(),
            status: record.status,
            bytes_in,
            bytes_out: record.bytes_out,
            duration: record.started.elapsed(),
            upstream: record.upstream.as_ref().map(|(host, port)| (host, *port)),
            termination: record.termination,
        };
        let unix_millis = self.shared.clock.unix_millis(record.started);
        let room = line_room(record.opening.len(), &outcome);
        let mut pending = self.shared.pending.lock();
        // After the close the engine is stopping, and the line came after its last request.
        if self.shared.closed.load(Ordering::Relaxed) {
            return;
        }
        if pending.bytes.len() + room > MAX_PENDING_BYTES {
            drop(pending);
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Pending { bytes, lines, finisher } = &mut *pending;
        bytes.reserve(room);
        finisher.finish(&record.opening, record.splits, unix_millis, &outcome, bytes);
        *lines += 1;
    }

    /// Reopens the file by its path before the lines waiting are written (logrotate renames the
    /// file, then asks for this).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        self.writer_thread.unpark();
    }

    /// Writes what is waiting, closes the output and waits for the writer to end.
    pub fn close(&self) {
        let Some(handle) = self.writer.lock().take() else {
            return;
        };
        // Under the lock: a line is either in the writer's last round or refused.
        {
            let _pending = self.shared.pending.lock();
            self.shared.closed.store(true, Ordering::Relaxed);
        }
        self.writer_thread.unpark();
        let _ = handle.join();
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    shared: Arc<Shared>,
    output: Box<dyn Write + Send>,
    destination: Destination,
    /// The buffer taken from the request path in the last round, kept for the next swap.
    taken: Vec<u8>,
    /// Writes are failing and that was logged.
    failing: bool,
    /// A write failed part-way: the output may end in the middle of a line.
    torn: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            self.shared.clock.set();
            if self.shared.reopen.load(Ordering::Acquire) && self.shared.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_output();
            }
            let (lines, closed) = {
                let mut pending = self.shared.pending.lock();
                std::mem::swap(&mut pending.bytes, &mut self.taken);
                (std::mem::take(&mut pending.lines), self.shared.closed.load(Ordering::Relaxed))
            };
            if lines > 0 {
                // A line a failed write cut short is ended before new ones follow it.
                if self.torn && self.output.write_all(b"\n").is_ok() {
                    self.torn = false;
                }
                let written = if self.torn { Err(io::Error::other("the last line could not be ended")) } else { self.output.write_all(&self.taken) };
                self.torn = written.is_err();
                self.note_write(written, lines);
            }
            self.taken.clear();
            if self.taken.capacity() > KEPT_BUFFER {
                self.taken = Vec::new();
            }
            if closed {
                return;
            }
            std::thread::park_timeout(ROUND);
        }
    }

    /// Counts a round's lines; a failure is logged once until a write succeeds again, not once
    /// per round (a full disk fails them all).
    fn note_write(&mut self, written: io::Result<()>, lines: u64) {
        match written {
            Ok(()) => {
                self.shared.counters.written.fetch_add(lines, Ordering::Relaxed);
                self.failing = false;
            }
            Err(err) => {
                self.shared.counters.dropped.fetch_add(lines, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %err, "the access log could not be written; lines are dropped until it can");
                }
            }
        }
    }

    fn reopen_output(&mut self) {
        match open_output(&self.destination) {
            Ok(output) => self.output = output,
            // The old file stays in use: nothing is lost, and the next reopen may succeed.
            Err(err) => tracing::warn!(error = %err, "the access log could not be reopened"),
        }
    }
}

fn open_output(destination: &Destination) -> io::Result<Box<dyn Write + Send>> {
    Ok(match destination {
        Destination::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| io::Error::new(err.kind(), format!("accessLog.path {}: {err}", path.display())))?;
            Box::new(file)
        }
        Destination::Stdout => Box::new(StdoutFd),
    })
}

/// File descriptor 1, shared with Node: Node may have made it non-blocking (a pipe), so a write
/// that would block waits until the descriptor is writable instead of failing, for a while: a
/// reader that stopped reading must not hold the writer (and `stop()`) for ever.
struct StdoutFd;

/// How long a write to standard output waits for a reader that does not read.
const STDOUT_PATIENCE: Duration = Duration::from_secs(5);

impl Write for StdoutFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = Instant::now() + STDOUT_PATIENCE;
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes; fd 1 belongs to the process.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if Instant::now() >= deadline => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "standard output has not been read for a while"));
                }
                io::ErrorKind::WouldBlock => {
                    let mut poll = libc::pollfd { fd: 1, events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut poll, 1, 100) };
                }
                _ => return Err(err),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(log: &AccessLog, path: &str) -> AccessRecord {
        let opening = Opening {
            client_ip: b"192.0.2.1",
            method: Some("GET"),
            host: None,
            path: Some(path.as_bytes()),
            protocol: "HTTP/1.1",
            tls: false,
            referer: None,
            user_agent: None,
        };
        let mut record = log.begin(&opening, Instant::now());
        record.status = Some(200);
        record
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("smartproxy-access-log-{}-{name}", std::process::id()))
    }

    #[test]
    fn records_reach_the_file_and_reopen_follows_a_rename() {
        let path = temp_path("reopen");
        let rotated = path.with_extension("1");
        let _ = std::fs::remove_file(&path);
        let counters = Arc::new(AccessLogCounters::default());
        let log = AccessLog::open(Destination::File(path.clone()), LogFormat::Json, counters.clone()).unwrap();
        log.submit(&request(&log, "/first"));
        // Wait for the writer to have written it before renaming.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.written.load(Ordering::Relaxed) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.submit(&request(&log, "/second"));
        log.close();
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("\"/first\"") && !old.contains("/second"), "{old}");
        assert!(new.contains("\"/second\"") && !new.contains("/first"), "{new}");
        assert_eq!(counters.written.load(Ordering::Relaxed), 2);
        // Lines after the close are refused, not counted as dropped.
        log.submit(&request(&log, "/late"));
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
    }

    #[test]
    fn the_buffer_is_bounded_by_bytes() {
        // A log whose writer is behind: nothing takes the buffer.
        let counters = Arc::new(AccessLogCounters::default());
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::new(LogFormat::Json)),
            closed: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            clock: WallClock::new(),
            counters: counters.clone(),
        });
        let log = AccessLog { shared, format: LogFormat::Json, writer_thread: std::thread::current(), writer: Mutex::new(None) };
        let record = request(&log, "/fits");
        let mut lines = 0;
        while counters.dropped.load(Ordering::Relaxed) == 0 {
            log.submit(&record);
            lines += 1;
        }
        // Every line until the bound was taken; at the bound they are dropped and counted.
        assert_eq!(log.shared.pending.lock().lines, lines - 1);
        assert!(log.shared.pending.lock().bytes.len() > MAX_PENDING_BYTES - 1024);
        log.submit(&record);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(log.shared.pending.lock().lines, lines - 1);
        assert!(log.shared.pending.lock().bytes.len() <= MAX_PENDING_BYTES);
    }

    #[test]
    fn a_line_carries_the_wall_time_of_its_start() {
        let counters = Arc::new(AccessLogCounters::default());
        let log = AccessLog::open(Destination::File(temp_path("clock")), LogFormat::Json, counters).unwrap();
        let started = Instant::now();
        let expected = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let at = Duration::from_millis(log.shared.clock.unix_millis(started));
        assert!(at.abs_diff(expected) < Duration::from_millis(50), "{at:?} vs {expected:?}");
        log.close();
        let _ = std::fs::remove_file(temp_path("clock"));
    }

    #[test]
    fn an_unopenable_path_is_an_error_naming_it() {
        let err = AccessLog::open(Destination::File("/nonexistent-dir/x.log".into()), LogFormat::Json, Arc::default()).err().unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/x.log"), "{err}");
    }
}
