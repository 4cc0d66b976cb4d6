//! Header templates (API.md "HTTP rewriting"): the `headers.request` / `headers.response` values of
//! routes and targets, compiled once per route table, rendered per request with `{domain}`,
//! `{path}`, `{query}`, `{clientIp}`, `{port}`, `{routeName}`, `{connectionId}` and `{jwt.<claim>}`.
//! A leaf: routing holds compiled templates, the HTTP engine renders them, neither owns them.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The values a header template may use.
pub struct TemplateContext<'a> {
    pub domain: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub query: &'a str,
    pub client_ip: IpAddr,
    pub route_name: &'a str,
    pub connection_id: u64,
    /// The verified JWT's claims, for `{jwt.<claim>}`.
    pub claims: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    Domain,
    Port,
    Path,
    Query,
    ClientIp,
    RouteName,
    ConnectionId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    Var(Variable),
    /// `{jwt.<claim>}`: a claim of the request's verified token (empty without one).
    Claim(Box<str>),
}

/// One `name: value-template` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTemplate {
    name: HeaderName,
    pieces: Vec<Piece>,
}

impl HeaderTemplate {
    /// Unknown `{words}` stay literal text, so values such as JSON survive untouched.
    pub fn parse(name: &str, value: &str) -> Result<HeaderTemplate, String> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!("the value of {name} contains a line break or NUL"));
        }
        let mut pieces = Vec::new();
        let mut rest = value;
        let mut text = String::new();
        while let Some(open) = rest.find('{') {
            let (before, from_brace) = rest.split_at(open);
            text.push_str(before);
            let variable = from_brace.find('}').and_then(|close| {
                let piece = match &from_brace[1..close] {
                    "domain" => Piece::Var(Variable::Domain),
                    "port" => Piece::Var(Variable::Port),
                    "path" => Piece::Var(Variable::Path),
                    "query" => Piece::Var(Variable::Query),
                    "clientIp" => Piece::Var(Variable::ClientIp),
                    "routeName" => Piece::Var(Variable::RouteName),
                    "connectionId" => Piece::Var(Variable::ConnectionId),
                    word => match word.strip_prefix("jwt.") {
                        Some(claim) if !claim.is_empty() => Piece::Claim(claim.into()),
                        _ => return None,
                    },
                };
                Some((piece, close))
            });
            match variable {
                Some((piece, close)) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text).into_boxed_str()));
                    }
                    pieces.push(piece);
                    rest = &from_brace[close + 1..];
                }
                None => {
                    text.push('{');
                    rest = &from_brace[1..];
                }
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text.into_boxed_str()));
        }
        Ok(HeaderTemplate { name, pieces })
    }

    /// `None` when the value cannot be rendered: a claim the token lacks, or a value that is not
    /// visible ASCII (a claim holding a line break, a path with bytes a header cannot carry).
    fn render(&self, ctx: &TemplateContext<'_>) -> Option<HeaderValue> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Var(Variable::Domain) => out.push_str(ctx.domain),
                Piece::Var(Variable::Port) => {
                    let _ = write!(out, "{}", ctx.port);
                }
                Piece::Var(Variable::Path) => out.push_str(ctx.path),
                Piece::Var(Variable::Query) => out.push_str(ctx.query),
                Piece::Var(Variable::ClientIp) => {
                    let _ = write!(out, "{}", ctx.client_ip);
                }
                Piece::Var(Variable::RouteName) => out.push_str(ctx.route_name),
                Piece::Var(Variable::ConnectionId) => {
                    let _ = write!(out, "{}", ctx.connection_id);
                }
                Piece::Claim(name) => match ctx.claims.and_then(|claims| claims.get(&**name)) {
                    Some(serde_json::Value::String(text)) => out.push_str(text),
                    Some(serde_json::Value::Null) | None => return None,
                    Some(other) => {
                        let _ = write!(out, "{other}");
                    }
                },
            }
        }
        if !out.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
            return None;
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// Sets every template's header, replacing what was there (later lists override earlier ones). A
/// template that cannot be rendered removes its header: the client's own value never passes in
/// its place.
pub fn apply_templates(headers: &mut HeaderMap, templates: &[HeaderTemplate], ctx: &TemplateContext<'_>) {
    for template in templates {
        match template.render(ctx) {
            Some(value) => {
                headers.insert(template.name.clone(), value);
            }
            None => {
                headers.remove(&template.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request that sent its own `X-User`.
    fn sent_user() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("admin"));
        headers
    }

    #[test]
    fn templates_render_known_variables_and_keep_the_rest() {
        let t = HeaderTemplate::parse("X-Info", "{domain}|{port}|{path}|{query}|{clientIp}|{routeName}|{unknown}|{jwt.sub}|{jwt.n}|{jwt.}|{").unwrap();
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"sub":"alice","n":3}"#).unwrap();
        let ctx = TemplateContext {
            domain: "a.com",
            port: 80,
            path: "/p",
            query: "q=1",
            client_ip: "::1".parse().unwrap(),
            route_name: "r",
            connection_id: 7,
            claims: Some(&claims),
        };
        let mut h = HeaderMap::new();
        apply_templates(&mut h, &[t], &ctx);
        assert_eq!(h["x-info"], "a.com|80|/p|q=1|::1|r|{unknown}|alice|3|{jwt.}|{");
    }

    #[test]
    fn a_template_that_cannot_be_rendered_removes_the_clients_value() {
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"sub":"a\r\nX-Admin: 1","nul":"a\u0000b","utf":"caf\u00e9","ok":"bob"}"#).unwrap();
        let ctx = TemplateContext {
            domain: "a.com",
            port: 80,
            path: "/p",
            query: "",
            client_ip: "::1".parse().unwrap(),
            route_name: "r",
            connection_id: 7,
            claims: Some(&claims),
        };
        for claim in ["sub", "nul", "utf", "missing"] {
            let t = HeaderTemplate::parse("X-User", &format!("{{jwt.{claim}}}")).unwrap();
            let mut h = sent_user();
            apply_templates(&mut h, &[t], &ctx);
            assert!(!h.contains_key("x-user"), "{claim}: {:?}", h.get("x-user"));
        }
        let t = HeaderTemplate::parse("X-User", "{jwt.ok}").unwrap();
        let mut h = sent_user();
        apply_templates(&mut h, &[t], &TemplateContext { claims: None, ..ctx });
        assert!(!h.contains_key("x-user"), "no token: no claim");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(HeaderTemplate::parse("bad name", "x").is_err());
        assert!(HeaderTemplate::parse("x", "a\r\nb").is_err());
    }
}
