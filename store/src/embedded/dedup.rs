//! Accepted client message ids, in `messages.redb`.
//!
//! Tables:
//! - `dedup_records`: (sender, client_msg_id) → (msg_id, seq, sent_at_ms, expires_at_ms);
//! - `dedup_expiry`: (expires_at_ms, sender, client_msg_id) → (), the same records
//!   ordered by expiry so the writer's maintenance can drop expired ones
//!   without scanning everything.
//!
//! A read never returns an expired record, whether or not it was dropped yet.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::{db_err, expiry_ms, now_ms};
use crate::{DedupRecord, DedupStore, StoreResult};

type RecordValue = (u64, u64, u64, u64);

pub(crate) const RECORDS: TableDefinition<(&str, &str), RecordValue> = TableDefinition::new("dedup_records");
pub(crate) const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("dedup_expiry");

/// Expired records dropped per maintenance run, so one run adds little
/// latency to the writes it shares a transaction with (the writer runs it
/// again at once while a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

pub(crate) struct DedupTables<'t> {
    records: Table<'t, (&'static str, &'static str), RecordValue>,
    expiry: Table<'t, (u64, &'static str, &'static str), ()>,
}

impl<'t> DedupTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(db_err)?,
            expiry: txn.open_table(EXPIRY).map_err(db_err)?,
        })
    }

    /// Records `record` under (sender, client message id) until `expires_at`.
    pub(crate) fn put(
        &mut self,
        sender: &str,
        client_msg_id: &str,
        record: DedupRecord,
        expires_at: u64,
    ) -> StoreResult<()> {
        let value = (record.msg_id, record.seq, record.sent_at_ms, expires_at);
        let old_expiry =
            self.records.insert((sender, client_msg_id), value).map_err(db_err)?.map(|old| old.value().3);
        if let Some(old) = old_expiry {
            self.expiry.remove((old, sender, client_msg_id)).map_err(db_err)?;
        }
        self.expiry.insert((expires_at, sender, client_msg_id), ()).map_err(db_err)?;
        Ok(())
    }

    /// Drops up to [`EXPIRE_BATCH`] expired records; returns whether more
    /// are left (run by the writer's maintenance).
    pub(crate) fn expire(&mut self, now_ms: u64) -> StoreResult<bool> {
        let t = self;
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
    store: SharedMessageDb,
}

impl EmbeddedDedupStore {
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
impl DedupStore for EmbeddedDedupStore {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>> {
        let mut records = self.get_many(sender, &[client_msg_id]).await?;
        Ok(records.pop().flatten())
    }

    /// One read transaction for all of them: opening it and the table costs
    /// more than a lookup.
    async fn get_many(&self, sender: &str, client_msg_ids: &[&str]) -> StoreResult<Vec<Option<DedupRecord>>> {
        let sender = sender.to_owned();
        let clients: Vec<String> = client_msg_ids.iter().map(|&c| c.to_owned()).collect();
        self.store
            .read(move |txn| {
                let table = txn.open_table(RECORDS).map_err(db_err)?;
                let now = now_ms();
                let mut records = Vec::with_capacity(clients.len());
                for client in &clients {
                    let found = table.get((sender.as_str(), client.as_str())).map_err(db_err)?;
                    records.push(found.and_then(|v| {
                        let (msg_id, seq, sent_at_ms, expires_at) = v.value();
                        (expires_at > now).then_some(DedupRecord { msg_id, seq, sent_at_ms })
                    }));
                }
                Ok(records)
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
            .write(move |t: &mut MessageTables<'_>| t.dedup.put(&sender, &client, record, expires_at))
            .await
    }
}
