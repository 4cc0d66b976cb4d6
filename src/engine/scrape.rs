//! The `metrics.prometheus` listener: `GET <path>` (or `HEAD`) is answered with the engine's
//! Prometheus exposition, another path with 404, another method with 405; one request per
//! connection, closed after the answer. A scraper is a trusted tool on a local port, but the
//! listener still bounds what it reads (one head of at most `MAX_HEAD` bytes within
//! `READ_TIMEOUT`) and every connection task ends with the listener.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Engine;
use crate::config::PrometheusOptions;
use crate::listener::BindError;
use crate::metrics::prometheus::CONTENT_TYPE;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound scrape listener; `stop` closes it and ends its connections.
pub struct ScrapeListener {
    stop: CancellationToken,
    accepting: JoinHandle<()>,
    connections: TaskTracker,
}

impl ScrapeListener {
    pub async fn bind(options: &PrometheusOptions, engine: Weak<Engine>) -> Result<ScrapeListener, BindError> {
        let address = format!("{}:{}", options.host, options.port);
        let listener = TcpListener::bind(&address).await.map_err(|source| BindError { port: options.port, source })?;
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let path: std::sync::Arc<str> = options.path.as_str().into();
        let accepting = tokio::spawn(accept_loop(listener, engine, path, stop.clone(), connections.clone()));
        Ok(ScrapeListener { stop, accepting, connections })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.accepting.await;
        self.connections.close();
        self.connections.wait().await;
    }
}

async fn accept_loop(listener: TcpListener, engine: Weak<Engine>, path: std::sync::Arc<str>, stop: CancellationToken, connections: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (engine, path, stop) = (engine.clone(), path.clone(), stop.clone());
                connections.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = answer(stream, peer, &engine, &path) => {}
                    }
                });
            }
            // A failed accept (a connection reset in the backlog, out of descriptors) is not the
            // listener's end; a short pause keeps a persistent failure from spinning.
            Err(err) => {
                tracing::debug!(error = %err, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, peer: SocketAddr, engine: &Weak<Engine>, path: &str) {
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
    let reply = if complete { reply_to(&head, engine, path) } else { plain(400, "Bad Request", "a request head was expected\n") };
    if tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&reply)).await.is_err() {
        tracing::debug!(%peer, "metrics listener: the scraper did not read the answer");
    }
    let _ = stream.shutdown().await;
}

fn reply_to(head: &[u8], engine: &Weak<Engine>, path: &str) -> Vec<u8> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return plain(400, "Bad Request", "malformed request head\n");
    }
    let target = request.path.unwrap_or("");
    let asked_path = target.split_once('?').map_or(target, |(path, _)| path);
    if asked_path != path {
        return plain(404, "Not Found", "not found\n");
    }
    let head_only = match request.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return plain(405, "Method Not Allowed", "GET or HEAD\n"),
    };
    let Some(engine) = engine.upgrade() else {
        return plain(503, "Service Unavailable", "the proxy is gone\n");
    };
    let body = engine.prometheus();
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        reply.extend_from_slice(body.as_bytes());
    }
    reply
}

fn plain(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
}
