//! Fuzzes the WebSocket frame tracker (the bytes a client sends through a tunnel after the 101)
//! and checks what the tunnel relies on: no panic, and the same heads, verdict and boundary state
//! whether the stream arrives whole or cut at any point into two reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/http/websocket/frame.rs"]
mod frame;

use frame::{FrameHead, FrameTracker};

fn run(chunks: &[&[u8]], limit: Option<u64>) -> (Vec<FrameHead>, Result<(), frame::FrameError>, bool) {
    let mut tracker = FrameTracker::new(limit);
    let mut heads = Vec::new();
    for chunk in chunks {
        if let Err(err) = tracker.feed(chunk, |head| heads.push(*head)) {
            return (heads, Err(err), tracker.at_boundary());
        }
    }
    (heads, Ok(()), tracker.at_boundary())
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else { return };
    let limit = (control & 1 == 1).then_some(u64::from(control) * 97);
    let whole = run(&[stream], limit);
    let cut = usize::from(control) % (stream.len() + 1);
    let split = run(&[&stream[..cut], &stream[cut..]], limit);
    assert_eq!(whole, split, "cut at {cut}");
    for head in &whole.0 {
        assert!(head.opcode <= 0x0F);
        assert!(head.payload_len >> 63 == 0);
    }
});
