//! The ClientHello inside a QUIC client's Initial packets, read without terminating QUIC, so that a
//! UDP passthrough route can be chosen by SNI as a TCP one is (RFC 9001 §5.2: Initial packets are
//! protected with keys derived from the Destination Connection ID, which anyone on the path can
//! compute; they hide the hello from nothing but ossifying middleboxes).
//!
//! Owns: parsing long headers of QUIC v1 (RFC 9000) and v2 (RFC 9369), removing Initial packet
//! protection, reading the frames an Initial may carry, and reassembling the CRYPTO stream (its
//! frames may come in any order, across packets and datagrams) up to the end of the ClientHello.
//! Must not know: sockets, flows, routes. The caller keeps a `CryptoAssembly` per client while the
//! hello is incomplete and decides how long to wait.
//!
//! Every byte comes from an unauthenticated peer: lengths are checked against what is present,
//! the assembly is bounded by `MAX_CLIENT_HELLO_BYTES`, and no path panics.

use ring::aead::quic::{HeaderProtectionKey, AES_128};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf;

use crate::tls::client_hello::{parse_client_hello_message, ClientHelloInfo, ClientHelloParse, MAX_CLIENT_HELLO_BYTES};

const VERSION_1: u32 = 0x0000_0001;
const VERSION_2: u32 = 0x6b33_43cf;
const SALT_V1: [u8; 20] = [0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a];
const SALT_V2: [u8; 20] = [0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9];
const MAX_CID_LEN: usize = 20;
const SAMPLE_LEN: usize = 16;
const TAG_LEN: usize = 16;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Ranges of the CRYPTO stream a hello may arrive in before it is refused: real clients send a
/// few frames; a peer sending thousands of one-byte frames must not make the merge quadratic.
const MAX_CRYPTO_RANGES: usize = 64;

/// What one datagram told about the client's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialRead {
    /// The whole ClientHello has been read (over this and earlier datagrams).
    Complete(ClientHelloInfo),
    /// Initial packets, but the hello goes on in later ones.
    Incomplete,
    /// Not a QUIC Initial of a version we read (another protocol, a short header, QUIC of another
    /// version): there is no SNI to be had from it.
    NotInitial,
    /// A QUIC Initial that cannot be a real client's: undecryptable, malformed, or too large.
    Invalid(&'static str),
}

/// The CRYPTO stream of a client's Initial packets as far as it has arrived.
#[derive(Debug, Default)]
pub struct CryptoAssembly {
    data: Vec<u8>,
    /// Filled ranges of `data`, sorted and merged.
    ranges: Vec<(usize, usize)>,
}

impl CryptoAssembly {
    fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<(), &'static str> {
        let start = usize::try_from(offset).map_err(|_| "CRYPTO offset out of range")?;
        let end = start.checked_add(bytes.len()).ok_or("CRYPTO offset out of range")?;
        if end > MAX_CLIENT_HELLO_BYTES {
            return Err("client hello exceeds size limit");
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        // Retransmitted bytes are the same bytes; the first copy stays.
        self.data[start..end].copy_from_slice(bytes);
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        if merged.len() > MAX_CRYPTO_RANGES {
            return Err("client hello in too many pieces");
        }
        self.ranges = merged;
        Ok(())
    }

    /// Bytes from the stream's start that have all arrived.
    fn contiguous(&self) -> &[u8] {
        match self.ranges.first() {
            Some(&(0, end)) => &self.data[..end],
            _ => &[],
        }
    }

    /// The hello once it is whole, an error once it cannot be one, else nothing yet.
    fn hello(&self) -> Option<Result<ClientHelloInfo, &'static str>> {
        let have = self.contiguous();
        let [kind, a, b, c, ..] = *have else { return None };
        let total = HANDSHAKE_HEADER_LEN + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if kind != 1 {
            return Some(Err("first handshake message is not a client hello"));
        }
        if total > MAX_CLIENT_HELLO_BYTES {
            return Some(Err("client hello exceeds size limit"));
        }
        let message = have.get(..total)?;
        Some(match parse_client_hello_message(message) {
            ClientHelloParse::Complete(info) => Ok(info),
            ClientHelloParse::Invalid(reason) => Err(reason),
            ClientHelloParse::Incomplete | ClientHelloParse::NotTls => Err("not a client hello"),
        })
    }
}

/// Reads the Initial packets of one datagram from a client into `assembly`. A datagram may hold
/// several QUIC packets (coalesced, RFC 9000 §12.2): each Initial is read, others are skipped.
pub fn read_datagram(datagram: &[u8], assembly: &mut CryptoAssembly) -> InitialRead {
    let mut rest = datagram;
    let mut initials = 0usize;
    while let Some(&first) = rest.first() {
        // A short header (or padding after the last packet) ends what can be read here.
        if first & 0x80 == 0 {
            break;
        }
        let packet = match LongPacket::parse(rest) {
            Ok(packet) => packet,
            Err(Unreadable::OtherVersion) if initials == 0 => return InitialRead::NotInitial,
            Err(Unreadable::OtherVersion) => break,
            Err(Unreadable::Malformed(reason)) if initials == 0 => return InitialRead::Invalid(reason),
            Err(Unreadable::Malformed(_)) => break,
        };
        let (bytes, after) = rest.split_at(packet.end);
        rest = after;
        if !packet.initial {
            continue;
        }
        initials += 1;
        let plaintext = match packet.unprotect(bytes) {
            Ok(plaintext) => plaintext,
            Err(reason) => return InitialRead::Invalid(reason),
        };
        if let Err(reason) = read_frames(&plaintext, assembly) {
            return InitialRead::Invalid(reason);
        }
    }
    if initials == 0 {
        return if assembly.data.is_empty() { InitialRead::NotInitial } else { InitialRead::Incomplete };
    }
    match assembly.hello() {
        Some(Ok(info)) => InitialRead::Complete(info),
        Some(Err(reason)) => InitialRead::Invalid(reason),
        None => InitialRead::Incomplete,
    }
}

enum Unreadable {
    OtherVersion,
    Malformed(&'static str),
}

/// A long-header packet as far as it can be read before removing its protection.
struct LongPacket<'a> {
    version: u32,
    initial: bool,
    dcid: &'a [u8],
    /// Where the protected packet number starts.
    pn_offset: usize,
    /// Where the packet ends (its Length field counts from the packet number).
    end: usize,
}

impl<'a> LongPacket<'a> {
    fn parse(bytes: &'a [u8]) -> Result<LongPacket<'a>, Unreadable> {
        let mut reader = Reader::new(bytes);
        let first = reader.byte().ok_or(Unreadable::Malformed("truncated long header"))?;
        let version = reader.u32().ok_or(Unreadable::Malformed("truncated long header"))?;
        let initial_type = match version {
            VERSION_1 => 0b00,
            VERSION_2 => 0b01,
            // Version negotiation (0) and versions we cannot read.
            _ => return Err(Unreadable::OtherVersion),
        };
        if first & 0x40 == 0 {
            return Err(Unreadable::Malformed("fixed bit not set"));
        }
        let packet_type = (first >> 4) & 0b11;
        let retry_type = if version == VERSION_2 { 0b00 } else { 0b11 };
        if packet_type == retry_type {
            return Err(Unreadable::Malformed("a client does not send Retry packets"));
        }
        let dcid = reader.cid().ok_or(Unreadable::Malformed("bad destination connection ID"))?;
        reader.cid().ok_or(Unreadable::Malformed("bad source connection ID"))?;
        let initial = packet_type == initial_type;
        if initial {
            let token_len = reader.varint().ok_or(Unreadable::Malformed("truncated token length"))?;
            reader.skip(token_len).ok_or(Unreadable::Malformed("truncated token"))?;
        }
        let length = reader.varint().ok_or(Unreadable::Malformed("truncated packet length"))?;
        let pn_offset = reader.position();
        let end = usize::try_from(length).ok().and_then(|length| pn_offset.checked_add(length)).filter(|&end| end <= bytes.len());
        let end = end.ok_or(Unreadable::Malformed("packet longer than its datagram"))?;
        Ok(LongPacket { version, initial, dcid, pn_offset, end })
    }

    /// The packet's frames: header protection removed, then the payload opened with the client's
    /// Initial keys for this DCID.
    fn unprotect(&self, packet: &[u8]) -> Result<Vec<u8>, &'static str> {
        let keys = InitialKeys::client(self.version, self.dcid)?;
        let sample_at = self.pn_offset + 4;
        let sample = packet.get(sample_at..sample_at + SAMPLE_LEN).ok_or("packet too short to sample")?;
        let mask = keys.header.new_mask(sample).map_err(|_| "header protection failed")?;
        let first = packet[0] ^ (mask[0] & 0x0f);
        let pn_len = usize::from(first & 0x03) + 1;
        let payload_at = self.pn_offset + pn_len;
        if payload_at + TAG_LEN > packet.len() {
            return Err("packet too short for its packet number and tag");
        }
        let mut header = packet[..payload_at].to_vec();
        header[0] = first;
        let mut packet_number = 0u64;
        for i in 0..pn_len {
            header[self.pn_offset + i] ^= mask[1 + i];
            packet_number = packet_number << 8 | u64::from(header[self.pn_offset + i]);
        }
        // A client's first Initials number from 0: the truncated number is the whole one.
        let mut nonce = keys.iv;
        for (byte, pn_byte) in nonce[4..].iter_mut().zip(packet_number.to_be_bytes()) {
            *byte ^= pn_byte;
        }
        let mut payload = packet[payload_at..].to_vec();
        let opened = keys.packet.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut payload).map_err(|_| "Initial packet does not decrypt")?;
        let len = opened.len();
        payload.truncate(len);
        Ok(payload)
    }
}

struct InitialKeys {
    packet: LessSafeKey,
    iv: [u8; 12],
    header: HeaderProtectionKey,
}

impl InitialKeys {
    /// The client's Initial keys (RFC 9001 §5.2; RFC 9369 §3.3 for v2's salt and labels).
    fn client(version: u32, dcid: &[u8]) -> Result<InitialKeys, &'static str> {
        let (salt, key_label, iv_label, hp_label): (&[u8], &[u8], &[u8], &[u8]) = if version == VERSION_2 {
            (&SALT_V2, b"quicv2 key", b"quicv2 iv", b"quicv2 hp")
        } else {
            (&SALT_V1, b"quic key", b"quic iv", b"quic hp")
        };
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(dcid);
        let mut client_secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut client_secret)?;
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client_secret);
        let mut key = [0u8; 16];
        let mut iv = [0u8; 12];
        let mut hp = [0u8; 16];
        expand_label(&client, key_label, &mut key)?;
        expand_label(&client, iv_label, &mut iv)?;
        expand_label(&client, hp_label, &mut hp)?;
        let packet = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).map_err(|_| "bad packet key")?);
        let header = HeaderProtectionKey::new(&AES_128, &hp).map_err(|_| "bad header protection key")?;
        Ok(InitialKeys { packet, iv, header })
    }
}

/// HKDF-Expand-Label of TLS 1.3 (RFC 8446 §7.1) with an empty context, filling `out`.
fn expand_label(secret: &hkdf::Prk, label: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = u16::try_from(out.len()).map_err(|_| "label output too long")?.to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).map_err(|_| "label too long")?];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    secret.expand(&info, Len(out.len())).and_then(|okm| okm.fill(out)).map_err(|_| "key derivation failed")
}

/// The frames of an Initial packet's payload; CRYPTO data goes into `assembly`.
fn read_frames(payload: &[u8], assembly: &mut CryptoAssembly) -> Result<(), &'static str> {
    let mut reader = Reader::new(payload);
    while let Some(frame_type) = reader.varint() {
        match frame_type {
            // PADDING, PING.
            0x00 | 0x01 => {}
            // ACK, ACK with ECN counts.
            0x02 | 0x03 => {
                let fields = [reader.varint(), reader.varint()];
                let range_count = reader.varint().ok_or("truncated ACK frame")?;
                reader.varint().ok_or("truncated ACK frame")?;
                if fields.iter().any(Option::is_none) {
                    return Err("truncated ACK frame");
                }
                for _ in 0..range_count.saturating_mul(2) {
                    reader.varint().ok_or("truncated ACK frame")?;
                }
                if frame_type == 0x03 {
                    for _ in 0..3 {
                        reader.varint().ok_or("truncated ACK frame")?;
                    }
                }
            }
            // CRYPTO.
            0x06 => {
                let offset = reader.varint().ok_or("truncated CRYPTO frame")?;
                let len = reader.varint().ok_or("truncated CRYPTO frame")?;
                let data = reader.take(len).ok_or("truncated CRYPTO frame")?;
                assembly.insert(offset, data)?;
            }
            // CONNECTION_CLOSE of the transport.
            0x1c => return Err("the client closed its connection"),
            _ => return Err("a frame an Initial packet may not carry"),
        }
    }
    if reader.position() != payload.len() {
        return Err("truncated frame type");
    }
    Ok(())
}

/// Bounds-checked reading of QUIC's wire encodings.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn position(&self) -> usize {
        self.at
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.bytes.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let bytes = self.bytes.get(self.at..self.at.checked_add(len)?)?;
        self.at += len;
        Some(bytes)
    }

    fn skip(&mut self, len: u64) -> Option<()> {
        self.take(len).map(drop)
    }

    /// A connection ID: a length byte (at most 20 in the versions read here) and the ID.
    fn cid(&mut self) -> Option<&'a [u8]> {
        let len = self.byte()?;
        if usize::from(len) > MAX_CID_LEN {
            return None;
        }
        self.take(u64::from(len))
    }

    /// A variable-length integer (RFC 9000 §16).
    fn varint(&mut self) -> Option<u64> {
        let first = self.byte()?;
        let extra = (1usize << (first >> 6)) - 1;
        let mut value = u64::from(first & 0x3f);
        for _ in 0..extra {
            value = value << 8 | u64::from(self.byte()?);
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect()
    }

    /// RFC 9001 Appendix A.1: the client's keys for DCID 0x8394c8f03e515708.
    #[test]
    fn initial_keys_match_rfc_9001_appendix_a() {
        let dcid = hex("8394c8f03e515708");
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &SALT_V1).extract(&dcid);
        let mut client_secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut client_secret).unwrap();
        assert_eq!(client_secret.to_vec(), hex("c00cf151ca5be075ed0ebfb5c80323c4 2d6b7db67881289af4008f1f6c357aea"));
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client_secret);
        let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&client, b"quic key", &mut key).unwrap();
        expand_label(&client, b"quic iv", &mut iv).unwrap();
        expand_label(&client, b"quic hp", &mut hp).unwrap();
        assert_eq!(key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
    }

    #[test]
    fn varints_decode_every_length() {
        for (bytes, value) in [(hex("25"), 37u64), (hex("7bbd"), 15_293), (hex("9d7f3e7d"), 494_878_333), (hex("c2197c5eff14e88c"), 151_288_809_941_952_652)] {
            assert_eq!(Reader::new(&bytes).varint(), Some(value));
        }
        assert_eq!(Reader::new(&hex("7b")).varint(), None);
    }

    #[test]
    fn crypto_ranges_reassemble_out_of_order_and_bounded() {
        let mut assembly = CryptoAssembly::default();
        assembly.insert(4, b"efgh").unwrap();
        assert_eq!(assembly.contiguous(), b"");
        assembly.insert(0, b"abcd").unwrap();
        assert_eq!(assembly.contiguous(), b"abcdefgh");
        assembly.insert(2, b"cd").unwrap();
        assert_eq!(assembly.ranges, vec![(0, 8)]);
        assert!(assembly.insert(MAX_CLIENT_HELLO_BYTES as u64, b"x").is_err());
        let mut scattered = CryptoAssembly::default();
        let mut refused = false;
        for i in 0..200u64 {
            if scattered.insert(i * 2 + 1, b"x").is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "a hello in hundreds of pieces is refused");
    }

    #[test]
    fn other_protocols_and_versions_are_not_initials() {
        let mut assembly = CryptoAssembly::default();
        assert_eq!(read_datagram(b"", &mut assembly), InitialRead::NotInitial);
        assert_eq!(read_datagram(b"\x16\x03\x01\x00\x05hello", &mut assembly), InitialRead::NotInitial);
        // A version negotiation packet, and a draft version.
        assert_eq!(read_datagram(&hex("c0 00000000 08 0102030405060708 00"), &mut assembly), InitialRead::NotInitial);
        assert_eq!(read_datagram(&hex("c0 ff00001d 08 0102030405060708 00"), &mut assembly), InitialRead::NotInitial);
        // A v1 Initial whose length runs past the datagram.
        assert!(matches!(read_datagram(&hex("c0 00000001 08 0102030405060708 00 00 4400 00"), &mut assembly), InitialRead::Invalid(_)));
    }

    #[test]
    fn every_truncation_of_a_real_initial_is_handled() {
        let datagram = client_initials("trunc.example", 0).remove(0);
        for len in 0..datagram.len() {
            let mut assembly = CryptoAssembly::default();
            // Any answer but a panic; a prefix never decrypts into a whole hello.
            assert!(!matches!(read_datagram(&datagram[..len], &mut assembly), InitialRead::Complete(_)));
        }
        let mut assembly = CryptoAssembly::default();
        let mut flipped = datagram.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(read_datagram(&flipped, &mut assembly), InitialRead::Invalid(_)));
    }

    #[test]
    fn the_sni_of_a_real_client_initial_is_read() {
        let datagrams = client_initials("quic.example", 0);
        let mut assembly = CryptoAssembly::default();
        match read_datagram(&datagrams[0], &mut assembly) {
            InitialRead::Complete(info) => {
                assert_eq!(info.sni.as_deref(), Some("quic.example"));
                assert_eq!(info.alpn, vec!["h3".to_string()]);
                assert_eq!(info.max_version_name(), Some("TLSv1.3"));
            }
            other => panic!("expected a whole hello, got {other:?}"),
        }
    }

    #[test]
    fn a_hello_over_several_initial_packets_is_read_in_any_order() {
        // Enough ALPN names to make the hello span several datagrams.
        let datagrams = client_initials("big.example", 120);
        assert!(datagrams.len() >= 2, "the hello should span datagrams, got {}", datagrams.len());
        for order in [false, true] {
            let mut assembly = CryptoAssembly::default();
            let mut seen = Vec::new();
            let sequence: Vec<&Vec<u8>> = if order { datagrams.iter().rev().collect() } else { datagrams.iter().collect() };
            for datagram in sequence {
                seen.push(read_datagram(datagram, &mut assembly));
            }
            let last = seen.pop().unwrap();
            assert!(seen.iter().all(|r| *r == InitialRead::Incomplete), "{seen:?}");
            match last {
                InitialRead::Complete(info) => assert_eq!(info.sni.as_deref(), Some("big.example")),
                other => panic!("expected a whole hello, got {other:?}"),
            }
        }
    }

    /// The datagrams a real QUIC client (quinn, with rustls) sends first to a server that does not
    /// answer: its Initial packets, padded and coalesced as the client makes them.
    fn client_initials(server_name: &str, extra_alpn: usize) -> Vec<Vec<u8>> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"h3".to_vec()];
            for i in 0..extra_alpn {
                tls.alpn_protocols.push(format!("padding-protocol-name-{i:04}").into_bytes());
            }
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
            let _connecting = endpoint.connect(server.local_addr().unwrap(), server_name).unwrap();
            let mut datagrams = Vec::new();
            let mut buf = vec![0u8; 65_535];
            let mut first_dcid: Option<Vec<u8>> = None;
            // The first flight, not its retransmissions (those come after a timeout).
            while let Ok(Ok(len)) = tokio::time::timeout(std::time::Duration::from_millis(150), server.recv(&mut buf)).await {
                let datagram = buf[..len].to_vec();
                let dcid = datagram[6..6 + usize::from(datagram[5])].to_vec();
                match &first_dcid {
                    None => first_dcid = Some(dcid),
                    Some(first) => assert_eq!(first, &dcid),
                }
                datagrams.push(datagram);
            }
            endpoint.close(0u32.into(), b"");
            datagrams
        })
    }
}
