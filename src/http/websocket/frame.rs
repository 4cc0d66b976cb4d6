//! WebSocket frames (RFC 6455 §5) in a byte stream that the tunnel relays unchanged: where each
//! frame starts (so a ping can be put between frames, never inside one), what kind it is, how long
//! its message has grown, and whether the sender keeps the protocol's rules. The tracker reads
//! frame heads as the bytes pass and skips payloads without looking at them; it copies nothing,
//! allocates nothing, and answers any byte sequence with heads or a reason, never a panic. It knows
//! nothing of sockets: what to do with a refused stream is the tunnel's call.

/// Longest frame head: 2 bytes, an 8-byte extended length, a 4-byte masking key.
const MAX_HEAD: usize = 14;
/// Control frames carry at most this many payload bytes (§5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// RSV1 belongs to permessage-deflate (RFC 7692), which client and backend may negotiate in
/// headers the tunnel never sees: it stays allowed. No extension in use defines RSV2 or RSV3.
const RSV2_RSV3: u8 = 0x30;

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// A frame head, once all of its bytes have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload_len: u64,
}

impl FrameHead {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Why a stream stops being one the tunnel may pass on. Every reason but `TooBig` is a protocol
/// error (Close 1002); `TooBig` is Close 1009.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A 64-bit payload length with its most significant bit set (§5.2 forbids it).
    InvalidLength,
    /// An opcode RFC 6455 reserves (0x3-0x7, 0xB-0xF): no endpoint can know what it means.
    ReservedOpcode(u8),
    /// RSV2 or RSV3 set, which only a negotiated extension may do (§5.2).
    ReservedBits,
    /// A client frame without a masking key (§5.1).
    UnmaskedClientFrame,
    /// A server frame with a masking key (§5.1).
    MaskedServerFrame,
    /// A control frame over 125 bytes (§5.5).
    ControlTooLong,
    /// A control frame with FIN clear: control frames are never fragmented (§5.5).
    FragmentedControl,
    /// A new data message before the fragmented one ended, or a continuation of none (§5.4).
    BadFragmentation,
    /// A frame, or a data message (all its frames' payloads), over the configured maximum.
    TooBig { limit: u64 },
}

impl FrameError {
    /// The Close status the sender is told (§7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooBig { .. } => 1009,
            _ => 1002,
        }
    }

    /// The Close reason: what the sender did wrong.
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::InvalidLength => "invalid frame length",
            FrameError::ReservedOpcode(_) => "reserved opcode",
            FrameError::ReservedBits => "reserved bits set",
            FrameError::UnmaskedClientFrame => "unmasked client frame",
            FrameError::MaskedServerFrame => "masked server frame",
            FrameError::ControlTooLong => "control frame over 125 bytes",
            FrameError::FragmentedControl => "fragmented control frame",
            FrameError::BadFragmentation => "bad fragmentation",
            FrameError::TooBig { .. } => "message too big",
        }
    }
}

/// Follows one direction of a tunnel, frame by frame.
#[derive(Debug)]
pub struct FrameTracker {
    /// The current head's bytes, when a read cut it.
    head: [u8; MAX_HEAD],
    /// Bytes of the current head so far; a refused head stays counted here.
    head_have: usize,
    /// Payload bytes of the current frame still to pass; 0 between frames.
    payload_left: u64,
    /// Bytes fed so far: the stream offset of the next byte.
    position: u64,
    /// Payload bytes of the data message in progress (its frames so far).
    message_len: u64,
    /// A fragmented data message has begun and not yet ended.
    in_message: bool,
    max_message: Option<u64>,
    /// Client frames must be masked, server frames must not be (§5.1).
    from_client: bool,
    /// Once a frame is refused, the stream after it is not followed: every later feed repeats why.
    refused: Option<FrameError>,
}

impl FrameTracker {
    /// Follows the frames a client sends. `max_message`: refuse any frame, and any data message
    /// whose frames' payloads add up, over this many bytes.
    pub fn new(max_message: Option<u64>) -> Self {
        FrameTracker {
            head: [0; MAX_HEAD],
            head_have: 0,
            payload_left: 0,
            position: 0,
            message_len: 0,
            in_message: false,
            max_message,
            from_client: true,
            refused: None,
        }
    }

    /// Follows the frames a server sends (unmasked), with no size limit.
    pub fn from_server() -> Self {
        FrameTracker { from_client: false, ..FrameTracker::new(None) }
    }

    /// True when the bytes so far end exactly at a frame's end: another frame may be put here.
    pub fn at_boundary(&self) -> bool {
        self.head_have == 0 && self.payload_left == 0 && self.refused.is_none()
    }

    /// The stream offset up to which every byte belongs to a frame whose head passed the checks:
    /// what a tunnel may pass on. An incomplete head, or a refused frame, begins here, so a tunnel
    /// that holds back the bytes past it never lets one byte of a refused frame through.
    pub fn cleared(&self) -> u64 {
        self.position - self.head_have as u64
    }

    /// Walks the next bytes of the stream, calling `on_head` for each frame head that completes in
    /// them and passes the checks. After a refusal the tracker stays refused.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_head: impl FnMut(&FrameHead)) -> Result<(), FrameError> {
        if let Some(err) = self.refused {
            return Err(err);
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skip;
                self.position += skip;
                bytes = &bytes[skip as usize..];
                continue;
            }
            let parsed = match head_len(bytes) {
                // The usual case, a whole head within these bytes: read where it lies.
                Some(full) if self.head_have == 0 && full <= bytes.len() => {
                    self.head_have = full;
                    self.position += full as u64;
                    let parsed = parse_head(&bytes[..full]);
                    bytes = &bytes[full..];
                    parsed
                }
                // A head cut by the end of a read: collect its bytes until its first ones say how
                // long it is, then until it is whole.
                _ => {
                    let need = head_len(&self.head[..self.head_have]).unwrap_or(2);
                    let take = (need - self.head_have).min(bytes.len());
                    self.head[self.head_have..self.head_have + take].copy_from_slice(&bytes[..take]);
                    self.head_have += take;
                    self.position += take as u64;
                    bytes = &bytes[take..];
                    let Some(full) = head_len(&self.head[..self.head_have]) else { continue };
                    if self.head_have < full {
                        continue;
                    }
                    parse_head(&self.head[..full])
                }
            };
            // Until admitted, the head counts in `head_have`: a refused one stays there, so that
            // `cleared` stops where its frame began.
            let head = parsed.and_then(|head| self.admit(&head).map(|()| head));
            let head = head.inspect_err(|err| self.refused = Some(*err))?;
            self.head_have = 0;
            self.payload_left = head.payload_len;
            on_head(&head);
        }
        Ok(())
    }

    /// Checks a complete head against the rules and, for a data frame, counts it into its message.
    /// Protocol errors are looked for before sizes: a frame of any size with a reserved opcode is a
    /// protocol error whatever the limit.
    fn admit(&mut self, head: &FrameHead) -> Result<(), FrameError> {
        match (self.from_client, head.masked) {
            (true, false) => return Err(FrameError::UnmaskedClientFrame),
            (false, true) => return Err(FrameError::MaskedServerFrame),
            _ => {}
        }
        if head.is_control() {
            if !matches!(head.opcode, OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG) {
                return Err(FrameError::ReservedOpcode(head.opcode));
            }
            if !head.fin {
                return Err(FrameError::FragmentedControl);
            }
            if head.payload_len > MAX_CONTROL_PAYLOAD {
                return Err(FrameError::ControlTooLong);
            }
            return match self.max_message {
                Some(limit) if head.payload_len > limit => Err(FrameError::TooBig { limit }),
                _ => Ok(()),
            };
        }
        if !matches!(head.opcode, OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY) {
            return Err(FrameError::ReservedOpcode(head.opcode));
        }
        // A new data message starts with a non-continuation opcode, and only between messages:
        // otherwise a message could be cut short to dodge the size limit.
        if (head.opcode == OPCODE_CONTINUATION) != self.in_message {
            return Err(FrameError::BadFragmentation);
        }
        let message_len = if head.opcode == OPCODE_CONTINUATION { self.message_len } else { 0 };
        let message_len = message_len.saturating_add(head.payload_len);
        if let Some(limit) = self.max_message.filter(|limit| message_len > *limit) {
            return Err(FrameError::TooBig { limit });
        }
        self.in_message = !head.fin;
        self.message_len = if head.fin { 0 } else { message_len };
        Ok(())
    }
}

/// The head's full length, once its first two bytes are known.
fn head_len(have: &[u8]) -> Option<usize> {
    let [_, second, ..] = *have else { return None };
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// Reads a complete head (`head_len` bytes); refuses what no frame may carry in any context.
fn parse_head(head: &[u8]) -> Result<FrameHead, FrameError> {
    let (first, second) = (head[0], head[1]);
    if first & RSV2_RSV3 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let payload_len = match second & 0x7F {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&head[2..10]);
            let len = u64::from_be_bytes(len);
            if len >> 63 != 0 {
                return Err(FrameError::InvalidLength);
            }
            len
        }
        short => u64::from(short),
    };
    Ok(FrameHead { fin: first & 0x80 != 0, opcode: first & 0x0F, masked: second & 0x80 != 0, payload_len })
}

/// A frame the proxy itself sends to the client (server to client: unmasked, §5.1).
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= 125, "control frames carry at most 125 bytes");
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.push(0x80 | opcode);
    frame.push(payload.len() as u8);
    frame.extend_from_slice(payload);
    frame
}

/// A Close frame with a status code (§5.5.1, §7.4.1) and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    server_frame(OPCODE_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with any first byte (FIN, RSV, opcode), masked or not, and `payload_len` bytes.
    fn frame(first: u8, masked: bool, payload_len: usize) -> Vec<u8> {
        let mask_bit = if masked { 0x80 } else { 0 };
        let mut frame = vec![first];
        match payload_len {
            0..=125 => frame.push(mask_bit | payload_len as u8),
            126..=0xFFFF => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            frame.extend_from_slice(&[1, 2, 3, 4]);
        }
        frame.extend(std::iter::repeat(0x55).take(payload_len));
        frame
    }

    fn client_frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        frame(if fin { 0x80 } else { 0 } | opcode, true, payload_len)
    }

    fn heads(tracker: &mut FrameTracker, bytes: &[u8]) -> Result<Vec<FrameHead>, FrameError> {
        let mut seen = Vec::new();
        tracker.feed(bytes, |head| seen.push(*head))?;
        Ok(seen)
    }

    #[test]
    fn frames_of_every_length_form_are_followed_to_their_boundaries() {
        let mut stream = client_frame(true, 0x1, 5);
        stream.extend(client_frame(true, 0x2, 300));
        stream.extend(client_frame(true, 0x2, 70_000));
        stream.extend(client_frame(true, OPCODE_PONG, 0));
        let mut tracker = FrameTracker::new(None);
        let seen = heads(&mut tracker, &stream).unwrap();
        let lens: Vec<u64> = seen.iter().map(|h| h.payload_len).collect();
        assert_eq!(lens, vec![5, 300, 70_000, 0]);
        assert_eq!(seen[3].opcode, OPCODE_PONG);
        assert!(seen.iter().all(|h| h.masked && h.fin));
        assert!(tracker.at_boundary());
    }

    #[test]
    fn a_stream_fed_byte_by_byte_gives_the_same_heads_and_boundaries() {
        let mut stream = client_frame(false, 0x1, 200);
        stream.extend(client_frame(true, OPCODE_PING, 3));
        stream.extend(client_frame(true, OPCODE_CONTINUATION, 100_000));
        let whole = heads(&mut FrameTracker::new(None), &stream).unwrap();
        let mut tracker = FrameTracker::new(None);
        let mut split = Vec::new();
        let mut boundaries = 0;
        for byte in &stream {
            split.extend(heads(&mut tracker, std::slice::from_ref(byte)).unwrap());
            boundaries += usize::from(tracker.at_boundary());
        }
        assert_eq!(whole, split);
        assert_eq!(boundaries, 3, "one boundary after each frame");
    }

    #[test]
    fn a_message_over_the_limit_is_refused_even_when_fragmented() {
        let mut tracker = FrameTracker::new(Some(1000));
        assert!(heads(&mut tracker, &client_frame(true, 0x2, 1000)).is_ok());
        let mut fragmented = client_frame(false, 0x1, 600);
        fragmented.extend(client_frame(true, OPCODE_PING, 10));
        fragmented.extend(client_frame(true, OPCODE_CONTINUATION, 600));
        assert_eq!(heads(&mut tracker, &fragmented), Err(FrameError::TooBig { limit: 1000 }));
        // Control frames do not count; a new message starts from zero.
        let mut tracker = FrameTracker::new(Some(1000));
        let mut two = client_frame(true, 0x2, 900);
        two.extend(client_frame(true, 0x2, 900));
        assert!(heads(&mut tracker, &two).is_ok());
    }

    #[test]
    fn a_new_message_inside_a_fragmented_one_and_a_stray_continuation_are_refused() {
        let mut interleaved = client_frame(false, 0x1, 10);
        interleaved.extend(client_frame(true, 0x2, 10));
        assert_eq!(heads(&mut FrameTracker::new(Some(1000)), &interleaved), Err(FrameError::BadFragmentation));
        let stray = client_frame(true, OPCODE_CONTINUATION, 10);
        assert_eq!(heads(&mut FrameTracker::new(None), &stray), Err(FrameError::BadFragmentation));
    }

    #[test]
    fn a_length_with_the_top_bit_set_is_invalid() {
        let mut bad = vec![0x82, 0x7F];
        bad.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(heads(&mut FrameTracker::new(None), &bad), Err(FrameError::InvalidLength));
    }

    #[test]
    fn frames_the_proxy_sends_are_unmasked_and_well_formed() {
        let ping = server_frame(OPCODE_PING, b"sp");
        assert_eq!(ping, vec![0x89, 2, b's', b'p']);
        let close = close_frame(1009, "message too big");
        let seen = heads(&mut FrameTracker::from_server(), &close).unwrap();
        assert_eq!(seen, vec![FrameHead { fin: true, opcode: OPCODE_CLOSE, masked: false, payload_len: 17 }]);
        assert_eq!(&close[2..4], &1009u16.to_be_bytes());
    }

    /// Feeds `bytes` whole and returns the verdict, the heads passed and how far the bytes cleared.
    fn verdict(tracker: &mut FrameTracker, bytes: &[u8]) -> (Result<(), FrameError>, usize, u64) {
        let mut passed = 0;
        let result = tracker.feed(bytes, |_| passed += 1);
        (result, passed, tracker.cleared())
    }

    #[test]
    fn every_reserved_opcode_is_a_protocol_error_before_its_size_is_weighed() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            let mut tracker = FrameTracker::new(Some(1024));
            let (result, passed, cleared) = verdict(&mut tracker, &client_frame(true, opcode, 1 << 20));
            assert_eq!(result, Err(FrameError::ReservedOpcode(opcode)), "opcode {opcode:#x}");
            assert_eq!((passed, cleared), (0, 0), "opcode {opcode:#x}: nothing of it may pass");
            assert_eq!(FrameError::ReservedOpcode(opcode).close_code(), 1002);
        }
    }

    #[test]
    fn a_control_frame_over_125_bytes_is_a_protocol_error() {
        for opcode in [OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG] {
            assert!(heads(&mut FrameTracker::new(Some(1024)), &client_frame(true, opcode, 125)).is_ok());
            let err = heads(&mut FrameTracker::new(Some(1024)), &client_frame(true, opcode, 126));
            assert_eq!(err, Err(FrameError::ControlTooLong), "opcode {opcode:#x}");
        }
        assert_eq!(FrameError::ControlTooLong.close_code(), 1002);
    }

    #[test]
    fn a_control_frame_without_fin_is_a_protocol_error() {
        for opcode in [OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG] {
            let err = heads(&mut FrameTracker::new(None), &client_frame(false, opcode, 4));
            assert_eq!(err, Err(FrameError::FragmentedControl), "opcode {opcode:#x}");
        }
    }

    #[test]
    fn an_unmasked_client_frame_and_a_masked_server_frame_are_protocol_errors() {
        let unmasked = frame(0x81, false, 5);
        assert_eq!(heads(&mut FrameTracker::new(None), &unmasked), Err(FrameError::UnmaskedClientFrame));
        assert!(heads(&mut FrameTracker::from_server(), &unmasked).is_ok());
        let masked = client_frame(true, OPCODE_TEXT, 5);
        assert_eq!(heads(&mut FrameTracker::from_server(), &masked), Err(FrameError::MaskedServerFrame));
    }

    #[test]
    fn rsv1_passes_for_permessage_deflate_but_rsv2_and_rsv3_are_protocol_errors() {
        assert!(heads(&mut FrameTracker::new(None), &frame(0x80 | 0x40 | OPCODE_TEXT, true, 5)).is_ok());
        for rsv in [0x20, 0x10] {
            let err = heads(&mut FrameTracker::new(None), &frame(0x80 | rsv | OPCODE_TEXT, true, 5));
            assert_eq!(err, Err(FrameError::ReservedBits), "rsv {rsv:#x}");
        }
    }

    #[test]
    fn the_limit_applies_to_a_single_frame_of_any_kind() {
        // A first fragment already over the limit is refused at its head, not when the message ends.
        let err = heads(&mut FrameTracker::new(Some(1024)), &client_frame(false, OPCODE_BINARY, 1025));
        assert_eq!(err, Err(FrameError::TooBig { limit: 1024 }));
        let err = heads(&mut FrameTracker::new(Some(50)), &client_frame(true, OPCODE_PING, 51));
        assert_eq!(err, Err(FrameError::TooBig { limit: 50 }));
        assert_eq!(FrameError::TooBig { limit: 50 }.close_code(), 1009);
    }

    #[test]
    fn a_fragmented_message_under_the_limit_passes_with_a_control_frame_between_its_fragments() {
        let mut stream = client_frame(false, OPCODE_TEXT, 400);
        stream.extend(client_frame(true, OPCODE_PING, 125));
        stream.extend(client_frame(false, OPCODE_CONTINUATION, 400));
        stream.extend(client_frame(true, OPCODE_CONTINUATION, 224));
        stream.extend(client_frame(true, OPCODE_BINARY, 1024));
        let mut tracker = FrameTracker::new(Some(1024));
        let (result, passed, cleared) = verdict(&mut tracker, &stream);
        assert_eq!(result, Ok(()));
        assert_eq!((passed, cleared), (5, stream.len() as u64));
    }

    #[test]
    fn cleared_stops_before_an_incomplete_head_and_at_the_start_of_a_refused_frame() {
        let good = client_frame(true, OPCODE_TEXT, 10);
        let bad = frame(0x81, false, 10);
        let mut tracker = FrameTracker::new(None);
        // The good frame and the refused frame's first byte: only the good frame is cleared.
        let mut first = good.clone();
        first.push(bad[0]);
        assert_eq!(verdict(&mut tracker, &first), (Ok(()), 1, good.len() as u64));
        // The rest of the refused head completes it: still cleared up to its start, and no further.
        assert_eq!(verdict(&mut tracker, &bad[1..]), (Err(FrameError::UnmaskedClientFrame), 0, good.len() as u64));
        // A refused stream stays refused.
        assert_eq!(verdict(&mut tracker, &good), (Err(FrameError::UnmaskedClientFrame), 0, good.len() as u64));
        assert!(!tracker.at_boundary());
    }
}
