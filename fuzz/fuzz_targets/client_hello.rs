//! Fuzzes the TLS ClientHello parser with arbitrary bytes and checks the promises its callers
//! rely on, not just the absence of panics.
//!
//! The parser is included by path because the main crate is a napi cdylib that needs a Node
//! runtime to link; the module is std-only precisely so it can be built alone like this.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/tls/client_hello.rs"]
mod client_hello;

use client_hello::{parse_client_hello, tls_version_name, ClientHelloParse, MAX_CLIENT_HELLO_BYTES};

/// Record header + handshake header + the smallest legal body (version, random, empty session id,
/// one cipher suite, one compression method, no extensions).
const MIN_COMPLETE_LEN: usize = 5 + 4 + 2 + 32 + 1 + 2 + 2 + 1 + 1;

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    assert_eq!(full, parse_client_hello(data), "not deterministic");

    match &full {
        // The caller's buffer cap relies on this: it never has to wait past the limit.
        ClientHelloParse::Incomplete => assert!(data.len() < MAX_CLIENT_HELLO_BYTES),
        ClientHelloParse::NotTls => assert!(data.first() != Some(&22) || data.get(1) != Some(&3)),
        ClientHelloParse::Invalid(reason) => assert!(!reason.is_empty()),
        ClientHelloParse::Complete(info) => {
            assert!(data.len() >= MIN_COMPLETE_LEN);
            assert!(data.first() == Some(&22) && data.get(1) == Some(&3));
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && sni.len() < data.len());
                assert!(sni.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
            }
            assert!(info.alpn.iter().all(|p| !p.is_empty()));
            assert!(info.supported_versions.iter().all(|v| !(v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff)));
            if let Some(name) = info.max_version_name() {
                assert!(info.supported_versions.iter().chain([&info.legacy_version]).any(|v| tls_version_name(*v) == Some(name)));
            }
            check_rechunked(data, &full);
        }
    }

    // Every answer but Incomplete is final: shorter prefixes are Incomplete or agree, and more
    // bytes never change it.
    let lens: Vec<usize> = if data.len() <= 256 {
        (0..data.len()).collect()
    } else {
        (0..32).map(|i| i * data.len() / 32).chain([data.len() - 1]).collect()
    };
    for n in lens {
        let part = parse_client_hello(&data[..n]);
        assert!(part == ClientHelloParse::Incomplete || part == full, "prefix {n}: {part:?} vs {full:?}");
    }
    if full != ClientHelloParse::Incomplete {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse_client_hello(&longer), full);
    }
});

/// A hello carried in one record must parse the same when split over two, at a cut the input picks.
fn check_rechunked(data: &[u8], full: &ClientHelloParse) {
    let Some(&[_, _, minor, hi, lo]) = data.first_chunk::<5>() else { return };
    let record_len = usize::from(u16::from_be_bytes([hi, lo]));
    let Some(message) = data.get(5..5 + record_len) else { return };
    let Some(&[_, a, b, c]) = message.first_chunk::<4>() else { return };
    if 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)) != record_len {
        return; // already split over records
    }
    // Both halves non-empty: empty handshake records are rightly Invalid.
    let pick = usize::from(data.last().copied().unwrap_or(0));
    let cut = 1 + pick * (record_len - 2) / 255;
    let mut split = Vec::with_capacity(record_len + 10);
    for part in [&message[..cut], &message[cut..]] {
        split.extend_from_slice(&[22, 3, minor]);
        split.extend_from_slice(&(part.len() as u16).to_be_bytes());
        split.extend_from_slice(part);
    }
    assert_eq!(&parse_client_hello(&split), full, "split at {cut}");
}
