//! Group message history (`history`: (group, msg_id) → payload in
//! `messages.redb`).

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::db_err;
use crate::{HistoryStore, StoreResult};

pub(crate) const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");

pub(crate) struct HistoryTables<'t> {
    messages: Table<'t, (&'static str, u64), &'static [u8]>,
}

impl<'t> HistoryTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self { messages: txn.open_table(MESSAGES).map_err(db_err)? })
    }
}

/// [`HistoryStore`] on redb.
pub struct EmbeddedHistoryStore {
    store: SharedMessageDb,
}

impl EmbeddedHistoryStore {
    /// Opens (creating if needed) a message database of its own at `path`.
    /// Blocking.
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
        let group = group_id.to_owned();
        self.store
            .write(move |t: &mut MessageTables<'_>| {
                let t = &mut t.history;
                let key = (group.as_str(), msg_id);
                // Idempotent: a redelivered append keeps the first copy.
                if t.messages.get(key).map_err(db_err)?.is_none() {
                    t.messages.insert(key, payload.as_ref()).map_err(db_err)?;
                }
                Ok(())
            })
            .await
    }

    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>> {
        let group = group_id.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(MESSAGES).map_err(db_err)?;
                let g = group.as_str();
                let range = if before == 0 {
                    table.range((g, 0)..=(g, u64::MAX))
                } else {
                    table.range((g, 0)..(g, before))
                }
                .map_err(db_err)?;
                let mut out = Vec::new();
                for entry in range.rev().take(limit) {
                    let (k, v) = entry.map_err(db_err)?;
                    out.push((k.value().1, Bytes::copy_from_slice(v.value())));
                }
                Ok(out)
            })
            .await
    }
}
