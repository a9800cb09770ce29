//! Moves the message path's data of older layouts into the message database
//! (`messages/`), once, when a data directory is opened.
//!
//! Two older layouts exist, both redb files: one file per store
//! (`sequences.redb`, `dedup.redb`, `bus.redb`, `offline.redb`,
//! `history.redb`), then one shared `messages.redb`. The per-store files are
//! first gathered into a `messages.redb` (their tables renamed), and that
//! file is then copied into the message database. Each old file is renamed
//! to `<name>.migrated` afterwards, so it is never read again and can be
//! deleted by hand.
//!
//! A crash in the middle leaves the old files in place and the new data
//! under a temporary name, so the next start migrates again from scratch.

use std::path::Path;

use fjall::{Database, Keyspace, PersistMode};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::keys::{Key, u64s};
use super::messages::{Keyspaces, db_err, open_database};
use super::{bus, dedup, offline};
use crate::{StoreError, StoreResult};

/// The tables of `messages.redb`.
mod table {
    use redb::TableDefinition;

    pub(super) const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");
    pub(super) const DEDUP_RECORDS: TableDefinition<(&str, &str), (u64, u64, u64, u64)> =
        TableDefinition::new("dedup_records");
    pub(super) const DEDUP_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
        TableDefinition::new("dedup_expiry");
    /// (key, payload) of a bus record.
    type BusRecord = (&'static [u8], &'static [u8]);

    pub(super) const BUS_RECORDS: TableDefinition<(&str, u64), BusRecord> =
        TableDefinition::new("bus_records");
    pub(super) const BUS_HEADS: TableDefinition<&str, u64> = TableDefinition::new("bus_heads");
    pub(super) const BUS_GROUP_OFFSETS: TableDefinition<(&str, &str), u64> =
        TableDefinition::new("bus_group_offsets");
    pub(super) const OFFLINE_ENTRIES: TableDefinition<(&str, u64), &[u8]> =
        TableDefinition::new("offline_entries");
    pub(super) const OFFLINE_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("offline_counts");
    pub(super) const OFFLINE_TOMBSTONES: TableDefinition<(&str, u64), u64> =
        TableDefinition::new("offline_tombstones");
    pub(super) const OFFLINE_TOMBSTONE_EXPIRY: TableDefinition<(u64, &str, u64), ()> =
        TableDefinition::new("offline_tombstone_expiry");
    pub(super) const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
}

/// The file of the shared redb layout.
const REDB_FILE: &str = "messages.redb";

fn unavailable(what: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

/// Brings the data of any older layout in `dir` into the message database
/// directory `target` (which must not be open). Blocking. Returns the files
/// migrated (none when there was nothing to do).
pub(crate) fn migrate(dir: &Path, target: &Path) -> StoreResult<Vec<String>> {
    let redb_path = dir.join(REDB_FILE);
    if target.exists() {
        // A crash after installing the new database but before retiring
        // the old file: finish that step.
        if redb_path.exists() {
            retire(&redb_path)?;
        }
        return Ok(Vec::new());
    }
    let mut migrated = migrate_legacy_files(dir, &redb_path)?;
    if redb_path.exists() {
        copy_redb(&redb_path, target)?;
        retire(&redb_path)?;
        migrated.push(REDB_FILE.to_owned());
    }
    Ok(migrated)
}

/// Renames `path` to `<path>.migrated`.
fn retire(path: &Path) -> StoreResult<()> {
    let mut retired = path.as_os_str().to_owned();
    retired.push(".migrated");
    std::fs::rename(path, &retired).map_err(|e| unavailable(&format!("retiring {}", path.display()), &e))
}

/// Copies every table of `messages.redb` into a new message database at
/// `target` (built under a temporary name, then renamed).
fn copy_redb(source: &Path, target: &Path) -> StoreResult<()> {
    let staging = target.with_extension("migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| unavailable("removing an unfinished migration", &e))?;
    }
    let old = redb::Database::open(source)
        .map_err(|e| unavailable(&format!("opening {}", source.display()), &e))?;
    let read = old.begin_read().map_err(redb_err)?;
    {
        let (db, ks) = open_database(&staging)?;
        let mut copier = Copier { db: &db, batch: db.batch() };
        copy_rows(&read, table::SEQUENCES, &mut copier, &ks.sequences, |k, v| {
            Ok((k.as_bytes().to_vec(), u64s([v])))
        })?;
        copy_rows(&read, table::DEDUP_RECORDS, &mut copier, &ks.dedup_records, |(s, c), (m, q, t, e)| {
            Ok((dedup::record_key(s, c), u64s([m, q, t, e])))
        })?;
        copy_rows(&read, table::DEDUP_EXPIRY, &mut copier, &ks.dedup_expiry, |(at, s, c), ()| {
            Ok((Key::new().u64(at).str(s).str(c).build(), Vec::new()))
        })?;
        copy_rows(&read, table::BUS_RECORDS, &mut copier, &ks.bus_records, |(t, o), (k, p)| {
            Ok((bus::record_key(t, o), bus::record_value(k, p)?))
        })?;
        copy_rows(&read, table::BUS_HEADS, &mut copier, &ks.bus_heads, |t, h| {
            Ok((t.as_bytes().to_vec(), u64s([h])))
        })?;
        copy_rows(&read, table::BUS_GROUP_OFFSETS, &mut copier, &ks.bus_group_offsets, |(t, g), o| {
            Ok((bus::group_key(t, g), u64s([o])))
        })?;
        copy_rows(&read, table::OFFLINE_ENTRIES, &mut copier, &ks.offline_entries, |(r, m), p| {
            Ok((offline::entry_key(r, m), p.to_vec()))
        })?;
        copy_rows(&read, table::OFFLINE_COUNTS, &mut copier, &ks.offline_counts, |r, n| {
            Ok((r.as_bytes().to_vec(), u64s([n])))
        })?;
        copy_rows(&read, table::OFFLINE_TOMBSTONES, &mut copier, &ks.offline_tombstones, |(r, m), e| {
            Ok((offline::entry_key(r, m), u64s([e])))
        })?;
        copy_rows(
            &read,
            table::OFFLINE_TOMBSTONE_EXPIRY,
            &mut copier,
            &ks.offline_tombstone_expiry,
            |(at, r, m), ()| Ok((Key::new().u64(at).str(r).u64(m).build(), Vec::new())),
        )?;
        copy_rows(&read, table::HISTORY, &mut copier, &ks.history, |(g, m), p| {
            Ok((Key::new().str(g).u64(m).build(), p.to_vec()))
        })?;
        copier.flush()?;
        db.persist(PersistMode::SyncAll).map_err(db_err)?;
        drop::<Keyspaces>(ks);
    }
    std::fs::rename(&staging, target).map_err(|e| unavailable("installing the message database", &e))
}

/// Writes copied rows in batches of bounded size.
struct Copier<'a> {
    db: &'a Database,
    batch: fjall::OwnedWriteBatch,
}

impl Copier<'_> {
    const BATCH_ROWS: usize = 10_000;

    fn insert(&mut self, keyspace: &Keyspace, key: Vec<u8>, value: Vec<u8>) -> StoreResult<()> {
        self.batch.insert(keyspace, key, value);
        if self.batch.len() >= Self::BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> StoreResult<()> {
        std::mem::replace(&mut self.batch, self.db.batch()).commit().map_err(db_err)
    }
}

/// Copies every row of `definition` (if the file has that table) into
/// `keyspace`, encoded by `encode`.
fn copy_rows<K, V>(
    from: &redb::ReadTransaction,
    definition: TableDefinition<K, V>,
    copier: &mut Copier<'_>,
    keyspace: &Keyspace,
    encode: impl Fn(K::SelfType<'_>, V::SelfType<'_>) -> StoreResult<(Vec<u8>, Vec<u8>)>,
) -> StoreResult<()>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let source = match from.open_table(definition) {
        Ok(table) => table,
        // A table the old file never created has nothing to copy.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(redb_err(e)),
    };
    let mut rows = 0u64;
    for entry in source.iter().map_err(redb_err)? {
        let (k, v) = entry.map_err(redb_err)?;
        let (key, value) = encode(k.value(), v.value())?;
        copier.insert(keyspace, key, value)?;
        rows += 1;
    }
    tracing::info!(table = definition.name(), rows, "migrated messages.redb into the message database");
    Ok(())
}

/// Copies the tables of one per-store file into `messages.redb`.
type LegacyCopy = fn(&redb::ReadTransaction, &WriteTransaction) -> StoreResult<()>;

/// The files of the one-file-per-store layout, and how each is copied. In
/// the shared file every table name carries its store's prefix (two stores
/// had a `records` table).
pub(crate) const LEGACY_FILES: [(&str, LegacyCopy); 5] = [
    ("sequences.redb", |from, to| rename_table(from, "counters", to, table::SEQUENCES)),
    ("dedup.redb", |from, to| {
        rename_table(from, "records", to, table::DEDUP_RECORDS)?;
        rename_table(from, "expiry", to, table::DEDUP_EXPIRY)
    }),
    ("bus.redb", |from, to| {
        rename_table(from, "records", to, table::BUS_RECORDS)?;
        rename_table(from, "heads", to, table::BUS_HEADS)?;
        rename_table(from, "group_offsets", to, table::BUS_GROUP_OFFSETS)
    }),
    ("offline.redb", |from, to| {
        rename_table(from, "entries", to, table::OFFLINE_ENTRIES)?;
        rename_table(from, "counts", to, table::OFFLINE_COUNTS)?;
        rename_table(from, "tombstones", to, table::OFFLINE_TOMBSTONES)?;
        rename_table(from, "tombstone_expiry", to, table::OFFLINE_TOMBSTONE_EXPIRY)
    }),
    ("history.redb", |from, to| rename_table(from, "messages", to, table::HISTORY)),
];

/// Gathers the per-store files in `dir` into a new `messages.redb` at
/// `target`, then retires each old file. Does nothing when `target` exists
/// or no old file does.
fn migrate_legacy_files(dir: &Path, target: &Path) -> StoreResult<Vec<String>> {
    if target.exists() {
        return Ok(Vec::new());
    }
    let present: Vec<(&str, LegacyCopy)> =
        LEGACY_FILES.iter().copied().filter(|(file, _)| dir.join(file).exists()).collect();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    let staging = target.with_extension("redb.migrating");
    if staging.exists() {
        std::fs::remove_file(&staging).map_err(|e| unavailable("removing an unfinished migration", &e))?;
    }
    let new_db = redb::Database::create(&staging).map_err(|e| unavailable("creating messages.redb", &e))?;
    let txn = new_db.begin_write().map_err(redb_err)?;
    for (file, copy_tables) in &present {
        let old =
            redb::Database::open(dir.join(file)).map_err(|e| unavailable(&format!("opening {file}"), &e))?;
        let read = old.begin_read().map_err(redb_err)?;
        copy_tables(&read, &txn)?;
    }
    txn.commit().map_err(redb_err)?;
    drop(new_db);
    std::fs::rename(&staging, target).map_err(|e| unavailable("installing messages.redb", &e))?;
    for (file, _) in &present {
        retire(&dir.join(file))?;
    }
    Ok(present.iter().map(|(file, _)| (*file).to_owned()).collect())
}

/// Copies table `old_name` of `from` into `definition` of `to` (same key and
/// value types, new name).
fn rename_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    old_name: &'static str,
    to: &WriteTransaction,
    definition: TableDefinition<K, V>,
) -> StoreResult<()> {
    let source = match from.open_table(TableDefinition::<K, V>::new(old_name)) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(redb_err(e)),
    };
    let mut target = to.open_table(definition).map_err(redb_err)?;
    let mut rows = 0u64;
    for entry in source.iter().map_err(redb_err)? {
        let (k, v) = entry.map_err(redb_err)?;
        target.insert(k.value(), v.value()).map_err(redb_err)?;
        rows += 1;
    }
    tracing::info!(from = old_name, to = definition.name(), rows, "migrated into messages.redb");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use redb::{Database, TableDefinition};

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
    async fn directories_of_both_redb_layouts_are_migrated_into_the_message_database() {
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
        let pulled = b.offline.pull("bob/phone", 0, 10).await.expect("pull");
        assert_eq!(pulled.iter().map(|e| e.msg_id).collect::<Vec<_>>(), vec![42]);
        assert_eq!(b.history.page("g1", 0, 10).await.expect("page"), vec![(42, Bytes::from_static(b"h42"))]);
        drop(consumer);
        drop(b);

        for file in super::LEGACY_FILES.iter().map(|(file, _)| *file).chain(["messages.redb"]) {
            assert!(!d.join(file).exists(), "{file} was retired");
            assert!(d.join(format!("{file}.migrated")).exists(), "{file} was kept aside");
        }
        assert!(d.join("messages").is_dir());
        // Reopening uses the message database and does not migrate again.
        let b = EmbeddedBackends::open(d).expect("reopen");
        assert_eq!(b.sequences.current("p:alice:bob").await.expect("current"), 8);
    }
}
