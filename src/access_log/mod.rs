//! The access log (`accessLog`): one record per HTTP request and per TCP connection, handed to a
//! bounded queue and written by a thread of its own, so that the data path never waits on a disk
//! or a pipe. A record that finds the queue full is dropped and counted. The file is reopened on
//! request (`reopenLogs()`, SIGUSR1 in the CLI), for logrotate. Knows nothing of sockets or napi;
//! what goes into a record (and what never does: credentials, query strings) is decided where the
//! record is made.

mod format;

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

pub use format::{write_rfc3339, LineFormatter, LogFormat};

/// Records waiting for the writer at most; beyond it they are dropped (and counted).
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Bytes of records waiting for the writer at most, whatever their number: a client decides how
/// long its path and headers are, so the count of records alone does not bound the memory.
const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// What a record keeps of each string a client chose (host, path, referer, user agent).
pub const MAX_CLIENT_FIELD: usize = 2048;
/// The writer's buffer: a burst of records goes out in few writes.
const WRITE_BUFFER: usize = 64 * 1024;
/// How long the writer sleeps once it has caught up. It is never woken per record: a wake-up is a
/// system call and a context switch on the request path, which would cost more than the record.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What became of the records: written, or dropped because the queue was full.
#[derive(Debug, Default)]
pub struct AccessLogCounters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// One line of the log. HTTP records name a method, path and status; TCP records do not.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request head (or the connection) arrived.
    pub time: SystemTime,
    pub started: Instant,
    pub route: Option<Arc<str>>,
    pub client_ip: IpAddr,
    pub method: Option<http::Method>,
    /// The host the client named (HTTP) or its SNI (TCP).
    pub host: Option<Box<str>>,
    /// The path without its query.
    pub path: Option<Box<str>>,
    pub status: Option<u16>,
    /// Body bytes from the client (HTTP), or bytes relayed from it (TCP).
    pub bytes_in: u64,
    /// Counted elsewhere while the exchange runs (a streamed request body); read when submitted.
    pub bytes_in_meter: Option<Arc<AtomicU64>>,
    /// Body bytes to the client (HTTP), or bytes relayed to it (TCP).
    pub bytes_out: u64,
    pub duration: Duration,
    /// The backend's host and port.
    pub upstream: Option<(Arc<str>, u16)>,
    /// `HTTP/1.1`, `HTTP/2`, … or `tcp`.
    pub protocol: &'static str,
    pub tls: bool,
    /// How it ended: `completed`, `client_aborted`, `upstream_error`, or a connection's
    /// termination reason.
    pub termination: &'static str,
    /// Kept for the combined format only, without query or credentials.
    pub referer: Option<Box<str>>,
    pub user_agent: Option<Box<str>>,
}

/// `text` cut to at most `MAX_CLIENT_FIELD` bytes, at a character boundary.
pub fn clipped(text: &str) -> Box<str> {
    if text.len() <= MAX_CLIENT_FIELD {
        return text.into();
    }
    let mut end = MAX_CLIENT_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}

impl AccessRecord {
    /// What the record holds, in bytes, for the queue's budget.
    fn footprint(&self) -> usize {
        let text = |s: &Option<Box<str>>| s.as_ref().map_or(0, |s| s.len());
        std::mem::size_of::<AccessRecord>() + text(&self.host) + text(&self.path) + text(&self.referer) + text(&self.user_agent)
    }

    /// A record of what began at `started` (now, or a moment ago).
    pub fn begin(client_ip: IpAddr, protocol: &'static str, tls: bool, started: Instant) -> AccessRecord {
        AccessRecord {
            time: SystemTime::now().checked_sub(started.elapsed()).unwrap_or_else(SystemTime::now),
            started,
            route: None,
            client_ip,
            method: None,
            host: None,
            path: None,
            status: None,
            bytes_in: 0,
            bytes_in_meter: None,
            bytes_out: 0,
            duration: Duration::ZERO,
            upstream: None,
            protocol,
            tls,
            termination: "completed",
            referer: None,
            user_agent: None,
        }
    }
}

enum Message {
    Record(Box<AccessRecord>),
    Close,
}

/// Where lines go: a file (reopened on request) or the process's standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
}

/// A running access log: the queue's sending end and the writer thread.
pub struct AccessLog {
    queue: SyncSender<Message>,
    format: LogFormat,
    reopen: Arc<AtomicBool>,
    counters: Arc<AccessLogCounters>,
    /// Bytes of the records in the queue (`MAX_QUEUED_BYTES`).
    queued_bytes: Arc<AtomicUsize>,
    /// To wake the writer for a reopen or the close.
    writer_thread: std::thread::Thread,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Opens the destination (an error names the file) and starts the writer.
    pub fn open(destination: Destination, format: LogFormat, counters: Arc<AccessLogCounters>) -> io::Result<AccessLog> {
        let output = Output::open(&destination)?;
        let (queue, records) = mpsc::sync_channel(QUEUE_CAPACITY);
        let reopen = Arc::new(AtomicBool::new(false));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            records,
            output,
            destination,
            format: LineFormatter::new(format),
            reopen: reopen.clone(),
            counters: counters.clone(),
            queued_bytes: queued_bytes.clone(),
            line: Vec::with_capacity(512),
            failing: false,
        };
        let handle = std::thread::Builder::new().name("smartproxy-access-log".into()).spawn(move || writer.run())?;
        Ok(AccessLog { queue, format, reopen, counters, queued_bytes, writer_thread: handle.thread().clone(), writer: Mutex::new(Some(handle)) })
    }

    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// Queues a record, or drops it if the writer is behind: never waits.
    pub fn submit(&self, mut record: Box<AccessRecord>) {
        if let Some(meter) = record.bytes_in_meter.take() {
            record.bytes_in += meter.load(Ordering::Relaxed);
        }
        let footprint = record.footprint();
        if self.queued_bytes.fetch_add(footprint, Ordering::Relaxed) + footprint > MAX_QUEUED_BYTES {
            self.queued_bytes.fetch_sub(footprint, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.queue.try_send(Message::Record(record)) {
            Ok(()) => {}
            Err(err) => {
                self.queued_bytes.fetch_sub(footprint, Ordering::Relaxed);
                // Disconnected: the engine is stopping, and the record came after its last request.
                if matches!(err, TrySendError::Full(_)) {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Reopens the file by its path, once the records already queued are written (logrotate
    /// renames the file, then asks for this).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        self.writer_thread.unpark();
    }

    /// Writes what is queued, closes the output and waits for the writer to end.
    pub fn close(&self) {
        let Some(handle) = self.writer.lock().take() else {
            return;
        };
        self.writer_thread.unpark();
        // Waits for room if the writer is behind: it is draining, so the wait is short.
        let _ = self.queue.send(Message::Close);
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
    records: Receiver<Message>,
    output: Output,
    destination: Destination,
    format: LineFormatter,
    reopen: Arc<AtomicBool>,
    counters: Arc<AccessLogCounters>,
    queued_bytes: Arc<AtomicUsize>,
    line: Vec<u8>,
    /// Writes are failing and that was logged.
    failing: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            // Before the next record: whatever was queued after `reopen()` goes to the new file.
            if self.reopen.load(Ordering::Acquire) && self.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_output();
            }
            let message = match self.records.try_recv() {
                Ok(message) => message,
                // Caught up: what is buffered goes out, then a nap (until a reopen or close).
                Err(TryRecvError::Empty) => {
                    self.flush();
                    std::thread::park_timeout(IDLE_POLL);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match message {
                Message::Record(record) => {
                    self.queued_bytes.fetch_sub(record.footprint(), Ordering::Relaxed);
                    self.line.clear();
                    self.format.write(&record, &mut self.line);
                    let written = self.output.write_all(&self.line);
                    self.note_write(written);
                }
                Message::Close => break,
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        if let Err(err) = self.output.flush() {
            self.report_failure(&err);
        }
    }

    /// Counts a record's write; a failure is logged once until a write succeeds again, not once
    /// per request (a full disk fails every line).
    fn note_write(&mut self, written: io::Result<()>) {
        match written {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                self.failing = false;
            }
            Err(err) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.report_failure(&err);
            }
        }
    }

    fn report_failure(&mut self, err: &io::Error) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(error = %err, "the access log could not be written; lines are dropped until it can");
        }
    }

    fn reopen_output(&mut self) {
        self.flush();
        match Output::open(&self.destination) {
            Ok(output) => self.output = output,
            // The old file stays in use: nothing is lost, and the next reopen may succeed.
            Err(err) => tracing::warn!(error = %err, "the access log could not be reopened"),
        }
    }
}

enum Output {
    File(BufWriter<File>),
    Stdout(BufWriter<StdoutFd>),
}

impl Output {
    fn open(destination: &Destination) -> io::Result<Output> {
        Ok(match destination {
            Destination::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|err| io::Error::new(err.kind(), format!("accessLog.path {}: {err}", path.display())))?;
                Output::File(BufWriter::with_capacity(WRITE_BUFFER, file))
            }
            Destination::Stdout => Output::Stdout(BufWriter::with_capacity(WRITE_BUFFER, StdoutFd)),
        })
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::File(w) => w.write(buf),
            Output::Stdout(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::File(w) => w.write_all(buf),
            Output::Stdout(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::File(w) => w.flush(),
            Output::Stdout(w) => w.flush(),
        }
    }
}

/// File descriptor 1, shared with Node: Node may have made it non-blocking (a pipe), so a write
/// that would block waits until the descriptor is writable instead of failing.
struct StdoutFd;

impl Write for StdoutFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes; fd 1 belongs to the process.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
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

    fn record(path: &str) -> Box<AccessRecord> {
        let mut record = Box::new(AccessRecord::begin("192.0.2.1".parse().unwrap(), "HTTP/1.1", false, Instant::now()));
        record.method = Some(http::Method::GET);
        record.path = Some(path.into());
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
        log.submit(record("/first"));
        // Wait for the writer to have written it before renaming.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.written.load(Ordering::Relaxed) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.submit(record("/second"));
        log.close();
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("\"/first\"") && !old.contains("/second"), "{old}");
        assert!(new.contains("\"/second\"") && !new.contains("/first"), "{new}");
        assert_eq!(counters.written.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&rotated);
    }

    #[test]
    fn client_strings_are_clipped_at_a_character_boundary() {
        let long = "é".repeat(MAX_CLIENT_FIELD);
        let cut = clipped(&long);
        assert!(cut.len() <= MAX_CLIENT_FIELD && cut.len() >= MAX_CLIENT_FIELD - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(&*clipped("/short"), "/short");
    }

    #[test]
    fn the_queue_is_bounded_by_bytes_too() {
        let counters = Arc::new(AccessLogCounters::default());
        let log = AccessLog::open(Destination::File(temp_path("budget")), LogFormat::Json, counters.clone()).unwrap();
        // Hold the queue as full as the budget allows, as a writer that is behind would.
        log.queued_bytes.store(MAX_QUEUED_BYTES - 100, Ordering::Relaxed);
        let mut big = record("/x");
        big.path = Some(clipped(&"a".repeat(10_000)));
        log.submit(big);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
        log.queued_bytes.store(0, Ordering::Relaxed);
        log.submit(record("/fits"));
        log.close();
        assert_eq!(counters.written.load(Ordering::Relaxed), 1);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_file(temp_path("budget"));
    }

    #[test]
    fn an_unopenable_path_is_an_error_naming_it() {
        let err = AccessLog::open(Destination::File("/nonexistent-dir/x.log".into()), LogFormat::Json, Arc::default()).err().unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/x.log"), "{err}");
    }
}
