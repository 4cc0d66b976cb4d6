//! Our HTTP/1.x server side: the body decoder (content length and strict chunked coding), the
//! on-demand hand-over of a request body to the pipeline, the response writer, and the
//! connection loop that drives them. The request head is read by `http::head`, the one parser.

pub mod channel;
pub mod client;
pub mod decode;
pub mod fields;
pub mod response_head;
#[cfg(test)] mod differential;
pub mod server;
pub mod write;
