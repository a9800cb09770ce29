//! The shared error vocabulary: codes carried by ERROR frames.

use std::fmt;

/// Error codes sent in [`crate::pb::ErrorBody::code`]. The numbers are part of
/// the wire protocol and never change meaning; docs/PROTOCOL.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// headLength was not 20. The connection is closed after the error.
    BadHeader = 1,
    /// bodyLength exceeds the server's maximum. Closed after the error.
    FrameTooLarge = 2,
    /// The connection ended in the middle of a frame. Closed after the error.
    TruncatedFrame = 3,
    /// requestType is not one the server accepts from clients.
    UnknownRequestType = 4,
    /// The body does not decode as the protobuf message of its requestType.
    BadBody = 5,
    /// A request other than LOGIN or HEARTBEAT before a successful LOGIN.
    NotLoggedIn = 6,
    /// The token's signature or format is wrong. Closed after the error.
    InvalidToken = 7,
    /// The token has expired. Closed after the error.
    TokenExpired = 8,
    /// LOGIN on a connection that is already logged in.
    AlreadyLoggedIn = 9,
    /// A field is missing, malformed or too long.
    InvalidArgument = 10,
    /// The `sender` field names a user other than the logged-in one.
    SenderMismatch = 11,
    /// The receiver or a named member does not exist.
    NoSuchUser = 12,
    /// The group does not exist.
    NoSuchGroup = 13,
    /// The sender is not a member of the group.
    NotGroupMember = 14,
    /// The group id is taken.
    GroupExists = 15,
    /// A backend failed; the request may be retried.
    Internal = 16,
    /// A role or backend behind the access node is unavailable right now
    /// (a dispatcher died, the bus failed); retry the request.
    Unavailable = 17,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        Self::BadHeader,
        Self::FrameTooLarge,
        Self::TruncatedFrame,
        Self::UnknownRequestType,
        Self::BadBody,
        Self::NotLoggedIn,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::AlreadyLoggedIn,
        Self::InvalidArgument,
        Self::SenderMismatch,
        Self::NoSuchUser,
        Self::NoSuchGroup,
        Self::NotGroupMember,
        Self::GroupExists,
        Self::Internal,
        Self::Unavailable,
    ];

    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u32 == value)
    }

    /// Whether the server closes the connection after sending this error:
    /// framing errors cannot be resynchronised and auth failures end the
    /// connection.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Self::BadHeader
                | Self::FrameTooLarge
                | Self::TruncatedFrame
                | Self::InvalidToken
                | Self::TokenExpired
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHeader => "BAD_HEADER",
            Self::FrameTooLarge => "FRAME_TOO_LARGE",
            Self::TruncatedFrame => "TRUNCATED_FRAME",
            Self::UnknownRequestType => "UNKNOWN_REQUEST_TYPE",
            Self::BadBody => "BAD_BODY",
            Self::NotLoggedIn => "NOT_LOGGED_IN",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::AlreadyLoggedIn => "ALREADY_LOGGED_IN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::SenderMismatch => "SENDER_MISMATCH",
            Self::NoSuchUser => "NO_SUCH_USER",
            Self::NoSuchGroup => "NO_SUCH_GROUP",
            Self::NotGroupMember => "NOT_GROUP_MEMBER",
            Self::GroupExists => "GROUP_EXISTS",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error any service can return; it maps one-to-one onto an ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, message.to_string())
    }

    /// A backend (store, bus) failed: `INTERNAL`, the request may be retried.
    pub fn backend(error: impl fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, format!("backend failure: {error}"))
    }

    /// A peer role or resource is unavailable right now: `UNAVAILABLE`.
    pub fn unavailable(error: impl fmt::Display) -> Self {
        Self::new(ErrorCode::Unavailable, error.to_string())
    }

    pub fn to_body(&self) -> crate::pb::ErrorBody {
        crate::pb::ErrorBody { code: self.code as u32, message: self.message.clone() }
    }
}
