//! Fuzzes the plain-HTTP Host sniffer (the first bytes of every connection on a port with domain
//! routes and no TLS) and checks what the session relies on: every answer but `Incomplete` is
//! final, `Incomplete` never outlives the buffer cap, and a found host is already normalised.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/http/sniff.rs"]
mod sniff;

use sniff::{sniff, HttpSniff, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    let full = sniff(data);
    assert_eq!(full, sniff(data), "not deterministic");
    match &full {
        HttpSniff::Incomplete => assert!(data.len() < MAX_HEAD_BYTES),
        HttpSniff::Request { host: Some(host) } => {
            assert!(!host.is_empty());
            assert!(!host.ends_with('.'));
            assert_eq!(host, &host.to_ascii_lowercase());
        }
        HttpSniff::Request { host: None } | HttpSniff::H2Preface | HttpSniff::NotHttp => {}
    }
    // A decided answer never changes when more bytes arrive; prefixes were undecided or agree.
    if full != HttpSniff::Incomplete {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(sniff(&longer), full, "appending changed the answer");
    }
    let step = (data.len() / 64).max(1);
    for n in (0..data.len()).step_by(step) {
        let part = sniff(&data[..n]);
        assert!(part == HttpSniff::Incomplete || part == full, "prefix {n}: {part:?} vs {full:?}");
    }
});
