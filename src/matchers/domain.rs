//! Domain patterns of `match.domains`: parsed once when a route table is built, matched against
//! an SNI name or a Host header on every connection. Matching follows API.md: case-insensitive, a
//! trailing dot ignored on both sides, `*` matches any run of characters (dots included), so
//! `*.example.com` covers `a.b.example.com` but not `example.com`.
//!
//! The matcher is the classic greedy two-pointer wildcard walk: linear for one `*`, worst case
//! O(pattern × name) with several, never recursive, and it allocates nothing per match (the name is
//! compared byte by byte, lower-cased on the fly).

use std::fmt;

/// Longest DNS name (RFC 1035 §2.3.4, without the trailing dot).
const MAX_NAME_LEN: usize = 253;

#[derive(Clone, PartialEq, Eq)]
pub struct DomainPattern {
    /// Lower-cased, trailing dot removed, runs of `*` collapsed to one.
    pattern: Box<str>,
    kind: PatternKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternKind {
    /// `*`: every non-empty name.
    Any,
    /// No wildcard: a length check then a case-insensitive compare.
    Exact,
    /// At least one `*` somewhere.
    Wildcard,
}

impl fmt::Debug for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainPattern({:?})", self.pattern)
    }
}

impl DomainPattern {
    /// Accepts letters, digits, `-`, `_`, `.` and `*`; refuses empty labels (`a..b`), a leading dot
    /// and names longer than DNS allows. Errors say what is wrong with the pattern as written.
    pub fn parse(pattern: &str) -> Result<DomainPattern, String> {
        let trimmed = pattern.trim();
        let without_dot = trimmed.strip_suffix('.').unwrap_or(trimmed);
        if without_dot.is_empty() {
            return Err(format!("{pattern:?} is not a valid domain pattern: it is empty"));
        }
        if without_dot.len() > MAX_NAME_LEN {
            return Err(format!(
                "{pattern:?} is not a valid domain pattern: longer than {MAX_NAME_LEN} characters"
            ));
        }
        if let Some(bad) = without_dot
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*')))
        {
            return Err(format!(
                "{pattern:?} is not a valid domain pattern: {bad:?} is not allowed (use punycode for international names)"
            ));
        }
        if without_dot.starts_with('.') || without_dot.contains("..") {
            return Err(format!("{pattern:?} is not a valid domain pattern: it has an empty label"));
        }
        let mut normalized = String::with_capacity(without_dot.len());
        for c in without_dot.chars() {
            if c == '*' && normalized.ends_with('*') {
                continue;
            }
            normalized.push(c.to_ascii_lowercase());
        }
        let kind = if normalized == "*" {
            PatternKind::Any
        } else if normalized.contains('*') {
            PatternKind::Wildcard
        } else {
            PatternKind::Exact
        };
        Ok(DomainPattern { pattern: normalized.into_boxed_str(), kind })
    }

    /// `name` as it came from the wire (SNI or Host without port); any case, optional trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.as_bytes();
        let name = name.strip_suffix(b".").unwrap_or(name);
        if name.is_empty() {
            return false;
        }
        let pattern = self.pattern.as_bytes();
        match self.kind {
            PatternKind::Any => true,
            PatternKind::Exact => pattern.eq_ignore_ascii_case(name),
            PatternKind::Wildcard => wildcard_match(pattern, name),
        }
    }

    /// The normalized pattern (lower case, no trailing dot).
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// True when the pattern contains a `*`.
    #[cfg(test)]
    pub fn is_wildcard(&self) -> bool {
        self.kind != PatternKind::Exact
    }
}

/// `pattern` is lower case; `name` is compared case-insensitively. On a mismatch after a `*`, the
/// star absorbs one more byte and the walk resumes right after it: the last star is the only
/// backtrack point needed, because an earlier star can always absorb what a later one would.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n].to_ascii_lowercase() {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        DomainPattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn exact_names_ignore_case_and_trailing_dot() {
        assert!(m("example.com", "example.com"));
        assert!(m("Example.COM", "example.com"));
        assert!(m("example.com", "EXAMPLE.com."));
        assert!(m("example.com.", "example.com"));
        assert!(!m("example.com", "example.co"));
        assert!(!m("example.com", "www.example.com"));
        assert!(!m("example.com", ""));
        assert!(!m("example.com", "."));
    }

    #[test]
    fn leading_star_spans_one_or_more_labels_but_not_the_apex() {
        assert!(m("*.example.com", "a.example.com"));
        assert!(m("*.example.com", "a.b.example.com"));
        assert!(m("*.Example.com", "A.EXAMPLE.COM."));
        assert!(!m("*.example.com", "example.com"));
        assert!(!m("*.example.com", "aexample.com"));
        assert!(!m("*.example.com", "a.example.org"));
        assert!(!m("*.example.com", "a.example.com.evil"));
    }

    #[test]
    fn trailing_and_inner_stars() {
        assert!(m("example.*", "example.com"));
        assert!(m("example.*", "example.co.uk"));
        assert!(!m("example.*", "example"));
        assert!(!m("example.*", "www.example.com"));
        assert!(m("api.*.example.com", "api.eu.example.com"));
        assert!(m("api-*.example.com", "api-1.example.com"));
        assert!(!m("api-*.example.com", "api.example.com"));
        assert!(m("*a*b*", "xxaxxbxx"));
        assert!(m("*a*b", "ab"));
        assert!(!m("*a*b", "ba"));
        assert!(m("a**b", "ab"));
    }

    #[test]
    fn backtracking_finds_the_later_occurrence() {
        // The first ".com" seen is not the suffix; the walk must retry past it.
        assert!(m("*.com", "a.com.b.com"));
        assert!(m("*abc", "ababc"));
        assert!(m("*aab", "aaab"));
        assert!(!m("*aab", "aaba"));
    }

    #[test]
    fn lone_star_matches_every_name_but_not_the_empty_one() {
        assert!(m("*", "anything.example"));
        assert!(m("*", "localhost"));
        assert!(!m("*", ""));
        assert!(m("**", "x"));
    }

    #[test]
    fn parse_normalizes_and_rejects_garbage() {
        let p = DomainPattern::parse("  WWW.Example.COM.  ").unwrap();
        assert_eq!(p.as_str(), "www.example.com");
        assert!(!p.is_wildcard());
        assert_eq!(DomainPattern::parse("a***.b").unwrap().as_str(), "a*.b");
        assert!(DomainPattern::parse("*.b").unwrap().is_wildcard());
        for bad in ["", ".", "a..b", ".a.com", "exa mple.com", "exämple.com", "a/b", "a:80"] {
            let err = DomainPattern::parse(bad).unwrap_err();
            assert!(err.contains("not a valid domain pattern"), "{bad}: {err}");
        }
        assert!(DomainPattern::parse(&"a".repeat(254)).is_err());
        assert!(DomainPattern::parse(&"a".repeat(253)).is_ok());
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        // A recursive matcher is exponential here; the two-pointer walk is quadratic at worst.
        let pattern = DomainPattern::parse(&"*a".repeat(40)).unwrap();
        let name = "a".repeat(200) + "b";
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&name));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn agrees_with_a_reference_matcher_on_generated_cases() {
        // Exhaustive small alphabet: every pattern up to 4 symbols against every name up to 5.
        fn reference(p: &[u8], n: &[u8]) -> bool {
            match p.split_first() {
                None => n.is_empty(),
                Some((b'*', rest)) => (0..=n.len()).any(|i| reference(rest, &n[i..])),
                Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
            }
        }
        fn all(alphabet: &[u8], max: usize) -> Vec<Vec<u8>> {
            let mut out = vec![vec![]];
            let mut frontier = vec![vec![]];
            for _ in 0..max {
                let mut next = Vec::new();
                for s in &frontier {
                    for &c in alphabet {
                        let mut t: Vec<u8> = s.clone();
                        t.push(c);
                        next.push(t);
                    }
                }
                out.extend(next.iter().cloned());
                frontier = next;
            }
            out
        }
        for p in all(b"a.*", 4) {
            for n in all(b"a.", 5) {
                assert_eq!(wildcard_match(&p, &n), reference(&p, &n), "{:?} vs {:?}",
                    String::from_utf8_lossy(&p), String::from_utf8_lossy(&n));
            }
        }
    }
}
