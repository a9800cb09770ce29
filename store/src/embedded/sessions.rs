//! Session placements in `sessions.redb`.
//!
//! Tables:
//! - `placements`: (user, device) → (node, connection);
//! - `by_node`: (node, user, device) → connection, an index kept in the same
//!   transaction so draining a node does not scan every session.

use std::path::Path;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::writer::{Schema, Store, db_err};
use crate::{Placement, SessionStore, StoreResult};

const PLACEMENTS: TableDefinition<(&str, &str), (&str, u64)> = TableDefinition::new("placements");
const BY_NODE: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("by_node");

pub(crate) struct Sessions;

pub(crate) struct SessionTables<'t> {
    placements: Table<'t, (&'static str, &'static str), (&'static str, u64)>,
    by_node: Table<'t, (&'static str, &'static str, &'static str), u64>,
}

impl Schema for Sessions {
    const NAME: &'static str = "sessions";
    type Tables<'t> = SessionTables<'t>;

    fn open_tables(txn: &WriteTransaction) -> StoreResult<SessionTables<'_>> {
        Ok(SessionTables {
            placements: txn.open_table(PLACEMENTS).map_err(db_err)?,
            by_node: txn.open_table(BY_NODE).map_err(db_err)?,
        })
    }
}

/// [`SessionStore`] on redb.
pub struct EmbeddedSessionStore {
    store: Store<Sessions>,
}

impl EmbeddedSessionStore {
    /// Opens (creating if needed) the session file at `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self { store: Store::open(path, super::SMALL_CACHE_BYTES)? })
    }
}

#[async_trait]
impl SessionStore for EmbeddedSessionStore {
    async fn put(&self, placement: &Placement) -> StoreResult<()> {
        let p = placement.clone();
        self.store
            .write(move |t: &mut SessionTables<'_>| {
                let key = (p.user_id.as_str(), p.device_id.as_str());
                let old_node = t
                    .placements
                    .insert(key, (p.node_id.as_str(), p.connection_id))
                    .map_err(db_err)?
                    .map(|old| old.value().0.to_owned());
                if let Some(old_node) = old_node {
                    t.by_node.remove((old_node.as_str(), key.0, key.1)).map_err(db_err)?;
                }
                t.by_node.insert((p.node_id.as_str(), key.0, key.1), p.connection_id).map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn remove(&self, placement: &Placement) -> StoreResult<bool> {
        let p = placement.clone();
        self.store
            .write(move |t: &mut SessionTables<'_>| {
                let key = (p.user_id.as_str(), p.device_id.as_str());
                let current =
                    t.placements.get(key).map_err(db_err)?.map(|v| (v.value().0 == p.node_id, v.value().1));
                // Only the exact login being closed may be removed: a newer
                // login of the same device (other node or connection) stays.
                if current != Some((true, p.connection_id)) {
                    return Ok(false);
                }
                t.placements.remove(key).map_err(db_err)?;
                t.by_node.remove((p.node_id.as_str(), key.0, key.1)).map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn get(&self, user_id: &str) -> StoreResult<Vec<Placement>> {
        let user = user_id.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(PLACEMENTS).map_err(db_err)?;
                let mut out = Vec::new();
                for entry in table.range((user.as_str(), "")..).map_err(db_err)? {
                    let (k, v) = entry.map_err(db_err)?;
                    let (u, device) = k.value();
                    if u != user {
                        break;
                    }
                    let (node, connection_id) = v.value();
                    out.push(Placement {
                        user_id: u.to_owned(),
                        device_id: device.to_owned(),
                        node_id: node.to_owned(),
                        connection_id,
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn remove_node(&self, node_id: &str) -> StoreResult<usize> {
        let node = node_id.to_owned();
        self.store
            .write(move |t: &mut SessionTables<'_>| {
                let mut victims = Vec::new();
                for entry in t.by_node.range((node.as_str(), "", "")..).map_err(db_err)? {
                    let (k, _) = entry.map_err(db_err)?;
                    let (n, user, device) = k.value();
                    if n != node {
                        break;
                    }
                    victims.push((user.to_owned(), device.to_owned()));
                }
                for (user, device) in &victims {
                    t.by_node.remove((node.as_str(), user.as_str(), device.as_str())).map_err(db_err)?;
                    t.placements.remove((user.as_str(), device.as_str())).map_err(db_err)?;
                }
                Ok(victims.len())
            })
            .await
    }

    async fn online_users(&self, limit: usize) -> StoreResult<Vec<String>> {
        self.store
            .read(move |txn| {
                let table = txn.open_table(PLACEMENTS).map_err(db_err)?;
                let mut out: Vec<String> = Vec::new();
                if limit == 0 {
                    return Ok(out);
                }
                // Keys are ordered by (user, device): users come out sorted,
                // each device of a user adjacent, so dedup is a comparison
                // with the last one.
                for entry in table.iter().map_err(db_err)? {
                    let (k, _) = entry.map_err(db_err)?;
                    let user = k.value().0;
                    if out.last().is_some_and(|last| last == user) {
                        continue;
                    }
                    if out.len() == limit {
                        break;
                    }
                    out.push(user.to_owned());
                }
                Ok(out)
            })
            .await
    }
}
