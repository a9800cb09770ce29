//! `messages.redb`: the one database of the message path (sequences, dedup
//! records, the bus, offline sets, group history), with one writer thread.
//!
//! Why one file: every accepted message is written by several stores
//! (sequence, dedup reservation, bus record, each receiver's offline entry,
//! later the receiver's ACK). With a file per store, each file's writer
//! committed on its own, so every message paid for several `fdatasync`s and
//! thread wake-ups; a profile of S3 (1:1 at 6,000 msgs/s) put 28% of the
//! server's CPU in `fdatasync` alone, spread over four writer threads that
//! each committed continuously. Sharing the database lets one group commit
//! cover all of them, and lets a caller write to several stores in one
//! transaction ([`super::EmbeddedMessageLog`]).
//!
//! The user and group metadata (`meta.redb`) stays separate: it is written
//! at sign-up and login, not per message.

use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::bus::BusTables;
use super::dedup::{DedupIndex, DedupTables, IndexChange};
use super::history::HistoryTables;
use super::offline::OfflineTables;
use super::sequences::SequenceTables;
use super::writer::{Schema, Store, db_err};
use crate::{StoreError, StoreResult};

/// The message-path database schema.
pub(crate) struct MessageDb;

/// Every table of `messages.redb`, grouped by the store that owns them.
pub(crate) struct MessageTables<'t> {
    pub(crate) sequences: SequenceTables<'t>,
    pub(crate) dedup: DedupTables<'t>,
    pub(crate) bus: BusTables<'t>,
    pub(crate) offline: OfflineTables<'t>,
    pub(crate) history: HistoryTables<'t>,
}

impl Schema for MessageDb {
    const NAME: &'static str = "messages";
    type State = DedupIndex;
    type Staged = Vec<IndexChange>;
    type Tables<'t> = MessageTables<'t>;

    fn recover(txn: &WriteTransaction) -> StoreResult<DedupIndex> {
        let index = super::dedup::recover(txn)?;
        super::bus::recover(txn)?;
        drop(Self::open_tables(txn, &index)?);
        Ok(index)
    }

    fn staged(tables: MessageTables<'_>) -> Vec<IndexChange> {
        tables.dedup.into_staged()
    }

    fn publish(index: &DedupIndex, staged: Vec<IndexChange>) {
        index.publish(staged);
    }

    fn open_tables<'t>(txn: &'t WriteTransaction, index: &'t DedupIndex) -> StoreResult<MessageTables<'t>> {
        Ok(MessageTables {
            sequences: SequenceTables::open(txn)?,
            dedup: DedupTables::open(txn, index)?,
            bus: BusTables::open(txn)?,
            offline: OfflineTables::open(txn)?,
            history: HistoryTables::open(txn)?,
        })
    }

    fn maintain(t: &mut MessageTables<'_>, now_ms: u64) -> StoreResult<bool> {
        let dedup_backlog = t.dedup.expire(now_ms)?;
        let offline_backlog = t.offline.expire(now_ms)?;
        Ok(dedup_backlog || offline_backlog)
    }
}

/// The shared handle every message-path store holds.
pub(crate) type SharedMessageDb = Arc<Store<MessageDb>>;

/// Opens (creating if needed) a message database at `path`. Blocking.
pub(crate) fn open(path: &Path) -> StoreResult<SharedMessageDb> {
    Ok(Arc::new(Store::open(path, super::LARGE_CACHE_BYTES)?))
}

/// Copies the tables of one legacy file into the new database.
type LegacyCopy = fn(&redb::ReadTransaction, &WriteTransaction) -> StoreResult<()>;

/// The files an earlier layout kept the message path in, one per store, and
/// how each is copied. In the shared file every table name carries its
/// store's prefix (two stores had a `records` table).
pub(crate) const LEGACY_FILES: [(&str, LegacyCopy); 5] = [
    ("sequences.redb", |from, to| copy(from, "counters", to, super::sequences::COUNTERS)),
    ("dedup.redb", |from, to| {
        copy(from, "records", to, super::dedup::RECORDS)?;
        copy(from, "expiry", to, super::dedup::EXPIRY)
    }),
    ("bus.redb", |from, to| {
        // Its `heads` table is not copied: heads are read off the records.
        copy(from, "records", to, super::bus::RECORDS)?;
        copy(from, "group_offsets", to, super::bus::GROUP_OFFSETS)
    }),
    ("offline.redb", |from, to| {
        copy(from, "entries", to, super::offline::ENTRIES)?;
        copy(from, "counts", to, super::offline::COUNTS)?;
        copy(from, "tombstones", to, super::offline::TOMBSTONES)?;
        copy(from, "tombstone_expiry", to, super::offline::TOMBSTONE_EXPIRY)
    }),
    ("history.redb", |from, to| copy(from, "messages", to, super::history::MESSAGES)),
];

/// Copies the stores of the one-file-per-store layout in `dir` into a new
/// `messages.redb` at `target`, then renames each old file to `<name>.migrated`
/// so it is never read again (and can be deleted by hand). Blocking; does
/// nothing when `target` exists or no old file does. Returns the files
/// migrated.
///
/// A crash in the middle leaves the old files in place and the new one at a
/// temporary name, so the next start migrates again from scratch.
pub(crate) fn migrate_legacy_files(dir: &Path, target: &Path) -> StoreResult<Vec<String>> {
    if target.exists() {
        return Ok(Vec::new());
    }
    let present: Vec<(&str, LegacyCopy)> =
        LEGACY_FILES.iter().copied().filter(|(file, _)| dir.join(file).exists()).collect();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    let staging = target.with_extension("redb.migrating");
    let unavailable = |what: &str, e: &dyn std::fmt::Display| StoreError::Unavailable(format!("{what}: {e}"));
    if staging.exists() {
        std::fs::remove_file(&staging).map_err(|e| unavailable("removing an unfinished migration", &e))?;
    }
    let new_db = redb::Database::create(&staging).map_err(|e| unavailable("creating messages.redb", &e))?;
    let txn = new_db.begin_write().map_err(db_err)?;
    for (file, copy_tables) in &present {
        let old =
            redb::Database::open(dir.join(file)).map_err(|e| unavailable(&format!("opening {file}"), &e))?;
        let read = old.begin_read().map_err(db_err)?;
        copy_tables(&read, &txn)?;
    }
    txn.commit().map_err(db_err)?;
    drop(new_db);
    std::fs::rename(&staging, target).map_err(|e| unavailable("installing messages.redb", &e))?;
    for (file, _) in &present {
        let old = dir.join(file);
        std::fs::rename(&old, old.with_extension("redb.migrated"))
            .map_err(|e| unavailable(&format!("retiring {file}"), &e))?;
    }
    Ok(present.iter().map(|(file, _)| (*file).to_owned()).collect())
}

/// Copies table `old_name` of `from` into `definition` of `to` (same key and
/// value types, new name).
fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    old_name: &'static str,
    to: &WriteTransaction,
    definition: TableDefinition<K, V>,
) -> StoreResult<()> {
    let source = match from.open_table(TableDefinition::<K, V>::new(old_name)) {
        Ok(table) => table,
        // A table the old file never created has nothing to copy.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(db_err(e)),
    };
    let mut target = to.open_table(definition).map_err(db_err)?;
    let mut rows = 0u64;
    for entry in source.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        target.insert(k.value(), v.value()).map_err(db_err)?;
        rows += 1;
    }
    tracing::info!(from = old_name, to = definition.name(), rows, "migrated into messages.redb");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use redb::{Database, ReadableDatabase, TableDefinition};

    use crate::embedded::EmbeddedBackends;
    use crate::{Bus, DedupRecord, DedupStore, HistoryStore, OfflineStore, SequenceStore};

    /// Writes `rows` into table `name` of the legacy file `file` in `dir`.
    fn legacy<K, V>(
        dir: &std::path::Path,
        file: &str,
        name: &'static str,
        rows: &[(K::SelfType<'_>, V::SelfType<'_>)],
    ) where
        K: redb::Key + 'static,
        V: redb::Value + 'static,
    {
        let db = Database::create(dir.join(file)).expect("create legacy file");
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(TableDefinition::<K, V>::new(name)).expect("table");
            for (k, v) in rows {
                table.insert(k, v).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn a_directory_of_per_store_files_is_migrated_into_messages_redb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let far = u64::MAX / 2;
        legacy::<&str, u64>(d, "sequences.redb", "counters", &[("p:alice:bob", 7)]);
        legacy::<(&str, &str), (u64, u64, u64, u64)>(
            d,
            "dedup.redb",
            "records",
            &[(("alice", "c1"), (42, 7, 1, far))],
        );
        {
            let db = Database::create(d.join("bus.redb")).expect("bus");
            let txn = db.begin_write().expect("begin");
            {
                let mut records = txn
                    .open_table(TableDefinition::<(&str, u64), (&[u8], &[u8])>::new("records"))
                    .expect("t");
                records.insert(("tern.messages", 0), (b"k".as_slice(), b"first".as_slice())).expect("insert");
                records
                    .insert(("tern.messages", 1), (b"k".as_slice(), b"second".as_slice()))
                    .expect("insert");
                let mut heads = txn.open_table(TableDefinition::<&str, u64>::new("heads")).expect("t");
                heads.insert("tern.messages", 2).expect("insert");
                let mut groups =
                    txn.open_table(TableDefinition::<(&str, &str), u64>::new("group_offsets")).expect("t");
                groups.insert(("tern.messages", "offline-svc"), 1).expect("insert");
            }
            txn.commit().expect("commit");
        }
        legacy::<(&str, u64), &[u8]>(d, "offline.redb", "entries", &[(("bob/phone", 42), b"m42".as_slice())]);
        legacy::<(&str, u64), &[u8]>(d, "history.redb", "messages", &[(("g1", 42), b"h42".as_slice())]);

        let b = EmbeddedBackends::open(d).expect("open migrates");
        assert_eq!(b.sequences.current("p:alice:bob").await.expect("current"), 7);
        assert_eq!(b.sequences.incr("p:alice:bob").await.expect("incr"), 8, "counters continue");
        assert_eq!(
            b.dedup.get("alice", "c1").await.expect("get"),
            Some(DedupRecord { msg_id: 42, seq: 7, sent_at_ms: 1 })
        );
        let mut consumer = b.bus.subscribe("tern.messages", "offline-svc").await.expect("subscribe");
        let records = consumer.poll(10, Duration::from_secs(1)).await.expect("poll");
        assert_eq!(records.len(), 1, "the group resumes at its committed offset");
        assert_eq!(records[0].payload, Bytes::from_static(b"second"));
        b.bus.publish("tern.messages", Bytes::new(), Bytes::from_static(b"third")).await.expect("publish");
        let records = consumer.poll(10, Duration::from_secs(1)).await.expect("poll");
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![2], "offsets continue");
        let pulled = b.offline.pull("bob/phone", 0, 10).await.expect("pull");
        assert_eq!(pulled.iter().map(|e| e.msg_id).collect::<Vec<_>>(), vec![42]);
        assert_eq!(b.history.page("g1", 0, 10).await.expect("page"), vec![(42, Bytes::from_static(b"h42"))]);
        drop(consumer);
        drop(b);

        for (file, _) in super::LEGACY_FILES {
            assert!(!d.join(file).exists(), "{file} was retired");
            assert!(d.join(file).with_extension("redb.migrated").exists(), "{file} was kept aside");
        }
        // Reopening uses messages.redb and does not migrate again.
        let b = EmbeddedBackends::open(d).expect("reopen");
        assert_eq!(b.sequences.current("p:alice:bob").await.expect("current"), 8);
    }

    /// A database of a version that stored each bus topic's head in
    /// `bus_heads` opens without it: the table is dropped and offsets
    /// continue after the last record.
    #[tokio::test]
    async fn a_bus_heads_table_of_an_earlier_version_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("messages.redb");
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("begin");
            {
                let mut records = txn.open_table(crate::embedded::bus::RECORDS).expect("records");
                records.insert(("t", 0), (b"k".as_slice(), b"first".as_slice())).expect("insert");
                records.insert(("t", 1), (b"k".as_slice(), b"second".as_slice())).expect("insert");
                let mut heads = txn.open_table(crate::embedded::bus::HEADS).expect("heads");
                heads.insert("t", 2).expect("insert");
            }
            txn.commit().expect("commit");
        }
        {
            let b = EmbeddedBackends::open(dir.path()).expect("open");
            b.bus.publish("t", Bytes::new(), Bytes::from_static(b"third")).await.expect("publish");
            let mut consumer = b.bus.subscribe("t", "g").await.expect("subscribe");
            let records = consumer.poll(10, Duration::from_secs(1)).await.expect("poll");
            assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
        }
        let db = Database::open(&path).expect("reopen");
        let txn = db.begin_read().expect("read");
        let tables: Vec<String> =
            txn.list_tables().expect("list").map(|t| redb::TableHandle::name(&t).to_owned()).collect();
        assert!(!tables.iter().any(|t| t == "bus_heads"), "bus_heads is gone: {tables:?}");
    }
}
