//! Per-receiver offline sets, in the message database.
//!
//! Keyspaces:
//! - `offline_entries`: (receiver, msg_id) → payload, so a receiver's set is
//!   one ordered key range;
//! - `offline_counts`: receiver → number of entries, updated in the same
//!   batch as the entries so `count` is one lookup;
//! - `offline_tombstones`: (receiver, msg_id) → expires_at_ms, for
//!   acknowledged ids: an insert that arrives after the ack (the push
//!   overtook the store write, or the bus redelivered the insert) is ignored
//!   until the tombstone expires;
//! - `offline_tombstone_expiry`: (expires_at_ms, receiver, msg_id) → (),
//!   tombstones ordered by expiry for the writer's lazy cleanup (a renewed
//!   tombstone may leave an older entry here; expiry checks the tombstone's
//!   own time before dropping it).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::keys::{Key, KeyReader, read_u64s, u64s};
use super::messages::{self, Counter, SharedMessageDb, Writes, db_err};
use super::writer::{expiry_ms, now_ms};
use crate::{OfflineEntry, OfflineStore, StoreResult};

/// Expired tombstones dropped per maintenance run, so one run adds little
/// latency to the commit it shares (the writer runs it again at once while
/// a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

pub(crate) fn entry_key(receiver: &str, msg_id: u64) -> Vec<u8> {
    Key::new().str(receiver).u64(msg_id).build()
}

/// Adds `delta` to `receiver`'s count.
fn add_to_count(w: &mut Writes<'_>, receiver: &str, delta: i64) -> StoreResult<()> {
    if delta == 0 {
        return Ok(());
    }
    let current = w.counter(Counter::OfflineCounts, receiver.as_bytes())?.unwrap_or(0);
    let next = current.saturating_add_signed(delta);
    w.set_counter(Counter::OfflineCounts, receiver.as_bytes(), (next > 0).then_some(next));
    Ok(())
}

/// Drops up to [`EXPIRE_BATCH`] expired tombstones; returns whether more are
/// left (run by the writer's maintenance).
pub(crate) fn expire(w: &mut Writes<'_>, now_ms: u64) -> StoreResult<bool> {
    let ks = w.ks;
    let from = Key::new().u64(ks.tombstones_expired_below.load(Ordering::Relaxed)).build();
    let to = Key::new().u64(now_ms).build();
    let mut dropped = 0;
    let mut last_at = None;
    for entry in ks.offline_tombstone_expiry.range(from..to) {
        let key = entry.key().map_err(db_err)?;
        let mut r = KeyReader::new(&key);
        let (at, receiver, msg_id) = (r.u64()?, r.str()?, r.u64()?);
        let tombstone = entry_key(receiver, msg_id);
        // The tombstone may have been renewed by a later ack.
        let still_expired = match w.get(&ks.offline_tombstones, &tombstone)? {
            Some(v) => read_u64s::<1>(&v)?[0] <= at,
            None => false,
        };
        if still_expired {
            w.remove(&ks.offline_tombstones, tombstone);
        }
        w.remove(&ks.offline_tombstone_expiry, key.clone());
        last_at = Some(at);
        dropped += 1;
        if dropped == EXPIRE_BATCH {
            break;
        }
    }
    let backlog = dropped == EXPIRE_BATCH;
    let below = if backlog { last_at.unwrap_or(0) } else { now_ms };
    ks.tombstones_expired_below.fetch_max(below, Ordering::Relaxed);
    Ok(backlog)
}

/// [`OfflineStore`] on the embedded message database.
pub struct EmbeddedOfflineStore {
    store: SharedMessageDb,
}

impl EmbeddedOfflineStore {
    /// Opens (creating if needed) a message database of its own in the
    /// directory `path`. Blocking.
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
        // Each receiver once: the operation reads an entry before writing it.
        let receivers: BTreeSet<String> = receivers.iter().cloned().collect();
        let (msg_id, payload) = (entry.msg_id, entry.payload.clone());
        self.store
            .write(move |w| {
                let ks = w.ks;
                let now = now_ms();
                for receiver in &receivers {
                    let key = entry_key(receiver, msg_id);
                    let acked = match w.get(&ks.offline_tombstones, &key)? {
                        Some(v) => read_u64s::<1>(&v)?[0] > now,
                        None => false,
                    };
                    if acked {
                        continue;
                    }
                    // Rewriting an existing entry with the same message is
                    // harmless; only a new one counts.
                    let existed = w.get(&ks.offline_entries, &key)?.is_some();
                    w.insert(&ks.offline_entries, key, payload.as_ref());
                    if !existed {
                        add_to_count(w, receiver, 1)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn pull(&self, receiver: &str, after: u64, limit: usize) -> StoreResult<Vec<OfflineEntry>> {
        let mut out = Vec::new();
        let Some(first) = after.checked_add(1) else {
            return Ok(out);
        };
        let range = entry_key(receiver, first)..=entry_key(receiver, u64::MAX);
        for entry in self.store.tables().offline_entries.range(range).take(limit) {
            let (key, value) = entry.into_inner().map_err(db_err)?;
            let mut r = KeyReader::new(&key);
            r.str()?;
            out.push(OfflineEntry { msg_id: r.u64()?, payload: Bytes::copy_from_slice(&value) });
        }
        Ok(out)
    }

    async fn ack(&self, receiver: &str, msg_ids: &[u64], tombstone_ttl: Duration) -> StoreResult<()> {
        let receiver = receiver.to_owned();
        // Each id once: the operation reads an entry before deleting it.
        let msg_ids: BTreeSet<u64> = msg_ids.iter().copied().collect();
        let expires_at = expiry_ms(tombstone_ttl);
        self.store
            .write(move |w| {
                let ks = w.ks;
                let r = receiver.as_str();
                let mut removed = 0;
                for &msg_id in &msg_ids {
                    let key = entry_key(r, msg_id);
                    if w.get(&ks.offline_entries, &key)?.is_some() {
                        w.remove(&ks.offline_entries, key.clone());
                        removed += 1;
                    }
                    if tombstone_ttl.is_zero() {
                        continue;
                    }
                    // Every acknowledged id gets a tombstone, not only
                    // missing ones: a redelivered insert of a delivered
                    // message must not resurrect it either.
                    // A renewed tombstone leaves its old expiry entry
                    // behind rather than paying a read for it: `expire`
                    // finds the tombstone renewed and only drops that entry.
                    w.insert(&ks.offline_tombstones, key, u64s([expires_at]));
                    w.insert(
                        &ks.offline_tombstone_expiry,
                        Key::new().u64(expires_at).str(r).u64(msg_id).build(),
                        [],
                    );
                }
                add_to_count(w, r, -removed)
            })
            .await
    }

    async fn count(&self, receiver: &str) -> StoreResult<u64> {
        Ok(match self.store.tables().offline_counts.get(receiver.as_bytes()).map_err(db_err)? {
            Some(v) => read_u64s::<1>(&v)?[0],
            None => 0,
        })
    }
}
