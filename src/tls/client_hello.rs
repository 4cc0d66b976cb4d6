//! The first flight of a TLS client, read without consuming it: given the bytes buffered so far
//! off a connection, decide whether they are (the start of) a TLS ClientHello and, once the whole
//! hello has arrived, report what it asks for — SNI, ALPN and protocol versions — so the
//! connection can be routed while the original bytes are replayed untouched to the backend.
//!
//! Owns: record-layer reassembly of the hello, its structural validation, and the few TLS
//! constants a router needs to refuse a client (versions, alerts).
//! Must not know: sockets, timeouts, buffering policy, routes or certificates. The caller owns the
//! buffer and decides when to read more; this module only ever looks at a slice.
//!
//! The input comes from an unauthenticated peer before anything else has vetted it, so every
//! length is checked against the bytes actually present, nothing is allocated beyond a constant
//! factor of the input's own size, and no path panics.

use std::borrow::Cow;

pub const TLS_RECORD_HANDSHAKE: u8 = 22;

/// Upper bound on bytes we are willing to buffer to see a whole ClientHello (records + reassembly).
///
/// Why 64 KiB: today's hellos are 200 B – 2 KiB (a post-quantum X25519MLKEM768 key share adds
/// ~1.2 KiB), and resumption tickets, ECH and larger PQ key shares still fit many times over.
/// The bound exists because this buffering happens per connection before any route or allow-list
/// has been consulted: without it a peer could declare a 16 MiB handshake message (the u24 length
/// allows it) and make us hold that much for it. Past the bound the hello is `Invalid`, never
/// `Incomplete`, so a caller never waits for bytes it would refuse to hold.
pub const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;

pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;

const TLS_RECORD_ALERT: u8 = 21;
const ALERT_LEVEL_FATAL: u8 = 2;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// 2^14 + 2048 is TLS 1.2's ciphertext bound, the most any TLS version allows in one record.
/// Plaintext hello records should stay within 2^14, but enforcing that is the backend's business;
/// we only need a bound that keeps a bogus length from being believed.
const MAX_RECORD_PAYLOAD: usize = (1 << 14) + 2048;
const MAX_SESSION_ID_LEN: usize = 32;
const RANDOM_LEN: usize = 32;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SERVER_NAME_TYPE_HOST_NAME: u8 = 0;

const SIZE_LIMIT: &str = "client hello exceeds size limit";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// host_name from the server_name extension, lowercased ASCII, one trailing dot removed.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order of preference.
    pub alpn: Vec<String>,
    /// From the supported_versions extension, GREASE values removed.
    pub supported_versions: Vec<u16>,
    /// The ClientHello's own `client_version` field (frozen at 0x0303 by TLS 1.3 clients).
    pub legacy_version: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloParse {
    Complete(ClientHelloInfo),
    /// A prefix of a plausible ClientHello: read more bytes and call again with the whole buffer.
    Incomplete,
    /// The first byte is not a handshake record, or the record header cannot be TLS.
    NotTls,
    /// TLS, but malformed or over `MAX_CLIENT_HELLO_BYTES`.
    Invalid(&'static str),
}

/// Classifies `buf`, which must start at the first byte the client sent. Bytes after the record
/// that ends the hello (e.g. 0-RTT early data) are ignored.
///
/// Every decision other than `Incomplete` depends only on bytes already in `buf`, so once a prefix
/// yields `Complete`, `NotTls` or `Invalid`, any longer buffer with that prefix yields the same.
pub fn parse_client_hello(buf: &[u8]) -> ClientHelloParse {
    match reassemble(buf) {
        Ok(message) => match message.get(HANDSHAKE_HEADER_LEN..).map(parse_body) {
            Some(Ok(info)) => ClientHelloParse::Complete(info),
            Some(Err(reason)) => ClientHelloParse::Invalid(reason),
            // reassemble only returns messages that hold their 4-byte header.
            None => ClientHelloParse::Invalid("truncated handshake header"),
        },
        Err(outcome) => outcome,
    }
}

/// Parses a whole ClientHello handshake message (its 4-byte header first) that arrived without a
/// record layer, as QUIC carries it in CRYPTO frames (RFC 9001 §4). `message` must be exactly the
/// message: the caller knows its length from the header.
pub fn parse_client_hello_message(message: &[u8]) -> ClientHelloParse {
    match message {
        [HANDSHAKE_CLIENT_HELLO, a, b, c, body @ ..] if usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c) == body.len() => match parse_body(body) {
            Ok(info) => ClientHelloParse::Complete(info),
            Err(reason) => ClientHelloParse::Invalid(reason),
        },
        [HANDSHAKE_CLIENT_HELLO, ..] => ClientHelloParse::Invalid("client hello length does not match its message"),
        _ => ClientHelloParse::Invalid("first handshake message is not a client hello"),
    }
}

impl ClientHelloInfo {
    /// Highest TLS version the client offers, as "TLSv1.3"/"TLSv1.2"/"TLSv1.1"/"TLSv1.0";
    /// supported_versions wins over legacy_version.
    pub fn max_version_name(&self) -> Option<&'static str> {
        // RFC 8446 4.2.1: when supported_versions is present, legacy_version must be ignored
        // (TLS 1.3 clients leave it at 0x0303). Empty here also covers a GREASE-only list.
        let legacy = [self.legacy_version];
        let offered: &[u16] = if self.supported_versions.is_empty() { &legacy } else { &self.supported_versions };
        offered.iter().copied().filter(|v| tls_version_name(*v).is_some()).max().and_then(tls_version_name)
    }
}

pub fn tls_version_name(v: u16) -> Option<&'static str> {
    match v {
        0x0304 => Some("TLSv1.3"),
        0x0303 => Some("TLSv1.2"),
        0x0302 => Some("TLSv1.1"),
        0x0301 => Some("TLSv1.0"),
        _ => None,
    }
}

/// A fatal TLS alert record (TLS 1.2 record version 0x0303) with the given description, e.g. 112
/// unrecognized_name.
pub fn fatal_alert(description: u8) -> [u8; 7] {
    // 0x0303 rather than echoing the client's record version: every TLS 1.0–1.3 client accepts it
    // on an alert, and we may be answering before we know which version would have been chosen.
    [TLS_RECORD_ALERT, 3, 3, 0, 2, ALERT_LEVEL_FATAL, description]
}

/// Returns the ClientHello handshake message (4-byte header included), borrowed when it sits in a
/// single record. `Err` carries every other outcome.
fn reassemble(buf: &[u8]) -> Result<Cow<'_, [u8]>, ClientHelloParse> {
    use ClientHelloParse::{Incomplete, Invalid, NotTls};

    // Only the first record decides TLS or not; later oddities are a broken TLS client, not
    // another protocol. The minor version is not checked: clients use 0x00 through 0x03 there.
    match buf {
        [] => return Err(Incomplete),
        [content_type, ..] if *content_type != TLS_RECORD_HANDSHAKE => return Err(NotTls),
        [_, major, ..] if *major != 3 => return Err(NotTls),
        _ => {}
    }

    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    // Length of the whole handshake message, known once its header has been gathered.
    let mut expected: Option<usize> = None;
    let mut pos = 0usize;
    loop {
        // A further record needs a header and at least one payload byte; refusing here, before
        // waiting for it, keeps `Incomplete` from ever being returned for a buffer at the limit.
        if pos + RECORD_HEADER_LEN + 1 > MAX_CLIENT_HELLO_BYTES {
            return Err(Invalid(SIZE_LIMIT));
        }
        // Checked before the rest of the header so that a client switching to another record type
        // mid-hello is refused as soon as it shows, not a few bytes later.
        match buf.get(pos) {
            None => return Err(Incomplete),
            Some(&TLS_RECORD_HANDSHAKE) => {}
            Some(_) => return Err(Invalid("non-handshake record before client hello ended")),
        }
        let Some(&[_, major, _minor, len_hi, len_lo]) =
            buf.get(pos..).and_then(<[u8]>::first_chunk::<RECORD_HEADER_LEN>)
        else {
            return Err(Incomplete);
        };
        if major != 3 {
            return Err(Invalid("record version is not TLS"));
        }
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        // RFC 8446 5.1 forbids empty handshake fragments; accepting them would only let a peer
        // spend our size budget on headers.
        if len == 0 {
            return Err(Invalid("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(Invalid("record longer than 2^14+2048"));
        }
        let start = pos + RECORD_HEADER_LEN;
        let end = start + len;
        if end > MAX_CLIENT_HELLO_BYTES {
            return Err(Invalid(SIZE_LIMIT));
        }

        let gathered_before = message.len();
        let available = buf.get(start..end.min(buf.len())).unwrap_or_default();
        if message.is_empty() {
            message = Cow::Borrowed(available);
        } else {
            // First copy happens only for a hello split over records, which real clients rarely
            // do; the copy is bounded by the bytes in `buf`.
            message.to_mut().extend_from_slice(available);
        }

        if expected.is_none() {
            if let Some(&msg_type) = message.first() {
                if msg_type != HANDSHAKE_CLIENT_HELLO {
                    return Err(Invalid("first handshake message is not a client hello"));
                }
            }
            if let Some(&[_, a, b, c]) = message.first_chunk::<HANDSHAKE_HEADER_LEN>() {
                let total = HANDSHAKE_HEADER_LEN + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
                // On the wire the message costs at least one record header more than itself.
                if total + RECORD_HEADER_LEN > MAX_CLIENT_HELLO_BYTES {
                    return Err(Invalid(SIZE_LIMIT));
                }
                expected = Some(total);
            }
        }
        if let Some(total) = expected {
            // RFC 8446 5.1: a ClientHello may be followed by a key change (0-RTT), so it must end
            // on a record boundary; in TLS 1.2 nothing else may follow it in the first flight.
            // Judged from the declared record length so it holds before the record has arrived.
            if gathered_before + len > total {
                return Err(Invalid("client hello does not end at a record boundary"));
            }
        }
        if end > buf.len() {
            return Err(Incomplete);
        }
        if expected == Some(message.len()) {
            return Ok(message);
        }
        pos = end;
    }
}

/// Parses the ClientHello body (after the handshake header), which must be exactly this long.
fn parse_body(body: &[u8]) -> Result<ClientHelloInfo, &'static str> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16().ok_or("truncated client version")?;
    r.take(RANDOM_LEN).ok_or("truncated random")?;
    let session_id = r.u8_prefixed().ok_or("truncated session id")?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err("session id longer than 32 bytes");
    }
    let cipher_suites = r.u16_prefixed().ok_or("truncated cipher suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err("bad cipher suites length");
    }
    let compression_methods = r.u8_prefixed().ok_or("truncated compression methods")?;
    if compression_methods.is_empty() {
        return Err("no compression methods");
    }

    let mut info = ClientHelloInfo { sni: None, alpn: Vec::new(), supported_versions: Vec::new(), legacy_version };
    // RFC 5246 7.4.1.2: a hello may end right after compression_methods, with no extensions block.
    if r.is_empty() {
        return Ok(info);
    }
    let mut extensions = Reader::new(r.u16_prefixed().ok_or("truncated extensions")?);
    if !r.is_empty() {
        return Err("bytes after extensions");
    }

    let mut seen = ExtensionSet::new();
    while !extensions.is_empty() {
        let ext_type = extensions.u16().ok_or("truncated extension header")?;
        let data = extensions.u16_prefixed().ok_or("truncated extension")?;
        // RFC 8446 4.2 forbids repeats; accepting them would let the SNI we route on differ from
        // the one the backend acts on, if it keeps the other copy.
        if !seen.insert(ext_type) {
            return Err("duplicate extension");
        }
        match ext_type {
            EXT_SERVER_NAME => info.sni = parse_server_name(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => info.supported_versions = parse_supported_versions(data)?,
            _ => {}
        }
    }
    Ok(info)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut ext = Reader::new(data);
    let list = ext.u16_prefixed().ok_or("truncated server name list")?;
    if !ext.is_empty() {
        return Err("server name list length mismatch");
    }
    if list.is_empty() {
        return Err("empty server name list");
    }
    let mut list = Reader::new(list);
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8().ok_or("truncated server name")?;
        // Every name type defined so far shares host_name's u16-length layout; skipping unknown
        // types (as Go does) rather than rejecting them keeps future clients routable.
        let name = list.u16_prefixed().ok_or("truncated server name")?;
        if name_type != SERVER_NAME_TYPE_HOST_NAME {
            continue;
        }
        // RFC 6066 3: at most one name per type. Two host_names would make routing ambiguous.
        if host_name.is_some() {
            return Err("more than one host_name");
        }
        host_name = Some(normalize_host_name(name)?);
    }
    Ok(host_name)
}

fn normalize_host_name(name: &[u8]) -> Result<String, &'static str> {
    // RFC 6066 says ASCII DNS name. Control bytes, spaces, NUL or UTF-8 have no business in a
    // routing key, and a lossy conversion could make two different names compare equal.
    if !name.iter().all(u8::is_ascii_graphic) {
        return Err("server name is not printable ascii");
    }
    // Route matching compares names; "Example.COM." and "example.com" are the same DNS name.
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err("empty server name");
    }
    let mut host = String::with_capacity(name.len());
    host.extend(name.iter().map(|b| char::from(b.to_ascii_lowercase())));
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, &'static str> {
    let mut ext = Reader::new(data);
    let list = ext.u16_prefixed().ok_or("truncated alpn list")?;
    if !ext.is_empty() {
        return Err("alpn list length mismatch");
    }
    if list.is_empty() {
        return Err("empty alpn list");
    }
    let mut list = Reader::new(list);
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.u8_prefixed().ok_or("truncated alpn protocol")?;
        // RFC 7301 3.1: empty names are forbidden.
        if name.is_empty() {
            return Err("empty alpn protocol");
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, &'static str> {
    let mut ext = Reader::new(data);
    let list = ext.u8_prefixed().ok_or("truncated supported versions")?;
    if !ext.is_empty() {
        return Err("supported versions length mismatch");
    }
    // RFC 8446 4.2.1: versions<2..254>.
    if list.is_empty() || list.len() % 2 != 0 {
        return Err("bad supported versions length");
    }
    Ok(list
        .chunks_exact(2)
        .filter_map(|pair| pair.first_chunk::<2>().map(|pair| u16::from_be_bytes(*pair)))
        .filter(|v| !is_grease(*v))
        .collect())
}

/// RFC 8701 GREASE: 0x0A0A, 0x1A1A, … 0xFAFA (both bytes equal, low nibble 0xA). Clients insert
/// them to keep servers tolerant of unknown values; they never name a real version.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// Which extension types have been seen: one bit per possible type, so the duplicate check costs
/// the same for 16 000 extensions as for 16 and allocates nothing.
struct ExtensionSet([u64; 1024]);

impl ExtensionSet {
    fn new() -> Self {
        ExtensionSet([0; 1024])
    }

    /// false if it was already there.
    fn insert(&mut self, ext_type: u16) -> bool {
        let bit = 1u64 << (ext_type % 64);
        match self.0.get_mut(usize::from(ext_type / 64)) {
            Some(word) => {
                let fresh = *word & bit == 0;
                *word |= bit;
                fresh
            }
            // Unreachable (65536 / 64 words); reported as a repeat rather than assumed.
            None => false,
        }
    }
}

/// A cursor over untrusted bytes where every read is checked: `None` means "not enough bytes".
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&b, tail) = self.rest.split_first()?;
        self.rest = tail;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let (&head, tail) = self.rest.split_first_chunk::<2>()?;
        self.rest = tail;
        Some(u16::from_be_bytes(head))
    }

    fn u8_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn u16_prefixed(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on 127.0.0.1 by a python socket server that hex-dumped the first bytes of each
    // connection, one real client per constant.
    /// `openssl s_client -servername example.com -alpn h2,http/1.1` (OpenSSL 3.0.19)
    const OPENSSL_TLS13_SNI_ALPN: &str = concat!(
        "160301014a01000146030315bbef116bf312868a76b8b4f2ee39a8bcc9fcf5e6064501feabc5ec3a6d51722052e43457",
        "2d3722f74387ea8780f93a14e2ddeee3106c603858ed4ba4a0d5820f003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000bf",
        "00000010000e00000b6578616d706c652e636f6d000b000403000102000a00160014001d0017001e0019001801000101",
        "010201030104002300000010000e000c02683208687474702f312e310016000000170000000d002a0028040305030603",
        "080708080809080a080b080408050806040105010601030303010302040205020602002b000908030403030302030100",
        "2d00020101003300260024001d00204c9e664e503fdf98fd23ffd7b5ca8daf608091cb00fc6436472f21fb0053ca26",
    );

    /// `openssl s_client -noservername` (OpenSSL 3.0.19)
    const OPENSSL_TLS13_NO_SNI: &str = concat!(
        "16030101240100012003035638b7df9d5378d3f7b1bf01c8733547340eac0b4bfe89640496d9cf4484c1ba202b23c837",
        "f1dc8796ce0bc01f3f5b4ce254ba378347adcdad8601411f4e214cbc003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000099",
        "000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d",
        "002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009",
        "080304030303020301002d00020101003300260024001d002040bfef4d226656fb28ad0dc5ad18baa8504dedc1deb582",
        "241631fb2408e06f1b",
    );

    /// `openssl s_client -servername Example.COM. -tls1_2` (OpenSSL 3.0.19)
    const OPENSSL_TLS12_MIXED_CASE_DOT: &str = concat!(
        "16030100cc010000c803038c69de689bd2d2029ea921acd186e4c50733048120134c21fb40d09a93a495d3000038c02c",
        "c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c",
        "0035002f00ff0100006700000011000f00000c4578616d706c652e434f4d2e000b000403000102000a000c000a001d00",
        "17001e00190018002300000016000000170000000d002a0028040305030603080708080809080a080b08040805080604",
        "0105010601030303010302040205020602",
    );

    /// `curl https://example.com:PORT/` (curl 7.88.1 / OpenSSL 3.0.19)
    const CURL_TLS13_SNI_ALPN: &str = concat!(
        "1603010200010001fc03031a2217ce13cbf16ba64672a0cb8e0d142d999bb9003d7e8bda5f83dac2f262f520ccf9230c",
        "83c80c17ed48f5aba031524de471a1d0f16ec7557ce8b614dc2bb0e0003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000175",
        "00000010000e00000b6578616d706c652e636f6d000b000403000102000a00160014001d0017001e0019001801000101",
        "0102010301040010000e000c02683208687474702f312e31001600000017000000310000000d002a0028040305030603",
        "080708080809080a080b080408050806040105010601030303010302040205020602002b000908030403030302030100",
        "2d00020101003300260024001d0020671c9ff0267413676068be33d64dc2b61889c30c5541f079f22dc06f2b357f2000",
        "1500b2000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "00000000000000000000000000000000000000000000000000000000000000000000000000",
    );

    /// node 20 `tls.connect({servername: 'example.com', ALPNProtocols: ['h2', 'http/1.1']})`
    const NODE_TLS13_SNI_ALPN: &str = concat!(
        "160301017e0100017a030333ee7001c7ef8dafcd0f712032bff6d327da3d5dc33d09fc29d321de8e03b5d320748695d4",
        "ea117fb80c0c4dfc10398cf8a80a4a23f01e367e7f1d5d5cc30a79170076130213031301c02fc02bc030c02c009ec027",
        "0067c028006b00a3009fcca9cca8ccaac0afc0adc0a3c09fc05dc061c057c05300a2c0aec0acc0a2c09ec05cc060c056",
        "c052c024006ac0230040c00ac01400390038c009c01300330032009dc0a1c09dc051009cc0a0c09cc050003d003c0035",
        "002f00ff010000bb00000010000e00000b6578616d706c652e636f6d000b000403000102000a00160014001d0017001e",
        "0019001801000101010201030104002300000010000e000c02683208687474702f312e310016000000170000000d002a",
        "0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b00050403",
        "040303002d00020101003300260024001d00208775e382913cea4717400f2bdf6bf1f2ba0aefb3cacf7a0ff63f242628",
        "b6a073",
    );

    /// node 20 `tls.connect({host: '127.0.0.1', servername: ''})`
    const NODE_TLS13_NO_SNI: &str = concat!(
        "1603010158010001540303ebf0a002932d2be1e0a24f448e07821320c744c7625fc0595a36641c586dd07b2014aa13c5",
        "c5a337a135bd964b61994f89488c765782febf83f21a5e9da2cbd95b0076130213031301c02fc02bc030c02c009ec027",
        "0067c028006b00a3009fcca9cca8ccaac0afc0adc0a3c09fc05dc061c057c05300a2c0aec0acc0a2c09ec05cc060c056",
        "c052c024006ac0230040c00ac01400390038c009c01300330032009dc0a1c09dc051009cc0a0c09cc050003d003c0035",
        "002f00ff01000095000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016",
        "000000170000000d002a0028040305030603080708080809080a080b0804080508060401050106010303030103020402",
        "05020602002b00050403040303002d00020101003300260024001d00204f534328dc7ffdbd59a37f3e23ec9676dc5e41",
        "06f3c225aaf3e2f374ebbc2279",
    );

    const ALL_CAPTURED: [&str; 6] = [
        OPENSSL_TLS13_SNI_ALPN,
        OPENSSL_TLS13_NO_SNI,
        OPENSSL_TLS12_MIXED_CASE_DOT,
        CURL_TLS13_SNI_ALPN,
        NODE_TLS13_SNI_ALPN,
        NODE_TLS13_NO_SNI,
    ];

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn be16(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    /// One handshake record holding `payload`, with the record version real clients use.
    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![TLS_RECORD_HANDSHAKE, 3, 1];
        r.extend_from_slice(&be16(payload.len()));
        r.extend_from_slice(payload);
        r
    }

    /// The handshake message of a single-record capture.
    fn message_of(single_record: &[u8]) -> Vec<u8> {
        assert_eq!(usize::from(u16::from_be_bytes([single_record[3], single_record[4]])) + 5, single_record.len());
        single_record[5..].to_vec()
    }

    /// `message` re-framed into records cut at the given payload offsets.
    fn rechunk(message: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&message.len())) {
            out.extend(record(&message[from..cut]));
            from = cut;
        }
        out
    }

    fn complete(buf: &[u8]) -> ClientHelloInfo {
        match parse_client_hello(buf) {
            ClientHelloParse::Complete(info) => info,
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> &'static str {
        match parse_client_hello(buf) {
            ClientHelloParse::Invalid(reason) => reason,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Every shorter prefix is Incomplete or already the final answer.
    fn assert_prefixes_consistent(buf: &[u8]) {
        let full = parse_client_hello(buf);
        for n in 0..buf.len() {
            let part = parse_client_hello(&buf[..n]);
            assert!(part == ClientHelloParse::Incomplete || part == full, "prefix {n}: {part:?} vs full {full:?}");
        }
    }

    /// A synthetic ClientHello whose every field can be bent out of shape.
    struct Hello {
        version: u16,
        session_id: Vec<u8>,
        cipher_suites: Vec<u8>,
        compression: Vec<u8>,
        /// Raw extension entries; None for a hello without an extensions block.
        extensions: Option<Vec<u8>>,
    }

    impl Hello {
        fn new() -> Self {
            Hello {
                version: 0x0303,
                session_id: vec![7; 32],
                cipher_suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                extensions: Some(Vec::new()),
            }
        }

        fn ext(mut self, ext_type: u16, data: &[u8]) -> Self {
            let exts = self.extensions.get_or_insert_with(Vec::new);
            exts.extend_from_slice(&ext_type.to_be_bytes());
            exts.extend_from_slice(&be16(data.len()));
            exts.extend_from_slice(data);
            self
        }

        fn body(&self) -> Vec<u8> {
            let mut b = self.version.to_be_bytes().to_vec();
            b.extend_from_slice(&[0x42; 32]);
            b.push(u8::try_from(self.session_id.len()).unwrap());
            b.extend_from_slice(&self.session_id);
            b.extend_from_slice(&be16(self.cipher_suites.len()));
            b.extend_from_slice(&self.cipher_suites);
            b.push(u8::try_from(self.compression.len()).unwrap());
            b.extend_from_slice(&self.compression);
            if let Some(exts) = &self.extensions {
                b.extend_from_slice(&be16(exts.len()));
                b.extend_from_slice(exts);
            }
            b
        }

        fn record(&self) -> Vec<u8> {
            record(&handshake(&self.body()))
        }
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut m = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        m.extend_from_slice(body);
        m
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in names {
            list.push(*name_type);
            list.extend_from_slice(&be16(name.len()));
            list.extend_from_slice(name);
        }
        let mut data = be16(list.len()).to_vec();
        data.extend(list);
        data
    }

    fn alpn_ext(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend_from_slice(p);
        }
        let mut data = be16(list.len()).to_vec();
        data.extend(list);
        data
    }

    fn versions_ext(versions: &[u16]) -> Vec<u8> {
        let mut data = vec![u8::try_from(versions.len() * 2).unwrap()];
        for v in versions {
            data.extend_from_slice(&v.to_be_bytes());
        }
        data
    }

    // ---- real clients ----

    #[test]
    fn openssl_tls13_with_sni_and_alpn() {
        let info = complete(&unhex(OPENSSL_TLS13_SNI_ALPN));
        assert_eq!(
            info,
            ClientHelloInfo {
                sni: Some("example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
                supported_versions: vec![0x0304, 0x0303, 0x0302, 0x0301],
                legacy_version: 0x0303,
            }
        );
        assert_eq!(info.max_version_name(), Some("TLSv1.3"));
    }

    #[test]
    fn openssl_tls13_without_sni() {
        let info = complete(&unhex(OPENSSL_TLS13_NO_SNI));
        assert_eq!(info.sni, None);
        assert!(info.alpn.is_empty());
        assert_eq!(info.supported_versions, vec![0x0304, 0x0303, 0x0302, 0x0301]);
        assert_eq!(info.max_version_name(), Some("TLSv1.3"));
    }

    #[test]
    fn openssl_tls12_sni_is_lowercased_and_loses_trailing_dot() {
        // OpenSSL sent "Example.COM." verbatim.
        let buf = unhex(OPENSSL_TLS12_MIXED_CASE_DOT);
        assert!(buf.windows(12).any(|w| w == b"Example.COM."));
        let info = complete(&buf);
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert!(info.supported_versions.is_empty());
        assert_eq!(info.legacy_version, 0x0303);
        assert_eq!(info.max_version_name(), Some("TLSv1.2"));
    }

    #[test]
    fn curl_tls13() {
        let info = complete(&unhex(CURL_TLS13_SNI_ALPN));
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert_eq!(info.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(info.max_version_name(), Some("TLSv1.3"));
    }

    #[test]
    fn node_tls13_with_and_without_sni() {
        let with = complete(&unhex(NODE_TLS13_SNI_ALPN));
        assert_eq!(with.sni.as_deref(), Some("example.com"));
        assert_eq!(with.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(with.supported_versions, vec![0x0304, 0x0303]);
        let without = complete(&unhex(NODE_TLS13_NO_SNI));
        assert_eq!(without.sni, None);
        assert!(without.alpn.is_empty());
        assert_eq!(without.max_version_name(), Some("TLSv1.3"));
    }

    #[test]
    fn every_split_point_of_real_hellos() {
        for hex in ALL_CAPTURED {
            let buf = unhex(hex);
            let info = complete(&buf);
            for n in 0..buf.len() {
                assert_eq!(parse_client_hello(&buf[..n]), ClientHelloParse::Incomplete, "prefix {n}");
            }
            // What follows the hello (early data, or the next read) does not change the answer.
            let mut more = buf.clone();
            more.extend_from_slice(&[23, 3, 3, 0, 4, 1, 2, 3, 4]);
            assert_eq!(complete(&more), info);
        }
    }

    #[test]
    fn hello_split_over_records_parses_the_same() {
        for hex in ALL_CAPTURED {
            let buf = unhex(hex);
            let info = complete(&buf);
            let message = message_of(&buf);
            // Three records, the first cutting through the handshake header.
            let three = rechunk(&message, &[2, 100]);
            assert_eq!(complete(&three), info);
            for n in 0..three.len() {
                assert_eq!(parse_client_hello(&three[..n]), ClientHelloParse::Incomplete, "prefix {n}");
            }
            // Every two-record split.
            for cut in 1..message.len() {
                assert_eq!(complete(&rechunk(&message, &[cut])), info, "cut {cut}");
            }
            // The extreme: one byte per record.
            let cuts: Vec<usize> = (1..message.len()).collect();
            assert_eq!(complete(&rechunk(&message, &cuts)), info);
        }
    }

    // ---- not TLS / incomplete ----

    #[test]
    fn not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"), ClientHelloParse::NotTls);
        assert_eq!(parse_client_hello(b"G"), ClientHelloParse::NotTls);
        assert_eq!(parse_client_hello(b"PRI * HTTP/2.0\r\n"), ClientHelloParse::NotTls);
        // SSLv2-compatible hello: no TLS record header.
        assert_eq!(parse_client_hello(&[0x80, 0x2e, 0x01, 0x03, 0x01]), ClientHelloParse::NotTls);
        // Application data first, or a handshake record with a non-TLS major version.
        assert_eq!(parse_client_hello(&[23, 3, 3, 0, 1, 0]), ClientHelloParse::NotTls);
        assert_eq!(parse_client_hello(&[22, 2]), ClientHelloParse::NotTls);
        assert_eq!(parse_client_hello(&[22, 0xfe, 0xfd, 0, 10]), ClientHelloParse::NotTls);
    }

    #[test]
    fn short_prefixes_are_incomplete() {
        for buf in [&[][..], &[22], &[22, 3], &[22, 3, 1], &[22, 3, 1, 0], &[22, 3, 1, 0, 5], &[22, 3, 1, 0, 5, 1]] {
            assert_eq!(parse_client_hello(buf), ClientHelloParse::Incomplete, "{buf:?}");
        }
    }

    // ---- record layer ----

    #[test]
    fn wrong_handshake_type_is_invalid_as_soon_as_seen() {
        let mut buf = unhex(OPENSSL_TLS13_SNI_ALPN);
        buf[5] = 2; // server_hello
        assert_eq!(invalid(&buf), "first handshake message is not a client hello");
        assert_eq!(invalid(&buf[..6]), "first handshake message is not a client hello");
        assert_prefixes_consistent(&buf);
    }

    #[test]
    fn oversize_declared_lengths_are_invalid_without_waiting() {
        // A 16 MiB handshake message: refused from its header alone.
        assert_eq!(invalid(&[22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]), SIZE_LIMIT);
        // The largest message that still fits with one record header around it is worth waiting for.
        let fits = MAX_CLIENT_HELLO_BYTES - RECORD_HEADER_LEN - HANDSHAKE_HEADER_LEN;
        let header = |body_len: usize| {
            let l = u32::try_from(body_len).unwrap().to_be_bytes();
            vec![22, 3, 1, 0x40, 0, 1, l[1], l[2], l[3]]
        };
        assert_eq!(parse_client_hello(&header(fits)), ClientHelloParse::Incomplete);
        assert_eq!(invalid(&header(fits + 1)), SIZE_LIMIT);
        // Records longer than any TLS version allows, and empty ones.
        assert_eq!(invalid(&[22, 3, 1, 0x48, 0x01]), "record longer than 2^14+2048");
        assert_eq!(parse_client_hello(&[22, 3, 1, 0x48, 0x00]), ClientHelloParse::Incomplete);
        assert_eq!(invalid(&[22, 3, 1, 0, 0]), "empty handshake record");
    }

    #[test]
    fn tiny_records_cannot_outgrow_the_limit() {
        // A plausible header for a 60 000-byte hello, then one payload byte per record: the
        // record headers push the buffer past the limit long before the hello is whole.
        let mut message = vec![HANDSHAKE_CLIENT_HELLO, 0, 0xea, 0x60];
        message.resize(4 + 60_000, 0);
        let cuts: Vec<usize> = (1..message.len()).collect();
        let buf = rechunk(&message, &cuts);
        assert!(buf.len() > MAX_CLIENT_HELLO_BYTES);
        assert_eq!(invalid(&buf), SIZE_LIMIT);
        for n in MAX_CLIENT_HELLO_BYTES - 40..MAX_CLIENT_HELLO_BYTES + 40 {
            let part = parse_client_hello(&buf[..n]);
            assert!(
                part == ClientHelloParse::Incomplete && n < MAX_CLIENT_HELLO_BYTES
                    || part == ClientHelloParse::Invalid(SIZE_LIMIT),
                "{n}: {part:?}"
            );
        }
    }

    #[test]
    fn other_record_types_inside_the_hello_are_invalid() {
        let message = message_of(&unhex(NODE_TLS13_SNI_ALPN));
        let mut buf = record(&message[..50]);
        buf.extend_from_slice(&[23, 3, 3, 0, 2, 0, 0]);
        assert_eq!(invalid(&buf), "non-handshake record before client hello ended");
        // Known from the content-type byte alone.
        assert_eq!(invalid(&buf[..56]), "non-handshake record before client hello ended");
        let mut buf = record(&message[..50]);
        buf.extend_from_slice(&[22, 4, 0, 0, 2, 0, 0]);
        assert_eq!(invalid(&buf), "record version is not TLS");
        assert_prefixes_consistent(&buf);
    }

    #[test]
    fn hello_must_end_at_a_record_boundary() {
        let mut message = message_of(&unhex(NODE_TLS13_SNI_ALPN));
        message.push(0);
        let buf = record(&message);
        assert_eq!(invalid(&buf), "client hello does not end at a record boundary");
        // Decided from the declared record length, before the record has arrived.
        assert_eq!(invalid(&buf[..10]), "client hello does not end at a record boundary");
        // The same when the overrun is in a later record.
        let buf = rechunk(&message, &[200]);
        assert_eq!(invalid(&buf), "client hello does not end at a record boundary");
        assert_prefixes_consistent(&buf);
    }

    // ---- ClientHello structure ----

    #[test]
    fn minimal_hello_without_extensions() {
        let info = complete(&Hello { extensions: None, ..Hello::new() }.record());
        assert_eq!(
            info,
            ClientHelloInfo { sni: None, alpn: vec![], supported_versions: vec![], legacy_version: 0x0303 }
        );
        let info = complete(&Hello { version: 0x0301, extensions: None, ..Hello::new() }.record());
        assert_eq!(info.max_version_name(), Some("TLSv1.0"));
        // An empty extensions block is just as fine.
        assert!(complete(&Hello::new().record()).sni.is_none());
    }

    #[test]
    fn every_truncation_of_a_real_body_is_invalid() {
        let message = message_of(&unhex(CURL_TLS13_SNI_ALPN));
        let body = &message[4..];
        // Where the body may legally end: straight after compression_methods.
        let sid = usize::from(body[34]);
        let suites = usize::from(u16::from_be_bytes([body[35 + sid], body[36 + sid]]));
        let no_extensions_end = 35 + sid + 2 + suites + 1 + usize::from(body[37 + sid + suites]);
        for len in 0..body.len() {
            let buf = record(&handshake(&body[..len]));
            match parse_client_hello(&buf) {
                ClientHelloParse::Invalid(_) => assert_ne!(len, no_extensions_end),
                ClientHelloParse::Complete(info) => {
                    assert_eq!(len, no_extensions_end);
                    assert_eq!(info.sni, None);
                }
                other => panic!("truncated to {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_fixed_fields_are_invalid() {
        assert_eq!(
            invalid(&Hello { session_id: vec![0; 33], ..Hello::new() }.record()),
            "session id longer than 32 bytes"
        );
        assert!(complete(&Hello { session_id: vec![], ..Hello::new() }.record()).sni.is_none());
        assert_eq!(invalid(&Hello { cipher_suites: vec![], ..Hello::new() }.record()), "bad cipher suites length");
        assert_eq!(
            invalid(&Hello { cipher_suites: vec![0x13, 0x01, 0x13], ..Hello::new() }.record()),
            "bad cipher suites length"
        );
        assert_eq!(invalid(&Hello { compression: vec![], ..Hello::new() }.record()), "no compression methods");
        // Inner lengths that run past the message.
        let mut body = Hello::new().body();
        body[34] = 200; // session id length
        assert_eq!(invalid(&record(&handshake(&body))), "truncated session id");
        assert_eq!(invalid(&record(&handshake(&body[..20]))), "truncated random");
        assert_eq!(invalid(&record(&handshake(&body[..1]))), "truncated client version");
    }

    #[test]
    fn extension_block_lengths_must_be_exact() {
        let hello = Hello::new().ext(EXT_SERVER_NAME, &sni_ext(&[(0, b"a.example")]));
        let body = hello.body();
        let exts_at = body.len() - hello.extensions.as_ref().unwrap().len() - 2;
        // Declared one short: a byte is left over after the block.
        let mut short = body.clone();
        short[exts_at + 1] -= 1;
        assert_eq!(invalid(&record(&handshake(&short))), "bytes after extensions");
        // Declared one long.
        let mut long = body.clone();
        long[exts_at + 1] += 1;
        assert_eq!(invalid(&record(&handshake(&long))), "truncated extensions");
        // A lone byte where the block length should be.
        let mut dangling = Hello { extensions: None, ..Hello::new() }.body();
        dangling.push(0);
        assert_eq!(invalid(&record(&handshake(&dangling))), "truncated extensions");
        // An extension claiming more data than the block holds.
        let hello = Hello { extensions: Some(vec![0xff, 0x01, 0x00, 0x05, 1, 2]), ..Hello::new() };
        assert_eq!(invalid(&hello.record()), "truncated extension");
        let hello = Hello { extensions: Some(vec![0xff, 0x01, 0x00]), ..Hello::new() };
        assert_eq!(invalid(&hello.record()), "truncated extension");
        let hello = Hello { extensions: Some(vec![0xff]), ..Hello::new() };
        assert_eq!(invalid(&hello.record()), "truncated extension header");
    }

    #[test]
    fn duplicate_extensions_are_invalid() {
        let twice_sni = Hello::new().ext(0, &sni_ext(&[(0, b"a.example")])).ext(0, &sni_ext(&[(0, b"b.example")]));
        assert_eq!(invalid(&twice_sni.record()), "duplicate extension");
        let twice_unknown = Hello::new().ext(0xff01, &[0]).ext(EXT_ALPN, &alpn_ext(&[b"h2"])).ext(0xff01, &[0]);
        assert_eq!(invalid(&twice_unknown.record()), "duplicate extension");
        // Distinct types that share the low bits of the bitset's word index are not duplicates.
        let distinct = Hello::new().ext(0x0001, &[]).ext(0x0041, &[]).ext(0xffff, &[]).ext(0xffbf, &[]);
        assert!(complete(&distinct.record()).alpn.is_empty());
    }

    // ---- server_name ----

    #[test]
    fn sni_is_lowercased_and_loses_one_trailing_dot() {
        let sni = |name: &[u8]| complete(&Hello::new().ext(EXT_SERVER_NAME, &sni_ext(&[(0, name)])).record()).sni;
        assert_eq!(sni(b"WWW.Example.COM.").as_deref(), Some("www.example.com"));
        assert_eq!(sni(b"example.com").as_deref(), Some("example.com"));
        assert_eq!(sni(b"xn--bcher-kva.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(sni(b"a..").as_deref(), Some("a."));
    }

    #[test]
    fn malformed_sni_is_invalid() {
        let bad = |data: &[u8]| invalid(&Hello::new().ext(EXT_SERVER_NAME, data).record());
        assert_eq!(bad(&sni_ext(&[(0, b".")])), "empty server name");
        assert_eq!(bad(&sni_ext(&[(0, b"")])), "empty server name");
        assert_eq!(bad(&sni_ext(&[(0, b"exa mple.com")])), "server name is not printable ascii");
        assert_eq!(bad(&sni_ext(&[(0, b"ex\0ample.com")])), "server name is not printable ascii");
        assert_eq!(bad(&sni_ext(&[(0, "bücher.example".as_bytes())])), "server name is not printable ascii");
        assert_eq!(bad(&sni_ext(&[(0, b"a.example"), (0, b"b.example")])), "more than one host_name");
        assert_eq!(bad(&sni_ext(&[])), "empty server name list");
        assert_eq!(bad(&[]), "truncated server name list");
        let mut trailing = sni_ext(&[(0, b"a.example")]);
        trailing.push(0);
        assert_eq!(bad(&trailing), "server name list length mismatch");
        let mut cut = sni_ext(&[(0, b"a.example")]);
        cut[1] -= 1; // list length one short of the name inside it
        cut.pop();
        assert_eq!(bad(&cut), "truncated server name");
    }

    #[test]
    fn unknown_server_name_types_are_skipped() {
        let hello = Hello::new().ext(EXT_SERVER_NAME, &sni_ext(&[(7, b"\x00\xff opaque"), (0, b"Host.Example")]));
        assert_eq!(complete(&hello.record()).sni.as_deref(), Some("host.example"));
        let only_unknown = Hello::new().ext(EXT_SERVER_NAME, &sni_ext(&[(1, b"x")]));
        assert_eq!(complete(&only_unknown.record()).sni, None);
    }

    // ---- ALPN ----

    #[test]
    fn alpn_keeps_order_and_rejects_malformed_lists() {
        let alpn = |data: &[u8]| parse_client_hello(&Hello::new().ext(EXT_ALPN, data).record());
        let ok = alpn(&alpn_ext(&[b"http/1.1", b"h2", b"\xff\xfe"]));
        let ClientHelloParse::Complete(info) = ok else { panic!("{ok:?}") };
        assert_eq!(info.alpn, vec!["http/1.1", "h2", "\u{fffd}\u{fffd}"]);
        assert_eq!(alpn(&alpn_ext(&[b"h2", b""])), ClientHelloParse::Invalid("empty alpn protocol"));
        assert_eq!(alpn(&alpn_ext(&[])), ClientHelloParse::Invalid("empty alpn list"));
        assert_eq!(alpn(&[0]), ClientHelloParse::Invalid("truncated alpn list"));
        let mut trailing = alpn_ext(&[b"h2"]);
        trailing.push(0);
        assert_eq!(alpn(&trailing), ClientHelloParse::Invalid("alpn list length mismatch"));
        assert_eq!(alpn(&[0, 3, 5, b'h', b'2']), ClientHelloParse::Invalid("truncated alpn protocol"));
    }

    // ---- supported_versions ----

    #[test]
    fn grease_versions_are_stripped() {
        let hello =
            Hello::new().ext(EXT_SUPPORTED_VERSIONS, &versions_ext(&[0x0a0a, 0x0304, 0xfafa, 0x0303, 0x7a7a, 0x1a2a]));
        // 0x1a2a is not GREASE: RFC 8701 values repeat the same byte twice.
        assert_eq!(complete(&hello.record()).supported_versions, vec![0x0304, 0x0303, 0x1a2a]);
        let grease_only = Hello::new().ext(EXT_SUPPORTED_VERSIONS, &versions_ext(&[0xdada]));
        let info = complete(&grease_only.record());
        assert!(info.supported_versions.is_empty());
        assert_eq!(info.max_version_name(), Some("TLSv1.2"));
        for v in (0..16u16).map(|i| i << 12 | 0x0a00 | i << 4 | 0x0a) {
            assert!(is_grease(v), "{v:#06x}");
        }
        assert!(!is_grease(0x0304) && !is_grease(0x0a1a) && !is_grease(0x0a0b));
    }

    #[test]
    fn malformed_supported_versions_are_invalid() {
        let bad = |data: &[u8]| invalid(&Hello::new().ext(EXT_SUPPORTED_VERSIONS, data).record());
        assert_eq!(bad(&[3, 3, 4, 3]), "bad supported versions length");
        assert_eq!(bad(&[0]), "bad supported versions length");
        assert_eq!(bad(&[]), "truncated supported versions");
        assert_eq!(bad(&[4, 3, 4]), "truncated supported versions");
        assert_eq!(bad(&[2, 3, 4, 0]), "supported versions length mismatch");
    }

    // ---- versions, alerts ----

    #[test]
    fn max_version_name_prefers_supported_versions() {
        let info = |supported_versions: Vec<u16>, legacy_version| ClientHelloInfo {
            sni: None,
            alpn: vec![],
            supported_versions,
            legacy_version,
        };
        assert_eq!(info(vec![0x0303, 0x0304], 0x0303).max_version_name(), Some("TLSv1.3"));
        assert_eq!(info(vec![0x0302, 0x0301], 0x0303).max_version_name(), Some("TLSv1.1"));
        assert_eq!(info(vec![0x7f1c, 0x0303], 0x0303).max_version_name(), Some("TLSv1.2"));
        assert_eq!(info(vec![], 0x0302).max_version_name(), Some("TLSv1.1"));
        assert_eq!(info(vec![], 0x0300).max_version_name(), None);
        assert_eq!(info(vec![0x0305], 0x0303).max_version_name(), None);
    }

    #[test]
    fn version_names() {
        assert_eq!(tls_version_name(0x0304), Some("TLSv1.3"));
        assert_eq!(tls_version_name(0x0303), Some("TLSv1.2"));
        assert_eq!(tls_version_name(0x0302), Some("TLSv1.1"));
        assert_eq!(tls_version_name(0x0301), Some("TLSv1.0"));
        assert_eq!(tls_version_name(0x0300), None);
        assert_eq!(tls_version_name(0xfefd), None);
    }

    #[test]
    fn fatal_alert_bytes() {
        assert_eq!(fatal_alert(ALERT_UNRECOGNIZED_NAME), [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70]);
    }

    #[test]
    fn prefixes_of_malformed_hellos_never_disagree_with_the_whole() {
        let hellos = [
            Hello { session_id: vec![0; 33], ..Hello::new() }.record(),
            Hello::new().ext(0, &sni_ext(&[(0, b"a")])).ext(0, &sni_ext(&[(0, b"b")])).record(),
            Hello::new().ext(EXT_ALPN, &alpn_ext(&[b""])).record(),
            rechunk(&handshake(&Hello::new().ext(EXT_SUPPORTED_VERSIONS, &[1, 3]).body()), &[3, 40]),
        ];
        for buf in hellos {
            assert!(matches!(parse_client_hello(&buf), ClientHelloParse::Invalid(_)));
            assert_prefixes_consistent(&buf);
        }
    }
}
