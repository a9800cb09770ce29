//! Accepted client message ids, in `messages.redb`: a log on disk and its
//! index in memory.
//!
//! Why not a table keyed by (sender, client message id): client message ids
//! are random, so in a copy-on-write B-tree every accepted message dirtied
//! a leaf page (and its branch path) of its own. At 56,000 msgs/s that
//! table was half of the bytes the server wrote (127 MB/s, about 2.3 KB
//! per message, 78 pages per group commit) and the writer thread was busy
//! 90% of the time. Records are appended instead, in write order, to
//! `dedup_log` (position → (expires_at_ms, msg_id, seq, sent_at_ms,
//! sender, client_msg_id)), so a commit dirties the log's last leaf or
//! two; and [`DedupIndex`] maps a 64-bit fingerprint of (sender, client
//! message id) to the positions holding it, in memory, rebuilt from the log
//! when the database opens.
//!
//! - A lookup that finds no fingerprint (the common case: a new message)
//!   needs no read transaction at all; a lookup that finds one reads the
//!   row and compares sender and client id, so a fingerprint collision
//!   costs a read, never a wrong answer.
//! - The index changes only after the commit that wrote the rows (see
//!   [`super::writer::Schema::Staged`]), so it never points a retry at a
//!   record that was rolled back.
//! - Rows expire in log order: the maintenance drops expired rows from the
//!   front and stops at the first live one. With one TTL (the dispatcher's)
//!   that is expiry order; a row written with a shorter TTL than the rows
//!   before it stays on disk until they expire, and reads ignore it.
//! - A record written again (a renewal) gets a new row; the older row stays
//!   until it expires, and a lookup answers from the newest live row.
//! - Memory: one (fingerprint, position) slot of 16 bytes plus a control
//!   byte per record, in a table kept between 44% and 88% full: 19 to 39
//!   bytes per record alive within the TTL (24 h by default, the
//!   dispatcher's `dedup_ttl_secs`).
//! - Start: the database's first transaction reads the whole log to build
//!   the index, about 2.5 s per 10 million records on the 2-core machine
//!   of BENCHMARKS.md (log in the OS cache; 5 s before the rows were
//!   grouped by part first), so a day at 1,000 msgs/s takes about 20 s.
//!
//! Earlier versions kept `dedup_records` ((sender, client_msg_id) →
//! (msg_id, seq, sent_at_ms, expires_at_ms)) with the expiry indexes
//! `dedup_expiry` and `dedup_expiry_batches`; opening such a database moves
//! the live records into the log and deletes those tables.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, TableHandle, WriteTransaction};

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::{db_err, expiry_ms, now_ms};
use crate::{DedupRecord, DedupStore, StoreResult};

/// (expires_at_ms, msg_id, seq, sent_at_ms, sender, client_msg_id).
type LogRow = (u64, u64, u64, u64, &'static str, &'static str);

const LOG: TableDefinition<u64, LogRow> = TableDefinition::new("dedup_log");

/// The record table of earlier versions (also what the one-file-per-store
/// layout is copied into before the move to the log).
pub(crate) const RECORDS: TableDefinition<(&str, &str), (u64, u64, u64, u64)> =
    TableDefinition::new("dedup_records");
/// The per-record expiry index of earlier versions.
pub(crate) const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("dedup_expiry");
/// The per-write expiry index of earlier versions.
const EXPIRY_BATCHES: TableDefinition<(u64, u64), Vec<(&str, &str)>> =
    TableDefinition::new("dedup_expiry_batches");

/// Expired rows dropped per maintenance run, so one run adds little latency
/// to the writes it shares a transaction with (the writer runs it again at
/// once while a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

/// A record to store: sender, client message id, the ids it reserves, and
/// when it expires (ms since the epoch).
pub(crate) type DedupPut<'a> = (&'a str, &'a str, DedupRecord, u64);

/// A hasher for keys that already are uniform 64-bit hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are u64); kept correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type FingerprintMap<V> = HashMap<u64, V, BuildHasherDefault<Prehashed>>;

/// Fingerprint → log positions. Nearly every fingerprint has one position,
/// kept in `first`; a renewal or a collision adds more, kept in `more`.
#[derive(Default)]
struct Positions {
    first: FingerprintMap<u64>,
    more: FingerprintMap<Vec<u64>>,
}

impl Positions {
    fn add(&mut self, fingerprint: u64, position: u64) {
        if let Some(&existing) = self.first.get(&fingerprint) {
            if existing != position {
                self.more.entry(fingerprint).or_default().push(position);
            }
        } else {
            self.first.insert(fingerprint, position);
        }
    }

    fn remove(&mut self, fingerprint: u64, position: u64) {
        if self.first.get(&fingerprint) == Some(&position) {
            match self.more.get_mut(&fingerprint).and_then(Vec::pop) {
                Some(next) => {
                    self.first.insert(fingerprint, next);
                }
                None => {
                    self.first.remove(&fingerprint);
                }
            }
        } else if let Some(others) = self.more.get_mut(&fingerprint) {
            others.retain(|&p| p != position);
        } else {
            return;
        }
        if self.more.get(&fingerprint).is_some_and(Vec::is_empty) {
            self.more.remove(&fingerprint);
        }
    }

    /// The positions holding `fingerprint`, newest (highest) first.
    fn of(&self, fingerprint: u64) -> Vec<u64> {
        let mut positions: Vec<u64> = self.first.get(&fingerprint).copied().into_iter().collect();
        if let Some(others) = self.more.get(&fingerprint) {
            positions.extend(others);
        }
        positions.sort_unstable_by(|a, b| b.cmp(a));
        positions
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

/// How many parts the index is split into (by fingerprint). A hash table
/// grows by moving every entry into one twice as large while its lock is
/// held: one table of 4 million records would stall every lookup and the
/// writer for tens of milliseconds, and one of 80 million (a day at 1,000
/// msgs/s) for about a second. A part grows on its own, 1/256 of that.
const SHARDS: usize = 256;

/// The in-memory index of `dedup_log` (the message database's state).
pub(crate) struct DedupIndex {
    /// Keyed per process: the index is rebuilt at every start, and a key
    /// nobody outside knows keeps senders from choosing colliding ids.
    fingerprints: RandomState,
    /// The next log position to assign; positions are never reused.
    next_position: AtomicU64,
    shards: Box<[RwLock<Positions>]>,
}

/// A committed transaction's changes to the index.
pub(crate) enum IndexChange {
    Added { fingerprint: u64, position: u64 },
    Dropped { fingerprint: u64, position: u64 },
}

impl DedupIndex {
    fn fingerprint(&self, sender: &str, client_msg_id: &str) -> u64 {
        self.fingerprints.hash_one((sender, client_msg_id))
    }

    fn new(next_position: u64) -> Self {
        Self {
            fingerprints: RandomState::new(),
            next_position: AtomicU64::new(next_position),
            shards: (0..SHARDS).map(|_| RwLock::new(Positions::default())).collect(),
        }
    }

    /// The part holding `fingerprint`. Chosen by middle bits: the tables
    /// use the low bits for the bucket and the top seven as a tag, which
    /// must stay varied within a part.
    fn shard(&self, fingerprint: u64) -> &RwLock<Positions> {
        &self.shards[Self::shard_of(fingerprint)]
    }

    fn shard_of(fingerprint: u64) -> usize {
        (fingerprint >> 32) as usize % SHARDS
    }

    fn add(&self, fingerprint: u64, position: u64) {
        self.shard(fingerprint).write().unwrap_or_else(PoisonError::into_inner).add(fingerprint, position);
    }

    /// Applies a committed transaction's changes, in order.
    pub(crate) fn publish(&self, changes: Vec<IndexChange>) {
        for change in changes {
            match change {
                IndexChange::Added { fingerprint, position } => self.add(fingerprint, position),
                IndexChange::Dropped { fingerprint, position } => self
                    .shard(fingerprint)
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(fingerprint, position),
            }
        }
    }

    /// The positions that may hold each id's record, newest first.
    fn candidates(&self, sender: &str, client_msg_ids: &[&str]) -> Vec<Vec<u64>> {
        client_msg_ids
            .iter()
            .map(|id| {
                let fingerprint = self.fingerprint(sender, id);
                self.shard(fingerprint).read().unwrap_or_else(PoisonError::into_inner).of(fingerprint)
            })
            .collect()
    }

    /// Records in the index (a position each).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }
}

/// Moves the record table of an earlier version into the log (live records
/// only, in expiry order) and deletes it and its expiry indexes, then builds
/// the index from the log. Runs in the database's first write transaction.
pub(crate) fn recover(txn: &WriteTransaction) -> StoreResult<DedupIndex> {
    let mut log = txn.open_table(LOG).map_err(db_err)?;
    let mut next_position = log.last().map_err(db_err)?.map_or(0, |(k, _)| k.value() + 1);
    let now = now_ms();
    // Looked for by name: opening a table in a write transaction creates it.
    let has_records = txn.list_tables().map_err(db_err)?.any(|table| table.name() == RECORDS.name());
    if has_records {
        let records = txn.open_table(RECORDS).map_err(db_err)?;
        let mut live = Vec::new();
        for entry in records.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let ((sender, client), (msg_id, seq, sent_at_ms, expires_at)) = (k.value(), v.value());
            if expires_at > now {
                live.push((expires_at, msg_id, seq, sent_at_ms, sender.to_owned(), client.to_owned()));
            }
        }
        live.sort_unstable();
        for (expires_at, msg_id, seq, sent_at_ms, sender, client) in &live {
            let row = (*expires_at, *msg_id, *seq, *sent_at_ms, sender.as_str(), client.as_str());
            log.insert(next_position, row).map_err(db_err)?;
            next_position += 1;
        }
        if records.len().map_err(db_err)? > 0 {
            tracing::info!(records = live.len(), "moved the dedup records into the dedup log");
        }
    }
    txn.delete_table(RECORDS).map_err(db_err)?;
    txn.delete_table(EXPIRY).map_err(db_err)?;
    txn.delete_table(EXPIRY_BATCHES).map_err(db_err)?;

    let started = std::time::Instant::now();
    let mut index = DedupIndex::new(next_position);
    // Rows are first sorted out by part and each part is then built at its
    // final size: filling the parts row by row, in log order, would jump
    // between 256 growing tables (a cache miss per row, and every table
    // rehashed as it doubles). Tens of millions of rows (a day of traffic)
    // are normal here, and the server does not serve before this is done.
    let mut by_shard: Vec<Vec<(u64, u64)>> = vec![Vec::new(); SHARDS];
    for entry in log.iter().map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (expires_at, _, _, _, sender, client) = v.value();
        if expires_at > now {
            let fingerprint = index.fingerprint(sender, client);
            by_shard[DedupIndex::shard_of(fingerprint)].push((fingerprint, k.value()));
        }
    }
    let mut records = 0;
    for (shard, rows) in index.shards.iter_mut().zip(by_shard) {
        let positions = shard.get_mut().unwrap_or_else(PoisonError::into_inner);
        positions.first.reserve(rows.len());
        records += rows.len();
        for (fingerprint, position) in rows {
            positions.add(fingerprint, position);
        }
    }
    if records > 0 {
        tracing::info!(
            records,
            elapsed_ms = started.elapsed().as_millis(),
            "dedup index rebuilt from the log"
        );
    }
    Ok(index)
}

pub(crate) struct DedupTables<'t> {
    log: Table<'t, u64, LogRow>,
    index: &'t DedupIndex,
    /// Changes to the index, published if the transaction commits.
    staged: Vec<IndexChange>,
}

impl<'t> DedupTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction, index: &'t DedupIndex) -> StoreResult<Self> {
        Ok(Self { log: txn.open_table(LOG).map_err(db_err)?, index, staged: Vec::new() })
    }

    /// The index changes of the transaction so far.
    pub(crate) fn into_staged(self) -> Vec<IndexChange> {
        self.staged
    }

    /// Appends each record to the log.
    pub(crate) fn put_all<'a>(&mut self, records: impl IntoIterator<Item = DedupPut<'a>>) -> StoreResult<()> {
        for (sender, client_msg_id, record, expires_at) in records {
            // A position taken by an attempt that is rolled back is skipped.
            let position = self.index.next_position.fetch_add(1, Ordering::Relaxed);
            let row = (expires_at, record.msg_id, record.seq, record.sent_at_ms, sender, client_msg_id);
            self.log.insert(position, row).map_err(db_err)?;
            let fingerprint = self.index.fingerprint(sender, client_msg_id);
            self.staged.push(IndexChange::Added { fingerprint, position });
        }
        Ok(())
    }

    /// Drops up to [`EXPIRE_BATCH`] expired rows from the front of the log;
    /// returns whether more may be left (run by the writer's maintenance).
    pub(crate) fn expire(&mut self, now_ms: u64) -> StoreResult<bool> {
        let mut expired = Vec::new();
        for entry in self.log.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (expires_at, _, _, _, sender, client) = v.value();
            if expires_at > now_ms || expired.len() == EXPIRE_BATCH {
                break;
            }
            expired.push((k.value(), self.index.fingerprint(sender, client)));
        }
        for &(position, fingerprint) in &expired {
            self.log.remove(position).map_err(db_err)?;
            self.staged.push(IndexChange::Dropped { fingerprint, position });
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

    /// Asks the index; reads the log (one read transaction for all of them)
    /// only for ids whose fingerprint it holds.
    async fn get_many(&self, sender: &str, client_msg_ids: &[&str]) -> StoreResult<Vec<Option<DedupRecord>>> {
        let candidates = self.store.state().candidates(sender, client_msg_ids);
        if candidates.iter().all(Vec::is_empty) {
            return Ok(vec![None; client_msg_ids.len()]);
        }
        // Owned only now: most bursts (all new ids) never get here.
        let clients: Vec<String> = client_msg_ids.iter().map(|&c| c.to_owned()).collect();
        let sender = sender.to_owned();
        self.store
            .read(move |txn| {
                let log = txn.open_table(LOG).map_err(db_err)?;
                let now = now_ms();
                let mut records = Vec::with_capacity(clients.len());
                for (client, positions) in clients.iter().zip(candidates) {
                    let mut found = None;
                    for position in positions {
                        let Some(row) = log.get(position).map_err(db_err)? else { continue };
                        let (expires_at, msg_id, seq, sent_at_ms, row_sender, row_client) = row.value();
                        if row_sender == sender && row_client == client && expires_at > now {
                            found = Some(DedupRecord { msg_id, seq, sent_at_ms });
                            break;
                        }
                    }
                    records.push(found);
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
    use redb::{Database, ReadableDatabase, TableHandle};

    use super::*;
    use crate::StoreError;

    fn record(msg_id: u64) -> DedupRecord {
        DedupRecord { msg_id, seq: msg_id, sent_at_ms: 1 }
    }

    /// An in-memory database with the dedup tables and their index.
    fn database() -> (Database, DedupIndex) {
        let db = Database::builder().create_with_backend(InMemoryBackend::new()).expect("in-memory database");
        let txn = db.begin_write().expect("begin");
        let index = recover(&txn).expect("recover");
        txn.commit().expect("commit");
        (db, index)
    }

    /// Runs `f` on the tables in one write transaction, commits it and
    /// publishes its index changes, as the writer does.
    fn write<T>(
        db: &Database,
        index: &DedupIndex,
        f: impl FnOnce(&mut DedupTables<'_>) -> StoreResult<T>,
    ) -> T {
        let txn = db.begin_write().expect("begin");
        let (out, staged) = {
            let mut tables = DedupTables::open(&txn, index).expect("open");
            let out = f(&mut tables).expect("write");
            (out, tables.into_staged())
        };
        txn.commit().expect("commit");
        index.publish(staged);
        out
    }

    /// What a lookup at `now` answers (the index, then the log's row).
    fn lookup(
        db: &Database,
        index: &DedupIndex,
        sender: &str,
        client: &str,
        now: u64,
    ) -> Option<DedupRecord> {
        let candidates = index.candidates(sender, &[client]).pop().expect("one");
        let txn = db.begin_read().expect("read");
        let log = txn.open_table(LOG).expect("log");
        candidates.into_iter().find_map(|position| {
            let row = log.get(position).expect("get")?;
            let (expires_at, msg_id, seq, sent_at_ms, s, c) = row.value();
            (s == sender && c == client && expires_at > now).then_some(DedupRecord {
                msg_id,
                seq,
                sent_at_ms,
            })
        })
    }

    fn log_rows(db: &Database) -> u64 {
        db.begin_read().expect("read").open_table(LOG).expect("log").len().expect("len")
    }

    #[test]
    fn expiry_drops_rows_from_the_front_and_their_index_entries() {
        let (db, index) = database();
        write(&db, &index, |t| {
            t.put_all([("a", "c1", record(1), 100), ("b", "c1", record(2), 100), ("a", "c2", record(3), 200)])
        });
        assert_eq!(lookup(&db, &index, "b", "c1", 50), Some(record(2)));
        assert!(!write(&db, &index, |t| t.expire(150)), "no backlog");
        assert_eq!(log_rows(&db), 1);
        assert_eq!(index.len(), 1);
        assert_eq!(lookup(&db, &index, "a", "c1", 50), None, "dropped with its row");
        assert_eq!(lookup(&db, &index, "a", "c2", 150), Some(record(3)));
        write(&db, &index, |t| t.expire(201));
        assert_eq!((log_rows(&db), index.len()), (0, 0));
    }

    #[test]
    fn a_renewed_record_outlives_its_first_row() {
        let (db, index) = database();
        write(&db, &index, |t| t.put_all([("a", "c1", record(1), 100), ("a", "c2", record(2), 100)]));
        write(&db, &index, |t| t.put_all([("a", "c1", record(1), 300)]));
        write(&db, &index, |t| t.expire(150));
        assert_eq!(lookup(&db, &index, "a", "c1", 150), Some(record(1)), "renewed until 300");
        assert_eq!(lookup(&db, &index, "a", "c2", 50), None);
        write(&db, &index, |t| t.expire(301));
        assert_eq!(lookup(&db, &index, "a", "c1", 50), None);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_short_lived_row_behind_a_long_lived_one_waits_but_is_not_answered() {
        let (db, index) = database();
        write(&db, &index, |t| t.put_all([("a", "long", record(1), 1_000), ("a", "short", record(2), 100)]));
        write(&db, &index, |t| t.expire(150));
        assert_eq!(log_rows(&db), 2, "expiry stops at the first live row");
        assert_eq!(lookup(&db, &index, "a", "short", 150), None, "but a read checks the row's own expiry");
        write(&db, &index, |t| t.expire(1_001));
        assert_eq!((log_rows(&db), index.len()), (0, 0));
    }

    #[test]
    fn a_fingerprint_pointing_at_another_record_answers_nothing() {
        let (db, index) = database();
        write(&db, &index, |t| t.put_all([("b", "c2", record(9), 100)]));
        // As if ("a", "c1") had the fingerprint of ("b", "c2")'s row.
        index.publish(vec![IndexChange::Added { fingerprint: index.fingerprint("a", "c1"), position: 0 }]);
        assert_eq!(lookup(&db, &index, "a", "c1", 50), None);
        assert_eq!(lookup(&db, &index, "b", "c2", 50), Some(record(9)));
    }

    #[test]
    fn positions_keep_every_row_of_a_fingerprint() {
        let mut p = Positions::default();
        p.add(7, 1);
        p.add(7, 5);
        p.add(7, 3);
        p.add(8, 2);
        assert_eq!(p.of(7), vec![5, 3, 1], "newest first");
        p.remove(7, 1);
        assert_eq!(p.of(7), vec![5, 3]);
        p.remove(7, 5);
        p.remove(7, 9);
        assert_eq!(p.of(7), vec![3]);
        p.remove(7, 3);
        assert_eq!(p.of(7), Vec::<u64>::new());
        assert!(p.more.is_empty(), "no empty lists left behind");
        assert_eq!(p.of(8), vec![2]);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_large_backlog_is_dropped_over_several_runs() {
        let (db, index) = database();
        let names: Vec<String> = (0..EXPIRE_BATCH + 10).map(|i| format!("c{i}")).collect();
        for (n, chunk) in names.chunks(100).enumerate() {
            write(&db, &index, |t| t.put_all(chunk.iter().map(|c| ("a", c.as_str(), record(n as u64), 100))));
        }
        assert!(write(&db, &index, |t| t.expire(101)), "a backlog is left after one run");
        assert!(!write(&db, &index, |t| t.expire(101)), "the second run finishes it");
        assert_eq!((log_rows(&db), index.len()), (0, 0));
    }

    #[tokio::test]
    async fn reopening_rebuilds_the_index_and_continues_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("messages.redb");
        {
            let store = EmbeddedDedupStore::open(&path).expect("open");
            store.put("a", "c1", record(9), Duration::from_secs(600)).await.expect("put");
            store.put("a", "gone", record(2), Duration::from_millis(1)).await.expect("put");
            // Enough ids to land in many parts of the index.
            for i in 0..100 {
                store
                    .put("m", &format!("id{i}"), record(100 + i), Duration::from_secs(600))
                    .await
                    .expect("put");
            }
            // A renewal: a second row of the same id, answered from now on.
            store.put("a", "c1", record(1), Duration::from_secs(600)).await.expect("put");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let store = EmbeddedDedupStore::open(&path).expect("reopen");
        assert_eq!(
            store.store.state().len(),
            102,
            "expired rows are not indexed, both rows of a renewal are"
        );
        assert_eq!(store.get("a", "c1").await.expect("get"), Some(record(1)), "the newest row answers");
        let ids: Vec<String> = (0..100).map(|i| format!("id{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = store.get_many("m", &ids).await.expect("get_many");
        assert_eq!(found, (0..100).map(|i| Some(record(100 + i))).collect::<Vec<_>>());
        store.put("b", "c1", record(3), Duration::from_secs(600)).await.expect("put");
        assert_eq!(store.get("a", "c1").await.expect("get"), Some(record(1)), "new rows go after the old");
        assert_eq!(store.get("b", "c1").await.expect("get"), Some(record(3)));
    }

    #[tokio::test]
    async fn a_write_that_fails_leaves_the_index_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedDedupStore::open(&dir.path().join("messages.redb")).expect("open");
        let failed = store
            .store
            .write(|t: &mut MessageTables<'_>| {
                t.dedup.put_all([("a", "c1", record(1), u64::MAX)])?;
                Err::<(), _>(StoreError::Backend("refused".into()))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(store.store.state().len(), 0, "the rolled-back row was never published");
        assert_eq!(store.get("a", "c1").await.expect("get"), None);
        store.put("a", "c2", record(2), Duration::from_secs(600)).await.expect("put");
        assert_eq!(store.store.state().len(), 1);
    }

    #[tokio::test]
    async fn the_record_table_of_earlier_versions_is_moved_into_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("messages.redb");
        let far = now_ms() + 600_000;
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("begin");
            {
                let mut records = txn.open_table(RECORDS).expect("records");
                records.insert(("a", "c1"), (1, 1, 1, far)).expect("insert");
                records.insert(("a", "old"), (2, 2, 1, 5)).expect("insert");
                records.insert(("b", "c1"), (3, 3, 1, far - 1)).expect("insert");
                txn.open_table(EXPIRY).expect("expiry").insert((5, "a", "old"), ()).expect("insert");
                txn.open_table(EXPIRY_BATCHES)
                    .expect("batches")
                    .insert((far, 1), vec![("a", "c1")])
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let store = EmbeddedDedupStore::open(&path).expect("open migrates");
        assert_eq!(
            store.get("a", "c1").await.expect("get"),
            Some(DedupRecord { msg_id: 1, seq: 1, sent_at_ms: 1 })
        );
        assert_eq!(
            store.get("b", "c1").await.expect("get"),
            Some(DedupRecord { msg_id: 3, seq: 3, sent_at_ms: 1 })
        );
        assert_eq!(store.get("a", "old").await.expect("get"), None, "expired records are not moved");
        assert_eq!(store.store.state().len(), 2);
        drop(store);
        let db = Database::open(&path).expect("open");
        let txn = db.begin_read().expect("read");
        let names: Vec<String> = txn.list_tables().expect("list").map(|t| t.name().to_owned()).collect();
        for legacy in ["dedup_records", "dedup_expiry", "dedup_expiry_batches"] {
            assert!(!names.iter().any(|n| n == legacy), "{legacy} was deleted: {names:?}");
        }
        let log = txn.open_table(LOG).expect("log");
        let expiries: Vec<u64> = log.iter().expect("iter").map(|e| e.expect("row").1.value().0).collect();
        assert_eq!(expiries, vec![far - 1, far], "moved in expiry order");
    }
}
