//! [`MessageLog`]: what the dispatcher stores for each new message, as one
//! call, so a backend that can do it in one durable write does.
//!
//! Each accepted message needs three things stored before its SendAck: the
//! next sequence of its conversation, the reservation of its ids under the
//! sender's client message id (so a retry finds them), and its bus record.
//! [`SeparateStores`] does them one after another on three backends (Redis
//! and Kafka in a cluster); the embedded backend writes all three in one
//! transaction, which costs one group commit instead of three.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Bus, DedupRecord, DedupStore, SequenceStore, StoreError, StoreResult};

/// Builds a message's bus payload once its sequence is known. `FnMut` so
/// it can fill the sequence into an envelope it owns instead of copying one.
pub type PayloadFn = Box<dyn FnMut(u64) -> Bytes + Send + Sync>;

/// A message to store: everything but its sequence is decided by the caller.
pub struct NewMessage {
    /// Conversation key; its counter gives the sequence.
    pub conversation: String,
    pub sender: String,
    pub client_msg_id: String,
    pub msg_id: u64,
    pub sent_at_ms: u64,
    /// How long the reservation under `client_msg_id` is kept.
    pub dedup_ttl: Duration,
    pub topic: String,
    /// Bus record key (the conversation, so one conversation stays in one
    /// partition).
    pub key: Bytes,
    /// The bus payload for a given sequence. May be called more than once.
    pub payload: PayloadFn,
}

#[async_trait]
pub trait MessageLog: Send + Sync + 'static {
    /// Assigns the conversation's next sequence, reserves the message's ids
    /// under (sender, client message id) and publishes its bus record.
    /// Returns the ids once all three are durable.
    ///
    /// On error the caller must not acknowledge the message. If the error
    /// came after the reservation, a retry finds the reserved ids (and
    /// publishes with them); otherwise no sequence was used up.
    async fn append(&self, message: NewMessage) -> StoreResult<DedupRecord>;

    /// Appends `messages` in order: within a conversation, a later message
    /// gets a later sequence and a later bus record. Returns one result per
    /// message, in the same order. A backend that stores the batch in one
    /// write stores all of it or none: on failure every message gets the
    /// error (and a retry of any of them is safe, as after `append`).
    ///
    /// The default appends them one at a time. A backend that can store them
    /// in one durable write overrides it (the dispatcher hands it the
    /// consecutive sends of one connection, so a client that pipelines its
    /// sends costs one commit per burst instead of one per message).
    async fn append_batch(&self, messages: Vec<NewMessage>) -> Vec<StoreResult<DedupRecord>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.append(message).await);
        }
        results
    }
}

/// [`MessageLog`] over three separate backends, one call after another.
pub struct SeparateStores {
    pub sequences: Arc<dyn SequenceStore>,
    pub dedup: Arc<dyn DedupStore>,
    pub bus: Arc<dyn Bus>,
}

#[async_trait]
impl MessageLog for SeparateStores {
    async fn append(&self, mut message: NewMessage) -> StoreResult<DedupRecord> {
        let seq = self.sequences.incr(&message.conversation).await?;
        let ids = DedupRecord { msg_id: message.msg_id, seq, sent_at_ms: message.sent_at_ms };
        // Reserve the ids before publishing, so a retry after any failure
        // from here on publishes the same message instead of a second one.
        if let Err(e) = self.dedup.put(&message.sender, &message.client_msg_id, ids, message.dedup_ttl).await
        {
            // Keeps sequences gap-free: nothing was stored under `seq`.
            if let Err(undo) = self.sequences.rollback(&message.conversation, seq).await {
                tracing::warn!(error = %undo, conversation = %message.conversation, seq, "sequence rollback failed; a gap remains");
            }
            return Err(e);
        }
        let payload = (message.payload)(seq);
        self.bus.publish(&message.topic, message.key, payload).await.map_err(|e| {
            // The ids stay reserved: a retry publishes the same message.
            StoreError::Unavailable(format!("message not stored, retry: {e}"))
        })?;
        Ok(ids)
    }
}
