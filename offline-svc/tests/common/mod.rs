//! Helpers shared by the consumer tests: bus envelopes as the dispatcher
//! publishes them, and placements on one access node.

use bytes::Bytes;
use prost::Message as _;
use tern_proto::pb;
use tern_store::Placement;

/// A message as the dispatcher publishes it: `receivers` are the members
/// other than the sender.
pub fn envelope(msg_id: u64, group: &str, sender: &str, receivers: &[&str]) -> Bytes {
    let kind = if group.is_empty() { pb::ConversationKind::Single } else { pb::ConversationKind::Group };
    let message = pb::Message {
        msg_id,
        kind: kind as i32,
        sender: sender.into(),
        receiver: if group.is_empty() { receivers[0].into() } else { String::new() },
        group_id: group.into(),
        seq: msg_id,
        content: format!("m{msg_id}").into_bytes(),
        sent_at_ms: 1,
        client_msg_id: format!("c{msg_id}"),
    };
    let envelope = pb::BusEnvelope {
        message: Some(message),
        receivers: receivers.iter().map(|r| r.to_string()).collect(),
        sender_device: "a1".into(),
    };
    Bytes::from(envelope.encode_to_vec())
}

pub fn placement(user: &str, device: &str, connection_id: u64) -> Placement {
    Placement { user_id: user.into(), device_id: device.into(), node_id: "n1".into(), connection_id }
}
