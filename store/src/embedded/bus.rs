//! The in-process bus of a standalone process: a durable append-only log per
//! topic in the message database, consumed by named groups that commit
//! offsets.
//!
//! Keyspaces:
//! - `bus_records`: (topic, offset) → (key length u32, key, payload);
//!   offsets start at 0;
//! - `bus_heads`: topic → next offset to assign;
//! - `bus_group_offsets`: (topic, group) → next offset the group has not yet
//!   committed (0 when nothing was committed). A group gets a row as soon as
//!   it subscribes, so records it has not consumed are never trimmed.
//!
//! `publish` returns once its record is durable (group commit, see
//! [`super::messages`]). Each topic has a `watch` channel holding its
//! durable head, advanced on the writer thread right after each sync, so a
//! waiting consumer wakes immediately instead of polling; a consumer reads
//! only below that head, never a record a crash could still take back.
//!
//! Records below the smallest committed offset of every group that ever
//! subscribed to a topic are deleted every [`TRIM_EVERY_COMMITS`] commits
//! (or on [`EmbeddedBus::trim`]), so the log does not grow forever.
//!
//! Unlike Kafka there are no partitions: every consumer of a group reads the
//! whole topic from the group's committed offset, so a group should have one
//! live consumer per topic (standalone runs one per service).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::keys::{Key, KeyReader, corrupt, read_u64s};
use super::messages::{self, Counter, SharedMessageDb, Writes, db_err};
use crate::{Bus, BusConsumer, BusRecord, StoreError, StoreResult};

/// A trim of the committed topic runs with every this many commits.
const TRIM_EVERY_COMMITS: u64 = 32;

pub(crate) fn record_key(topic: &str, offset: u64) -> Vec<u8> {
    Key::new().str(topic).u64(offset).build()
}

pub(crate) fn group_key(topic: &str, group: &str) -> Vec<u8> {
    Key::new().str(topic).str(group).build()
}

/// Appends a record to `topic` and returns its offset. Consumers learn of it
/// through [`HeadSignal::committed`] once it is durable.
pub(crate) fn append(w: &mut Writes<'_>, topic: &str, key: &[u8], payload: &[u8]) -> StoreResult<u64> {
    let ks = w.ks;
    let offset = head(w, topic)?;
    w.insert(&ks.bus_records, record_key(topic, offset), record_value(key, payload)?);
    w.set_counter(Counter::BusHeads, topic.as_bytes(), Some(offset + 1));
    Ok(offset)
}

fn head(w: &mut Writes<'_>, topic: &str) -> StoreResult<u64> {
    Ok(w.counter(Counter::BusHeads, topic.as_bytes())?.unwrap_or(0))
}

/// A stored record value: the key's length, the key, the payload.
pub(crate) fn record_value(key: &[u8], payload: &[u8]) -> StoreResult<Vec<u8>> {
    let key_len =
        u32::try_from(key.len()).map_err(|_| StoreError::Backend("bus record key too long".into()))?;
    let mut value = Vec::with_capacity(4 + key.len() + payload.len());
    value.extend_from_slice(&key_len.to_be_bytes());
    value.extend_from_slice(key);
    value.extend_from_slice(payload);
    Ok(value)
}

/// Splits a stored record value into (key, payload).
fn split_value(value: &[u8]) -> StoreResult<(&[u8], &[u8])> {
    let (len, rest) = value.split_first_chunk::<4>().ok_or_else(|| corrupt("bus record cut short"))?;
    rest.split_at_checked(u32::from_be_bytes(*len) as usize)
        .ok_or_else(|| corrupt("bus record key cut short"))
}

/// Deletes the records of `topic` below the smallest committed offset of its
/// groups; returns how many were deleted. `trimmed` remembers, per topic,
/// the offset below which everything is deleted already, so the scan does
/// not step over the deletion markers of earlier trims again.
fn trim_topic(w: &mut Writes<'_>, trimmed: &Mutex<HashMap<String, u64>>, topic: &str) -> StoreResult<u64> {
    let ks = w.ks;
    let mut low: Option<u64> = None;
    for entry in ks.bus_group_offsets.prefix(Key::new().str(topic).build()) {
        let value = entry.value().map_err(db_err)?;
        let [committed] = read_u64s::<1>(&value)?;
        low = Some(low.map_or(committed, |l| l.min(committed)));
    }
    let Some(low) = low.filter(|&l| l > 0) else {
        return Ok(0);
    };
    let mut trimmed = trimmed.lock().unwrap_or_else(PoisonError::into_inner);
    let from = trimmed.get(topic).copied().unwrap_or(0);
    if from >= low {
        return Ok(0);
    }
    let mut removed = 0;
    for entry in ks.bus_records.range(record_key(topic, from)..record_key(topic, low)) {
        w.remove(&ks.bus_records, entry.key().map_err(db_err)?);
        removed += 1;
    }
    trimmed.insert(topic.to_owned(), low);
    Ok(removed)
}

/// State shared by the bus and its consumers.
struct Shared {
    store: SharedMessageDb,
    /// Durable head (next offset) of each topic, for waking consumers.
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Per topic, the offset below which every record is trimmed.
    trimmed: Arc<Mutex<HashMap<String, u64>>>,
    commits: AtomicU64,
}

impl Shared {
    fn head_channel(&self, topic: &str) -> watch::Sender<u64> {
        let mut heads = self.heads.lock().unwrap_or_else(PoisonError::into_inner);
        heads.entry(topic.to_owned()).or_insert_with(|| watch::channel(0).0).clone()
    }
}

/// Advances a topic's durable head, waking its consumers.
pub(crate) struct HeadSignal(watch::Sender<u64>);

impl HeadSignal {
    /// Records that the record at `offset` is durable.
    pub(crate) fn committed(&self, offset: u64) {
        self.0.send_if_modified(|h| {
            let advanced = *h <= offset;
            *h = (*h).max(offset + 1);
            advanced
        });
    }
}

/// [`Bus`] persisted in the embedded message database.
pub struct EmbeddedBus {
    shared: Arc<Shared>,
}

impl EmbeddedBus {
    /// Opens (creating if needed) a message database of its own in the
    /// directory `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::on(messages::open(path)?)
    }

    /// The bus in a shared message database. Blocking (reads the heads).
    pub(crate) fn on(store: SharedMessageDb) -> StoreResult<Self> {
        let mut heads = HashMap::new();
        for entry in store.tables().bus_heads.iter() {
            let (topic, value) = entry.into_inner().map_err(db_err)?;
            let topic = std::str::from_utf8(&topic).map_err(|_| corrupt("topic is not UTF-8"))?;
            let [head] = read_u64s::<1>(&value)?;
            heads.insert(topic.to_owned(), watch::channel(head).0);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                heads: Mutex::new(heads),
                trimmed: Arc::default(),
                commits: AtomicU64::new(0),
            }),
        })
    }

    /// Deletes, in every topic, the records every subscribed group has
    /// committed. Runs on its own every few hundred commits; returns how many
    /// records were deleted.
    pub async fn trim(&self) -> StoreResult<u64> {
        let trimmed = self.shared.trimmed.clone();
        self.shared
            .store
            .write(move |w| {
                let mut topics = BTreeMap::new();
                for entry in w.ks.bus_group_offsets.iter() {
                    let key = entry.key().map_err(db_err)?;
                    topics.insert(KeyReader::new(&key).str()?.to_owned(), ());
                }
                let mut removed = 0;
                for topic in topics.keys() {
                    removed += trim_topic(w, &trimmed, topic)?;
                }
                Ok(removed)
            })
            .await
    }

    /// What wakes `topic`'s consumers: call [`HeadSignal::committed`] with
    /// the offset of every appended record once it is durable.
    pub(crate) fn head_signal(&self, topic: &str) -> HeadSignal {
        HeadSignal(self.shared.head_channel(topic))
    }

    /// Number of records of `topic` still stored (not yet trimmed).
    pub async fn retained(&self, topic: &str) -> StoreResult<u64> {
        let records = &self.shared.store.tables().bus_records;
        let mut n = 0;
        for entry in records.range(record_key(topic, 0)..=record_key(topic, u64::MAX)) {
            entry.key().map_err(db_err)?;
            n += 1;
        }
        Ok(n)
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
                move |w| append(w, &topic, &key, &payload),
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
        let key = group_key(topic, group);
        let position = self
            .shared
            .store
            .write(move |w| {
                match w.counter(Counter::BusGroupOffsets, &key)? {
                    Some(next) => Ok(next),
                    None => {
                        // Registers the group so nothing it has not read is trimmed.
                        w.set_counter(Counter::BusGroupOffsets, &key, Some(0));
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

/// A consumer of one topic of an [`EmbeddedBus`]. Keeps the database open
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
    /// Up to `max` records from the consumer's position, below the durable
    /// `head`.
    fn read_from(&self, head: u64, max: usize) -> StoreResult<Vec<BusRecord>> {
        let records = &self.shared.store.tables().bus_records;
        let range = record_key(&self.topic, self.position)..record_key(&self.topic, head);
        let mut out = Vec::new();
        for entry in records.range(range).take(max) {
            let (k, v) = entry.into_inner().map_err(db_err)?;
            let mut r = KeyReader::new(&k);
            r.str()?;
            let (key, payload) = split_value(&v)?;
            out.push(BusRecord {
                partition: 0,
                offset: r.u64()?,
                key: Bytes::copy_from_slice(key),
                payload: Bytes::copy_from_slice(payload),
            });
        }
        Ok(out)
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
                let records = self.read_from(head, max)?;
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
        let trim = self.shared.commits.fetch_add(1, Ordering::Relaxed) % TRIM_EVERY_COMMITS
            == TRIM_EVERY_COMMITS - 1;
        let (topic, key) = (self.topic.clone(), group_key(&self.topic, &self.group));
        let trimmed = self.shared.trimmed.clone();
        self.shared
            .store
            .write(move |w| {
                let current = w.counter(Counter::BusGroupOffsets, &key)?.unwrap_or(0);
                // Never beyond what exists (so trimming cannot delete records
                // not yet written) and never backwards.
                let next = offset.saturating_add(1).min(head(w, &topic)?).max(current);
                if next != current {
                    w.set_counter(Counter::BusGroupOffsets, &key, Some(next));
                }
                if trim {
                    // The new offset is not visible to this operation: the
                    // trim uses the one before (the next trim catches up).
                    trim_topic(w, &trimmed, &topic)?;
                }
                Ok(())
            })
            .await
    }
}
