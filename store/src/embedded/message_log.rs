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
                    // One counter update per conversation and one head read
                    // per topic for the whole batch, not one per message.
                    let seqs = take_in_order(messages.iter().map(|m| m.conversation.as_str()), |key, n| {
                        t.sequences.take(key, n)
                    })?;
                    let offsets = take_in_order(messages.iter().map(|m| m.topic.as_str()), |topic, _| {
                        t.bus.head(topic)
                    })?;
                    let mut ids = Vec::with_capacity(messages.len());
                    let mut last_offsets = vec![None; topics];
                    for (i, m) in messages.iter_mut().enumerate() {
                        let (seq, offset) = (seqs[i], offsets[i]);
                        t.bus.put_record(&m.topic, offset, &m.key, &(m.payload)(seq))?;
                        last_offsets[head_of[i]] = Some(offset);
                        ids.push(DedupRecord { msg_id: m.msg_id, seq, sent_at_ms: m.sent_at_ms });
                    }
                    t.dedup.put_all(messages.iter().zip(&ids).zip(&expiries).map(
                        |((m, &record), &expires_at)| {
                            (m.sender.as_str(), m.client_msg_id.as_str(), record, expires_at)
                        },
                    ))?;
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

/// Numbers items that draw from per-key counters: calls `take(key, n)` once
/// per distinct key, for the `n` items with that key, and gives the items of
/// a key the consecutive values from the first one `take` returned, in item
/// order.
fn take_in_order<'k>(
    keys: impl Iterator<Item = &'k str> + Clone,
    mut take: impl FnMut(&str, u64) -> StoreResult<u64>,
) -> StoreResult<Vec<u64>> {
    // (key, how many items, the next value to give); batches have few keys.
    let mut counters: Vec<(&str, u64, u64)> = Vec::new();
    for key in keys.clone() {
        match counters.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, n, _)) => *n += 1,
            None => counters.push((key, 1, 0)),
        }
    }
    for (key, n, next) in &mut counters {
        *next = take(key, *n)?;
    }
    Ok(keys
        .map(|key| {
            let (_, _, next) = counters.iter_mut().find(|(k, _, _)| *k == key).expect("counted above");
            *next += 1;
            *next - 1
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_in_order_draws_once_per_key_and_numbers_items_in_order() {
        let mut counters = std::collections::HashMap::from([("a".to_owned(), 10u64)]);
        let mut calls = Vec::new();
        let keys = ["a", "b", "a", "c", "a", "b"];
        let values = take_in_order(keys.iter().copied(), |key, n| {
            calls.push((key.to_owned(), n));
            let counter = counters.entry(key.to_owned()).or_insert(0);
            let first = *counter + 1;
            *counter += n;
            Ok(first)
        })
        .unwrap();
        assert_eq!(values, [11, 1, 12, 1, 13, 2]);
        assert_eq!(calls, [("a".to_owned(), 3), ("b".to_owned(), 2), ("c".to_owned(), 1)]);
    }

    #[test]
    fn take_in_order_passes_an_error_on() {
        let failed = take_in_order(["a"].into_iter(), |_, _| Err(crate::StoreError::Backend("full".into())));
        assert!(failed.is_err());
    }
}
