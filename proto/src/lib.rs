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
mod envelope;
mod error;
#[cfg(feature = "rpc")]
pub mod rpc;

pub use codec::{DEFAULT_MAX_BODY_LEN, Frame, FrameCodec, FrameError, FrameHeader, HEADER_LEN};
pub use envelope::{EnvelopeError, EnvelopeParts, decode_receivers, encode_envelope};
pub use error::{ErrorCode, ServiceError, ServiceResult};

/// Generated protobuf bodies (package `tern.v1`).
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

/// Names on the message bus. The messages topic carries every accepted
/// message, as a [`pb::BusEnvelope`] keyed by conversation, from the
/// dispatchers to offline-svc and group-svc, each consuming it in its own
/// group. A prefix (default `tern`) lets several deployments share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusNames {
    pub messages_topic: String,
    pub offline_group: String,
    pub history_group: String,
}

impl BusNames {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            messages_topic: format!("{prefix}.messages"),
            offline_group: format!("{prefix}.offline-svc"),
            history_group: format!("{prefix}.group-svc"),
        }
    }
}

impl Default for BusNames {
    fn default() -> Self {
        Self::with_prefix("tern")
    }
}

/// Most message bytes one page (offline pull, history) carries; a page
/// always holds at least one message, so a server frame stays below
/// `MAX_PAGE_BYTES` plus one maximal message.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// Largest frame body clients should accept from servers: the biggest
/// configurable request body (16 MiB) plus a page's worth of room.
pub const MAX_SERVER_BODY_LEN: u32 = 16 * 1024 * 1024 + MAX_PAGE_BYTES as u32;

/// Cuts `rows`, fetched with one row beyond `limit`, to at most `limit` rows
/// and [`MAX_PAGE_BYTES`] (counted with `size`, at least one row kept).
/// Returns whether rows were left out, i.e. whether another page exists.
pub fn cut_page<T>(rows: &mut Vec<T>, limit: usize, size: impl Fn(&T) -> usize) -> bool {
    let mut total = 0;
    let mut keep = 0;
    for row in rows.iter().take(limit) {
        total += size(row);
        if keep > 0 && total > MAX_PAGE_BYTES {
            break;
        }
        keep += 1;
    }
    let more = rows.len() > keep;
    rows.truncate(keep);
    more
}

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
    // `concat` sizes the string once; `format!` was 1% of the server's CPU
    // in S3 (this runs for every 1:1 send).
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    ["p:", low, ":", high].concat()
}

/// See [`single_conversation_key`].
pub fn group_conversation_key(group_id: &str) -> String {
    ["g:", group_id].concat()
}

/// Whether `key` (a bus record's key: its conversation) is a group's, so a
/// consumer of group messages can skip the others without decoding them.
pub fn is_group_conversation_key(key: &[u8]) -> bool {
    key.starts_with(b"g:")
}

/// Rendezvous (highest random weight) hashing weight of `node` for `key`.
/// Every process computes the same weights (FNV-1a, no per-process seed),
/// so all of them map a key to the same node; when a node leaves, only the
/// keys it owned move.
pub fn rendezvous_weight(key: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [key.as_bytes(), node.as_bytes()] {
        for byte in part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
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
    fn group_keys_are_told_from_single_keys() {
        assert!(is_group_conversation_key(group_conversation_key("team").as_bytes()));
        assert!(!is_group_conversation_key(single_conversation_key("g", "h").as_bytes()));
        assert!(!is_group_conversation_key(b""));
    }

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
    fn pages_are_cut_by_count_and_bytes() {
        let mut rows = vec![10usize; 5];
        assert!(cut_page(&mut rows, 4, |r| *r));
        assert_eq!(rows.len(), 4);
        let mut rows = vec![10usize; 3];
        assert!(!cut_page(&mut rows, 4, |r| *r));
        assert_eq!(rows.len(), 3);
        let mut rows = vec![MAX_PAGE_BYTES / 2 + 1; 3];
        assert!(cut_page(&mut rows, 10, |r| *r));
        assert_eq!(rows.len(), 1);
        let mut rows = vec![MAX_PAGE_BYTES * 3];
        assert!(!cut_page(&mut rows, 10, |r| *r), "one oversized row is still returned");
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("user id", "alice.smith@x-1_2").is_ok());
        assert!(validate_id("user id", "").is_err());
        assert!(validate_id("user id", "a:b").is_err());
        assert!(validate_id("user id", &"x".repeat(65)).is_err());
    }
}
