//! tern client SDK.
//!
//! - [`Connection`]: one framed connection (TLS or plaintext) with requests
//!   matched to responses by sequence; the building block for tools that
//!   need raw frames.
//! - [`Client`]: what an app uses: logs in through router-auth, connects to
//!   the least-loaded access node, pulls the offline store, shows every
//!   message once (dedup by message id) and each conversation in `seq`
//!   order (holding a message behind a gap, pulling what is missing, and
//!   reporting seqs that never came), ACKs what it showed, retries sends
//!   until the server ACKs them, heartbeats and reconnects.
//! - [`AuthClient`]: the router-auth HTTP API.

mod client;
mod connection;
mod http;
mod order;

pub use client::{Client, ClientConfig, Event};
pub use connection::{ConnectOptions, Connection, ServerEvent, TlsMode};
pub use http::{AccessNodeInfo, AuthClient, IssuedToken};
pub use order::conversation_key;
pub use tern_proto::{self as proto, ErrorCode, ServiceError, pb};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS error: {0}")]
    Tls(String),
    #[error("server error {0}")]
    Server(ServiceError),
    #[error("router-auth answered {status} {code}: {message}")]
    Http { status: u16, code: String, message: String },
    #[error("no response in time")]
    Timeout,
    #[error("connection closed")]
    Closed,
    #[error("not connected (reconnecting)")]
    NotConnected,
    #[error("router-auth lists no access node")]
    NoAccessNode,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, if the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }
}
