//! Per-conversation counters (keyspace `sequences`: key → u64).
//!
//! Increments are group-committed: concurrent `incr` calls on the same key
//! are applied one after another in the writer, so each still gets its own
//! value and the counter never goes back after a restart.

use std::path::Path;

use async_trait::async_trait;

use super::keys::read_u64s;
use super::messages::{self, Counter, SharedMessageDb, Writes};
use crate::{SequenceStore, StoreResult};

/// `key`'s counter as `w` sees it (0 if never incremented).
fn current(w: &mut Writes<'_>, key: &str) -> StoreResult<u64> {
    Ok(w.counter(Counter::Sequences, key.as_bytes())?.unwrap_or(0))
}

/// Adds one to `key`'s counter and returns the new value.
pub(crate) fn incr(w: &mut Writes<'_>, key: &str) -> StoreResult<u64> {
    let next = current(w, key)?.saturating_add(1);
    w.set_counter(Counter::Sequences, key.as_bytes(), Some(next));
    Ok(next)
}

/// [`SequenceStore`] on the embedded message database.
pub struct EmbeddedSequenceStore {
    store: SharedMessageDb,
}

impl EmbeddedSequenceStore {
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
impl SequenceStore for EmbeddedSequenceStore {
    async fn incr(&self, key: &str) -> StoreResult<u64> {
        let key = key.to_owned();
        self.store.write(move |w| incr(w, &key)).await
    }

    async fn current(&self, key: &str) -> StoreResult<u64> {
        let value = self.store.tables().sequences.get(key.as_bytes()).map_err(messages::db_err)?;
        Ok(match value {
            Some(v) => read_u64s::<1>(&v)?[0],
            None => 0,
        })
    }

    async fn rollback(&self, key: &str, expected: u64) -> StoreResult<bool> {
        let key = key.to_owned();
        self.store
            .write(move |w| {
                if expected == 0 || current(w, &key)? != expected {
                    return Ok(false);
                }
                w.set_counter(Counter::Sequences, key.as_bytes(), Some(expected - 1));
                Ok(true)
            })
            .await
    }
}
