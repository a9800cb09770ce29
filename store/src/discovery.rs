//! Finding peers through the [`Registry`]: a live view of one role's nodes
//! and a cache of gRPC channels to them, so a role calls another without
//! knowing its addresses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::{NodeInfo, Registry, StoreError, StoreResult};

/// The live nodes of one role and channels to them.
pub struct Peers {
    role: String,
    nodes: watch::Receiver<Vec<NodeInfo>>,
    channels: Mutex<HashMap<String, Channel>>,
    next: AtomicUsize,
}

/// Which of a node's addresses to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// `NodeInfo::addr` (roles whose service is their main address).
    Addr,
    /// `NodeInfo::internal_addr` (access nodes' push endpoint).
    Internal,
}

/// A lazily connected channel to `addr` (`host:port`), with short connect
/// and request timeouts so a dead peer fails fast and the caller can move on.
pub fn channel(addr: &str) -> StoreResult<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| StoreError::Backend(format!("bad peer address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(endpoint.connect_lazy())
}

impl Peers {
    /// Starts following `role` in `registry`.
    pub async fn follow(registry: &dyn Registry, role: &str) -> StoreResult<Arc<Self>> {
        let nodes = registry.watch(role).await?;
        Ok(Arc::new(Self {
            role: role.to_owned(),
            nodes,
            channels: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        }))
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    /// The current nodes, sorted by node id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.borrow().clone()
    }

    /// A receiver that changes when the role's membership changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<NodeInfo>> {
        self.nodes.clone()
    }

    fn channel_to(&self, node: &NodeInfo, dial: Dial) -> StoreResult<Channel> {
        let addr = match dial {
            Dial::Addr => &node.addr,
            Dial::Internal => &node.internal_addr,
        };
        let key = format!("{}@{addr}", node.node_id);
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let channel = channel(addr)?;
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// A channel to some live node of the role, round robin.
    pub fn any(&self, dial: Dial) -> StoreResult<(NodeInfo, Channel)> {
        let nodes = self.nodes.borrow().clone();
        if nodes.is_empty() {
            return Err(StoreError::Unavailable(format!("no live {} node", self.role)));
        }
        let node = nodes[self.next.fetch_add(1, Ordering::Relaxed) % nodes.len()].clone();
        let channel = self.channel_to(&node, dial)?;
        Ok((node, channel))
    }

    /// A channel to the node with this id, if it is live.
    pub fn node(&self, node_id: &str, dial: Dial) -> StoreResult<Option<Channel>> {
        let node = self.nodes.borrow().iter().find(|n| n.node_id == node_id).cloned();
        node.map(|n| self.channel_to(&n, dial)).transpose()
    }
}
