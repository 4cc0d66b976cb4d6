//! What the access log learns of a request: the request as the client sent it (before any phase
//! rewrites it, and without its query or credentials), then the route, backend and status, and
//! the bytes and time once the response has been passed on. Made only when the log is on.

use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{header, Response, Version};
use hyper::body::Body;

use super::ConnectionContext;
use crate::access_log::{AccessLog, AccessRecord, LogFormat};
use crate::http::body::ProxyBody;

/// A request's record and the log it goes to when the request ends.
pub(super) struct PendingRecord {
    pub record: Box<AccessRecord>,
    log: Arc<AccessLog>,
}

impl PendingRecord {
    pub fn begin(conn: &ConnectionContext, head: &Parts, received: Instant) -> Option<PendingRecord> {
        let log = conn.env.access_log.as_ref()?;
        let mut record = Box::new(AccessRecord::begin(conn.client_ip, protocol_name(head.version), conn.https));
        record.started = received;
        record.method = Some(head.method.clone());
        record.host = request_host(head).map(Into::into);
        record.path = Some(head.uri.path().into());
        if log.format() == LogFormat::Combined {
            record.referer = head.headers.get(header::REFERER).and_then(|v| v.to_str().ok()).map(|v| without_secrets(v).into());
            record.user_agent = head.headers.get(header::USER_AGENT).map(|v| String::from_utf8_lossy(v.as_bytes()).into());
        }
        Some(PendingRecord { record, log: log.clone() })
    }

    /// A response the proxy gave itself (or a 101): it is whole already.
    pub fn answered(mut self, route: Option<&Arc<crate::routing::table::Route>>, response: &Response<ProxyBody>) {
        let status = response.status().as_u16();
        self.record.route = route.map(|r| r.label.clone());
        self.record.status = Some(status);
        self.record.bytes_out = response.body().size_hint().exact().unwrap_or(0);
        if status == 101 {
            self.record.termination = "upgraded";
        }
        self.finish();
    }

    /// The request is over: the record goes to the writer.
    pub fn finish(mut self) {
        self.record.duration = self.record.started.elapsed();
        self.log.submit(self.record);
    }
}

pub(super) fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// The host the client named: `Host`, else the target's authority (HTTP/2's `:authority`),
/// without any user information.
fn request_host(head: &Parts) -> Option<String> {
    if let Some(host) = head.headers.get(header::HOST) {
        return Some(String::from_utf8_lossy(host.as_bytes()).into_owned());
    }
    let authority = head.uri.authority()?.as_str();
    Some(authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_string())
}

/// A URL as a log may keep it: no user information, no query, no fragment.
fn without_secrets(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referers_lose_credentials_queries_and_fragments() {
        assert_eq!(without_secrets("https://user:pw@example.com/a/b?token=1#x"), "https://example.com/a/b");
        assert_eq!(without_secrets("https://example.com/p@th?q"), "https://example.com/p@th");
        assert_eq!(without_secrets("/relative?secret"), "/relative");
        assert_eq!(without_secrets("https://example.com"), "https://example.com");
    }
}
