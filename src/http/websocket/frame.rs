//! WebSocket frame boundaries (RFC 6455 §5.2) in a byte stream that the tunnel relays unchanged.
//! The tracker reads frame heads as the bytes pass and skips payloads without looking at them: it
//! tells where a frame starts (so a ping can be put between frames, never inside one), what kind it
//! is and how long its message has grown. It copies nothing and allocates nothing; any byte
//! sequence is accepted or refused with a reason, never a panic.

/// Longest frame head: 2 bytes, an 8-byte extended length, a 4-byte masking key.
const MAX_HEAD: usize = 14;

pub const OPCODE_CONTINUATION: u8 = 0x0;
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

/// Why a stream stops being a WebSocket stream the tunnel can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A 64-bit payload length with its most significant bit set (§5.2 forbids it).
    InvalidLength,
    /// A data message (all its frames' payloads) over the configured maximum.
    MessageTooBig { limit: u64 },
    /// A new data message before the fragmented one ended, or a continuation of none (§5.4).
    BadFragmentation,
}

/// Follows one direction of a tunnel, frame by frame.
#[derive(Debug)]
pub struct FrameTracker {
    head: [u8; MAX_HEAD],
    head_have: usize,
    /// Payload bytes of the current frame still to pass; 0 between frames.
    payload_left: u64,
    /// Payload bytes of the data message in progress (its frames so far).
    message_len: u64,
    /// A fragmented data message has begun and not yet ended.
    in_message: bool,
    max_message: Option<u64>,
}

impl FrameTracker {
    /// `max_message`: refuse data messages whose payloads add up to more than this.
    pub fn new(max_message: Option<u64>) -> Self {
        FrameTracker { head: [0; MAX_HEAD], head_have: 0, payload_left: 0, message_len: 0, in_message: false, max_message }
    }

    /// True when the bytes so far end exactly at a frame's end: another frame may be put here.
    pub fn at_boundary(&self) -> bool {
        self.head_have == 0 && self.payload_left == 0
    }

    /// Walks the next bytes of the stream, calling `on_head` for each frame head completed in them.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_head: impl FnMut(&FrameHead)) -> Result<(), FrameError> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skip;
                bytes = &bytes[skip as usize..];
                continue;
            }
            // Collect head bytes until the head's own first bytes say how long it is.
            let need = head_len(&self.head[..self.head_have]).unwrap_or(2);
            let take = (need - self.head_have).min(bytes.len());
            self.head[self.head_have..self.head_have + take].copy_from_slice(&bytes[..take]);
            self.head_have += take;
            bytes = &bytes[take..];
            let Some(full) = head_len(&self.head[..self.head_have]) else { continue };
            if self.head_have < full {
                continue;
            }
            let head = parse_head(&self.head[..full])?;
            self.head_have = 0;
            self.payload_left = head.payload_len;
            if !head.is_control() {
                // A new data message starts with a non-continuation opcode, and only between
                // messages: otherwise a message could be cut short to dodge the size limit.
                if (head.opcode == OPCODE_CONTINUATION) != self.in_message {
                    return Err(FrameError::BadFragmentation);
                }
                if head.opcode != OPCODE_CONTINUATION {
                    self.message_len = 0;
                }
                self.message_len = self.message_len.saturating_add(head.payload_len);
                if let Some(limit) = self.max_message.filter(|limit| self.message_len > *limit) {
                    return Err(FrameError::MessageTooBig { limit });
                }
                self.in_message = !head.fin;
                if head.fin {
                    self.message_len = 0;
                }
            }
            on_head(&head);
        }
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

fn parse_head(head: &[u8]) -> Result<FrameHead, FrameError> {
    let (first, second) = (head[0], head[1]);
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

    fn client_frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload_len {
            0..=125 => frame.push(0x80 | payload_len as u8),
            126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend(std::iter::repeat(0x55).take(payload_len));
        frame
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
        assert_eq!(heads(&mut tracker, &fragmented), Err(FrameError::MessageTooBig { limit: 1000 }));
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
        let seen = heads(&mut FrameTracker::new(None), &close).unwrap();
        assert_eq!(seen, vec![FrameHead { fin: true, opcode: OPCODE_CLOSE, masked: false, payload_len: 17 }]);
        assert_eq!(&close[2..4], &1009u16.to_be_bytes());
    }
}
