//! Fuzzes the reader of QUIC client Initial packets (the SNI of QUIC passthrough routes) two ways:
//! arbitrary bytes as datagrams, and arbitrary bytes as the *plaintext* of real, correctly
//! protected Initial packets, which is the only way past the AEAD to the frame parser and the
//! CRYPTO reassembly. Checks, beyond no panics: the same datagrams give the same answers; a hello
//! read whole has a normalised SNI; CRYPTO frames split over two packets give the answer the
//! unsplit frames give, in either order.
//!
//! The modules are included by path (the main crate is a napi cdylib); `tls` re-exports the hello
//! parser where `initial.rs` looks for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::aead::quic::{HeaderProtectionKey, AES_128};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf;

#[allow(dead_code)]
#[path = "../../src/tls/client_hello.rs"]
mod client_hello;

mod tls {
    pub(crate) use super::client_hello;
}

#[allow(dead_code)]
#[path = "../../src/quic/initial.rs"]
mod initial;

use initial::{read_datagram, CryptoAssembly, InitialRead};

const SALT_V1: [u8; 20] = [0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a];
const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes, as one datagram and as two.
    let whole = read_all(&[data]);
    assert_eq!(whole, read_all(&[data]), "not deterministic");
    check(&whole);
    let cut = usize::from(data.first().copied().unwrap_or(0)) * data.len() / 256;
    check(&read_all(&[&data[..cut], &data[cut..]]));

    // Arbitrary plaintext in real Initial packets: as CRYPTO data from offset 0 in one packet,
    // and the same bytes as two CRYPTO frames in two packets, in both orders.
    let one = read_all(&[&seal(0, &crypto_frame(0, data))]);
    check(&one);
    let first = seal(0, &crypto_frame(0, &data[..cut]));
    let second = seal(1, &crypto_frame(cut as u64, &data[cut..]));
    let forward = read_all(&[&first, &second]);
    let backward = read_all(&[&second, &first]);
    if let (Some(InitialRead::Complete(a)), Some(InitialRead::Complete(b)), Some(InitialRead::Complete(c))) = (one.last(), forward.last(), backward.last()) {
        assert_eq!(a, b);
        assert_eq!(a, c);
    }
    if matches!(one.last(), Some(InitialRead::Complete(_))) {
        assert!(matches!(forward.last(), Some(InitialRead::Complete(_))), "split hello not read: {forward:?}");
        assert!(matches!(backward.last(), Some(InitialRead::Complete(_))), "split hello not read backwards: {backward:?}");
    }
    // The input as frames of its own.
    check(&read_all(&[&seal(0, data)]));
});

fn read_all(datagrams: &[&[u8]]) -> Vec<InitialRead> {
    let mut assembly = CryptoAssembly::default();
    datagrams.iter().map(|d| read_datagram(d, &mut assembly)).collect()
}

fn check(reads: &[InitialRead]) {
    for read in reads {
        if let InitialRead::Complete(info) = read {
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && !sni.ends_with('.'));
                assert!(sni.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
            }
        }
        if let InitialRead::Invalid(reason) = read {
            assert!(!reason.is_empty());
        }
    }
}

fn crypto_frame(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x06];
    varint(&mut frame, offset);
    varint(&mut frame, bytes.len() as u64);
    frame.extend_from_slice(bytes);
    frame
}

fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// A QUIC v1 client Initial packet with packet number `pn` carrying `frames`, protected as a
/// client protects it (RFC 9001 §5), padded so that a header protection sample exists.
fn seal(pn: u8, frames: &[u8]) -> Vec<u8> {
    let mut plaintext = frames.to_vec();
    if plaintext.len() < 20 {
        plaintext.resize(20, 0);
    }
    let (key, iv, hp) = client_keys();
    let mut header = vec![0xc0, 0, 0, 0, 1, DCID.len() as u8];
    header.extend_from_slice(&DCID);
    header.push(0); // SCID
    header.push(0); // token
    varint(&mut header, (1 + plaintext.len() + 16) as u64);
    let pn_offset = header.len();
    header.push(pn);
    let mut nonce = iv;
    nonce[11] ^= pn;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut plaintext).unwrap();
    let mut packet = header;
    packet.extend_from_slice(&plaintext);
    let hp = HeaderProtectionKey::new(&AES_128, &hp).unwrap();
    let mask = hp.new_mask(&packet[pn_offset + 4..pn_offset + 20]).unwrap();
    packet[0] ^= mask[0] & 0x0f;
    packet[pn_offset] ^= mask[1];
    packet
}

fn client_keys() -> ([u8; 16], [u8; 12], [u8; 16]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    fn expand(secret: &hkdf::Prk, label: &[u8], out: &mut [u8]) {
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(6 + label.len()) as u8];
        let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
        secret.expand(&info, Len(out.len())).unwrap().fill(out).unwrap();
    }
    let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &SALT_V1).extract(&DCID);
    let mut client_secret = [0u8; 32];
    expand(&initial, b"client in", &mut client_secret);
    let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client_secret);
    let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
    expand(&client, b"quic key", &mut key);
    expand(&client, b"quic iv", &mut iv);
    expand(&client, b"quic hp", &mut hp);
    (key, iv, hp)
}
