//! The message database: the one store of the message path (sequences,
//! dedup records, the bus, offline sets, group history), a log-structured
//! merge tree (fjall) in the directory `messages/`, with one writer thread
//! that group-commits.
//!
//! Why one database: every accepted message is written by several stores
//! (sequence, dedup reservation, bus record, each receiver's offline entry,
//! later the receiver's ACK). Sharing one journal lets one `fdatasync` cover
//! all of them, and lets a caller write to several stores atomically
//! ([`super::EmbeddedMessageLog`]).
//!
//! Why a log-structured tree and not a B-tree: nearly every key the message
//! path writes is a different one (a sender's dedup record, each receiver's
//! entry, then its tombstone), and most of them are deleted again within
//! seconds. The copy-on-write B-tree used before (redb) rewrote and synced
//! a 4 KiB page for almost every key of a commit: at 12,000 messages/s its
//! writer thread took a whole core, half of it copying pages and writing
//! them out. Here a commit appends the batches to the journal and syncs
//! that once; the sorted tables are written later, in the background, and
//! entries inserted and deleted between two flushes cost only memory.
//!
//! Writes go through [`MessageDb::write`]: the writer thread takes every
//! queued operation, runs each (an operation that fails contributes no
//! change and does not fail the others), writes all their changes as one
//! atomic batch, syncs the journal once and only then answers the callers.
//! An operation therefore never returns `Ok` before it is durable.
//!
//! Reads run on the caller's thread against the live tables, which hold a
//! commit's batch from just before its journal is synced. That is harmless for everything but the bus: a consumer must
//! not act on a record that a crash could still take back, so consumers read
//! only up to the head published after the sync (see [`super::bus`]).
//!
//! The user and group metadata (`meta.redb`) stays apart: it is written at
//! sign-up and login, not per message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use tokio::sync::{mpsc, oneshot};

use super::keys::{read_u64s, u64s};
use super::writer::now_ms;
use crate::{StoreError, StoreResult};

/// Operations waiting for the writer. The queue is bounded; when it is full
/// callers wait, which pushes back on whoever produces the load instead of
/// growing memory without limit.
const QUEUE_CAPACITY: usize = 16 * 1024;

/// Upper bound on operations in one commit, so one commit (and the latency
/// of the first caller in it) stays bounded under overload.
const MAX_BATCH: usize = 8 * 1024;

/// How often, at most, expiry of old records runs while writes arrive; when
/// a run reports a backlog, the next commit runs it again.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Block cache of the sorted tables.
const CACHE_BYTES: u64 = 128 * 1024 * 1024;
/// Per keyspace: a full memtable is flushed to a sorted table. Every write
/// and read searches the memtable's skip list, which grows slower as it
/// fills (32 MiB ones made a server that had been overloaded once stay
/// slow); each flush also rotates the journal, which stalls the writer for
/// a moment (smaller ones stalled it too often). 8 MiB measured best in S3.
const MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Journal kept before the memtables it covers are flushed (this also
/// bounds the memory of unflushed writes).
const JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// A keyspace's number (`Keyspace::id`; fjall does not export the type).
type InternalKeyspaceId = u64;

/// Maps a fjall error to a [`StoreError`].
pub(crate) fn db_err(e: fjall::Error) -> StoreError {
    StoreError::Backend(format!("message database: {e}"))
}

/// The keyspaces (tables) of the message database. See each store's module
/// for its keys and values.
pub(crate) struct Keyspaces {
    pub(crate) sequences: Keyspace,
    pub(crate) dedup_records: Keyspace,
    pub(crate) dedup_expiry: Keyspace,
    pub(crate) bus_records: Keyspace,
    pub(crate) bus_heads: Keyspace,
    pub(crate) bus_group_offsets: Keyspace,
    pub(crate) offline_entries: Keyspace,
    pub(crate) offline_counts: Keyspace,
    pub(crate) offline_tombstones: Keyspace,
    pub(crate) offline_tombstone_expiry: Keyspace,
    pub(crate) history: Keyspace,
    /// Expiry times below which every entry of `dedup_expiry` resp.
    /// `offline_tombstone_expiry` was dropped (by this process). Expiry
    /// scans start there instead of at 0: dropped entries stay behind as
    /// deletion markers until compaction removes them, and stepping over
    /// them at every run would cost more and more.
    pub(crate) dedup_expired_below: AtomicU64,
    pub(crate) tombstones_expired_below: AtomicU64,
}

impl Keyspaces {
    fn open(db: &Database) -> StoreResult<Self> {
        let open = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(MEMTABLE_BYTES)
                    .manual_journal_persist(true)
            })
            .map_err(db_err)
        };
        Ok(Self {
            sequences: open("sequences")?,
            dedup_records: open("dedup_records")?,
            dedup_expiry: open("dedup_expiry")?,
            bus_records: open("bus_records")?,
            bus_heads: open("bus_heads")?,
            bus_group_offsets: open("bus_group_offsets")?,
            offline_entries: open("offline_entries")?,
            offline_counts: open("offline_counts")?,
            offline_tombstones: open("offline_tombstones")?,
            offline_tombstone_expiry: open("offline_tombstone_expiry")?,
            history: open("history")?,
            dedup_expired_below: AtomicU64::new(0),
            tombstones_expired_below: AtomicU64::new(0),
        })
    }
}

/// The keyspaces that hold one integer per key and are read and written by
/// nearly every operation (a conversation's sequence, a topic's head, a
/// group's offset, a receiver's count). Each update of a key adds a version
/// to its memtable, so a lookup there walks a skip list of many thousands
/// of versions of a few keys; the writer keeps their current values in
/// memory instead (it is their only writer, so the copy cannot go stale).
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    Sequences,
    BusHeads,
    BusGroupOffsets,
    OfflineCounts,
}

impl Counter {
    const ALL: usize = 4;

    fn keyspace(self, ks: &Keyspaces) -> &Keyspace {
        match self {
            Self::Sequences => &ks.sequences,
            Self::BusHeads => &ks.bus_heads,
            Self::BusGroupOffsets => &ks.bus_group_offsets,
            Self::OfflineCounts => &ks.offline_counts,
        }
    }
}

/// The writer's copy of the [`Counter`] keyspaces: key → value (`None`: no
/// such key). Each map is emptied when it reaches [`COUNTER_CACHE_KEYS`]
/// (a lookup after that reads the keyspace again).
#[derive(Default)]
struct CounterCache([HashMap<Vec<u8>, Option<u64>>; Counter::ALL]);

/// Keys kept per [`Counter`] keyspace.
const COUNTER_CACHE_KEYS: usize = 64 * 1024;

impl CounterCache {
    fn apply(&mut self, changes: Vec<(Counter, Vec<u8>, Option<u64>)>) {
        for (counter, key, value) in changes {
            let map = &mut self.0[counter as usize];
            if map.len() >= COUNTER_CACHE_KEYS && !map.contains_key(&key) {
                map.clear();
            }
            map.insert(key, value);
        }
    }
}

/// The changes of the operations applied so far in one commit: they are
/// written together, as one batch, when the commit ends.
#[derive(Default)]
struct PendingWrites {
    /// In order, for the batch.
    writes: Vec<(Keyspace, Slice, Option<Slice>)>,
    /// The newest value of each key written (`None`: removed), so later
    /// operations of the commit read them.
    latest: HashMap<(InternalKeyspaceId, Slice), Option<Slice>>,
}

/// What one write operation sees: the tables with every earlier operation
/// of the commit applied, and where its own changes go.
///
/// Its changes join the commit when the operation returns `Ok` and are
/// dropped when it fails, so [`Writes::get`] does not see the operation's
/// own writes: an operation reads each key once, before writing it.
/// Counters ([`Writes::counter`]) do see them.
pub(crate) struct Writes<'a> {
    pub(crate) ks: &'a Keyspaces,
    pending: &'a PendingWrites,
    cache: &'a CounterCache,
    writes: Vec<(Keyspace, Slice, Option<Slice>)>,
    /// Counter values read or written by this operation, for the cache
    /// once the operation succeeded (newest last).
    counters: Vec<(Counter, Vec<u8>, Option<u64>)>,
}

impl Writes<'_> {
    pub(crate) fn get(&self, keyspace: &Keyspace, key: &[u8]) -> StoreResult<Option<Slice>> {
        if let Some(value) = self.pending.latest.get(&(keyspace.id(), Slice::from(key))) {
            return Ok(value.clone());
        }
        keyspace.get(key).map_err(db_err)
    }

    pub(crate) fn insert(&mut self, keyspace: &Keyspace, key: impl Into<Slice>, value: impl Into<Slice>) {
        self.writes.push((keyspace.clone(), key.into(), Some(value.into())));
    }

    pub(crate) fn remove(&mut self, keyspace: &Keyspace, key: impl Into<Slice>) {
        self.writes.push((keyspace.clone(), key.into(), None));
    }

    /// The current value of a counter (`None` if it has no key).
    pub(crate) fn counter(&mut self, counter: Counter, key: &[u8]) -> StoreResult<Option<u64>> {
        let own = self.counters.iter().rev().find(|(c, k, _)| *c as usize == counter as usize && k == key);
        if let Some((_, _, value)) = own {
            return Ok(*value);
        }
        if let Some(value) = self.cache.0[counter as usize].get(key) {
            return Ok(*value);
        }
        let value = match counter.keyspace(self.ks).get(key).map_err(db_err)? {
            Some(v) => Some(read_u64s::<1>(&v)?[0]),
            None => None,
        };
        self.counters.push((counter, key.to_vec(), value));
        Ok(value)
    }

    /// Sets a counter (`None` deletes its key).
    pub(crate) fn set_counter(&mut self, counter: Counter, key: &[u8], value: Option<u64>) {
        let keyspace = counter.keyspace(self.ks).clone();
        self.writes.push((keyspace, Slice::from(key), value.map(|v| Slice::from(u64s([v])))));
        self.counters.push((counter, key.to_vec(), value));
    }
}

/// A queued write operation, type-erased over its result.
trait Job: Send {
    /// Runs the operation, collecting its changes in `w`.
    fn apply(&mut self, w: &mut Writes<'_>) -> StoreResult<()>;
    /// Answers the caller once the commit is durable (or failed).
    fn finish(self: Box<Self>, commit: Result<(), &StoreError>);
    /// Answers the caller with the error of its own operation.
    fn fail(self: Box<Self>, error: StoreError);
}

struct FnJob<F, A, T> {
    op: Option<F>,
    after_commit: A,
    result: Option<T>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<F, A, T> Job for FnJob<F, A, T>
where
    F: FnOnce(&mut Writes<'_>) -> StoreResult<T> + Send,
    A: FnOnce(&T) + Send,
    T: Send,
{
    fn apply(&mut self, w: &mut Writes<'_>) -> StoreResult<()> {
        let op = self.op.take().ok_or_else(|| StoreError::Backend("write operation applied twice".into()))?;
        self.result = Some(op(w)?);
        Ok(())
    }

    fn finish(self: Box<Self>, commit: Result<(), &StoreError>) {
        let answer = match (commit, self.result) {
            (Ok(()), Some(value)) => {
                (self.after_commit)(&value);
                Ok(value)
            }
            (Ok(()), None) => Err(StoreError::Backend("write operation was not applied".into())),
            (Err(e), _) => Err(StoreError::Backend(format!("commit failed: {e}"))),
        };
        // The caller may have gone away (cancelled future); nothing to do then.
        let _ = self.reply.send(answer);
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

/// Expiry of dedup records and offline tombstones, run as a job nobody
/// waits for.
struct MaintenanceJob {
    /// Set when the run left work for the next one.
    backlog: Arc<AtomicBool>,
}

impl Job for MaintenanceJob {
    fn apply(&mut self, w: &mut Writes<'_>) -> StoreResult<()> {
        let now = now_ms();
        let dedup_backlog = super::dedup::expire(w, now)?;
        let offline_backlog = super::offline::expire(w, now)?;
        self.backlog.store(dedup_backlog || offline_backlog, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self: Box<Self>, commit: Result<(), &StoreError>) {
        if let Err(e) = commit {
            tracing::warn!(error = %e, "message database: maintenance commit failed");
        }
    }

    fn fail(self: Box<Self>, error: StoreError) {
        tracing::warn!(error = %error, "message database: maintenance failed");
    }
}

/// The message database and its writer thread. Dropping it stops the writer
/// (after the queued operations), waits for it and syncs the journal.
pub(crate) struct MessageDb {
    ks: Arc<Keyspaces>,
    queue: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// The shared handle every message-path store holds.
pub(crate) type SharedMessageDb = Arc<MessageDb>;

/// Opens (creating if needed) the message database in the directory `path`
/// and starts its writer. Blocking (recovery replays the journal).
pub(crate) fn open(path: &Path) -> StoreResult<SharedMessageDb> {
    Ok(Arc::new(MessageDb::open(path)?))
}

/// How much lower than the process the database's background threads run
/// (nice value). Flushes and compactions can wait; the writer thread and
/// the request path cannot: on a small machine, a compaction that takes the
/// writer's core stalls every message behind it.
const BACKGROUND_NICENESS: i32 = 5;

/// Opens the fjall database in `path` with tern's settings. The database's
/// background threads are started by the opening thread and inherit its
/// priority, so it is opened from a short-lived thread of lower priority.
pub(crate) fn open_database(path: &Path) -> StoreResult<(Database, Keyspaces)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Linux: the calling thread only. A failure (not permitted
                // here) leaves the normal priority, which is only slower.
                if let Ok(current) = rustix::process::getpriority_process(None) {
                    let _ = rustix::process::setpriority_process(None, current + BACKGROUND_NICENESS);
                }
                open_database_here(path)
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Unavailable("opening the message database panicked".into())))
    })
}

fn open_database_here(path: &Path) -> StoreResult<(Database, Keyspaces)> {
    let db = Database::builder(path)
        .cache_size(CACHE_BYTES)
        .max_journaling_size(JOURNAL_BYTES)
        // The writer syncs once per commit; batches only fill the buffer.
        .manual_journal_persist(true)
        .open()
        .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", path.display())))?;
    let ks = Keyspaces::open(&db)?;
    Ok((db, ks))
}

impl MessageDb {
    fn open(path: &Path) -> StoreResult<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", parent.display())))?;
        }
        let (db, ks) = open_database(path)?;
        let ks = Arc::new(ks);
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer_ks = ks.clone();
        let thread = std::thread::Builder::new()
            .name("tern-messages".into())
            .spawn(move || writer_loop(&db, &writer_ks, rx))
            .map_err(|e| StoreError::Unavailable(format!("spawning the writer thread: {e}")))?;
        Ok(Self { ks, queue: Some(tx), thread: Some(thread), path: path.to_owned() })
    }

    /// Runs `op` in the next commit and returns its result once the commit
    /// is durable.
    pub(crate) async fn write<T, F>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writes<'_>) -> StoreResult<T> + Send + 'static,
    {
        self.write_then(op, |_: &T| {}).await
    }

    /// Like [`MessageDb::write`], and runs `after_commit` with the result on
    /// the writer thread right after the sync, before answering. Unlike code
    /// after the `.await`, it runs even if the caller's future is dropped
    /// meanwhile (used to wake bus consumers for every durable record).
    pub(crate) async fn write_then<T, F, A>(&self, op: F, after_commit: A) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writes<'_>) -> StoreResult<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let queue = self.queue.as_ref().ok_or_else(|| self.closed())?;
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(FnJob { op: Some(op), after_commit, result: None, reply });
        queue.send(job).await.map_err(|_| self.closed())?;
        answer.await.map_err(|_| self.closed())?
    }

    /// The tables, for reads on the calling thread (see the module docs for
    /// what a read may see).
    pub(crate) fn tables(&self) -> &Keyspaces {
        &self.ks
    }

    fn closed(&self) -> StoreError {
        StoreError::Unavailable(format!("{} writer stopped", self.path.display()))
    }
}

impl Drop for MessageDb {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        self.queue = None;
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
            && thread.join().is_err()
        {
            tracing::error!("message database writer thread panicked");
        }
    }
}

fn writer_loop(db: &Database, ks: &Keyspaces, mut rx: mpsc::Receiver<Box<dyn Job>>) {
    let mut last_maintenance = Instant::now();
    let backlog = Arc::new(AtomicBool::new(false));
    let mut jobs: Vec<Box<dyn Job>> = Vec::new();
    let mut cache = CounterCache::default();
    // Sleeps until one operation is queued, then takes everything else
    // already waiting: that is the group commit.
    while let Some(first) = rx.blocking_recv() {
        if backlog.load(Ordering::Relaxed) || last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
            last_maintenance = Instant::now();
            backlog.store(false, Ordering::Relaxed);
            jobs.push(Box::new(MaintenanceJob { backlog: backlog.clone() }));
        }
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit(db, ks, &mut cache, std::mem::take(&mut jobs));
    }
    if let Err(e) = db.persist(PersistMode::SyncAll) {
        tracing::warn!(error = %e, "message database: final sync failed");
    }
}

/// Applies the jobs, writes all their changes as one batch, syncs the
/// journal once, then answers. A job that fails contributes nothing.
///
/// One batch per commit rather than per job: each batch pays for the
/// journal lock, a sequence number and a check of every keyspace it
/// touches, which at tens of thousands of operations per second cost the
/// writer thread a measurable share of its time.
fn commit(db: &Database, ks: &Keyspaces, cache: &mut CounterCache, jobs: Vec<Box<dyn Job>>) {
    let mut applied = Vec::with_capacity(jobs.len());
    let mut pending = PendingWrites::default();
    for mut job in jobs {
        let mut w = Writes { ks, pending: &pending, cache, writes: Vec::new(), counters: Vec::new() };
        let result = job.apply(&mut w);
        let (writes, counters) = (std::mem::take(&mut w.writes), std::mem::take(&mut w.counters));
        match result {
            Ok(()) => {
                for (keyspace, key, value) in &writes {
                    pending.latest.insert((keyspace.id(), key.clone()), value.clone());
                }
                pending.writes.extend(writes);
                cache.apply(counters);
                applied.push(job);
            }
            Err(e) => job.fail(e),
        }
    }
    if applied.is_empty() {
        return;
    }
    let mut batch = db.batch();
    for (keyspace, key, value) in pending.writes {
        match value {
            Some(value) => batch.insert(&keyspace, key, value),
            None => batch.remove(&keyspace, key),
        }
    }
    match batch.commit().and_then(|()| db.persist(PersistMode::SyncData)) {
        Ok(()) => applied.into_iter().for_each(|job| job.finish(Ok(()))),
        Err(e) => {
            // The cache holds values that may never have been written.
            *cache = CounterCache::default();
            let error = db_err(e);
            tracing::warn!(error = %error, "message database: commit failed");
            applied.into_iter().for_each(|job| job.finish(Err(&error)));
        }
    }
}
