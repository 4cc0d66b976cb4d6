//! Path patterns of `match.path`, `targets[].match.path` and the auth `excludePaths`, per API.md:
//! `/api` matches only `/api`; a pattern ending in `/` or containing `*` is a prefix or glob
//! (`/api/` and `/api/*` match `/api/x/y`); `:name` matches one non-empty segment (`/users/:id`).
//! Paths are compared without their query and case-sensitively, as origin servers see them.
//!
//! Matching never recurses and never allocates: literals and `:params` are deterministic, so only
//! the last `*` needs to be a backtrack point (the same walk as the domain matcher).

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(Box<str>),
    /// One path segment, at least one byte, no `/`.
    Param,
    /// Any run of bytes, `/` included, possibly empty.
    Star,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: Box<str>,
    tokens: Vec<Token>,
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<PathPattern, String> {
        if !pattern.starts_with('/') && pattern != "*" {
            return Err(format!("{pattern:?} is not a path pattern: it must start with '/'"));
        }
        if pattern.contains('?') || pattern.contains('#') {
            return Err(format!("{pattern:?} is not a path pattern: queries and fragments are not matched"));
        }
        let mut tokens: Vec<Token> = Vec::new();
        let mut literal = String::new();
        let mut rest = pattern;
        let mut previous: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            let at_segment_start = previous == Some('/');
            previous = Some(c);
            if c == '*' {
                flush(&mut literal, &mut tokens);
                if tokens.last() != Some(&Token::Star) {
                    tokens.push(Token::Star);
                }
                rest = &rest[1..];
            } else if c == ':' && at_segment_start {
                let name_len = rest[1..].find('/').unwrap_or(rest.len() - 1);
                let name = &rest[1..1 + name_len];
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("{pattern:?}: ':{name}' is not a valid parameter name"));
                }
                flush(&mut literal, &mut tokens);
                tokens.push(Token::Param);
                rest = &rest[1 + name_len..];
            } else {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        let ends_with_slash = literal.ends_with('/');
        flush(&mut literal, &mut tokens);
        if ends_with_slash && pattern.len() > 1 {
            tokens.push(Token::Star);
        }
        Ok(PathPattern { source: pattern.into(), tokens })
    }

    /// `path` may carry a query (`/a?b=c`); it is ignored.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p).as_bytes();
        let tokens = &self.tokens;
        let (mut t, mut p) = (0usize, 0usize);
        // (token index after the star, path position the star has absorbed up to)
        let mut star: Option<(usize, usize)> = None;
        loop {
            if t == tokens.len() && p == path.len() {
                return true;
            }
            let step = match tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t + 1, p));
                    t += 1;
                    continue;
                }
                Some(Token::Literal(lit)) => {
                    let lit = lit.as_bytes();
                    if path[p..].starts_with(lit) {
                        Some(lit.len())
                    } else {
                        None
                    }
                }
                Some(Token::Param) => {
                    let len = path[p..].iter().position(|&b| b == b'/').unwrap_or(path.len() - p);
                    (len > 0).then_some(len)
                }
                None => None,
            };
            match step {
                Some(len) => {
                    p += len;
                    t += 1;
                }
                None => match star {
                    Some((after_star, absorbed)) if absorbed < path.len() => {
                        star = Some((after_star, absorbed + 1));
                        t = after_star;
                        p = absorbed + 1;
                    }
                    _ => return false,
                },
            }
        }
    }
}

fn flush(literal: &mut String, tokens: &mut Vec<Token>) {
    if !literal.is_empty() {
        tokens.push(Token::Literal(std::mem::take(literal).into_boxed_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn plain_patterns_are_exact() {
        assert!(m("/api", "/api"));
        assert!(m("/api", "/api?x=1"));
        assert!(!m("/api", "/api/"));
        assert!(!m("/api", "/api/users"));
        assert!(!m("/api", "/apix"));
        assert!(!m("/api", "/API"));
        assert!(m("/", "/"));
        assert!(!m("/", "/x"));
    }

    #[test]
    fn trailing_slash_and_star_are_prefixes() {
        assert!(m("/api/", "/api/"));
        assert!(m("/api/", "/api/users/1"));
        assert!(!m("/api/", "/api"));
        assert!(m("/api/*", "/api/users/1"));
        assert!(m("/api/*", "/api/"));
        assert!(!m("/api/*", "/apix"));
        assert!(m("/static*", "/static.css"));
        assert!(m("*", "/anything/at/all"));
        assert!(m("/*", "/"));
    }

    #[test]
    fn inner_stars_glob() {
        assert!(m("/api/*/users", "/api/v1/users"));
        assert!(m("/api/*/users", "/api/v1/beta/users"));
        assert!(!m("/api/*/users", "/api/v1/users/2"));
        assert!(m("/*.png", "/img/a.b.png"));
        assert!(!m("/*.png", "/img/a.png.txt"));
    }

    #[test]
    fn params_take_one_non_empty_segment() {
        assert!(m("/users/:id", "/users/42"));
        assert!(!m("/users/:id", "/users/"));
        assert!(!m("/users/:id", "/users/42/posts"));
        assert!(m("/users/:id/posts", "/users/42/posts"));
        assert!(m("/users/:id/*", "/users/42/posts/7"));
        assert!(m("/:a/:b", "/x/y"));
        assert!(!m("/:a/:b", "/x"));
        // A colon inside a segment is literal.
        assert!(m("/a:b", "/a:b"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["api", "/a?b", "/users/:", "/users/:id-x", "/a#b"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_paths_stay_fast() {
        let pattern = PathPattern::parse(&"/*a".repeat(30)).unwrap();
        let path = "/".to_string() + &"a".repeat(5000);
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&path));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
