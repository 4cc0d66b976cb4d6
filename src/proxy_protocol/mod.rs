//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary): parsing the header a trusted
//! balancer puts in front of a connection, and writing one towards a backend. Pure functions over
//! byte slices: no sockets, no allocation beyond the parsed result, every input answered
//! (complete, incomplete, invalid or not a PROXY header), never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// A v1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Larger v2 headers (TLVs) are refused: a balancer's header is a few hundred bytes at most.
pub const V2_MAX: usize = 16 + 4096;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address and the address it connected to; `None` for v2 `LOCAL` (the balancer
    /// speaking for itself) and for `UNKNOWN`/UNIX/UNSPEC families: the socket's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// The header and how many bytes it took; the rest belongs to the client's stream.
    Complete(ProxyHeader, usize),
    /// A PROXY header may follow: read more.
    Incomplete,
    /// The bytes start like a PROXY header but are not a valid one.
    Invalid(&'static str),
    /// Not a PROXY header at all.
    NotProxy,
}

pub fn parse(buf: &[u8]) -> Parse {
    if buf.is_empty() {
        return Parse::Incomplete;
    }
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] == V2_SIGNATURE[..sig] {
        return if sig < V2_SIGNATURE.len() { Parse::Incomplete } else { parse_v2(buf) };
    }
    let prefix = buf.len().min(6);
    if buf[..prefix] == b"PROXY "[..prefix] {
        return if prefix < 6 { Parse::Incomplete } else { parse_v1(buf) };
    }
    Parse::NotProxy
}

fn parse_v1(buf: &[u8]) -> Parse {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Parse::Invalid("v1 line longer than 107 bytes") } else { Parse::Incomplete };
    };
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Parse::Invalid("v1 line is not ASCII");
    };
    let mut fields = line.split(' ');
    let header = match fields.next() {
        Some("UNKNOWN") => ProxyHeader { addresses: None },
        Some(family @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (fields.next(), fields.next(), fields.next(), fields.next(), fields.next()) else {
                return Parse::Invalid("v1 line needs four addresses and ports");
            };
            let ip = |text: &str| -> Option<IpAddr> {
                match family {
                    "TCP4" => text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
                    _ => text.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
                }
            };
            // Ports are 0-65535 in decimal without a sign or leading zeros beyond "0".
            let port = |text: &str| -> Option<u16> {
                if text.is_empty() || text.len() > 5 || (text.len() > 1 && text.starts_with('0')) || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                text.parse().ok()
            };
            match (ip(src), ip(dst), port(sport), port(dport)) {
                (Some(src), Some(dst), Some(sport), Some(dport)) => ProxyHeader { addresses: Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport))) },
                _ => return Parse::Invalid("v1 addresses or ports are malformed"),
            }
        }
        _ => return Parse::Invalid("v1 protocol is not TCP4, TCP6 or UNKNOWN"),
    };
    Parse::Complete(header, end + 2)
}

fn parse_v2(buf: &[u8]) -> Parse {
    if buf.len() < 16 {
        return Parse::Incomplete;
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Parse::Invalid("v2 version is not 2");
    }
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + length > V2_MAX {
        return Parse::Invalid("v2 header too large");
    }
    if buf.len() < 16 + length {
        return Parse::Incomplete;
    }
    let body = &buf[16..16 + length];
    let local = match version_command & 0x0F {
        0 => true,
        1 => false,
        _ => return Parse::Invalid("v2 command is neither LOCAL nor PROXY"),
    };
    let family = buf[13];
    let addresses = match family >> 4 {
        // AF_INET: 4 + 4 address bytes, 2 + 2 port bytes.
        1 if body.len() >= 12 => {
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            Some((SocketAddr::new(src.into(), u16::from_be_bytes([body[8], body[9]])), SocketAddr::new(dst.into(), u16::from_be_bytes([body[10], body[11]]))))
        }
        // AF_INET6: 16 + 16, 2 + 2.
        2 if body.len() >= 36 => {
            let octets = |at: usize| -> [u8; 16] {
                let mut out = [0u8; 16];
                out.copy_from_slice(&body[at..at + 16]);
                out
            };
            let (src, dst) = (Ipv6Addr::from(octets(0)), Ipv6Addr::from(octets(16)));
            Some((SocketAddr::new(src.into(), u16::from_be_bytes([body[32], body[33]])), SocketAddr::new(dst.into(), u16::from_be_bytes([body[34], body[35]]))))
        }
        1 | 2 => return Parse::Invalid("v2 address block shorter than its family needs"),
        // AF_UNSPEC and AF_UNIX carry no IP: the socket's addresses stand.
        0 | 3 => None,
        _ => return Parse::Invalid("v2 address family unknown"),
    };
    let transport = family & 0x0F;
    if transport > 2 {
        return Parse::Invalid("v2 transport protocol unknown");
    }
    // LOCAL: the balancer's own connection (a health check); addresses, if any, are ignored.
    let addresses = if local { None } else { addresses };
    Parse::Complete(ProxyHeader { addresses }, 16 + length)
}

/// The header of `version` (1 or 2; anything else: none) for a connection from `source` to `destination`.
pub fn encode(version: u8, source: SocketAddr, destination: SocketAddr) -> Option<Vec<u8>> {
    match version {
        1 => Some(encode_v1(source, destination)),
        2 => Some(encode_v2(source, destination)),
        _ => None,
    }
}

/// The v1 line for a TCP connection from `source` to `destination` (mixed families are sent as
/// TCP6 with IPv4-mapped addresses).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(source.ip(), destination.ip());
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {src} {dst} {} {}\r\n", source.port(), destination.port()).into_bytes()
}

/// The v2 header (PROXY command, TCP over IPv4 or IPv6, no TLVs).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(source.ip(), destination.ip());
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(src).octets());
            out.extend_from_slice(&to_v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both as IPv4 where both can be (IPv4-mapped IPv6 counts as IPv4), else both as IPv6.
fn same_family(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    let (a, b) = (a.to_canonical(), b.to_canonical());
    match (a, b) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (a, b),
        _ => (IpAddr::V6(to_v6(a)), IpAddr::V6(to_v6(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\nGET /";
        assert_eq!(parse(line), Parse::Complete(ProxyHeader { addresses: Some((addr("192.168.0.1:56324"), addr("10.0.0.2:443"))) }, 43));
        let line6 = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert_eq!(parse(line6), Parse::Complete(ProxyHeader { addresses: Some((addr("[2001:db8::1]:1"), addr("[::1]:65535"))) }, line6.len()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parse::Complete(ProxyHeader { addresses: None }, 15));
        assert_eq!(parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"), Parse::Complete(ProxyHeader { addresses: None }, 31));
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = encode_v1(addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        let v2 = encode_v2(addr("[2001:db8::7]:5"), addr("[::1]:10"));
        for header in [v1, v2] {
            for end in 1..header.len() {
                assert_eq!(parse(&header[..end]), Parse::Incomplete, "prefix {end} of {header:?}");
            }
            assert!(matches!(parse(&header), Parse::Complete(_, n) if n == header.len()));
        }
    }

    #[test]
    fn encoded_headers_parse_back() {
        for (src, dst) in [("1.2.3.4:5", "6.7.8.9:10"), ("[2001:db8::7]:5", "[::1]:10")] {
            for encoded in [encode_v1(addr(src), addr(dst)), encode_v2(addr(src), addr(dst))] {
                assert_eq!(parse(&encoded), Parse::Complete(ProxyHeader { addresses: Some((addr(src), addr(dst))) }, encoded.len()));
            }
        }
        // Mixed families go out as IPv6 (mapped).
        assert!(String::from_utf8(encode_v1(addr("1.2.3.4:5"), addr("[::1]:6"))).unwrap().starts_with("PROXY TCP6 ::ffff:1.2.3.4 ::1 "));
    }

    #[test]
    fn v2_local_unspec_unix_and_tlvs() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Parse::Complete(ProxyHeader { addresses: None }, 16));
        // PROXY over TCP4 with a 5-byte TLV after the addresses: skipped.
        let mut with_tlv = V2_SIGNATURE.to_vec();
        with_tlv.extend_from_slice(&[0x21, 0x11, 0x00, 17, 1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 1, 187, 0x04, 0x00, 0x02, 0xAA, 0xBB, b'X']);
        assert_eq!(parse(&with_tlv), Parse::Complete(ProxyHeader { addresses: Some((addr("1.2.3.4:80"), addr("5.6.7.8:443"))) }, 33));
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.resize(16 + 216, 0);
        assert_eq!(parse(&unix), Parse::Complete(ProxyHeader { addresses: None }, 232));
    }

    #[test]
    fn garbage_is_invalid_or_not_proxy() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::NotProxy);
        assert_eq!(parse(b"\x16\x03\x01"), Parse::NotProxy);
        for bad in [&b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..], b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"] {
            assert!(matches!(parse(bad), Parse::Invalid(_)), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert!(matches!(parse(&long), Parse::Invalid(_)));
        let mut wrong_version = V2_SIGNATURE.to_vec();
        wrong_version.extend_from_slice(&[0x11, 0x11, 0x00, 0x00]);
        assert!(matches!(parse(&wrong_version), Parse::Invalid(_)));
        let mut short_block = V2_SIGNATURE.to_vec();
        short_block.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(parse(&short_block), Parse::Invalid(_)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(matches!(parse(&huge), Parse::Invalid(_)));
    }
}
