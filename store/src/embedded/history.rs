//! Group message history (keyspace `history`: (group, msg_id) → payload in
//! the message database).

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::keys::{Key, KeyReader};
use super::messages::{self, SharedMessageDb, db_err};
use crate::{HistoryStore, StoreResult};

/// [`HistoryStore`] on the embedded message database.
pub struct EmbeddedHistoryStore {
    store: SharedMessageDb,
}

impl EmbeddedHistoryStore {
    /// Opens (creating if needed) a message database of its own in the
    /// directory `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self::on(messages::open(path)?))
    }

    pub(crate) fn on(store: SharedMessageDb) -> Self {
        Self { store }
    }
}

#[async_trait]
impl HistoryStore for EmbeddedHistoryStore {
    async fn append(&self, group_id: &str, msg_id: u64, payload: Bytes) -> StoreResult<()> {
        let key = Key::new().str(group_id).u64(msg_id).build();
        self.store
            .write(move |w| {
                let ks = w.ks;
                // Idempotent: a redelivered append keeps the first copy.
                if w.get(&ks.history, &key)?.is_none() {
                    w.insert(&ks.history, key, payload.as_ref());
                }
                Ok(())
            })
            .await
    }

    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>> {
        let start = Key::new().str(group_id).u64(0).build();
        let history = &self.store.tables().history;
        let range = if before == 0 {
            history.range(start..=Key::new().str(group_id).u64(u64::MAX).build())
        } else {
            history.range(start..Key::new().str(group_id).u64(before).build())
        };
        let mut out = Vec::new();
        for entry in range.rev().take(limit) {
            let (key, value) = entry.into_inner().map_err(db_err)?;
            let mut r = KeyReader::new(&key);
            r.str()?;
            out.push((r.u64()?, Bytes::copy_from_slice(&value)));
        }
        Ok(out)
    }
}
