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

/// The fields that go on, as spans of the head: name start, name end, value start, value end.
pub struct RawFields {
    head: Bytes,
    spans: [[u16; 4]; MAX_FIELDS],
    len: u8,
    /// Which field is the first `Content-Length`.
    content_length: Option<u8>,
}

impl RawFields {
    /// Room for the fields of `head` (the whole head, which must be shorter than 64 KiB), in an
    /// allocation of its own: it goes along with the response, and is not copied on each move.
    pub fn new(head: Bytes) -> Option<Box<RawFields>> {
        (head.len() <= usize::from(u16::MAX)).then(|| Box::new(RawFields { head, spans: [[0; 4]; MAX_FIELDS], len: 0, content_length: None }))
    }

    /// Keeps a field whose name and value are slices of the head; false when there is no room
    /// (or either is not in the head).
    pub fn push(&mut self, name: &[u8], value: &[u8]) -> bool {
        let index = usize::from(self.len);
        if index == MAX_FIELDS {
            return false;
        }
        // Where a slice of the head starts in it, and ends: within the head, which is shorter
        // than 64 KiB (`new`).
        let span = |part: &[u8]| {
            let start = (part.as_ptr() as usize).checked_sub(self.head.as_ptr() as usize)?;
            let end = start.checked_add(part.len()).filter(|end| *end <= self.head.len())?;
            Some((start as u16, end as u16))
        };
        let (Some((name_start, name_end)), Some((value_start, value_end))) = (span(name), span(value)) else {
            return false;
        };
        self.spans[index] = [name_start, name_end, value_start, value_end];
        if self.content_length.is_none() && name.eq_ignore_ascii_case(b"content-length") {
            self.content_length = Some(self.len);
        }
        self.len += 1;
        true
    }

    /// The length of the head the fields are in.
    pub fn head_len(&self) -> usize {
        self.head.len()
    }

    /// Name (as the upstream cased it) and value of each field, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans[..usize::from(self.len)].iter().map(|[ns, ne, vs, ve]| {
            (&self.head[usize::from(*ns)..usize::from(*ne)], &self.head[usize::from(*vs)..usize::from(*ve)])
        })
    }

    /// The value of the first `Content-Length` field.
    pub fn content_length(&self) -> Option<&[u8]> {
        let [.., start, end] = self.spans[usize::from(self.content_length?)];
        Some(&self.head[usize::from(start)..usize::from(end)])
    }

    /// The fields as a map, in order.
    pub fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(usize::from(self.len));
        self.append_to(&mut map);
        map
    }

    fn append_to(&self, map: &mut HeaderMap) {
        for (name, value) in self.iter() {
            // httparse read each name as a token, which is what a HeaderName takes.
            let Ok(name) = HeaderName::from_bytes(name) else { continue };
            map.append(name, crate::http::head::parsed_field_value(value, Some(&self.head)));
        }
    }

    /// Puts the fields in `headers`, ahead of those already there.
    pub fn merge_into(self, headers: &mut HeaderMap) {
        let added = std::mem::replace(headers, self.into_map());
        headers.extend(added);
    }
}
