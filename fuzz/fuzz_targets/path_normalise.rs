//! Fuzzes the path normaliser that route matching and route security read (edge.rs), on arbitrary
//! UTF-8, and checks the shape of what it lets through: no dot segment, empty segment, backslash
//! or encoded slash survives; a normal form is its own normal form; an unchanged path is the
//! input itself; and spelling an unreserved character as a %-escape never changes the outcome.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/http/edge.rs"]
mod edge;

use edge::normalise_path;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn check_normal(raw: &str, out: &str) {
    assert!(out.starts_with('/') || out == "*", "{raw:?} -> {out:?}");
    for banned in ["//", "/./", "/../", "\\"] {
        assert!(!out.contains(banned), "{raw:?} -> {out:?} holds {banned:?}");
    }
    assert!(!out.ends_with("/.") && !out.ends_with("/.."), "{raw:?} -> {out:?}");
    assert!(out.len() <= raw.len(), "{raw:?} grew into {out:?}");
    // Every escape left is an upper-case one of a character that is neither unreserved nor a
    // slash: one spelling per path, and none a later decoder could turn into a separator.
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let escape = &bytes[i + 1..(i + 3).min(bytes.len())];
        let hex = |b: &u8| b.is_ascii_digit() || (b'A'..=b'F').contains(b);
        assert!(escape.len() == 2 && escape.iter().all(hex), "{raw:?} -> {out:?}: escape at {i}");
        let value = u8::from_str_radix(std::str::from_utf8(escape).unwrap_or("00"), 16).unwrap_or(0);
        assert!(!unreserved(value) && value != b'/' && value != b'\\', "{raw:?} -> {out:?}: %{value:02X} left encoded");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a character to %-encode; the rest, up to its first invalid UTF-8, is the
    // path.
    let Some((&pick, rest)) = data.split_first() else { return };
    let valid = match std::str::from_utf8(rest) {
        Ok(_) => rest.len(),
        Err(err) => err.valid_up_to(),
    };
    let Ok(raw) = std::str::from_utf8(&rest[..valid]) else { return };

    let result = normalise_path(raw);
    assert_eq!(result, normalise_path(raw), "not deterministic");
    match &result {
        Ok(Cow::Borrowed(out)) => {
            assert!(std::ptr::eq(*out, raw), "borrowed something other than the input: {raw:?} -> {out:?}");
            check_normal(raw, out);
        }
        Ok(Cow::Owned(out)) => check_normal(raw, out),
        Err(refusal) => {
            assert_eq!(refusal.status.as_u16(), 400);
            assert!(!refusal.reason.is_empty());
        }
    }
    if let Ok(out) = &result {
        let again = normalise_path(out);
        assert_eq!(again.as_deref(), Ok(&**out), "not idempotent: {raw:?} -> {out:?} -> {again:?}");
    }

    // One unreserved character, outside any escape, spelled as %XX (upper or lower case hex by the
    // pick's top bit): the same normal form, or the same refusal.
    let bytes = raw.as_bytes();
    let candidates: Vec<usize> =
        (0..bytes.len()).filter(|&i| unreserved(bytes[i]) && !bytes[i.saturating_sub(2)..i].contains(&b'%')).collect();
    if candidates.is_empty() {
        return;
    }
    let at = candidates[usize::from(pick & 0x7f) % candidates.len()];
    let escape = if pick & 0x80 == 0 { format!("%{:02X}", bytes[at]) } else { format!("%{:02x}", bytes[at]) };
    let encoded = format!("{}{escape}{}", &raw[..at], &raw[at + 1..]);
    let re = normalise_path(&encoded);
    match (&result, &re) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{raw:?} and {encoded:?} normalise apart"),
        (Err(_), Err(_)) => {}
        _ => panic!("{raw:?} -> {result:?} but {encoded:?} -> {re:?}"),
    }
});
