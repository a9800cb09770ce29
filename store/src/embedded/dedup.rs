//! Accepted client message ids, in the message database.
//!
//! Keyspaces:
//! - `dedup_records`: (sender, client_msg_id) → (msg_id, seq, sent_at_ms, expires_at_ms);
//! - `dedup_expiry`: (expires_at_ms, sender, client_msg_id) → (), the same records
//!   ordered by expiry so the writer's maintenance can drop expired ones
//!   without scanning everything (a renewed record may leave an older entry
//!   here; expiry checks the record's own time before dropping it).
//!
//! A read never returns an expired record, whether or not it was dropped yet.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;

use super::keys::{Key, KeyReader, read_u64s, u64s};
use super::messages::{self, SharedMessageDb, Writes, db_err};
use super::writer::{expiry_ms, now_ms};
use crate::{DedupRecord, DedupStore, StoreResult};

/// Expired records dropped per maintenance run, so one run adds little
/// latency to the commit it shares (the writer runs it again at once while
/// a backlog remains).
const EXPIRE_BATCH: usize = 4_096;

pub(crate) fn record_key(sender: &str, client_msg_id: &str) -> Vec<u8> {
    Key::new().str(sender).str(client_msg_id).build()
}

/// Records `record` under (sender, client message id) until `expires_at`.
pub(crate) fn put(
    w: &mut Writes<'_>,
    sender: &str,
    client_msg_id: &str,
    record: DedupRecord,
    expires_at: u64,
) -> StoreResult<()> {
    let ks = w.ks;
    // A record replaced here leaves its old expiry entry behind rather than
    // paying a read for it: `expire` finds the record renewed and only drops
    // that entry.
    let key = record_key(sender, client_msg_id);
    w.insert(&ks.dedup_records, key, u64s([record.msg_id, record.seq, record.sent_at_ms, expires_at]));
    w.insert(&ks.dedup_expiry, Key::new().u64(expires_at).str(sender).str(client_msg_id).build(), []);
    Ok(())
}

/// Drops up to [`EXPIRE_BATCH`] expired records; returns whether more are
/// left (run by the writer's maintenance).
pub(crate) fn expire(w: &mut Writes<'_>, now_ms: u64) -> StoreResult<bool> {
    let ks = w.ks;
    let from = Key::new().u64(ks.dedup_expired_below.load(Ordering::Relaxed)).build();
    let to = Key::new().u64(now_ms).build();
    let mut dropped = 0;
    let mut last_at = None;
    for entry in ks.dedup_expiry.range(from..to) {
        let key = entry.key().map_err(db_err)?;
        let mut r = KeyReader::new(&key);
        let (at, sender, client) = (r.u64()?, r.str()?, r.str()?);
        let record_key = record_key(sender, client);
        // The record may have been renewed with a later expiry since.
        let still_expired = match w.get(&ks.dedup_records, &record_key)? {
            Some(v) => read_u64s::<4>(&v)?[3] <= at,
            None => false,
        };
        if still_expired {
            w.remove(&ks.dedup_records, record_key);
        }
        w.remove(&ks.dedup_expiry, key.clone());
        last_at = Some(at);
        dropped += 1;
        if dropped == EXPIRE_BATCH {
            break;
        }
    }
    let backlog = dropped == EXPIRE_BATCH;
    // Everything below `now` is dropped unless the run stopped early; then
    // everything below the last expiry time seen (its peers may remain).
    let below = if backlog { last_at.unwrap_or(0) } else { now_ms };
    ks.dedup_expired_below.fetch_max(below, Ordering::Relaxed);
    Ok(backlog)
}

/// [`DedupStore`] on the embedded message database.
pub struct EmbeddedDedupStore {
    store: SharedMessageDb,
}

impl EmbeddedDedupStore {
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
impl DedupStore for EmbeddedDedupStore {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>> {
        let value =
            self.store.tables().dedup_records.get(record_key(sender, client_msg_id)).map_err(db_err)?;
        let Some(value) = value else { return Ok(None) };
        let [msg_id, seq, sent_at_ms, expires_at] = read_u64s::<4>(&value)?;
        Ok((expires_at > now_ms()).then_some(DedupRecord { msg_id, seq, sent_at_ms }))
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
        self.store.write(move |w| put(w, &sender, &client, record, expires_at)).await
    }
}
