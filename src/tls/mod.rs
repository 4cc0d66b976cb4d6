//! TLS as the proxy sees it before (or without) terminating it: the ClientHello parser used for
//! SNI routing and passthrough. Certificate stores and acceptors come with TLS termination.

pub mod client_hello;
