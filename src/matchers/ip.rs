//! Client-IP patterns of `match.clientIp`, `ipAllowList` and `ipBlockList`: exact addresses, CIDR
//! ranges (v4 and v6), globs over the textual form (`192.168.*`, `10.0.?.1`, `2001:db8:*`) and `*`.
//! An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports) is the same
//! client as `a.b.c.d`, both in patterns and in the addresses matched, so every comparison works
//! on `canonical_ip`. Matching allocates nothing: globs format the address into a stack buffer.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};

/// The address a client is known by: IPv4-mapped IPv6 becomes plain IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpPattern {
    Any,
    Exact(IpAddr),
    /// Network address already masked to `prefix` bits.
    V4Net { network: u32, prefix: u8 },
    V6Net { network: u128, prefix: u8 },
    /// Lower-cased glob of `*` (any run) and `?` (one character) over the canonical text form.
    Glob(Box<str>),
}

impl IpPattern {
    pub fn parse(input: &str) -> Result<IpPattern, String> {
        let s = input.trim();
        if s == "*" {
            return Ok(IpPattern::Any);
        }
        if s.is_empty() {
            return Err("an empty string is not an IP address, CIDR range or glob".to_string());
        }
        if let Some((address, prefix)) = s.split_once('/') {
            return parse_cidr(input, address, prefix);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(IpPattern::Exact(canonical_ip(ip)));
        }
        let is_glob_char = |c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '*' | '?');
        if (s.contains('*') || s.contains('?')) && s.chars().all(is_glob_char) {
            let mut glob = s.to_ascii_lowercase();
            // `::ffff:10.*` names the same clients as `10.*`, which is how they are matched.
            if let Some(rest) = glob.strip_prefix("::ffff:") {
                if rest.contains('.') {
                    glob = rest.to_string();
                }
            }
            return Ok(IpPattern::Glob(glob.into_boxed_str()));
        }
        Err(format!("{input:?} is not an IP address, CIDR range (10.0.0.0/8) or glob (192.168.*)"))
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self, ip) {
            (IpPattern::Any, _) => true,
            (IpPattern::Exact(expected), ip) => *expected == ip,
            (IpPattern::V4Net { network, prefix }, IpAddr::V4(v4)) => {
                u32::from(v4) & v4_mask(*prefix) == *network
            }
            (IpPattern::V6Net { network, prefix }, IpAddr::V6(v6)) => {
                u128::from(v6) & v6_mask(*prefix) == *network
            }
            (IpPattern::Glob(glob), ip) => {
                let mut text = AddrText::default();
                // 45 bytes hold the longest IPv6 text form; a failed write cannot happen.
                if write!(text, "{ip}").is_err() {
                    return false;
                }
                glob_match(glob.as_bytes(), text.as_bytes())
            }
            _ => false,
        }
    }
}

fn parse_cidr(input: &str, address: &str, prefix: &str) -> Result<IpPattern, String> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("{input:?} is not a CIDR range: {address:?} is not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("{input:?} is not a CIDR range: {prefix:?} is not a prefix length"))?;
    match ip {
        IpAddr::V4(v4) => {
            if prefix > 32 {
                return Err(format!("{input:?}: prefix length {prefix} is larger than 32"));
            }
            Ok(v4_net(v4, prefix))
        }
        IpAddr::V6(v6) => {
            if prefix > 128 {
                return Err(format!("{input:?}: prefix length {prefix} is larger than 128"));
            }
            // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: mapped clients are matched as IPv4.
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Ok(v4_net(v4, prefix - 96));
            }
            Ok(IpPattern::V6Net { network: u128::from(v6) & v6_mask(prefix), prefix })
        }
    }
}

fn v4_net(v4: Ipv4Addr, prefix: u8) -> IpPattern {
    IpPattern::V4Net { network: u32::from(v4) & v4_mask(prefix), prefix }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// `*` any run (possibly empty), `?` exactly one byte; same greedy walk as the domain matcher.
fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if g < glob.len() && (glob[g] == b'?' || glob[g] == text[t]) {
            g += 1;
            t += 1;
        } else if let Some((star_g, star_t)) = star {
            g = star_g + 1;
            t = star_t + 1;
            star = Some((star_g, star_t + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

/// Fixed buffer for an address's text form (`Display` of `Ipv6Addr` is at most 45 bytes).
struct AddrText {
    buf: [u8; 48],
    len: usize,
}

impl Default for AddrText {
    fn default() -> Self {
        AddrText { buf: [0; 48], len: 0 }
    }
}

impl AddrText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A parsed list; an empty list matches nothing (callers decide what "no list" means).
#[derive(Debug, Clone, Default)]
pub struct IpList {
    patterns: Vec<IpPattern>,
}

impl IpList {
    /// On failure: the index of the bad entry and why it is bad.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<IpList, (usize, String)> {
        let patterns = items
            .iter()
            .enumerate()
            .map(|(index, item)| IpPattern::parse(item.as_ref()).map_err(|reason| (index, reason)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IpList { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }
    fn m(pattern: &str, addr: &str) -> bool {
        IpPattern::parse(pattern).unwrap().matches(ip(addr))
    }

    #[test]
    fn exact_v4_v6_and_mapped_are_one_client() {
        assert!(m("10.1.2.3", "10.1.2.3"));
        assert!(!m("10.1.2.3", "10.1.2.4"));
        assert!(m("10.1.2.3", "::ffff:10.1.2.3"));
        assert!(m("::ffff:10.1.2.3", "10.1.2.3"));
        assert!(m("::1", "::1"));
        assert!(m("2001:DB8::1", "2001:db8:0:0::1"));
        assert!(!m("::1", "127.0.0.1"));
        assert_eq!(canonical_ip(v6("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical_ip(v6("::1")), ip("::1"));
    }

    #[test]
    fn cidr_v4() {
        assert!(m("10.0.0.0/8", "10.255.1.1"));
        assert!(!m("10.0.0.0/8", "11.0.0.1"));
        assert!(m("192.168.1.0/24", "::ffff:192.168.1.77"));
        assert!(m("192.168.1.77/32", "192.168.1.77"));
        assert!(!m("192.168.1.77/32", "192.168.1.78"));
        assert!(m("0.0.0.0/0", "8.8.8.8"));
        assert!(!m("0.0.0.0/0", "::1"), "a v4 range never covers a real v6 client");
        // Host bits are masked off rather than refused, as nginx and HAProxy do.
        assert!(m("10.1.2.3/16", "10.1.200.200"));
    }

    #[test]
    fn cidr_v6_and_mapped_ranges() {
        assert!(m("2001:db8::/32", "2001:db8:ffff::1"));
        assert!(!m("2001:db8::/32", "2001:db9::1"));
        assert!(m("::/0", "::1"));
        assert!(!m("::/0", "1.2.3.4"));
        assert!(m("::1/128", "::1"));
        assert!(m("::ffff:10.0.0.0/104", "10.9.9.9"));
        assert!(!m("::ffff:10.0.0.0/104", "11.0.0.1"));
        assert_eq!(IpPattern::parse("::ffff:10.0.0.0/104").unwrap(), IpPattern::V4Net { network: 0x0a00_0000, prefix: 8 });
    }

    #[test]
    fn globs_over_the_text_form() {
        assert!(m("192.168.*", "192.168.0.1"));
        assert!(m("192.168.*", "::ffff:192.168.0.1"));
        assert!(!m("192.168.*", "192.169.0.1"));
        assert!(m("10.0.?.1", "10.0.5.1"));
        assert!(!m("10.0.?.1", "10.0.55.1"));
        assert!(m("*.1", "10.0.0.1"));
        assert!(m("2001:DB8:*", "2001:db8::5"));
        assert!(m("::ffff:127.*", "127.0.0.1"));
        assert!(!m("192.168.*", "2001:db8::1"));
    }

    #[test]
    fn any_matches_everything() {
        assert!(m("*", "1.2.3.4"));
        assert!(m("*", "::1"));
    }

    #[test]
    fn parse_errors_explain_themselves() {
        for (bad, needle) in [
            ("10.0.0.0/33", "larger than 32"),
            ("::/129", "larger than 128"),
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/x", "not a prefix length"),
            ("", "empty"),
            ("example.com", "not an IP address"),
            ("10.0.0.256", "not an IP address"),
        ] {
            let err = IpPattern::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn list_reports_the_index_of_the_bad_entry() {
        let list = IpList::parse(&["127.0.0.1", "10.0.0.0/8"]).unwrap();
        assert!(list.matches(ip("10.2.3.4")));
        assert!(list.matches(ip("::ffff:127.0.0.1")));
        assert!(!list.matches(ip("11.0.0.1")));
        assert!(IpList::parse::<&str>(&[]).unwrap().is_empty());
        let (index, reason) = IpList::parse(&["1.2.3.4", "nope"]).unwrap_err();
        assert_eq!(index, 1);
        assert!(reason.contains("nope"));
    }

    #[test]
    fn longest_v6_text_fits_the_buffer() {
        let longest = v6("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255");
        assert!(IpPattern::parse("ffff:*").unwrap().matches(longest));
    }
}
