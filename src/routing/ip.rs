//! TEMPORARY stand-in until the real matcher lands.
use std::net::IpAddr;
#[derive(Debug, Clone)]
pub enum IpPattern { Any, Exact(IpAddr), Cidr(IpAddr, u8), Glob(String) }
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip { IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip), v4 => v4 }
}
impl IpPattern {
    pub fn parse(s: &str) -> Result<IpPattern, String> {
        if s == "*" { return Ok(IpPattern::Any); }
        if let Some((a, l)) = s.split_once('/') {
            let ip: IpAddr = a.parse().map_err(|_| format!("{s}: bad address"))?;
            let len: u8 = l.parse().map_err(|_| format!("{s}: bad prefix"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if len > max { return Err(format!("{s}: prefix length {len} is larger than {max}")); }
            return Ok(IpPattern::Cidr(ip, len));
        }
        if let Ok(ip) = s.parse::<IpAddr>() { return Ok(IpPattern::Exact(canonical_ip(ip))); }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'*' || b == b'?') { return Ok(IpPattern::Glob(s.to_string())); }
        Err(format!("{s:?} is not an IP address, CIDR range or glob"))
    }
    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match self {
            IpPattern::Any => true,
            IpPattern::Exact(e) => *e == ip,
            IpPattern::Cidr(net, len) => match (net, ip) {
                (IpAddr::V4(n), IpAddr::V4(i)) => { let m = if *len == 0 { 0 } else { u32::MAX << (32 - len) }; u32::from(*n) & m == u32::from(i) & m }
                (IpAddr::V6(n), IpAddr::V6(i)) => { let m = if *len == 0 { 0 } else { u128::MAX << (128 - len) }; u128::from(*n) & m == u128::from(i) & m }
                _ => false,
            },
            IpPattern::Glob(g) => {
                let s = ip.to_string();
                fn m(p: &[u8], d: &[u8]) -> bool {
                    match p.split_first() { None => d.is_empty(), Some((b'*', r)) => (0..=d.len()).any(|i| m(r, &d[i..])), Some((b'?', r)) => !d.is_empty() && m(r, &d[1..]), Some((c, r)) => d.first() == Some(c) && m(r, &d[1..]) }
                }
                m(g.as_bytes(), s.as_bytes())
            }
        }
    }
}
#[derive(Debug, Clone, Default)]
pub struct IpList { patterns: Vec<IpPattern> }
impl IpList {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<IpList, (usize, String)> {
        let mut patterns = Vec::new();
        for (i, s) in items.iter().enumerate() { patterns.push(IpPattern::parse(s.as_ref()).map_err(|e| (i, e))?); }
        Ok(IpList { patterns })
    }
    pub fn is_empty(&self) -> bool { self.patterns.is_empty() }
    pub fn matches(&self, ip: IpAddr) -> bool { self.patterns.iter().any(|p| p.matches(ip)) }
}
