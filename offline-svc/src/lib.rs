//! offline-svc: the per-receiver offline store.
//!
//! Its bus consumer writes every accepted message into the offline set of
//! each receiver (write diffusion), then pushes it to the receivers that are
//! online. Entries leave the set only when the client ACKs them, so a push
//! that is lost, unacknowledged or sent to a device that just went away is
//! still pulled at the next login.
//!
//! Architecture invariant: the push of a message happens after its offline
//! write. A client that logs in after the write pulls it; one that logged in
//! before the write is found by the placement lookup and pushed. No message
//! falls between the two.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub mod rpc;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use tern_proto::{BusNames, pb};
use tern_proto::{ServiceError, ServiceResult};
use tern_store::{Bus, BusRecord, MetaStore, OfflineEntry, OfflineStore, Placement, SessionStore};

/// Delivers a pushed message to the connection a placement names. Pushes are
/// best effort: the offline set keeps the message until it is ACKed.
pub trait PushGateway: Send + Sync + 'static {
    /// `message` is an encoded `tern.v1.Message`.
    fn push(&self, placement: &Placement, msg_id: u64, message: Bytes);
}

/// What access nodes call for pulls and ACKs.
#[async_trait]
pub trait OfflineApi: Send + Sync + 'static {
    /// Up to `limit` messages waiting for this device of `user` after
    /// `after_msg_id`, oldest first, and whether more are waiting.
    async fn pull(
        &self,
        user: &str,
        device: &str,
        after_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)>;
    /// The device has the messages: delete its copies (other devices keep
    /// theirs).
    async fn ack(&self, user: &str, device: &str, msg_ids: &[u64]) -> ServiceResult<()>;
    /// How many messages are waiting for the device.
    async fn pending(&self, user: &str, device: &str) -> ServiceResult<u64>;
}

#[derive(Debug, Clone)]
pub struct OfflineConfig {
    /// Largest page a pull returns.
    pub max_pull: u32,
    /// How long an ACK for a message not yet written is remembered.
    pub tombstone_ttl: Duration,
    /// Most ids one ACK may carry.
    pub max_ack_ids: usize,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        Self { max_pull: 200, tombstone_ttl: Duration::from_secs(3600), max_ack_ids: 1_000 }
    }
}

pub struct OfflineService {
    store: Arc<dyn OfflineStore>,
    config: OfflineConfig,
}

impl OfflineService {
    pub fn new(store: Arc<dyn OfflineStore>, config: OfflineConfig) -> Self {
        Self { store, config }
    }
}

#[async_trait]
impl OfflineApi for OfflineService {
    async fn pull(
        &self,
        user: &str,
        device: &str,
        after_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)> {
        let limit = if limit == 0 { self.config.max_pull } else { limit.min(self.config.max_pull) } as usize;
        // One extra row of each set tells whether another page exists.
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        let own = self.store.pull(&own_key, after_msg_id, limit + 1);
        let shared = self.store.pull(&shared_key, after_msg_id, limit + 1);
        let (own, shared) = futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        let mut entries: Vec<OfflineEntry> = own.into_iter().chain(shared).collect();
        entries.sort_by_key(|e| e.msg_id);
        entries.dedup_by_key(|e| e.msg_id);
        let more = tern_proto::cut_page(&mut entries, limit, |e| e.payload.len());
        let mut messages = Vec::with_capacity(entries.len());
        for entry in entries {
            match pb::Message::decode(entry.payload) {
                Ok(m) => messages.push(m),
                Err(e) => tracing::error!(msg_id = entry.msg_id, error = %e, "corrupt offline entry skipped"),
            }
        }
        Ok((messages, more))
    }

    async fn ack(&self, user: &str, device: &str, msg_ids: &[u64]) -> ServiceResult<()> {
        if msg_ids.len() > self.config.max_ack_ids {
            return Err(ServiceError::invalid(format!("at most {} ids per ACK", self.config.max_ack_ids)));
        }
        let ttl = self.config.tombstone_ttl;
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        let own = self.store.ack(&own_key, msg_ids, ttl);
        let shared = self.store.ack(&shared_key, msg_ids, ttl);
        futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        Ok(())
    }

    async fn pending(&self, user: &str, device: &str) -> ServiceResult<u64> {
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        let own = self.store.count(&own_key);
        let shared = self.store.count(&shared_key);
        let (own, shared) = futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        Ok(own + shared)
    }
}

/// One message and who gets a copy.
struct Delivery {
    receivers: Vec<String>,
    sender: String,
    /// The device the message was sent from; empty if unknown.
    sender_device: String,
    entry: OfflineEntry,
}

impl Delivery {
    /// The offline sets this message goes to: each receiver's recorded
    /// devices (or the shared set of a receiver with none yet), and the
    /// sender's devices other than the one it was sent from.
    fn inboxes(&self, devices: &std::collections::HashMap<String, Vec<String>>) -> Vec<String> {
        let mut keys = Vec::new();
        for receiver in &self.receivers {
            match devices.get(receiver).filter(|d| !d.is_empty()) {
                Some(list) => keys.extend(list.iter().map(|d| device_inbox(receiver, d))),
                None => keys.push(user_inbox(receiver)),
            }
        }
        if !self.sender_device.is_empty() && !self.receivers.contains(&self.sender) {
            let own = devices.get(&self.sender).into_iter().flatten();
            keys.extend(own.filter(|d| **d != self.sender_device).map(|d| device_inbox(&self.sender, d)));
        }
        keys
    }
}

/// The offline set of one device of a user. Ids never contain `/`, so the
/// key is unambiguous.
pub fn device_inbox(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

/// The offline set of a user who has no recorded device yet (registered,
/// never logged in). Every device pulls it too; the first device to ACK an
/// entry takes it.
pub fn user_inbox(user: &str) -> String {
    format!("{user}/")
}

/// Consumes the messages topic until `shutdown` resolves: offline write for
/// every receiver, then pushes to online receivers, then the offset commit.
/// A crash before the commit replays the batch; the writes are idempotent and
/// clients drop duplicate pushes by message id.
pub async fn run_consumer(
    bus: Arc<dyn Bus>,
    names: BusNames,
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn OfflineStore>,
    sessions: Arc<dyn SessionStore>,
    pushes: Arc<dyn PushGateway>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tern_store::StoreError> {
    let process = |batch: Vec<BusRecord>| {
        let (store, sessions, pushes, meta) = (store.clone(), sessions.clone(), pushes.clone(), meta.clone());
        async move {
            let mut decoded = Vec::with_capacity(batch.len());
            for record in &batch {
                match pb::BusEnvelope::decode(record.payload.clone()) {
                    Ok(pb::BusEnvelope { message: Some(message), receivers, sender_device }) => {
                        let payload = Bytes::from(message.encode_to_vec());
                        let entry = OfflineEntry { msg_id: message.msg_id, payload };
                        decoded.push(Delivery { receivers, sender: message.sender, sender_device, entry });
                    }
                    Ok(_) | Err(_) => {
                        tracing::error!(offset = record.offset, "undecodable bus record skipped")
                    }
                }
            }
            // The recorded devices of every user involved, one lookup per
            // user, all at once (a remote store answers them concurrently).
            let users: std::collections::BTreeSet<&String> = decoded
                .iter()
                .flat_map(|d| d.receivers.iter().chain((!d.sender_device.is_empty()).then_some(&d.sender)))
                .collect();
            let lookups = users.into_iter().map(|user| {
                let meta = meta.clone();
                async move { Ok::<_, tern_store::StoreError>((user.clone(), meta.devices(user).await?)) }
            });
            let devices: std::collections::HashMap<String, Vec<String>> =
                futures::future::try_join_all(lookups).await?.into_iter().collect();
            // Write diffusion per device: every recorded device of every
            // receiver, and the sender's other devices, get their own copy,
            // ACKed and deleted independently.
            let writes = decoded.iter().map(|d| {
                let keys = d.inboxes(&devices);
                let store = store.clone();
                async move { store.insert(&keys, &d.entry).await }
            });
            futures::future::try_join_all(writes).await?;
            // Placements of everyone to push to, one lookup per user, all at
            // once; then the pushes in message order.
            let push_targets = |d: &Delivery| {
                let sender_copy = !d.sender_device.is_empty() && !d.receivers.contains(&d.sender);
                d.receivers.iter().chain(sender_copy.then_some(&d.sender)).cloned().collect::<Vec<String>>()
            };
            let users: std::collections::BTreeSet<String> = decoded.iter().flat_map(push_targets).collect();
            let lookups = users.into_iter().map(|user| {
                let sessions = sessions.clone();
                async move {
                    match sessions.get(&user).await {
                        Ok(placements) => (user, placements),
                        // The entry is stored; the device pulls it at its next sync.
                        Err(e) => {
                            tracing::warn!(error = %e, "placement lookup failed; push skipped");
                            (user, Vec::new())
                        }
                    }
                }
            });
            let placements: std::collections::HashMap<String, Vec<Placement>> =
                futures::future::join_all(lookups).await.into_iter().collect();
            for d in &decoded {
                for user in push_targets(d) {
                    for placement in placements.get(&user).into_iter().flatten() {
                        let sending_device = user == d.sender && placement.device_id == d.sender_device;
                        if !sending_device || d.receivers.contains(&d.sender) {
                            pushes.push(placement, d.entry.msg_id, d.entry.payload.clone());
                        }
                    }
                }
            }
            Ok(())
        }
    };
    tern_store::consume::consume(&*bus, &names.messages_topic, &names.offline_group, shutdown, process).await
}
