//! The per-request Redis calls (affinity `GETEX`, the shared rate limit's `EVALSHA`) over one
//! pipelined connection that this module keeps itself; rare commands (bindings, certificates,
//! locks) go through the `redis` crate, which also parses the URL. Why a connection of our own for
//! calls made once per request: through the crate's multiplexed connection one cost several times
//! the proxy CPU (a batching task of ours, the crate's driver task, a combine-based reply parser, a
//! `Value` per reply), a large share of a whole proxied request.
//!
//! Callers write their command into the shared outbox themselves, in the order the answers will
//! come back, and wake the connection task only when they find the outbox empty, so calls that
//! arrive together leave in one write. The oldest unanswered lookup sets the connection's
//! deadline: replies come in order, so a connection that misses it is dropped with everything
//! pending on it. After a failed connect or a missed deadline, calls fail at once for
//! `RETRY_PAUSE` (the caller's memory answers them); then the next lookup connects again.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Notify};
use tokio::time::Sleep;
use tokio_util::either::Either;

use super::resp::{encode_command, encode_getex, parse_reply, Parse, Reply};

/// After a failed connect or a missed deadline, calls fail at once this long.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Where Redis listens and how to log in to it.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub address: RedisAddress,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

#[derive(Debug, Clone)]
pub enum RedisAddress {
    Tcp(String, u16),
    Unix(PathBuf),
}

/// Why a call has no answer from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Connecting failed, now or within the last `RETRY_PAUSE`.
    Unreachable(String),
    /// No answer within the timeout.
    TimedOut,
    /// The connection broke, or Redis sent bytes that are no reply.
    Broken(String),
    /// Redis answered with an error (`-WRONGTYPE ...`), or with a value that is not text.
    Refused(String),
    /// The store is gone: the engine stopped.
    Stopped,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable(why) => write!(f, "cannot connect to redis: {why}"),
            CallError::TimedOut => f.write_str("no answer from redis in time"),
            CallError::Broken(why) => write!(f, "the redis connection broke: {why}"),
            CallError::Refused(why) => write!(f, "redis refused the lookup: {why}"),
            CallError::Stopped => f.write_str("the lookup connection has stopped"),
        }
    }
}

type Answer = Result<Option<String>, CallError>;

struct Waiter {
    answer: oneshot::Sender<Answer>,
    queued_at: Instant,
}

#[derive(Default)]
struct Outbox {
    /// Encoded commands not yet written, one per waiter, in order.
    commands: Vec<u8>,
    /// Bumped each time `commands` is taken (written or failed): a `CountField` of an earlier
    /// generation is gone.
    generation: u64,
    waiting: Vec<Waiter>,
    /// Set after a failure: until the instant, calls fail at once for the reason.
    paused: Option<(Instant, String)>,
    stopped: bool,
}

struct Shared {
    outbox: Mutex<Outbox>,
    wake: Notify,
}

/// The lookup side of one replica's Redis store.
pub struct RedisPipeline {
    shared: Arc<Shared>,
}

impl RedisPipeline {
    /// Starts the connection task on the current runtime. It connects on the first lookup, and it
    /// ends (closing the connection) when this is dropped. A lookup waits at most `timeout`.
    pub fn start(target: RedisTarget, timeout: Duration) -> RedisPipeline {
        let shared = Arc::new(Shared { outbox: Mutex::new(Outbox::default()), wake: Notify::new() });
        tokio::spawn(run(shared.clone(), target, timeout));
        RedisPipeline { shared }
    }

    /// `GETEX <prefix><entry> EX <ttl_secs>`: the value, its expiry moved `ttl_secs` ahead.
    pub async fn getex(&self, prefix: &str, entry: &str, ttl_secs: u64) -> Answer {
        self.call(|out| encode_getex(out, prefix, entry, ttl_secs)).await
    }

    /// One command, which `encode` appends in RESP; its reply is a value, nil or an error.
    pub async fn call(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Answer {
        match self.queue(encode) {
            Ok((_, pending)) => pending.await,
            Err(err) => Err(err),
        }
    }

    /// Queues a command whose last argument is a count, written as `COUNT_DIGITS` digits (the
    /// caller encodes it, 1 as "0000000001"): until the command is written, `add_to_count` may
    /// raise it. Checks of one key that arrive before the write share the command this way.
    pub fn queue_counted(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(CountField, PendingAnswer), CallError> {
        let mut at = 0;
        let (generation, pending) = self.queue(|out| {
            encode(out);
            at = out.len() - (COUNT_DIGITS + 2);
            debug_assert!(out[at..at + COUNT_DIGITS].iter().all(u8::is_ascii_digit), "the command ends in a count field");
        })?;
        Ok((CountField { generation, at }, pending))
    }

    /// Adds one to a queued command's count field, in place (a carry rarely goes past the last
    /// digit); false when the command was written (or failed) already, or the field is full.
    pub fn add_to_count(&self, field: &CountField) -> bool {
        let mut outbox = self.shared.outbox.lock();
        if outbox.generation != field.generation {
            return false;
        }
        let digits = &mut outbox.commands[field.at..field.at + COUNT_DIGITS];
        if digits.iter().all(|digit| *digit == b'9') {
            return false;
        }
        for digit in digits.iter_mut().rev() {
            if *digit == b'9' {
                *digit = b'0';
            } else {
                *digit += 1;
                break;
            }
        }
        true
    }

    /// Appends a command to the outbox; the generation it went into, and its answer to come.
    fn queue(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(u64, PendingAnswer), CallError> {
        let (answer, answered) = oneshot::channel();
        let (generation, first) = {
            let mut outbox = self.shared.outbox.lock();
            if outbox.stopped {
                return Err(CallError::Stopped);
            }
            if let Some((until, why)) = &outbox.paused {
                if Instant::now() < *until {
                    return Err(CallError::Unreachable(why.clone()));
                }
                outbox.paused = None;
            }
            encode(&mut outbox.commands);
            outbox.waiting.push(Waiter { answer, queued_at: Instant::now() });
            (outbox.generation, outbox.waiting.len() == 1)
        };
        if first {
            self.shared.wake.notify_one();
        }
        Ok((generation, PendingAnswer(answered)))
    }
}

/// The width of a count field (`queue_counted`): zero-padded decimal digits.
pub const COUNT_DIGITS: usize = 10;

/// Where a queued command's count field is, while that command waits to be written.
#[derive(Debug)]
pub struct CountField {
    generation: u64,
    at: usize,
}

/// The answer to a queued command, to come.
pub struct PendingAnswer(oneshot::Receiver<Answer>);

impl std::future::Future for PendingAnswer {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Answer> {
        Pin::new(&mut self.0).poll(cx).map(|answer| answer.unwrap_or(Err(CallError::Stopped)))
    }
}

impl Drop for RedisPipeline {
    fn drop(&mut self) {
        self.shared.outbox.lock().stopped = true;
        self.shared.wake.notify_one();
    }
}

type Connection = Either<TcpStream, UnixStream>;

/// The connection task: writes what callers queued, hands each reply to its waiter, and keeps
/// every wait within `timeout`.
async fn run(shared: Arc<Shared>, target: RedisTarget, timeout: Duration) {
    let mut connection: Option<Connection> = None;
    let mut in_flight: VecDeque<Waiter> = VecDeque::new();
    let mut sending: Vec<u8> = Vec::new();
    let mut replies = BytesMut::with_capacity(4096);
    // One timer for the connection, moved to the oldest unanswered lookup's deadline.
    let mut deadline: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut armed_for: Option<Instant> = None;
    loop {
        let due = in_flight.front().map(|waiter| waiter.queued_at + timeout);
        if due != armed_for {
            if let Some(due) = due {
                deadline.as_mut().reset(due.into());
            }
            armed_for = due;
        }
        tokio::select! {
            biased;
            _ = shared.wake.notified() => {}
            read = read_more(&mut connection, &mut replies), if connection.is_some() => {
                let outcome = match read {
                    Ok(0) => Err(CallError::Broken("redis closed it".to_string())),
                    Ok(_) => answer_waiters(&mut in_flight, &mut replies),
                    Err(err) => Err(CallError::Broken(err.to_string())),
                };
                if let Err(err) = outcome {
                    drop_connection(&mut connection, &mut in_flight, &mut replies, err);
                }
            }
            _ = deadline.as_mut(), if armed_for.is_some() => {
                // Redis hangs: what queued behind the missed answers fails now, not after waiting too.
                drop_connection(&mut connection, &mut in_flight, &mut replies, CallError::TimedOut);
                pause(&shared, "no answer in time".to_string());
                fail_queued(&shared, CallError::Unreachable("no answer in time".to_string()));
            }
        }

        let (stopped, oldest) = {
            let outbox = shared.outbox.lock();
            (outbox.stopped, outbox.waiting.first().map(|waiter| waiter.queued_at))
        };
        if stopped {
            drop_connection(&mut connection, &mut in_flight, &mut replies, CallError::Stopped);
            fail_queued(&shared, CallError::Stopped);
            return;
        }
        let Some(oldest) = oldest else { continue };
        if connection.is_none() {
            match tokio::time::timeout_at((oldest + timeout).into(), connect(&target)).await {
                Ok(Ok(opened)) => connection = Some(opened),
                failed => {
                    let why = match failed {
                        Ok(Err(why)) => why,
                        _ => format!("connecting took longer than {} ms", timeout.as_millis()),
                    };
                    pause(&shared, why.clone());
                    fail_queued(&shared, CallError::Unreachable(why));
                    continue;
                }
            }
        }
        // Let the requests that are ready now queue their calls too: one write for them all.
        tokio::task::yield_now().await;
        {
            let mut outbox = shared.outbox.lock();
            std::mem::swap(&mut outbox.commands, &mut sending);
            outbox.generation += 1;
            in_flight.extend(outbox.waiting.drain(..));
        }
        let Some(open) = connection.as_mut() else { continue };
        let due = in_flight.front().map_or(oldest, |waiter| waiter.queued_at) + timeout;
        let written = match tokio::time::timeout_at(due.into(), open.write_all(&sending)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(CallError::Broken(err.to_string())),
            Err(_) => Err(CallError::TimedOut),
        };
        sending.clear();
        if let Err(err) = written {
            drop_connection(&mut connection, &mut in_flight, &mut replies, err);
        }
    }
}

async fn read_more(connection: &mut Option<Connection>, replies: &mut BytesMut) -> std::io::Result<usize> {
    match connection {
        Some(open) => {
            replies.reserve(4096);
            open.read_buf(replies).await
        }
        None => std::future::pending().await,
    }
}

/// Hands every complete reply in `replies` to the oldest waiter.
fn answer_waiters(in_flight: &mut VecDeque<Waiter>, replies: &mut BytesMut) -> Result<(), CallError> {
    loop {
        let (answer, used) = match parse_reply(replies) {
            Parse::Incomplete => return Ok(()),
            Parse::Invalid(why) => return Err(CallError::Broken(format!("redis sent no reply: {why}"))),
            Parse::Complete(reply, used) => {
                let answer = match reply {
                    Reply::Value(bytes) => match std::str::from_utf8(bytes) {
                        Ok(text) => Ok(Some(text.to_string())),
                        Err(_) => Err(CallError::Refused("the reply is not text".to_string())),
                    },
                    Reply::Nil => Ok(None),
                    Reply::Error(text) | Reply::Status(text) => Err(CallError::Refused(String::from_utf8_lossy(text).into_owned())),
                };
                (answer, used)
            }
        };
        let Some(waiter) = in_flight.pop_front() else {
            return Err(CallError::Broken("redis sent a reply nobody asked for".to_string()));
        };
        // A caller that went away (its request was dropped) needs no answer.
        let _ = waiter.answer.send(answer);
        replies.advance(used);
    }
}

fn drop_connection(connection: &mut Option<Connection>, in_flight: &mut VecDeque<Waiter>, replies: &mut BytesMut, why: CallError) {
    *connection = None;
    replies.clear();
    for waiter in in_flight.drain(..) {
        let _ = waiter.answer.send(Err(why.clone()));
    }
}

fn pause(shared: &Shared, why: String) {
    shared.outbox.lock().paused = Some((Instant::now() + RETRY_PAUSE, why));
}

fn fail_queued(shared: &Shared, why: CallError) {
    let waiting = {
        let mut outbox = shared.outbox.lock();
        outbox.commands.clear();
        outbox.generation += 1;
        std::mem::take(&mut outbox.waiting)
    };
    for waiter in waiting {
        let _ = waiter.answer.send(Err(why.clone()));
    }
}

/// Opens the connection, logs in and selects the database (one write; a reply each).
async fn connect(target: &RedisTarget) -> Result<Connection, String> {
    let mut connection = match &target.address {
        RedisAddress::Tcp(host, port) => {
            let stream = TcpStream::connect((host.as_str(), *port)).await.map_err(|e| format!("{host}:{port}: {e}"))?;
            // Lookups are small and waited for: never hold one back to fill a segment.
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            Either::Left(stream)
        }
        RedisAddress::Unix(path) => Either::Right(UnixStream::connect(path).await.map_err(|e| format!("{}: {e}", path.display()))?),
    };
    let mut hello = Vec::new();
    let mut asked = Vec::new();
    if let Some(password) = &target.password {
        match &target.username {
            Some(user) => encode_command(&mut hello, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => encode_command(&mut hello, &[b"AUTH", password.as_bytes()]),
        }
        asked.push("AUTH");
    }
    if target.db != 0 {
        encode_command(&mut hello, &[b"SELECT", target.db.to_string().as_bytes()]);
        asked.push("SELECT");
    }
    if asked.is_empty() {
        return Ok(connection);
    }
    connection.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut replies = BytesMut::with_capacity(512);
    let mut answered = 0;
    while answered < asked.len() {
        match parse_reply(&replies) {
            Parse::Complete(Reply::Status(_), used) => {
                replies.advance(used);
                answered += 1;
            }
            Parse::Complete(Reply::Error(text), _) => return Err(format!("{} refused: {}", asked[answered], String::from_utf8_lossy(text))),
            Parse::Complete(_, _) => return Err(format!("unexpected reply to {}", asked[answered])),
            Parse::Invalid(why) => return Err(format!("invalid reply to {}: {why}", asked[answered])),
            Parse::Incomplete => {
                if connection.read_buf(&mut replies).await.map_err(|e| e.to_string())? == 0 {
                    return Err(format!("redis closed the connection after {}", asked[answered]));
                }
            }
        }
    }
    Ok(connection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn target(port: u16) -> RedisTarget {
        RedisTarget { address: RedisAddress::Tcp("127.0.0.1".to_string(), port), username: None, password: None, db: 0 }
    }

    /// A listener on a free loopback port, and the port.
    async fn listen() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    /// A stand-in for Redis: answers each GETEX it reads with `answer`.
    async fn fake_redis(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let (listener, port) = listen().await;
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = socket.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&chunk[..n]);
                let commands = chunk[..n].windows(5).filter(|w| w == b"GETEX").count();
                for _ in 0..commands {
                    if socket.write_all(answer).await.is_err() {
                        return seen;
                    }
                }
            }
        });
        (port, served)
    }

    #[tokio::test]
    async fn a_queued_count_field_is_raised_in_place_with_its_carry_until_it_is_written() {
        let (_listener, port) = listen().await;
        let lookups = RedisPipeline::start(target(port), Duration::from_millis(500));
        let queued = |digits: &'static [u8]| lookups.queue_counted(|out| encode_command(out, &[b"EVALSHA", b"sha", digits])).unwrap();
        // Nothing yields here, so the connection task has not taken the outbox yet.
        let (nine, _nine_answer) = queued(b"0000000009");
        let (full, _full_answer) = queued(b"9999999999");
        assert!(lookups.add_to_count(&nine));
        assert!(!lookups.add_to_count(&full), "a full field is not raised");
        let commands = lookups.shared.outbox.lock().commands.clone();
        let text = String::from_utf8(commands).unwrap();
        assert!(text.contains("$10\r\n0000000010\r\n"), "{text:?}");
        assert!(text.ends_with("$10\r\n9999999999\r\n"), "{text:?}");
        // Taken by the connection task: too late to join.
        lookups.shared.outbox.lock().generation += 1;
        assert!(!lookups.add_to_count(&nine));
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_write_and_get_their_own_answers() {
        let (port, served) = fake_redis(b"$8\r\nh:1:8080\r\n").await;
        let lookups = Arc::new(RedisPipeline::start(target(port), Duration::from_millis(500)));
        let asks: Vec<_> = (0..10)
            .map(|i| {
                let lookups = lookups.clone();
                tokio::spawn(async move { lookups.getex("p:", &format!("k{i}"), 60).await })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap(), Ok(Some("h:1:8080".to_string())));
        }
        drop(lookups);
        let seen = served.await.unwrap();
        assert_eq!(seen.windows(5).filter(|w| w == b"GETEX").count(), 10);
        assert!(seen.windows(4).any(|w| w == b"p:k9"));
    }

    #[tokio::test]
    async fn a_missing_key_an_error_reply_and_an_invalid_reply() {
        let (port, _served) = fake_redis(b"$-1\r\n").await;
        let lookups = RedisPipeline::start(target(port), Duration::from_millis(500));
        assert_eq!(lookups.getex("p:", "k", 60).await, Ok(None));

        let (port, _served) = fake_redis(b"-WRONGTYPE Operation against a key\r\n").await;
        let lookups = RedisPipeline::start(target(port), Duration::from_millis(500));
        assert_eq!(lookups.getex("p:", "k", 60).await, Err(CallError::Refused("WRONGTYPE Operation against a key".to_string())));

        let (port, _served) = fake_redis(b":1\r\n").await;
        let lookups = RedisPipeline::start(target(port), Duration::from_millis(500));
        assert!(matches!(lookups.getex("p:", "k", 60).await, Err(CallError::Broken(_))));
    }

    #[tokio::test]
    async fn no_answer_times_out_then_lookups_fail_at_once_until_the_pause_ends() {
        let (listener, port) = listen().await;
        // Accepts and never answers.
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let lookups = Arc::new(RedisPipeline::start(target(port), Duration::from_millis(100)));
        let started = Instant::now();
        let asks: Vec<_> = (0..10)
            .map(|_| {
                let lookups = lookups.clone();
                tokio::spawn(async move { lookups.getex("p:", "k", 60).await })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap(), Err(CallError::TimedOut));
        }
        // One after another, ten 100 ms waits would take 1 s.
        assert!(started.elapsed() < Duration::from_millis(600), "the waits ran side by side");
        // During the pause a lookup is refused without being sent: not TimedOut, Unreachable.
        assert!(matches!(lookups.getex("p:", "k", 60).await, Err(CallError::Unreachable(_))));
    }

    #[tokio::test]
    async fn refused_connections_fail_at_once_and_a_returning_redis_is_used_again() {
        let (listener, port) = listen().await;
        drop(listener);
        let lookups = RedisPipeline::start(target(port), Duration::from_millis(200));
        assert!(matches!(lookups.getex("p:", "k", 60).await, Err(CallError::Unreachable(_))));
        // Redis comes back on the same port; after the pause the next lookup reconnects.
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 1024];
            while let Ok(n) = socket.read(&mut chunk).await {
                if n == 0 || socket.write_all(b"$3\r\nh:1\r\n").await.is_err() {
                    break;
                }
            }
        });
        tokio::time::sleep(RETRY_PAUSE).await;
        assert_eq!(lookups.getex("p:", "k", 60).await, Ok(Some("h:1".to_string())));
    }

    #[tokio::test]
    async fn auth_and_select_go_first_and_a_refused_login_is_reported() {
        let (listener, port) = listen().await;
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 1024];
            while !seen.windows(5).any(|w| w == b"GETEX") {
                let n = socket.read(&mut chunk).await.unwrap();
                seen.extend_from_slice(&chunk[..n]);
                if seen.ends_with(b"$1\r\n3\r\n") {
                    socket.write_all(b"+OK\r\n+OK\r\n").await.unwrap();
                }
            }
            socket.write_all(b"$-1\r\n").await.unwrap();
            seen
        });
        let mut login = target(port);
        login.username = Some("proxy".to_string());
        login.password = Some("secret".to_string());
        login.db = 3;
        let lookups = RedisPipeline::start(login.clone(), Duration::from_millis(500));
        assert_eq!(lookups.getex("p:", "k", 60).await, Ok(None));
        let seen = served.await.unwrap();
        assert!(seen.starts_with(b"*3\r\n$4\r\nAUTH\r\n$5\r\nproxy\r\n$6\r\nsecret\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*4\r\n$5\r\nGETEX"));

        let (listener, port) = listen().await;
        login.address = RedisAddress::Tcp("127.0.0.1".to_string(), port);
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 1024];
            let _ = socket.read(&mut chunk).await;
            let _ = socket.write_all(b"-WRONGPASS invalid username-password pair\r\n").await;
            let _ = socket.read(&mut chunk).await;
        });
        let lookups = RedisPipeline::start(login, Duration::from_millis(500));
        match lookups.getex("p:", "k", 60).await {
            Err(CallError::Unreachable(why)) => assert!(why.contains("AUTH refused: WRONGPASS"), "{why}"),
            other => panic!("expected a refused login, got {other:?}"),
        }
    }
}
