//! An upstream HTTP/1.1 response's fields kept in the head they arrived in, rather than in a
//! `HeaderMap`. Most responses go back to an HTTP/1.x client as they came: the writer copies
//! them from here (`write::Output::encode_head`), and building a map of them only to take it
//! apart again was most of what a response head cost. The upstream response's body carries them
//! (`h1::client::ResponseBody`) with the response's `HeaderMap` empty, and whatever reads or
//! changes the fields first makes them part of the map (`body::fields_in_map`); the pipeline hands
//! them to the HTTP/1.x writer beside the response (`pipeline::Answered`) when nothing did.

use bytes::Bytes;
use http::{HeaderMap, HeaderName};

/// The most fields kept here; a head with more is read into a map at once.
const MAX_FIELDS: usize = 24;

/// The fields of a head being read, as spans of it: they are noted while the parser's view of
/// the connection's buffer is still borrowed, and the head is taken off the buffer after
/// (`into_fields`), so that reading it takes no scan for its end first.
pub struct FieldSpans {
    /// Name start, name end, value start, value end.
    spans: [[u16; 4]; MAX_FIELDS],
    len: u8,
    /// Which field is the first `Content-Length`.
    content_length: Option<u8>,
    /// Bit i: field i's line is `name: value` CRLF, which the writer can copy as it is.
    plain_lines: u32,
}

/// The fields that go on, as spans of the head they came in.
pub struct RawFields {
    head: Bytes,
    spans: FieldSpans,
}

/// A field kept in the head: its name (as the upstream cased it), its value and, when the line
/// is exactly `name: value` CRLF, where that line is in the head.
pub struct RawField<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    pub line: Option<std::ops::Range<usize>>,
}

impl FieldSpans {
    /// Room for the fields of a head `head_len` bytes long, which must be shorter than 64 KiB.
    pub fn new(head_len: usize) -> Option<FieldSpans> {
        (head_len <= usize::from(u16::MAX)).then_some(FieldSpans { spans: [[0; 4]; MAX_FIELDS], len: 0, content_length: None, plain_lines: 0 })
    }

    /// Notes a field whose name and value are slices of `head`; false when there is no room (or
    /// either is not in the head).
    pub fn push(&mut self, head: &[u8], name: &[u8], value: &[u8]) -> bool {
        let index = usize::from(self.len);
        if index == MAX_FIELDS || head.len() > usize::from(u16::MAX) {
            return false;
        }
        // Where a slice of the head starts in it, and ends: within the head, which is shorter
        // than 64 KiB.
        let span = |part: &[u8]| {
            let start = (part.as_ptr() as usize).checked_sub(head.as_ptr() as usize)?;
            let end = start.checked_add(part.len()).filter(|end| *end <= head.len())?;
            Some((start, end))
        };
        let (Some((name_start, name_end)), Some((value_start, value_end))) = (span(name), span(value)) else {
            return false;
        };
        self.spans[index] = [name_start as u16, name_end as u16, value_start as u16, value_end as u16];
        if name_end + 2 == value_start && head[name_end..value_start] == *b": " && head.get(value_end..value_end + 2) == Some(b"\r\n") {
            self.plain_lines |= 1 << index;
        }
        if self.content_length.is_none() && crate::http::headers::equals_lowercase_any_case(name, b"content-length") {
            self.content_length = Some(self.len);
        }
        self.len += 1;
        true
    }

    /// The fields noted, in `head` (the one they were noted in, taken off its buffer), in an
    /// allocation of their own: they go along with the response, and are not copied on each move.
    pub fn into_fields(self, head: Bytes) -> Box<RawFields> {
        Box::new(RawFields { head, spans: self })
    }
}

impl RawFields {
    /// The length of the head the fields are in.
    pub fn head_len(&self) -> usize {
        self.head.len()
    }

    /// Name (as the upstream cased it) and value of each field, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.spans[..usize::from(self.spans.len)].iter().map(|[ns, ne, vs, ve]| {
            (&self.head[usize::from(*ns)..usize::from(*ne)], &self.head[usize::from(*vs)..usize::from(*ve)])
        })
    }

    /// The head the fields are in.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Each field, in order, with its line when that can be copied as it is.
    pub fn fields(&self) -> impl Iterator<Item = RawField<'_>> {
        self.iter().enumerate().map(|(index, (name, value))| {
            let [start, .., end] = self.spans.spans[index];
            let line = (self.spans.plain_lines & (1 << index) != 0).then(|| usize::from(start)..usize::from(end) + 2);
            RawField { name, value, line }
        })
    }

    /// The value of the first `Content-Length` field.
    pub fn content_length(&self) -> Option<&[u8]> {
        let [.., start, end] = self.spans.spans[usize::from(self.spans.content_length?)];
        Some(&self.head[usize::from(start)..usize::from(end)])
    }

    /// The fields as a map, in order.
    pub fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(usize::from(self.spans.len));
        self.append_to(&mut map);
        map
    }

    fn append_to(&self, map: &mut HeaderMap) {
        for (name, value) in self.iter() {
            // httparse read each name as a token, which is what a HeaderName takes.
            let Ok(name) = HeaderName::from_bytes(name) else { continue };
            map.append(name, crate::http::head::parsed_field_value(self.head.slice_ref(value)));
        }
    }

    /// Puts the fields in `headers`, ahead of those already there.
    pub fn merge_into(self, headers: &mut HeaderMap) {
        let added = std::mem::replace(headers, self.into_map());
        headers.extend(added);
    }
}
