//! Active health checks: one task per probed backend, started and stopped as route tables come
//! and go (and all stopped with the engine). A probe is a TCP connect for raw routes, else
//! `GET <path>` over HTTP/1.1 (over TLS where the route re-encrypts) whose status must be 2xx or
//! 3xx, each bounded by the check's timeout. Outcomes feed the backend's thresholds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::{BackendState, Thresholds};

#[derive(Debug, Clone)]
pub enum ProbeKind {
    Tcp,
    Http { path: String, tls: Option<Arc<rustls::ClientConfig>> },
}

/// One backend to probe, as a route table describes it.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub route: Arc<str>,
    pub state: Arc<BackendState>,
    pub kind: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
}

impl ProbeSpec {
    /// Same key and same settings: a running task may go on as it is.
    fn key(&self) -> String {
        let kind = match &self.kind {
            ProbeKind::Tcp => "tcp".to_string(),
            ProbeKind::Http { path, tls } => format!("http{} {path}", if tls.is_some() { "s" } else { "" }),
        };
        format!(
            "{}|{}|{}|{kind}|{:?}|{:?}|{}|{}",
            self.route, self.state.host, self.state.port, self.interval, self.timeout, self.thresholds.unhealthy, self.thresholds.healthy
        )
    }
}

/// The running probe tasks by key.
#[derive(Debug, Default)]
pub struct HealthChecks {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl HealthChecks {
    /// Runs exactly the probes of `specs`: new ones start, gone ones stop. Call on a runtime.
    pub fn sync(&self, specs: Vec<ProbeSpec>) {
        let wanted: HashMap<String, ProbeSpec> = specs.into_iter().map(|spec| (spec.key(), spec)).collect();
        let mut tasks = self.tasks.lock();
        tasks.retain(|key, task| {
            let keep = wanted.contains_key(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            tasks.entry(key).or_insert_with(|| tokio::spawn(probe_forever(spec)));
        }
    }

    pub fn stop_all(&self) {
        for (_, task) in self.tasks.lock().drain() {
            task.abort();
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn probe_forever(spec: ProbeSpec) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = matches!(tokio::time::timeout(spec.timeout, probe(&spec)).await, Ok(Ok(())));
        spec.state.record(ok, spec.thresholds);
    }
}

async fn probe(spec: &ProbeSpec) -> Result<(), String> {
    let host = spec.state.host.as_str();
    let stream = TcpStream::connect((host, spec.state.port)).await.map_err(|e| e.to_string())?;
    match &spec.kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http { path, tls: None } => http_probe(stream, host, spec.state.port, path).await,
        ProbeKind::Http { path, tls: Some(config) } => {
            let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
            let stream = TlsConnector::from(config.clone()).connect(name, stream).await.map_err(|e| e.to_string())?;
            http_probe(stream, host, spec.state.port, path).await
        }
    }
}

/// 2xx and 3xx are healthy; anything else, or no status line, is not.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, host: &str, port: u16, path: &str) -> Result<(), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: smartproxy-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut filled = 0;
    while filled < 12 {
        let n = stream.read(&mut head[filled..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        filled += n;
    }
    let status = status_code(&head[..filled]).ok_or("not an HTTP status line")?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn status_code(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status_code;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"garbage in here"), None);
    }
}
