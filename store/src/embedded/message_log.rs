//! [`MessageLog`] in one transaction of `messages.redb`: sequence,
//! reservation and bus record of a message commit together or not at all.

use std::sync::Arc;

use async_trait::async_trait;

use super::bus::EmbeddedBus;
use super::messages::{MessageTables, SharedMessageDb};
use super::writer::expiry_ms;
use crate::{DedupRecord, MessageLog, NewMessage, StoreResult};

/// [`MessageLog`] on the embedded message database.
pub struct EmbeddedMessageLog {
    store: SharedMessageDb,
    /// The bus in the same database, whose consumers are woken per record.
    bus: Arc<EmbeddedBus>,
}

impl EmbeddedMessageLog {
    pub(crate) fn new(store: SharedMessageDb, bus: Arc<EmbeddedBus>) -> Self {
        Self { store, bus }
    }
}

#[async_trait]
impl MessageLog for EmbeddedMessageLog {
    async fn append(&self, message: NewMessage) -> StoreResult<DedupRecord> {
        let head = self.bus.head_signal(&message.topic);
        let expires_at = expiry_ms(message.dedup_ttl);
        let (ids, _offset) = self
            .store
            .write_then(
                move |t: &mut MessageTables<'_>| {
                    let m = &message;
                    let seq = t.sequences.incr(&m.conversation)?;
                    let ids = DedupRecord { msg_id: m.msg_id, seq, sent_at_ms: m.sent_at_ms };
                    t.dedup.put(&m.sender, &m.client_msg_id, ids, expires_at)?;
                    let offset = t.bus.append(&m.topic, &m.key, &(m.payload)(seq))?;
                    Ok((ids, offset))
                },
                move |&(_, offset)| head.committed(offset),
            )
            .await?;
        Ok(ids)
    }
}
