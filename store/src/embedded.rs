//! Embedded backends for `tern standalone`: redb files under the data
//! directory, an in-process bus persisted in redb, and in memory what lives
//! no longer than the process (session placements, the registry).
//!
//! Each concern has its own redb file (`sequences.redb`,
//! `dedup.redb`, `offline.redb`, `history.redb`, `meta.redb`, `bus.redb`)
//! because redb serializes writers per file: separate files let the hot
//! paths (sequence numbers, bus appends, offline inserts) commit in parallel.
//! Every file has one writer thread that group-commits (module `writer`), so a
//! write that returned `Ok` is on disk and survives a crash of the process.
//!
//! Opening is blocking (it may replay or repair a file after a crash): call
//! [`EmbeddedBackends::open`] at startup, before serving.

mod bus;
mod dedup;
mod history;
mod meta;
mod offline;
mod registry;
mod sequences;
mod sessions;
mod writer;

use std::path::Path;
use std::sync::Arc;

pub use bus::{EmbeddedBus, EmbeddedConsumer};
pub use dedup::EmbeddedDedupStore;
pub use history::EmbeddedHistoryStore;
pub use meta::EmbeddedMetaStore;
pub use offline::EmbeddedOfflineStore;
pub use registry::InProcessRegistry;
pub use sequences::EmbeddedSequenceStore;
pub use sessions::EmbeddedSessionStore;

use crate::StoreResult;

/// Cache for the large, append-heavy files (offline sets, history, bus).
const LARGE_CACHE_BYTES: usize = 256 * 1024 * 1024;
/// Cache for the small files (counters, dedup, metadata).
const SMALL_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Every embedded backend of a standalone process, opened from one data
/// directory.
pub struct EmbeddedBackends {
    pub sessions: Arc<EmbeddedSessionStore>,
    pub sequences: Arc<EmbeddedSequenceStore>,
    pub dedup: Arc<EmbeddedDedupStore>,
    pub offline: Arc<EmbeddedOfflineStore>,
    pub history: Arc<EmbeddedHistoryStore>,
    pub meta: Arc<EmbeddedMetaStore>,
    pub bus: Arc<EmbeddedBus>,
    pub registry: Arc<InProcessRegistry>,
}

impl EmbeddedBackends {
    /// Opens (creating as needed) every backend under `dir`. Blocking.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        Ok(Self {
            sessions: Arc::new(EmbeddedSessionStore::new()),
            sequences: Arc::new(EmbeddedSequenceStore::open(&dir.join("sequences.redb"))?),
            dedup: Arc::new(EmbeddedDedupStore::open(&dir.join("dedup.redb"))?),
            offline: Arc::new(EmbeddedOfflineStore::open(&dir.join("offline.redb"))?),
            history: Arc::new(EmbeddedHistoryStore::open(&dir.join("history.redb"))?),
            meta: Arc::new(EmbeddedMetaStore::open(&dir.join("meta.redb"))?),
            bus: Arc::new(EmbeddedBus::open(&dir.join("bus.redb"))?),
            registry: Arc::new(InProcessRegistry::new()),
        })
    }
}
