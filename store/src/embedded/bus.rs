//! The in-process bus of a standalone process: a durable append-only log per
//! topic in `messages.redb`, consumed by named groups that commit offsets.
//!
//! Tables:
//! - `bus_records`: (topic, offset) → (key, payload); offsets start at 0;
//! - `bus_group_offsets`: (topic, group) → next offset the group has not yet
//!   committed (0 when nothing was committed, never past the topic's
//!   head). A group gets a row as soon as it subscribes, so records it has
//!   not consumed are never trimmed.
//!
//! No row holds a topic's head (the next offset to assign): it is one past
//! the topic's last record or, once every record was trimmed, the furthest
//! offset a group committed (see [`BusTables::head`]). Storing it cost each
//! group commit one more page to write and sync. Earlier versions kept it
//! in `bus_heads`, which opening such a database deletes.
//!
//! `publish` returns once its record is committed (group commit, see
//! [`super::writer`]). Each topic has a `watch` channel holding its committed
//! head, advanced on the writer thread right after each commit, so a waiting
//! consumer wakes immediately instead of polling the file.
//!
//! Records below the smallest committed offset of every group that ever
//! subscribed to a topic are deleted once the groups' commits have moved
//! their offsets by [`TRIM_EVERY_RECORDS`] in all (or on
//! [`EmbeddedBus::trim`]), so the log does not grow forever and each trim
//! deletes a bounded run of records, however often consumers commit.
//!
//! Unlike Kafka there are no partitions: every consumer of a group reads the
//! whole topic from the group's committed offset, so a group should have one
//! live consumer per topic (standalone runs one per service).

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::watch;
use tokio::time::Instant;

use super::messages::{self, MessageTables, SharedMessageDb};
use super::writer::db_err;
use crate::{Bus, BusConsumer, BusRecord, StoreError, StoreResult};

/// (topic, offset): the log of every topic, in offset order.
type RecordKey = (&'static str, u64);
/// (key, payload) of a record.
type RecordValue = (&'static [u8], &'static [u8]);

pub(crate) const RECORDS: TableDefinition<RecordKey, RecordValue> = TableDefinition::new("bus_records");
/// Where earlier versions stored each topic's head (deleted on open).
pub(crate) const HEADS: TableDefinition<&str, u64> = TableDefinition::new("bus_heads");
pub(crate) const GROUP_OFFSETS: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("bus_group_offsets");

/// A trim runs once the groups' commits have moved their offsets by this
/// many records in all (a record read by two groups counts twice): often
/// enough to keep the log short, seldom enough that no trim is large.
pub const TRIM_EVERY_RECORDS: u64 = 4096;

pub(crate) struct BusTables<'t> {
    records: Table<'t, RecordKey, RecordValue>,
    group_offsets: Table<'t, (&'static str, &'static str), u64>,
}

impl<'t> BusTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(db_err)?,
            group_offsets: txn.open_table(GROUP_OFFSETS).map_err(db_err)?,
        })
    }

    /// Appends a record to `topic` and returns its offset. Consumers learn
    /// of it through [`HeadSignal::committed`] once the transaction committed.
    pub(crate) fn append(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> StoreResult<u64> {
        let offset = self.head(topic)?;
        self.put_record(topic, offset, key, payload)?;
        Ok(offset)
    }

    /// Stores the record at `offset`. A caller storing several records
    /// reads the [`BusTables::head`] once and stores them at consecutive
    /// offsets from it, in the same transaction: each record stored moves
    /// the head past it.
    pub(crate) fn put_record(
        &mut self,
        topic: &str,
        offset: u64,
        key: &[u8],
        payload: &[u8],
    ) -> StoreResult<()> {
        self.records.insert((topic, offset), (key, payload)).map_err(db_err)?;
        Ok(())
    }

    /// The next offset to assign in `topic`: one past its last record.
    /// With no record left, the furthest offset any group committed: a
    /// trim deletes only records below every group's committed offset, and
    /// no group commits past the head, so when the trim took the last
    /// record every group stood at the head. Offsets are never reused.
    pub(crate) fn head(&self, topic: &str) -> StoreResult<u64> {
        head(&self.records, &self.group_offsets, topic)
    }

    /// [`BusTables::trim_topic`] for every topic a group subscribed to.
    fn trim_all(&mut self) -> StoreResult<u64> {
        let mut removed = 0;
        for topic in &group_topics(&self.group_offsets)? {
            removed += self.trim_topic(topic)?;
        }
        Ok(removed)
    }

    /// Deletes the records of `topic` below the smallest committed offset of
    /// its groups; returns how many were deleted.
    fn trim_topic(&mut self, topic: &str) -> StoreResult<u64> {
        let mut low: Option<u64> = None;
        for entry in self.group_offsets.range((topic, "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if k.value().0 != topic {
                break;
            }
            low = Some(low.map_or(v.value(), |l| l.min(v.value())));
        }
        let Some(low) = low.filter(|&l| l > 0) else {
            return Ok(0);
        };
        let mut removed = 0;
        self.records
            .retain_in((topic, 0)..(topic, low), |_, _| {
                removed += 1;
                false
            })
            .map_err(db_err)?;
        Ok(removed)
    }
}

/// [`BusTables::head`] on tables of any transaction.
fn head(
    records: &impl ReadableTable<RecordKey, RecordValue>,
    group_offsets: &impl ReadableTable<(&'static str, &'static str), u64>,
    topic: &str,
) -> StoreResult<u64> {
    if let Some(last) = records.range((topic, 0)..=(topic, u64::MAX)).map_err(db_err)?.next_back() {
        let (key, _) = last.map_err(db_err)?;
        return Ok(key.value().1 + 1);
    }
    let mut head = 0;
    for entry in group_offsets.range((topic, "")..).map_err(db_err)? {
        let (key, offset) = entry.map_err(db_err)?;
        if key.value().0 != topic {
            break;
        }
        head = head.max(offset.value());
    }
    Ok(head)
}

/// Every topic some group subscribed to, in order.
fn group_topics(
    group_offsets: &impl ReadableTable<(&'static str, &'static str), u64>,
) -> StoreResult<Vec<String>> {
    let mut topics = Vec::new();
    for entry in group_offsets.iter().map_err(db_err)? {
        let (key, _) = entry.map_err(db_err)?;
        let topic = key.value().0;
        if topics.last().is_none_or(|last: &String| last != topic) {
            topics.push(topic.to_owned());
        }
    }
    Ok(topics)
}

/// Every topic with a record or a group, in order.
fn topics(
    records: &impl ReadableTable<RecordKey, RecordValue>,
    group_offsets: &impl ReadableTable<(&'static str, &'static str), u64>,
) -> StoreResult<Vec<String>> {
    let mut topics: std::collections::BTreeSet<String> = group_topics(group_offsets)?.into_iter().collect();
    // One lookup per topic of the log, not one per record: each jumps past
    // the last offset of the topic before.
    let mut next = records.first().map_err(db_err)?.map(|(key, _)| key.value().0.to_owned());
    while let Some(topic) = next {
        next = {
            let past_topic = Bound::Excluded((topic.as_str(), u64::MAX));
            let mut rest = records.range::<(&str, u64)>((past_topic, Bound::Unbounded)).map_err(db_err)?;
            rest.next().transpose().map_err(db_err)?.map(|(key, _)| key.value().0.to_owned())
        };
        topics.insert(topic);
    }
    Ok(topics.into_iter().collect())
}

/// Opening a database of an earlier version: drops the table that held
/// each topic's head (the head is now read off the records).
pub(crate) fn recover(txn: &WriteTransaction) -> StoreResult<()> {
    txn.delete_table(HEADS).map_err(db_err)?;
    Ok(())
}

/// State shared by the bus and its consumers.
struct Shared {
    store: SharedMessageDb,
    /// Committed head (next offset) of each topic, for waking consumers.
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// How far the groups' offsets moved, summed, since the last trim.
    untrimmed: AtomicU64,
}

impl Shared {
    fn head_channel(&self, topic: &str) -> watch::Sender<u64> {
        let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        heads.entry(topic.to_owned()).or_insert_with(|| watch::channel(0).0).clone()
    }
}

/// Advances a topic's committed head, waking its consumers.
pub(crate) struct HeadSignal(watch::Sender<u64>);

impl HeadSignal {
    /// Records that the record at `offset` is committed.
    pub(crate) fn committed(&self, offset: u64) {
        self.0.send_if_modified(|h| {
            let advanced = *h <= offset;
            *h = (*h).max(offset + 1);
            advanced
        });
    }
}

/// [`Bus`] persisted in redb.
pub struct EmbeddedBus {
    shared: Arc<Shared>,
}

impl EmbeddedBus {
    /// Opens (creating if needed) a message database of its own at `path`.
    /// Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::on(messages::open(path)?)
    }

    /// The bus in a shared message database. Blocking (reads the heads).
    pub(crate) fn on(store: SharedMessageDb) -> StoreResult<Self> {
        let heads = store.read_blocking(|txn| {
            let records = txn.open_table(RECORDS).map_err(db_err)?;
            let group_offsets = txn.open_table(GROUP_OFFSETS).map_err(db_err)?;
            let mut heads = HashMap::new();
            for topic in topics(&records, &group_offsets)? {
                let head = head(&records, &group_offsets, &topic)?;
                heads.insert(topic, watch::channel(head).0);
            }
            Ok(heads)
        })?;
        Ok(Self {
            shared: Arc::new(Shared { store, heads: Mutex::new(heads), untrimmed: AtomicU64::new(0) }),
        })
    }

    /// Deletes, in every topic, the records every subscribed group has
    /// committed. Runs on its own as commits advance (see
    /// [`TRIM_EVERY_RECORDS`]); returns how many records were deleted.
    pub async fn trim(&self) -> StoreResult<u64> {
        self.shared.store.write(|t: &mut MessageTables<'_>| t.bus.trim_all()).await
    }

    /// What wakes `topic`'s consumers: call [`HeadSignal::committed`] with
    /// the offset of every appended record after its transaction committed.
    pub(crate) fn head_signal(&self, topic: &str) -> HeadSignal {
        HeadSignal(self.shared.head_channel(topic))
    }

    /// Number of records of `topic` still stored (not yet trimmed).
    pub async fn retained(&self, topic: &str) -> StoreResult<u64> {
        let topic = topic.to_owned();
        self.shared
            .store
            .read(move |txn| {
                let table = txn.open_table(RECORDS).map_err(db_err)?;
                let t = topic.as_str();
                let mut n = 0;
                for entry in table.range((t, 0)..=(t, u64::MAX)).map_err(db_err)? {
                    entry.map_err(db_err)?;
                    n += 1;
                }
                Ok(n)
            })
            .await
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, topic: &str, key: Bytes, payload: Bytes) -> StoreResult<()> {
        let head = self.head_signal(topic);
        let topic = topic.to_owned();
        self.shared
            .store
            .write_then(
                move |t: &mut MessageTables<'_>| t.bus.append(&topic, &key, &payload),
                // On the writer thread, in commit order, even if this
                // publisher's future is dropped: consumers never miss a wake.
                move |&offset| head.committed(offset),
            )
            .await?;
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> StoreResult<Box<dyn BusConsumer>> {
        // Watch first, then read the start: a record committed in between is
        // both in the read range and signalled, never lost.
        let head = self.shared.head_channel(topic).subscribe();
        let (t, g) = (topic.to_owned(), group.to_owned());
        let position = self
            .shared
            .store
            .write(move |tables: &mut MessageTables<'_>| {
                let tables = &mut tables.bus;
                let key = (t.as_str(), g.as_str());
                let committed = tables.group_offsets.get(key).map_err(db_err)?.map(|v| v.value());
                match committed {
                    Some(next) => Ok(next),
                    None => {
                        // Registers the group so nothing it has not read is trimmed.
                        tables.group_offsets.insert(key, 0).map_err(db_err)?;
                        Ok(0)
                    }
                }
            })
            .await?;
        Ok(Box::new(EmbeddedConsumer {
            shared: self.shared.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            position,
            head,
        }))
    }
}

/// A consumer of one topic of an [`EmbeddedBus`]. Keeps the bus file open
/// while it lives.
pub struct EmbeddedConsumer {
    shared: Arc<Shared>,
    topic: String,
    group: String,
    /// Next offset to deliver.
    position: u64,
    head: watch::Receiver<u64>,
}

impl EmbeddedConsumer {
    async fn read_from(&self, max: usize) -> StoreResult<Vec<BusRecord>> {
        let (topic, from) = (self.topic.clone(), self.position);
        self.shared
            .store
            .read(move |txn| {
                let table = txn.open_table(RECORDS).map_err(db_err)?;
                let t = topic.as_str();
                let mut out = Vec::new();
                for entry in table.range((t, from)..=(t, u64::MAX)).map_err(db_err)?.take(max) {
                    let (k, v) = entry.map_err(db_err)?;
                    let (key, payload) = v.value();
                    out.push(BusRecord {
                        partition: 0,
                        offset: k.value().1,
                        key: Bytes::copy_from_slice(key),
                        payload: Bytes::copy_from_slice(payload),
                    });
                }
                Ok(out)
            })
            .await
    }
}

#[async_trait]
impl BusConsumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> StoreResult<Vec<BusRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            // Mark the current head as seen before reading, so a commit after
            // the read still wakes the `changed()` below.
            let head = *self.head.borrow_and_update();
            if head > self.position {
                let records = self.read_from(max).await?;
                match records.last() {
                    Some(last) => {
                        self.position = last.offset + 1;
                        return Ok(records);
                    }
                    // Everything from our position on was trimmed (committed
                    // by this group through another consumer): skip ahead.
                    None => self.position = head,
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.head.changed()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(Ok(())) => {}
                Ok(Err(_closed)) => {
                    return Err(StoreError::Unavailable("bus closed".into()));
                }
            }
        }
    }

    async fn commit(&mut self, records: &[BusRecord]) -> StoreResult<()> {
        // One partition: the batch's highest offset is the commit point.
        let Some(offset) = records.iter().map(|r| r.offset).max() else { return Ok(()) };
        let (topic, group, shared) = (self.topic.clone(), self.group.clone(), self.shared.clone());
        self.shared
            .store
            .write(move |t: &mut MessageTables<'_>| {
                let t = &mut t.bus;
                let key = (topic.as_str(), group.as_str());
                let current = t.group_offsets.get(key).map_err(db_err)?.map_or(0, |v| v.value());
                // Never beyond what exists (so trimming cannot delete records
                // not yet written) and never backwards.
                let next = offset.saturating_add(1).min(t.head(&topic)?).max(current);
                if next != current {
                    t.group_offsets.insert(key, next).map_err(db_err)?;
                    // Re-applied if the writer retries the transaction: at
                    // worst the trim comes a little early.
                    let moved = next - current;
                    if shared.untrimmed.fetch_add(moved, Ordering::Relaxed) + moved >= TRIM_EVERY_RECORDS {
                        shared.untrimmed.store(0, Ordering::Relaxed);
                        t.trim_all()?;
                    }
                }
                Ok(())
            })
            .await
    }
}
