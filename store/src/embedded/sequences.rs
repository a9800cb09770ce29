//! Per-conversation counters in `sequences.redb` (`counters`: key → u64).
//!
//! Increments are group-committed: concurrent `incr` calls on the same key
//! are applied one after another inside one transaction, so each still gets
//! its own value and the counter never goes back after a restart.

use std::path::Path;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::writer::{Schema, Store, db_err};
use crate::{SequenceStore, StoreResult};

const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub(crate) struct Sequences;

pub(crate) struct SequenceTables<'t> {
    counters: Table<'t, &'static str, u64>,
}

impl Schema for Sequences {
    const NAME: &'static str = "sequences";
    type Tables<'t> = SequenceTables<'t>;

    fn open_tables(txn: &WriteTransaction) -> StoreResult<SequenceTables<'_>> {
        Ok(SequenceTables { counters: txn.open_table(COUNTERS).map_err(db_err)? })
    }
}

/// [`SequenceStore`] on redb.
pub struct EmbeddedSequenceStore {
    store: Store<Sequences>,
}

impl EmbeddedSequenceStore {
    /// Opens (creating if needed) the counter file at `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self { store: Store::open(path, super::SMALL_CACHE_BYTES)? })
    }
}

#[async_trait]
impl SequenceStore for EmbeddedSequenceStore {
    async fn incr(&self, key: &str) -> StoreResult<u64> {
        let key = key.to_owned();
        self.store
            .write(move |t: &mut SequenceTables<'_>| {
                let current = t.counters.get(key.as_str()).map_err(db_err)?.map_or(0, |v| v.value());
                let next = current.saturating_add(1);
                t.counters.insert(key.as_str(), next).map_err(db_err)?;
                Ok(next)
            })
            .await
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
            .write(move |t: &mut SequenceTables<'_>| {
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
