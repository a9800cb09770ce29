//! Accepted client message ids, in `messages.redb`.
//!
//! Tables:
//! - `dedup_records`: (sender, client_msg_id) → (msg_id, seq, sent_at_ms, expires_at_ms);
//! - `dedup_expiry_batches`: (expires_at_ms, msg_id of the first) → the
//!   (sender, client_msg_id) keys of the records one write stored with that
//!   expiry, so the writer's maintenance can drop expired records without
//!   scanning everything. One entry per write rather than per record: an
//!   index entry per record was about 40% of the cost of storing a record
//!   (S3 at 80,000 msgs/s).
//! - `dedup_expiry`: (expires_at_ms, sender, client_msg_id) → (), the index of
//!   earlier versions, one entry per record; no longer written, drained by
//!   the maintenance like the other.
//!
//! A record written again (a renewal) is not taken out of its older index
//! entry: the maintenance drops a record only if its own expiry has passed.
//! A read never returns an expired record, whether or not it was dropped yet.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::{db_err, expiry_ms, now_ms};
use crate::{DedupRecord, DedupStore, StoreResult};

type RecordValue = (u64, u64, u64, u64);
type BatchKeys<'a> = Vec<(&'a str, &'a str)>;
/// The (sender, client message id) keys of an index entry, owned.
type OwnedKeys = Vec<(String, String)>;

pub(crate) const RECORDS: TableDefinition<(&str, &str), RecordValue> = TableDefinition::new("dedup_records");
pub(crate) const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("dedup_expiry");
const EXPIRY_BATCHES: TableDefinition<(u64, u64), BatchKeys<'static>> =
    TableDefinition::new("dedup_expiry_batches");

/// Expired records dropped per maintenance run (whole index entries, so a
/// run may go past it by one write's records), so one run adds little
/// latency to the writes it shares a transaction with (the writer runs it
/// again at once while a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

/// A record to store: sender, client message id, the ids it reserves, and
/// when it expires (ms since the epoch).
pub(crate) type DedupPut<'a> = (&'a str, &'a str, DedupRecord, u64);

pub(crate) struct DedupTables<'t> {
    records: Table<'t, (&'static str, &'static str), RecordValue>,
    /// The index of earlier versions, drained.
    legacy_expiry: Table<'t, (u64, &'static str, &'static str), ()>,
    expiry_batches: Table<'t, (u64, u64), BatchKeys<'static>>,
}

impl<'t> DedupTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(db_err)?,
            legacy_expiry: txn.open_table(EXPIRY).map_err(db_err)?,
            expiry_batches: txn.open_table(EXPIRY_BATCHES).map_err(db_err)?,
        })
    }

    /// Stores each record under (sender, client message id), indexed for
    /// expiry by one entry per distinct expiry time among them (usually
    /// one for the whole write).
    pub(crate) fn put_all<'a>(&mut self, records: impl IntoIterator<Item = DedupPut<'a>>) -> StoreResult<()> {
        // (expires_at, msg_id of the first record, keys), in first-seen order.
        let mut entries: Vec<(u64, u64, BatchKeys<'a>)> = Vec::new();
        for (sender, client_msg_id, record, expires_at) in records {
            let value = (record.msg_id, record.seq, record.sent_at_ms, expires_at);
            self.records.insert((sender, client_msg_id), value).map_err(db_err)?;
            match entries.iter_mut().find(|(at, _, _)| *at == expires_at) {
                Some((_, _, keys)) => keys.push((sender, client_msg_id)),
                None => entries.push((expires_at, record.msg_id, vec![(sender, client_msg_id)])),
            }
        }
        for (expires_at, first, mut keys) in entries {
            // The key is unique unless one message is stored twice within a
            // millisecond (a renewal); the entry there keeps both lists.
            let earlier: OwnedKeys = match self.expiry_batches.get((expires_at, first)).map_err(db_err)? {
                Some(guard) => guard.value().into_iter().map(|(s, c)| (s.to_owned(), c.to_owned())).collect(),
                None => Vec::new(),
            };
            keys.extend(earlier.iter().map(|(s, c)| (s.as_str(), c.as_str())));
            self.expiry_batches.insert((expires_at, first), &keys).map_err(db_err)?;
        }
        Ok(())
    }

    /// Drops about [`EXPIRE_BATCH`] expired records; returns whether more
    /// may be left (run by the writer's maintenance).
    pub(crate) fn expire(&mut self, now_ms: u64) -> StoreResult<bool> {
        if self.expire_legacy(now_ms)? {
            return Ok(true);
        }
        let mut expired: Vec<(u64, u64, OwnedKeys)> = Vec::new();
        let mut count = 0;
        for entry in self.expiry_batches.range(..(now_ms, 0)).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (at, first) = k.value();
            let keys: OwnedKeys = v.value().into_iter().map(|(s, c)| (s.to_owned(), c.to_owned())).collect();
            count += keys.len();
            expired.push((at, first, keys));
            if count >= EXPIRE_BATCH {
                break;
            }
        }
        for (at, first, keys) in &expired {
            self.expiry_batches.remove((*at, *first)).map_err(db_err)?;
            for (sender, client) in keys {
                self.drop_if_expired((sender, client), *at)?;
            }
        }
        Ok(count >= EXPIRE_BATCH)
    }

    /// [`Self::expire`] on the per-record index of earlier versions.
    fn expire_legacy(&mut self, now_ms: u64) -> StoreResult<bool> {
        let mut expired = Vec::new();
        for entry in self.legacy_expiry.range(..(now_ms, "", "")).map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            let (at, sender, client) = k.value();
            expired.push((at, sender.to_owned(), client.to_owned()));
            if expired.len() == EXPIRE_BATCH {
                break;
            }
        }
        for (at, sender, client) in &expired {
            self.legacy_expiry.remove((*at, sender.as_str(), client.as_str())).map_err(db_err)?;
            self.drop_if_expired((sender, client), *at)?;
        }
        Ok(expired.len() == EXPIRE_BATCH)
    }

    /// Drops the record under `key` unless it was renewed past `at` since.
    fn drop_if_expired(&mut self, key: (&str, &str), at: u64) -> StoreResult<()> {
        let still_expired = self.records.get(key).map_err(db_err)?.is_some_and(|v| v.value().3 <= at);
        if still_expired {
            self.records.remove(key).map_err(db_err)?;
        }
        Ok(())
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
            .write(move |t: &mut MessageTables<'_>| {
                t.dedup.put_all([(sender.as_str(), client.as_str(), record, expires_at)])
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use redb::backends::InMemoryBackend;
    use redb::{Database, ReadableTableMetadata};

    use super::*;

    fn database() -> Database {
        Database::builder().create_with_backend(InMemoryBackend::new()).expect("in-memory database")
    }

    fn record(msg_id: u64) -> DedupRecord {
        DedupRecord { msg_id, seq: msg_id, sent_at_ms: 1 }
    }

    /// Runs `f` on the tables in one committed write transaction.
    fn write<T>(db: &Database, f: impl FnOnce(&mut DedupTables<'_>) -> StoreResult<T>) -> T {
        let txn = db.begin_write().expect("begin");
        let out = {
            let mut tables = DedupTables::open(&txn).expect("open");
            f(&mut tables).expect("write")
        };
        txn.commit().expect("commit");
        out
    }

    fn stored(db: &Database, sender: &str, client: &str) -> bool {
        write(db, |t| Ok(t.records.get((sender, client)).map_err(db_err)?.is_some()))
    }

    fn index_entries(db: &Database) -> u64 {
        write(db, |t| t.expiry_batches.len().map_err(db_err))
    }

    #[test]
    fn one_index_entry_per_write_and_expiry_drops_its_records() {
        let db = database();
        write(&db, |t| {
            t.put_all([("a", "c1", record(1), 100), ("b", "c1", record(2), 100), ("a", "c2", record(3), 200)])
        });
        assert_eq!(index_entries(&db), 2, "one entry per distinct expiry");
        assert!(!write(&db, |t| t.expire(150)), "no backlog");
        assert!(!stored(&db, "a", "c1") && !stored(&db, "b", "c1"), "expired at 100");
        assert!(stored(&db, "a", "c2"), "expires at 200");
        assert_eq!(index_entries(&db), 1);
        write(&db, |t| t.expire(201));
        assert!(!stored(&db, "a", "c2"));
        assert_eq!(index_entries(&db), 0);
    }

    #[test]
    fn a_renewed_record_outlives_its_first_index_entry() {
        let db = database();
        write(&db, |t| t.put_all([("a", "c1", record(1), 100), ("a", "c2", record(2), 100)]));
        write(&db, |t| t.put_all([("a", "c1", record(1), 300)]));
        write(&db, |t| t.expire(150));
        assert!(stored(&db, "a", "c1"), "renewed until 300");
        assert!(!stored(&db, "a", "c2"));
        write(&db, |t| t.expire(301));
        assert!(!stored(&db, "a", "c1"));
    }

    #[test]
    fn writes_sharing_a_key_keep_both_lists() {
        let db = database();
        write(&db, |t| t.put_all([("a", "c1", record(7), 100), ("a", "c2", record(8), 100)]));
        write(&db, |t| t.put_all([("a", "c1", record(7), 100), ("b", "c9", record(9), 100)]));
        assert_eq!(index_entries(&db), 1);
        write(&db, |t| t.expire(101));
        for (sender, client) in [("a", "c1"), ("a", "c2"), ("b", "c9")] {
            assert!(!stored(&db, sender, client), "{sender}/{client} dropped");
        }
    }

    #[test]
    fn the_per_record_index_of_earlier_versions_is_drained() {
        let db = database();
        write(&db, |t| {
            t.records.insert(("old", "c1"), (1, 1, 1, 100)).map_err(db_err)?;
            t.legacy_expiry.insert((100, "old", "c1"), ()).map_err(db_err)?;
            t.put_all([("new", "c1", record(2), 100)])
        });
        write(&db, |t| t.expire(101));
        assert!(!stored(&db, "old", "c1") && !stored(&db, "new", "c1"));
        assert_eq!(write(&db, |t| t.legacy_expiry.len().map_err(db_err)), 0);
    }

    #[test]
    fn a_large_backlog_is_dropped_over_several_runs() {
        let db = database();
        let names: Vec<String> = (0..EXPIRE_BATCH + 10).map(|i| format!("c{i}")).collect();
        // Writes of 100 records each.
        for (n, chunk) in names.chunks(100).enumerate() {
            write(&db, |t| t.put_all(chunk.iter().map(|c| ("a", c.as_str(), record(n as u64 * 1000), 100))));
        }
        assert!(write(&db, |t| t.expire(101)), "a backlog is left after one run");
        assert!(!write(&db, |t| t.expire(101)), "the second run finishes it");
        assert!(names.iter().all(|c| !stored(&db, "a", c)));
        assert_eq!(index_entries(&db), 0);
    }
}
