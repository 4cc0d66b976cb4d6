//! The operator's HTTP listeners: `metrics.prometheus` (its one path answers the Prometheus
//! exposition) and `admin` (`/metrics` and `/api/status` behind an optional bearer token,
//! `/healthz` and the status page without it). Methods other than GET and HEAD get 405, unknown paths 404; one request
//! per connection, closed after the answer. The peers are operators' tools on a local port, but
//! what is read stays bounded (one head of at most `MAX_HEAD` bytes within `READ_TIMEOUT`, at most
//! `MAX_CONNECTIONS` connections at once) and every connection task ends with its listener.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Engine;
use crate::listener::BindError;
use crate::metrics::prometheus::CONTENT_TYPE;

const MAX_HEAD: usize = 8 * 1024;
/// Connections one operator listener serves at once.
const MAX_CONNECTIONS: usize = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener answers.
pub enum Service {
    /// `metrics.prometheus`: the exposition at `path`.
    Scrape { path: String },
    /// `admin`: every operator path, with the token when one is set.
    Admin { token: Option<String> },
}

/// The status page: one file, no external assets.
const STATUS_PAGE: &str = include_str!("status.html");

/// A bound listener; `stop` closes it and ends its connections.
pub struct OpsListener {
    stop: CancellationToken,
    accepting: JoinHandle<()>,
    connections: TaskTracker,
}

impl OpsListener {
    pub async fn bind(host: &str, port: u16, service: Service, engine: Weak<Engine>) -> Result<OpsListener, BindError> {
        let listener = TcpListener::bind((host, port)).await.map_err(|source| BindError { port, source })?;
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let accepting = tokio::spawn(accept_loop(listener, engine, Arc::new(service), stop.clone(), connections.clone()));
        Ok(OpsListener { stop, accepting, connections })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.accepting.await;
        self.connections.close();
        self.connections.wait().await;
    }
}

async fn accept_loop(listener: TcpListener, engine: Weak<Engine>, service: Arc<Service>, stop: CancellationToken, connections: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            // Beyond the bound, a connection is closed at once: holding heads open cannot take
            // the process's descriptors through this port.
            Ok(_) if connections.len() >= MAX_CONNECTIONS => {
                tracing::debug!("operator listener: too many connections, one closed unanswered");
            }
            Ok((stream, peer)) => {
                let (engine, service, stop) = (engine.clone(), service.clone(), stop.clone());
                connections.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = answer(stream, peer, &engine, &service) => {}
                    }
                });
            }
            // A failed accept (a connection reset in the backlog, out of descriptors) is not the
            // listener's end; a short pause keeps a persistent failure from spinning.
            Err(err) => {
                tracing::debug!(error = %err, "operator listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, peer: SocketAddr, engine: &Weak<Engine>, service: &Service) {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while head.len() < MAX_HEAD {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let reply = if complete { reply_to(&head, engine, service) } else { plain(400, "Bad Request", "a request head was expected\n") };
    if tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply)).await.is_err() {
        tracing::debug!(%peer, "operator listener: the client did not read the answer");
    }
    let _ = stream.shutdown().await;
}

fn reply_to(head: &[u8], engine: &Weak<Engine>, service: &Service) -> Vec<u8> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return plain(400, "Bad Request", "malformed request head\n");
    }
    let target = request.path.unwrap_or("");
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let head_only = match request.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return plain(405, "Method Not Allowed", "GET or HEAD\n"),
    };
    let Some(engine) = engine.upgrade() else {
        return plain(503, "Service Unavailable", "the proxy is gone\n");
    };
    let (content_type, body) = match service {
        Service::Scrape { path: served } if path == served => (CONTENT_TYPE, engine.prometheus()),
        Service::Scrape { .. } => return plain(404, "Not Found", "not found\n"),
        // Load balancers and orchestrators probe this one without credentials.
        Service::Admin { .. } if path == "/healthz" => {
            return if engine.is_stopping() { plain(503, "Service Unavailable", "stopping\n") } else { plain(200, "OK", "ok\n") };
        }
        // The page holds no data (it fetches `/api/status` with the token), and a browser cannot
        // send a bearer token for the page itself: it loads without one.
        Service::Admin { .. } if path == "/" => ("text/html; charset=utf-8", STATUS_PAGE.to_string()),
        Service::Admin { token: Some(token) } if !bearer_matches(request.headers, token) => {
            return with_body(401, "Unauthorized", "text/plain", "WWW-Authenticate: Bearer realm=\"smartproxy\"\r\n", "a bearer token is required\n", false);
        }
        Service::Admin { .. } => match path {
            "/metrics" => (CONTENT_TYPE, engine.prometheus()),
            "/api/status" => match serde_json::to_string(&engine.status()) {
                Ok(json) => ("application/json", json),
                Err(_) => return plain(500, "Internal Server Error", "the status could not be written\n"),
            },
            _ => return plain(404, "Not Found", "not found\n"),
        },
    };
    with_body(200, "OK", content_type, "Cache-Control: no-store\r\n", &body, head_only)
}

/// `Authorization: Bearer <token>`, compared in time that does not depend on where it differs.
fn bearer_matches(fields: &[httparse::Header<'_>], token: &str) -> bool {
    let Some(sent) = fields.iter().find(|f| f.name.eq_ignore_ascii_case("authorization")).map(|f| f.value) else {
        return false;
    };
    let Some(sent) = sent.strip_prefix(b"Bearer ").or_else(|| sent.strip_prefix(b"bearer ")) else {
        return false;
    };
    let expected = token.as_bytes();
    let differs = sent.len() != expected.len();
    let mismatch = sent.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    !differs && mismatch == 0
}

fn with_body(status: u16, reason: &str, content_type: &str, extra_headers: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        reply.extend_from_slice(body.as_bytes());
    }
    reply
}

fn plain(status: u16, reason: &str, body: &str) -> Vec<u8> {
    with_body(status, reason, "text/plain", "", body, false)
}
