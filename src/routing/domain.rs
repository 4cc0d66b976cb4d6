//! TEMPORARY stand-in until the real matcher lands.
#[derive(Debug, Clone)]
pub struct DomainPattern { pattern: String }
impl DomainPattern {
    pub fn parse(pattern: &str) -> Result<DomainPattern, String> {
        let p = pattern.trim_end_matches('.').to_ascii_lowercase();
        if p.is_empty() || p.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"-.*_".contains(&b))) {
            return Err(format!("{pattern:?} is not a valid domain pattern"));
        }
        Ok(DomainPattern { pattern: p })
    }
    pub fn matches(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        fn m(p: &[u8], d: &[u8]) -> bool {
            match p.split_first() {
                None => d.is_empty(),
                Some((b'*', rest)) => (1..=d.len()).any(|i| m(rest, &d[i..])),
                Some((c, rest)) => d.first() == Some(c) && m(rest, &d[1..]),
            }
        }
        !d.is_empty() && m(self.pattern.as_bytes(), d.as_bytes())
    }
    pub fn as_str(&self) -> &str { &self.pattern }
}
