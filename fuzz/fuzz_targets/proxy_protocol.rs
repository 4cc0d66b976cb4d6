//! Fuzzes the PROXY protocol parser (the first bytes from a trusted balancer) and checks what the
//! session relies on: answers are deterministic, `Complete` never claims more bytes than it was
//! given, a decided answer does not change when more bytes follow, a prefix of a complete header is
//! `Incomplete`, and `Incomplete` never outlives the size caps. Encoded headers parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/proxy_protocol/mod.rs"]
mod proxy_protocol;

use proxy_protocol::{encode_v1, encode_v2, parse, Parse, V2_MAX};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    assert_eq!(full, parse(data), "not deterministic");
    match &full {
        Parse::Complete(_, consumed) => {
            assert!(*consumed <= data.len() && *consumed >= 15);
            // The header alone parses the same; any prefix of it is incomplete.
            assert_eq!(parse(&data[..*consumed]), full);
            let step = (*consumed / 32).max(1);
            for n in (1..*consumed).step_by(step) {
                assert_eq!(parse(&data[..n]), Parse::Incomplete, "prefix {n}");
            }
        }
        Parse::Incomplete => assert!(data.len() < V2_MAX),
        Parse::Invalid(_) | Parse::NotProxy => {
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\r\nPROXY UNKNOWN\r\n");
            assert_eq!(parse(&longer), full, "appending changed a decided answer");
        }
    }
    // Addresses drawn from the input round-trip through both encoders.
    if data.len() >= 36 {
        let v4 = |at: usize| IpAddr::V4(Ipv4Addr::new(data[at], data[at + 1], data[at + 2], data[at + 3]));
        let mut six = [0u8; 16];
        six.copy_from_slice(&data[16..32]);
        let port = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
        let pairs = [
            (SocketAddr::new(v4(0), port(32)), SocketAddr::new(v4(4), port(34))),
            (SocketAddr::new(IpAddr::V6(Ipv6Addr::from(six)), port(32)), SocketAddr::new(v4(8), port(34))),
        ];
        for (source, destination) in pairs {
            for encoded in [encode_v1(source, destination), encode_v2(source, destination)] {
                match parse(&encoded) {
                    Parse::Complete(header, consumed) => {
                        assert_eq!(consumed, encoded.len());
                        let (src, dst) = header.addresses.expect("addresses");
                        assert_eq!((src.port(), dst.port()), (source.port(), destination.port()));
                        assert_eq!(src.ip().to_canonical(), source.ip().to_canonical());
                        assert_eq!(dst.ip().to_canonical(), destination.ip().to_canonical());
                    }
                    other => panic!("encoded header did not parse: {other:?}"),
                }
            }
        }
    }
});
