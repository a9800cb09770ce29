//! [`MessageLog`] in one transaction of `messages.redb`: sequence,
//! reservation and bus record of a message commit together or not at all.

use std::sync::Arc;

use async_trait::async_trait;

use super::bus::{EmbeddedBus, HeadSignal};
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
        self.append_batch(vec![message]).await.pop().expect("one result per message")
    }

    /// One writer job for the whole batch: its messages commit together (in
    /// the writer's next group commit) or not at all.
    async fn append_batch(&self, mut messages: Vec<NewMessage>) -> Vec<StoreResult<DedupRecord>> {
        let count = messages.len();
        if count == 0 {
            return Vec::new();
        }
        // Each topic's consumers are woken once, for its last record.
        let mut heads: Vec<(String, HeadSignal)> = Vec::new();
        let mut head_of = Vec::with_capacity(count);
        for m in &messages {
            let index = match heads.iter().position(|(topic, _)| *topic == m.topic) {
                Some(index) => index,
                None => {
                    heads.push((m.topic.clone(), self.bus.head_signal(&m.topic)));
                    heads.len() - 1
                }
            };
            head_of.push(index);
        }
        let topics = heads.len();
        let expiries: Vec<u64> = messages.iter().map(|m| expiry_ms(m.dedup_ttl)).collect();
        let stored = self
            .store
            .write_then(
                move |t: &mut MessageTables<'_>| {
                    let mut ids = Vec::with_capacity(messages.len());
                    let mut last_offsets = vec![None; topics];
                    for ((m, &expires_at), &head) in messages.iter_mut().zip(&expiries).zip(&head_of) {
                        let seq = t.sequences.incr(&m.conversation)?;
                        let record = DedupRecord { msg_id: m.msg_id, seq, sent_at_ms: m.sent_at_ms };
                        t.dedup.put(&m.sender, &m.client_msg_id, record, expires_at)?;
                        last_offsets[head] = Some(t.bus.append(&m.topic, &m.key, &(m.payload)(seq))?);
                        ids.push(record);
                    }
                    Ok((ids, last_offsets))
                },
                move |(_, last_offsets): &(Vec<DedupRecord>, Vec<Option<u64>>)| {
                    for ((_, signal), offset) in heads.iter().zip(last_offsets) {
                        if let Some(offset) = offset {
                            signal.committed(*offset);
                        }
                    }
                },
            )
            .await;
        match stored {
            Ok((ids, _)) => ids.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); count],
        }
    }
}
