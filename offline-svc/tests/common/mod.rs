//! Helpers shared by the consumer tests: bus envelopes as the dispatcher
//! publishes them, placements on one access node, and a consumer started
//! on the default topic.

// Each test binary compiles this module and uses only some helpers.
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use tern_offline_svc::held::HeldWrites;
use tern_offline_svc::{ConsumerBackends, Holding, OfflineConfig, PushGateway};
use tern_proto::{BusNames, pb};
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, Placement, StoreError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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

/// The consumer's stores, all those of `backends`.
pub fn consumer_backends(
    backends: &EmbeddedBackends,
    held: Arc<HeldWrites>,
    holding: Holding,
) -> ConsumerBackends {
    ConsumerBackends {
        meta: backends.meta.clone(),
        store: backends.offline.clone(),
        sessions: backends.sessions.clone(),
        held,
        holding,
    }
}

/// `run_consumer` on the messages topic of the default bus names, as a
/// task, and the sender that stops it.
pub fn start_consumer(
    bus: Arc<dyn Bus>,
    backends: ConsumerBackends,
    gateway: Arc<dyn PushGateway>,
    config: OfflineConfig,
) -> (JoinHandle<Result<(), StoreError>>, oneshot::Sender<()>) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(tern_offline_svc::run_consumer(
        bus,
        BusNames::default(),
        backends,
        gateway,
        config,
        async move {
            let _ = stop_rx.await;
        },
    ));
    (task, stop_tx)
}
