//! The in-process registry of a standalone process: its own nodes, in memory
//! (they all live and die with the process, so nothing is persisted).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{NodeInfo, Registry, StoreResult};

/// [`Registry`] in memory, keyed by node id so listings come out sorted.
#[derive(Debug)]
pub struct InProcessRegistry {
    nodes: Arc<Mutex<BTreeMap<String, NodeInfo>>>,
    /// Bumped on every join or leave; watchers re-list on a change.
    membership: watch::Sender<u64>,
}

impl Default for InProcessRegistry {
    fn default() -> Self {
        Self { nodes: Arc::default(), membership: watch::channel(0).0 }
    }
}

impl InProcessRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeInfo>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every change is a single map operation), so poisoning is ignored.
        self.nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Registry for InProcessRegistry {
    async fn register(&self, node: &NodeInfo) -> StoreResult<()> {
        self.nodes().insert(node.node_id.clone(), node.clone());
        self.membership.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn update_connections(&self, node_id: &str, connections: u64) -> StoreResult<()> {
        // An unknown node (deregistered meanwhile) is ignored, as a vanished
        // ephemeral node would be in ZooKeeper.
        if let Some(node) = self.nodes().get_mut(node_id) {
            node.connections = connections;
        }
        Ok(())
    }

    async fn deregister(&self, node_id: &str) -> StoreResult<()> {
        if self.nodes().remove(node_id).is_some() {
            self.membership.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    async fn list(&self, role: &str) -> StoreResult<Vec<NodeInfo>> {
        Ok(self.nodes().values().filter(|n| n.role == role).cloned().collect())
    }

    async fn watch(&self, role: &str) -> StoreResult<watch::Receiver<Vec<NodeInfo>>> {
        let nodes = self.nodes.clone();
        let role = role.to_owned();
        let of_role = move || -> Vec<NodeInfo> {
            let nodes = nodes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            nodes.values().filter(|n| n.role == role).cloned().collect()
        };
        let (tx, rx) = watch::channel(of_role());
        let mut changes = self.membership.subscribe();
        tokio::spawn(async move {
            // Ends when the registry or every receiver is gone.
            while changes.changed().await.is_ok() {
                if tx.send(of_role()).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
}
