//! Embedded backends for `tern standalone`: redb files under the data
//! directory, an in-process bus persisted in redb, and in memory what lives
//! no longer than the process (session placements, the registry).
//!
//! Two files: `messages.redb` holds everything written per message
//! (sequences, dedup records, the bus, offline sets, group history; see
//! module `messages` for why they share one file), `meta.redb` the users,
//! devices and groups. Each file has one writer thread that group-commits
//! (module `writer`), so a write that returned `Ok` is on disk and survives
//! a crash of the process. A data directory of the older one-file-per-store
//! layout is migrated into `messages.redb` when it is opened.
//!
//! Opening is blocking (it may replay or repair a file after a crash): call
//! [`EmbeddedBackends::open`] at startup, before serving.

mod bus;
mod dedup;
mod history;
mod message_log;
mod messages;
mod meta;
mod offline;
mod registry;
mod sequences;
mod sessions;
mod writer;

use std::path::Path;
use std::sync::Arc;

pub use bus::{EmbeddedBus, EmbeddedConsumer, TRIM_EVERY_RECORDS};
pub use dedup::EmbeddedDedupStore;
pub use history::EmbeddedHistoryStore;
pub use message_log::EmbeddedMessageLog;
pub use meta::EmbeddedMetaStore;
pub use offline::EmbeddedOfflineStore;
pub use registry::InProcessRegistry;
pub use sequences::EmbeddedSequenceStore;
pub use sessions::EmbeddedSessionStore;

use crate::StoreResult;

/// Cache for the message database (offline sets, history, bus, counters).
const LARGE_CACHE_BYTES: usize = 256 * 1024 * 1024;
/// Cache for the metadata file.
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
    /// Sequence, reservation and bus record of a message in one commit.
    pub log: Arc<EmbeddedMessageLog>,
    pub registry: Arc<InProcessRegistry>,
}

impl EmbeddedBackends {
    /// Opens (creating as needed) every backend under `dir`. Blocking.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        let messages_path = dir.join("messages.redb");
        let migrated = messages::migrate_legacy_files(dir, &messages_path)?;
        if !migrated.is_empty() {
            tracing::info!(files = ?migrated, "moved the per-store files into messages.redb");
        }
        let db = messages::open(&messages_path)?;
        let bus = Arc::new(EmbeddedBus::on(db.clone())?);
        Ok(Self {
            sessions: Arc::new(EmbeddedSessionStore::new()),
            sequences: Arc::new(EmbeddedSequenceStore::on(db.clone())),
            dedup: Arc::new(EmbeddedDedupStore::on(db.clone())),
            offline: Arc::new(EmbeddedOfflineStore::on(db.clone())),
            history: Arc::new(EmbeddedHistoryStore::on(db.clone())),
            meta: Arc::new(EmbeddedMetaStore::open(&dir.join("meta.redb"))?),
            log: Arc::new(EmbeddedMessageLog::new(db, bus.clone())),
            bus,
            registry: Arc::new(InProcessRegistry::new()),
        })
    }
}
