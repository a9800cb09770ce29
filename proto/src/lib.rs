//! tern wire protocol.
//!
//! Every frame is a 20-byte big-endian [`FrameHeader`] followed by a protobuf
//! body (the messages in [`pb`]). [`FrameCodec`] is the streaming decoder and
//! encoder used by the access nodes and the SDK: it rejects a bad header or an
//! oversized body *before* reading the body, so a hostile peer cannot make the
//! server buffer more than `max_body_len` bytes.
//!
//! [`ErrorCode`] is the one error vocabulary shared by every service: it is
//! what goes into ERROR frames and what service errors map to.

mod codec;
mod error;

pub use codec::{DEFAULT_MAX_BODY_LEN, Frame, FrameCodec, FrameError, FrameHeader, HEADER_LEN};
pub use error::{ErrorCode, ServiceError, ServiceResult};

/// Generated protobuf bodies (package `tern.v1`).
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

/// Bus topic carrying every accepted message, as a [`pb::BusEnvelope`] keyed
/// by conversation, from the dispatchers to offline-svc and group-svc.
pub const MESSAGES_TOPIC: &str = "tern.messages";

/// Protocol version this build speaks; sent as `clientVersion` by the SDK.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a frame's body is. Responses carry the request's type and echo its
/// `sequence`; [`RequestType::Error`] replaces the type when a request fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RequestType {
    Login = 1,
    Heartbeat = 2,
    SendSingle = 3,
    SendGroup = 4,
    AckMessages = 5,
    PullOffline = 6,
    CreateGroup = 7,
    JoinGroup = 8,
    LeaveGroup = 9,
    GroupMembers = 10,
    ListGroups = 11,
    GroupHistory = 12,
    OnlineUsers = 13,
    /// Server → client: a [`pb::Message`] to show and ACK.
    PushMessage = 100,
    /// Server → client: a [`pb::Notice`].
    Notice = 101,
    /// A [`pb::ErrorBody`]; `sequence` names the failed request (0 if none).
    Error = 255,
}

impl RequestType {
    /// Every defined type, for docs and tests.
    pub const ALL: [RequestType; 16] = [
        Self::Login,
        Self::Heartbeat,
        Self::SendSingle,
        Self::SendGroup,
        Self::AckMessages,
        Self::PullOffline,
        Self::CreateGroup,
        Self::JoinGroup,
        Self::LeaveGroup,
        Self::GroupMembers,
        Self::ListGroups,
        Self::GroupHistory,
        Self::OnlineUsers,
        Self::PushMessage,
        Self::Notice,
        Self::Error,
    ];

    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == value)
    }
}

impl From<RequestType> for u32 {
    fn from(t: RequestType) -> u32 {
        t as u32
    }
}

/// Conversation key used for per-conversation sequences: `p:<a>:<b>` with the
/// two user ids sorted, so both directions of a 1:1 chat share one sequence,
/// and `g:<group id>` for groups.
pub fn single_conversation_key(a: &str, b: &str) -> String {
    if a <= b { format!("p:{a}:{b}") } else { format!("p:{b}:{a}") }
}

/// See [`single_conversation_key`].
pub fn group_conversation_key(group_id: &str) -> String {
    format!("g:{group_id}")
}

/// Checks a user, device or group id: 1–64 bytes of `[A-Za-z0-9_.@-]`.
/// Keeping ids in this alphabet lets every backend use them inside keys
/// (`p:a:b`, Redis keys, ZooKeeper paths) without escaping.
pub fn validate_id(kind: &str, id: &str) -> ServiceResult<()> {
    if id.is_empty() || id.len() > 64 {
        return Err(ServiceError::invalid(format!("{kind} must be 1 to 64 characters")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@')) {
        return Err(ServiceError::invalid(format!("{kind} may only contain letters, digits and _ - . @")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_type_round_trips() {
        for t in RequestType::ALL {
            assert_eq!(RequestType::from_u32(t as u32), Some(t));
        }
        assert_eq!(RequestType::from_u32(0), None);
        assert_eq!(RequestType::from_u32(14), None);
    }

    #[test]
    fn conversation_keys_are_symmetric() {
        assert_eq!(single_conversation_key("bob", "alice"), "p:alice:bob");
        assert_eq!(single_conversation_key("alice", "bob"), "p:alice:bob");
        assert_eq!(group_conversation_key("g1"), "g:g1");
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("user id", "alice.smith@x-1_2").is_ok());
        assert!(validate_id("user id", "").is_err());
        assert!(validate_id("user id", "a:b").is_err());
        assert!(validate_id("user id", &"x".repeat(65)).is_err());
    }
}
