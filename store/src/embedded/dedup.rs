//! Accepted client message ids in `dedup.redb`.
//!
//! Tables:
//! - `records`: (sender, client_msg_id) → (msg_id, seq, sent_at_ms, expires_at_ms);
//! - `expiry`: (expires_at_ms, sender, client_msg_id) → (), the same records
//!   ordered by expiry so the writer's maintenance can drop expired ones
//!   without scanning everything.
//!
//! A read never returns an expired record, whether or not it was dropped yet.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::writer::{Schema, Store, db_err, expiry_ms, now_ms};
use crate::{DedupRecord, DedupStore, StoreResult};

type RecordValue = (u64, u64, u64, u64);

const RECORDS: TableDefinition<(&str, &str), RecordValue> = TableDefinition::new("records");
const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("expiry");

/// Expired records dropped per maintenance run, so one run adds little
/// latency to the writes it shares a transaction with (the writer runs it
/// again at once while a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

pub(crate) struct Dedup;

pub(crate) struct DedupTables<'t> {
    records: Table<'t, (&'static str, &'static str), RecordValue>,
    expiry: Table<'t, (u64, &'static str, &'static str), ()>,
}

impl Schema for Dedup {
    const NAME: &'static str = "dedup";
    type Tables<'t> = DedupTables<'t>;

    fn open_tables(txn: &WriteTransaction) -> StoreResult<DedupTables<'_>> {
        Ok(DedupTables {
            records: txn.open_table(RECORDS).map_err(db_err)?,
            expiry: txn.open_table(EXPIRY).map_err(db_err)?,
        })
    }

    fn maintain(t: &mut DedupTables<'_>, now_ms: u64) -> StoreResult<bool> {
        let mut expired = Vec::new();
        for entry in t.expiry.range(..(now_ms, "", "")).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (at, sender, client) = k.value();
            expired.push((at, sender.to_owned(), client.to_owned()));
            if expired.len() == EXPIRE_BATCH {
                break;
            }
        }
        for (at, sender, client) in &expired {
            let key = (sender.as_str(), client.as_str());
            t.expiry.remove((*at, key.0, key.1)).map_err(db_err)?;
            // The record may have been renewed with a later expiry since.
            let still_expired = t.records.get(key).map_err(db_err)?.is_some_and(|v| v.value().3 <= *at);
            if still_expired {
                t.records.remove(key).map_err(db_err)?;
            }
        }
        Ok(expired.len() == EXPIRE_BATCH)
    }
}

/// [`DedupStore`] on redb.
pub struct EmbeddedDedupStore {
    store: Store<Dedup>,
}

impl EmbeddedDedupStore {
    /// Opens (creating if needed) the dedup file at `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self { store: Store::open(path, super::SMALL_CACHE_BYTES)? })
    }
}

#[async_trait]
impl DedupStore for EmbeddedDedupStore {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>> {
        let (sender, client) = (sender.to_owned(), client_msg_id.to_owned());
        self.store
            .read(move |txn| {
                let table = txn.open_table(RECORDS).map_err(db_err)?;
                let Some(v) = table.get((sender.as_str(), client.as_str())).map_err(db_err)? else {
                    return Ok(None);
                };
                let (msg_id, seq, sent_at_ms, expires_at) = v.value();
                Ok((expires_at > now_ms()).then_some(DedupRecord { msg_id, seq, sent_at_ms }))
            })
            .await
    }

    async fn put(
        &self,
        sender: &str,
        client_msg_id: &str,
        record: DedupRecord,
        ttl: Duration,
    ) -> StoreResult<()> {
        let (sender, client) = (sender.to_owned(), client_msg_id.to_owned());
        let expires_at = expiry_ms(ttl);
        self.store
            .write(move |t: &mut DedupTables<'_>| {
                let key = (sender.as_str(), client.as_str());
                let value = (record.msg_id, record.seq, record.sent_at_ms, expires_at);
                let old_expiry = t.records.insert(key, value).map_err(db_err)?.map(|old| old.value().3);
                if let Some(old) = old_expiry {
                    t.expiry.remove((old, key.0, key.1)).map_err(db_err)?;
                }
                t.expiry.insert((expires_at, key.0, key.1), ()).map_err(db_err)?;
                Ok(())
            })
            .await
    }
}
