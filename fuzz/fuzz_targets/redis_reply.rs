//! Fuzzes the Redis reply parser (bytes from the Redis server, which affinity lookups trust no
//! further than their bounds) and checks what the lookup connection relies on: answers are
//! deterministic, `Complete` never claims more bytes than it was given and is the same for the
//! reply alone, every prefix of a reply is `Incomplete`, a decided answer does not change when more
//! bytes follow, `Incomplete` never outlives the size caps, and encoded values parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/shared_state/resp.rs"]
mod resp;

use resp::{encode_command, encode_getex, parse_reply, Parse, Reply, MAX_LINE_BYTES, MAX_VALUE_BYTES};

fuzz_target!(|data: &[u8]| {
    let full = parse_reply(data);
    assert_eq!(full, parse_reply(data), "not deterministic");
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"$-1\r\n+OK\r\n");
    match full {
        Parse::Complete(_, consumed) => {
            assert!(consumed >= 3 && consumed <= data.len());
            assert_eq!(parse_reply(&data[..consumed]), full);
            let step = (consumed / 64).max(1);
            for n in (0..consumed).step_by(step) {
                assert_eq!(parse_reply(&data[..n]), Parse::Incomplete, "prefix {n}");
            }
            assert_eq!(parse_reply(&longer), full, "more bytes changed a reply");
        }
        Parse::Incomplete => assert!(data.len() < MAX_LINE_BYTES + MAX_VALUE_BYTES + 2),
        Parse::Invalid(_) => assert_eq!(parse_reply(&longer), full, "more bytes changed a decided answer"),
    }
    // The input as a stored value, and as a key: encodes and parses back.
    if data.len() <= MAX_VALUE_BYTES {
        let mut bulk = format!("${}\r\n", data.len()).into_bytes();
        bulk.extend_from_slice(data);
        bulk.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&bulk), Parse::Complete(Reply::Value(data), bulk.len()));
    }
    let (prefix, entry) = data.split_at(data.len() / 2);
    if let (Ok(prefix), Ok(entry)) = (std::str::from_utf8(prefix), std::str::from_utf8(entry)) {
        let ttl = data.iter().fold(0u64, |n, &b| n.wrapping_mul(31).wrapping_add(u64::from(b)));
        let mut fast = Vec::new();
        encode_getex(&mut fast, prefix, entry, ttl);
        let key = [prefix.as_bytes(), entry.as_bytes()].concat();
        let mut generic = Vec::new();
        encode_command(&mut generic, &[b"GETEX", &key, b"EX", ttl.to_string().as_bytes()]);
        assert_eq!(fast, generic);
        // Both share the digit writer; std's formatting checks it.
        let ttl_text = ttl.to_string();
        let mut formatted = format!("*4\r\n$5\r\nGETEX\r\n${}\r\n", key.len()).into_bytes();
        formatted.extend_from_slice(&key);
        formatted.extend_from_slice(format!("\r\n$2\r\nEX\r\n${}\r\n{ttl_text}\r\n", ttl_text.len()).as_bytes());
        assert_eq!(fast, formatted);
    }
});
