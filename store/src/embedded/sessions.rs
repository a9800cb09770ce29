//! Session placements of `tern standalone`, in memory.
//!
//! A placement names a live connection of this very process, so it cannot
//! outlive the process: after a restart every connection is gone and every
//! placement would be stale. Keeping them in memory (rather than in a redb
//! file, as before) makes a login one lock instead of a disk commit and two
//! blocking-pool reads, and a crash leaves nothing to clean up.
//!
//! Two ordered maps under one lock: `placements` (user, device) → (node,
//! connection), and `by_node` (node, user, device) so draining a node does
//! not scan every session; and a counter of puts, the placements epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::{Placement, SessionStore, StoreResult};

#[derive(Default)]
struct Maps {
    /// (user, device) → (node, connection id).
    placements: BTreeMap<(String, String), (String, u64)>,
    /// (node, user, device).
    by_node: BTreeSet<(String, String, String)>,
}

impl Maps {
    fn placements_of(&self, user_id: &str) -> Vec<Placement> {
        let from = (user_id.to_owned(), String::new());
        self.placements
            .range(from..)
            .take_while(|((user, _), _)| user == user_id)
            .map(|((user, device), (node, connection_id))| Placement {
                user_id: user.clone(),
                device_id: device.clone(),
                node_id: node.clone(),
                connection_id: *connection_id,
            })
            .collect()
    }
}

/// [`SessionStore`] in process memory.
#[derive(Default)]
pub struct EmbeddedSessionStore {
    maps: Mutex<Maps>,
    /// Puts so far: see [`SessionStore::placements_epoch`].
    epoch: AtomicU64,
}

impl EmbeddedSessionStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // The maps are consistent after every statement that changes them.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl SessionStore for EmbeddedSessionStore {
    async fn put(&self, placement: &Placement) -> StoreResult<Option<Placement>> {
        let p = placement;
        let mut maps = self.maps();
        let key = (p.user_id.clone(), p.device_id.clone());
        let replaced = maps.placements.insert(key, (p.node_id.clone(), p.connection_id));
        if let Some((old_node, _)) = &replaced {
            maps.by_node.remove(&(old_node.clone(), p.user_id.clone(), p.device_id.clone()));
        }
        maps.by_node.insert((p.node_id.clone(), p.user_id.clone(), p.device_id.clone()));
        // Before the put returns, so whoever reads the old epoch read it
        // before this login could act on its placement (its first pull).
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(replaced.map(|(node_id, connection_id)| Placement {
            user_id: p.user_id.clone(),
            device_id: p.device_id.clone(),
            node_id,
            connection_id,
        }))
    }

    async fn remove(&self, placement: &Placement) -> StoreResult<bool> {
        let p = placement;
        let mut maps = self.maps();
        let key = (p.user_id.clone(), p.device_id.clone());
        // Only the exact login being closed may be removed: a newer login
        // of the same device (other node or connection) stays.
        let current = maps.placements.get(&key).map(|(node, conn)| (*node == p.node_id, *conn));
        if current != Some((true, p.connection_id)) {
            return Ok(false);
        }
        maps.placements.remove(&key);
        maps.by_node.remove(&(p.node_id.clone(), key.0, key.1));
        Ok(true)
    }

    async fn get(&self, user_id: &str) -> StoreResult<Vec<Placement>> {
        Ok(self.maps().placements_of(user_id))
    }

    /// Every user under one lock, without a future per user (the consumer
    /// asks for all the members of a group at once).
    async fn get_many(&self, user_ids: &[&str]) -> StoreResult<Vec<Vec<Placement>>> {
        let maps = self.maps();
        Ok(user_ids.iter().map(|user| maps.placements_of(user)).collect())
    }

    async fn remove_node(&self, node_id: &str) -> StoreResult<usize> {
        let mut maps = self.maps();
        let from = (node_id.to_owned(), String::new(), String::new());
        let victims: Vec<(String, String, String)> =
            maps.by_node.range(from..).take_while(|(node, _, _)| node == node_id).cloned().collect();
        for victim in &victims {
            maps.by_node.remove(victim);
            let (_, user, device) = victim;
            maps.placements.remove(&(user.clone(), device.clone()));
        }
        Ok(victims.len())
    }

    async fn online_users(&self, limit: usize) -> StoreResult<Vec<String>> {
        let maps = self.maps();
        let mut out: Vec<String> = Vec::new();
        // Keys are ordered by (user, device): users come out sorted, each
        // user's devices adjacent.
        for (user, _) in maps.placements.keys() {
            if out.last().is_some_and(|last| last == user) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            out.push(user.clone());
        }
        Ok(out)
    }

    fn placements_epoch(&self) -> Option<u64> {
        Some(self.epoch.load(Ordering::SeqCst))
    }
}
