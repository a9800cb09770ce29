//! Per-conversation counters (`sequences`: key → u64 in `messages.redb`).
//!
//! Increments are group-committed: concurrent `incr` calls on the same key
//! are applied one after another inside one transaction, so each still gets
//! its own value and the counter never goes back after a restart.

use std::path::Path;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::db_err;
use crate::{SequenceStore, StoreResult};

pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("sequences");

pub(crate) struct SequenceTables<'t> {
    counters: Table<'t, &'static str, u64>,
}

impl<'t> SequenceTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self { counters: txn.open_table(COUNTERS).map_err(db_err)? })
    }

    /// Adds one to `key`'s counter and returns the new value.
    pub(crate) fn incr(&mut self, key: &str) -> StoreResult<u64> {
        self.take(key, 1)
    }

    /// Adds `count` to `key`'s counter and returns the first of the
    /// `count` values taken (one read and one write however many).
    pub(crate) fn take(&mut self, key: &str, count: u64) -> StoreResult<u64> {
        let current = self.counters.get(key).map_err(db_err)?.map_or(0, |v| v.value());
        self.counters.insert(key, current.saturating_add(count)).map_err(db_err)?;
        Ok(current.saturating_add(1))
    }
}

/// [`SequenceStore`] on redb.
pub struct EmbeddedSequenceStore {
    store: SharedMessageDb,
}

impl EmbeddedSequenceStore {
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
impl SequenceStore for EmbeddedSequenceStore {
    async fn incr(&self, key: &str) -> StoreResult<u64> {
        let key = key.to_owned();
        self.store.write(move |t: &mut MessageTables<'_>| t.sequences.incr(&key)).await
    }

    async fn current(&self, key: &str) -> StoreResult<u64> {
        let key = key.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(COUNTERS).map_err(db_err)?;
                Ok(table.get(key.as_str()).map_err(db_err)?.map_or(0, |v| v.value()))
            })
            .await
    }

    async fn rollback(&self, key: &str, expected: u64) -> StoreResult<bool> {
        let key = key.to_owned();
        self.store
            .write(move |t: &mut MessageTables<'_>| {
                let t = &mut t.sequences;
                let current = t.counters.get(key.as_str()).map_err(db_err)?.map_or(0, |v| v.value());
                if expected == 0 || current != expected {
                    return Ok(false);
                }
                t.counters.insert(key.as_str(), expected - 1).map_err(db_err)?;
                Ok(true)
            })
            .await
    }
}
