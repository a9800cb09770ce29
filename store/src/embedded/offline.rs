//! Per-receiver offline sets, in `messages.redb`.
//!
//! Tables:
//! - `offline_entries`: (receiver, msg_id) → payload, so a receiver's set is one
//!   ordered key range;
//! - `offline_counts`: receiver → number of entries, updated in the same transaction
//!   as the entries so `count` is one lookup;
//! - `offline_tombstones`: (receiver, msg_id) → expires_at_ms, for ids acknowledged
//!   before they were inserted (the push overtook the store write): their
//!   insert is ignored until the tombstone expires;
//! - `offline_tombstone_expiry`: (expires_at_ms, receiver, msg_id) → (), tombstones
//!   ordered by expiry for the writer's lazy cleanup.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::{db_err, expiry_ms, now_ms};
use crate::{OfflineEntry, OfflineStore, StoreResult};

pub(crate) const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("offline_entries");
pub(crate) const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("offline_counts");
pub(crate) const TOMBSTONES: TableDefinition<(&str, u64), u64> = TableDefinition::new("offline_tombstones");
pub(crate) const TOMBSTONE_EXPIRY: TableDefinition<(u64, &str, u64), ()> =
    TableDefinition::new("offline_tombstone_expiry");

/// Expired tombstones dropped per maintenance run, so one run adds little
/// latency to the writes it shares a transaction with (the writer runs it
/// again at once while a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

pub(crate) struct OfflineTables<'t> {
    entries: Table<'t, (&'static str, u64), &'static [u8]>,
    counts: Table<'t, &'static str, u64>,
    tombstones: Table<'t, (&'static str, u64), u64>,
    tombstone_expiry: Table<'t, (u64, &'static str, u64), ()>,
}

impl<'t> OfflineTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            entries: txn.open_table(ENTRIES).map_err(db_err)?,
            counts: txn.open_table(COUNTS).map_err(db_err)?,
            tombstones: txn.open_table(TOMBSTONES).map_err(db_err)?,
            tombstone_expiry: txn.open_table(TOMBSTONE_EXPIRY).map_err(db_err)?,
        })
    }

    fn add_to_count(&mut self, receiver: &str, delta: i64) -> StoreResult<()> {
        let current = self.counts.get(receiver).map_err(db_err)?.map_or(0, |v| v.value());
        let next = current.saturating_add_signed(delta);
        if next == 0 {
            self.counts.remove(receiver).map_err(db_err)?;
        } else {
            self.counts.insert(receiver, next).map_err(db_err)?;
        }
        Ok(())
    }

    /// Drops up to [`EXPIRE_BATCH`] expired tombstones; returns whether more
    /// are left (run by the writer's maintenance).
    pub(crate) fn expire(&mut self, now_ms: u64) -> StoreResult<bool> {
        let t = self;
        let mut expired = Vec::new();
        for entry in t.tombstone_expiry.range(..(now_ms, "", 0)).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (at, receiver, msg_id) = k.value();
            expired.push((at, receiver.to_owned(), msg_id));
            if expired.len() == EXPIRE_BATCH {
                break;
            }
        }
        for (at, receiver, msg_id) in &expired {
            t.tombstone_expiry.remove((*at, receiver.as_str(), *msg_id)).map_err(db_err)?;
            let key = (receiver.as_str(), *msg_id);
            // The tombstone may have been renewed by a later ack.
            let still_expired = t.tombstones.get(key).map_err(db_err)?.is_some_and(|v| v.value() <= *at);
            if still_expired {
                t.tombstones.remove(key).map_err(db_err)?;
            }
        }
        Ok(expired.len() == EXPIRE_BATCH)
    }
}

/// [`OfflineStore`] on redb.
pub struct EmbeddedOfflineStore {
    store: SharedMessageDb,
}

impl EmbeddedOfflineStore {
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
impl OfflineStore for EmbeddedOfflineStore {
    async fn insert(&self, receivers: &[String], entry: &OfflineEntry) -> StoreResult<()> {
        let receivers = receivers.to_vec();
        let (msg_id, payload) = (entry.msg_id, entry.payload.clone());
        self.store
            .write(move |t: &mut MessageTables<'_>| {
                let t = &mut t.offline;
                let now = now_ms();
                for receiver in &receivers {
                    let key = (receiver.as_str(), msg_id);
                    let acked = t.tombstones.get(key).map_err(db_err)?.is_some_and(|v| v.value() > now);
                    if acked {
                        continue;
                    }
                    // One lookup instead of get-then-insert: rewriting an
                    // existing entry with the same message is harmless.
                    let existed = t.entries.insert(key, payload.as_ref()).map_err(db_err)?.is_some();
                    if !existed {
                        t.add_to_count(receiver, 1)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn pull(&self, receiver: &str, after: u64, limit: usize) -> StoreResult<Vec<OfflineEntry>> {
        let receiver = receiver.to_owned();
        self.store
            .read(move |txn| {
                let mut out = Vec::new();
                let Some(first) = after.checked_add(1) else {
                    return Ok(out);
                };
                let table = txn.open_table(ENTRIES).map_err(db_err)?;
                let r = receiver.as_str();
                for entry in table.range((r, first)..=(r, u64::MAX)).map_err(db_err)?.take(limit) {
                    let (k, v) = entry.map_err(db_err)?;
                    out.push(OfflineEntry {
                        msg_id: k.value().1,
                        payload: Bytes::copy_from_slice(v.value()),
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn ack(&self, receiver: &str, msg_ids: &[u64], tombstone_ttl: Duration) -> StoreResult<()> {
        let receiver = receiver.to_owned();
        let msg_ids = msg_ids.to_vec();
        let expires_at = expiry_ms(tombstone_ttl);
        self.store
            .write(move |t: &mut MessageTables<'_>| {
                let t = &mut t.offline;
                let r = receiver.as_str();
                let mut removed = 0;
                for &msg_id in &msg_ids {
                    if t.entries.remove((r, msg_id)).map_err(db_err)?.is_some() {
                        removed += 1;
                        continue;
                    }
                    if tombstone_ttl.is_zero() {
                        continue;
                    }
                    // Not there (yet): the ack overtook the insert. Only
                    // such ids get a tombstone (see `OfflineStore::ack`).
                    let old =
                        t.tombstones.insert((r, msg_id), expires_at).map_err(db_err)?.map(|v| v.value());
                    if let Some(old) = old {
                        t.tombstone_expiry.remove((old, r, msg_id)).map_err(db_err)?;
                    }
                    t.tombstone_expiry.insert((expires_at, r, msg_id), ()).map_err(db_err)?;
                }
                if removed > 0 {
                    t.add_to_count(r, -removed)?;
                }
                Ok(())
            })
            .await
    }

    async fn count(&self, receiver: &str) -> StoreResult<u64> {
        let receiver = receiver.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(COUNTS).map_err(db_err)?;
                Ok(table.get(receiver.as_str()).map_err(db_err)?.map_or(0, |v| v.value()))
            })
            .await
    }
}
