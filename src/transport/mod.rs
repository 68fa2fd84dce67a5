//! The transport: everything between a TCP connection and a WebSocket
//! session. [`server`] accepts connections, serves the HTTP routes and
//! upgrades `/ws` once [`admission`] and the token allow it; [`tls`]
//! terminates TLS with certificates reloaded in place, over [`tls_stream`],
//! which holds no TLS buffers while a connection is idle; [`demo`] serves the
//! demo page; [`http`] builds the JSON responses.

pub(crate) mod admission;
pub(crate) mod demo;
pub(crate) mod http;
pub(crate) mod server;
pub mod tls;
pub mod tls_stream;
