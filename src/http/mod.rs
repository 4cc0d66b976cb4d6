//! HTTP as the proxy sees it. For now: recognising a plain HTTP/1.x request (or the HTTP/2
//! prior-knowledge preface) in the first bytes of a connection and reading its Host, for routing
//! by domain on ports without TLS. Knows nothing of sockets or routes.

pub mod sniff;
