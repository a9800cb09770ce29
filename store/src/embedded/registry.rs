//! The in-process registry of a standalone process: its own nodes, in memory
//! (they all live and die with the process, so nothing is persisted).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::{NodeInfo, Registry, StoreResult};

/// [`Registry`] in memory, keyed by node id so listings come out sorted.
#[derive(Debug, Default)]
pub struct InProcessRegistry {
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
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
        self.nodes().remove(node_id);
        Ok(())
    }

    async fn list(&self, role: &str) -> StoreResult<Vec<NodeInfo>> {
        Ok(self.nodes().values().filter(|n| n.role == role).cloned().collect())
    }
}
