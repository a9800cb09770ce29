//! Backend traits for every piece of state tern keeps, with embedded
//! implementations.
//!
//! Each trait is implemented twice: by the embedded backend here (redb files
//! under the data directory, an in-process bus and registry) used by
//! `tern standalone`, and by a real engine (Redis, Kafka, ZooKeeper, ScyllaDB,
//! MongoDB) in cluster mode. [`conformance`] holds one test suite per trait;
//! every implementation must pass it.
//!
//! Stored messages are opaque bytes (protobuf-encoded `tern.v1.Message`) so
//! the backends know nothing of the wire protocol.

pub mod conformance;
pub mod consume;
pub mod discovery;
pub mod embedded;
pub mod kafka;
pub mod message_log;
pub mod mongo;
pub mod redis;
pub mod scylla;
pub mod zookeeper;

pub use message_log::{MessageLog, NewMessage, PayloadFn, SeparateStores};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Failure of a backend. Callers map it to `ErrorCode::Internal`: the request
/// may be retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend error: {0}")]
    Backend(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where one logged-in device is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub user_id: String,
    pub device_id: String,
    /// Id of the access node holding the connection.
    pub node_id: String,
    /// Connection id, unique within the access node.
    pub connection_id: u64,
}

/// Session placement: user → device → (access node, connection).
/// Redis in cluster mode.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Records a placement, replacing any placement of the same (user,
    /// device), and returns the one it replaced. Read and replace are one
    /// step, so of two logins of one device racing, each learns of the
    /// other and neither connection is left open without a placement.
    async fn put(&self, placement: &Placement) -> StoreResult<Option<Placement>>;
    /// Removes the (user, device) placement only if it still names this node
    /// and connection, so a stale disconnect never removes a newer login.
    /// Returns whether something was removed.
    async fn remove(&self, placement: &Placement) -> StoreResult<bool>;
    /// All devices of a user.
    async fn get(&self, user_id: &str) -> StoreResult<Vec<Placement>>;
    /// [`SessionStore::get`] of each user, in order. The default asks for
    /// each concurrently; Redis sends them in one pipeline (the offline
    /// consumer asks for every member of a group at once, and a round trip
    /// each was a tenth of its work in a fan-out to 1000 members).
    async fn get_many(&self, user_ids: &[&str]) -> StoreResult<Vec<Vec<Placement>>> {
        futures::future::try_join_all(user_ids.iter().map(|&user| self.get(user))).await
    }
    /// Removes every placement on an access node (drain or crash recovery).
    /// Returns how many were removed.
    async fn remove_node(&self, node_id: &str) -> StoreResult<usize>;
    /// Up to `limit` online user ids, sorted.
    async fn online_users(&self, limit: usize) -> StoreResult<Vec<String>>;
    /// A number that grows with every [`SessionStore::put`] that has
    /// returned, if the store can tell without a round trip; `None` if it
    /// cannot. Read before looking placements up, it lets the caller skip
    /// looking again later when it has not changed: no login placed a
    /// connection in between (the offline consumer looks for connections
    /// that appeared during its write).
    fn placements_epoch(&self) -> Option<u64> {
        None
    }
}

/// Per-conversation counters (Redis INCR in cluster mode).
#[async_trait]
pub trait SequenceStore: Send + Sync + 'static {
    /// Increments the counter and returns the new value; the first call on a
    /// key returns 1.
    async fn incr(&self, key: &str) -> StoreResult<u64>;
    /// The current value, 0 for an unknown key.
    async fn current(&self, key: &str) -> StoreResult<u64>;
    /// Sets the counter back from `expected` to `expected - 1` if it still is
    /// `expected` (undoing an increment whose message could not be
    /// published). Returns whether it did.
    async fn rollback(&self, key: &str, expected: u64) -> StoreResult<bool>;
}

/// What an accepted message was assigned; returned again for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub msg_id: u64,
    pub seq: u64,
    pub sent_at_ms: u64,
}

/// Remembers accepted client message ids so retries are not stored twice.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>>;
    /// [`DedupStore::get`] for several client message ids of one sender:
    /// one result per id, in the same order. The dispatcher looks a whole
    /// burst of sends up at once; a backend that can answer them in one
    /// read (one transaction, one round trip) overrides the default, which
    /// asks one at a time.
    async fn get_many(&self, sender: &str, client_msg_ids: &[&str]) -> StoreResult<Vec<Option<DedupRecord>>> {
        let mut records = Vec::with_capacity(client_msg_ids.len());
        for client_msg_id in client_msg_ids {
            records.push(self.get(sender, client_msg_id).await?);
        }
        Ok(records)
    }
    /// Remembers the record for at least `ttl`.
    async fn put(
        &self,
        sender: &str,
        client_msg_id: &str,
        record: DedupRecord,
        ttl: Duration,
    ) -> StoreResult<()>;
}

/// One message in a receiver's offline set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineEntry {
    pub msg_id: u64,
    pub payload: Bytes,
}

/// Per-receiver ordered offline sets (Redis sorted sets in cluster mode),
/// ordered by message id.
#[async_trait]
pub trait OfflineStore: Send + Sync + 'static {
    /// Adds `entry` to each receiver's set (write diffusion). Idempotent per
    /// (receiver, msg_id). An id acknowledged before it was inserted (see
    /// [`OfflineStore::ack`]) is not added.
    async fn insert(&self, receivers: &[String], entry: &OfflineEntry) -> StoreResult<()>;
    /// Up to `limit` entries with `msg_id > after`, oldest first.
    async fn pull(&self, receiver: &str, after: u64, limit: usize) -> StoreResult<Vec<OfflineEntry>>;
    /// Deletes entries. An id that is not there yet is remembered for
    /// `tombstone_ttl` so a late insert of it is ignored (the push of a
    /// message can overtake its write to this store). An id that was there
    /// leaves nothing behind: a tombstone per delivered message would make
    /// the store grow with the delivery rate times the ttl. So an insert
    /// repeated after the ack (the bus replayed a batch, or a sender's retry
    /// published the message again) adds the entry again; the device gets
    /// it once more, drops it as a duplicate and ACKs it.
    async fn ack(&self, receiver: &str, msg_ids: &[u64], tombstone_ttl: Duration) -> StoreResult<()>;
    /// Number of entries waiting for `receiver`.
    async fn count(&self, receiver: &str) -> StoreResult<u64>;
}

/// Durable group message history (ScyllaDB rows keyed by group id and
/// reversed message id in cluster mode).
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores a message; idempotent per (group, msg_id).
    async fn append(&self, group_id: &str, msg_id: u64, payload: Bytes) -> StoreResult<()>;
    /// Up to `limit` messages with `msg_id < before` (`before == 0` means from
    /// the newest), newest first.
    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>>;
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    /// PHC-format password hash.
    pub password_hash: String,
    pub created_at_ms: u64,
}

/// A group and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group_id: String,
    pub name: String,
    pub owner: String,
    /// Sorted, without duplicates.
    pub members: Vec<String>,
    pub created_at_ms: u64,
}

/// Users, groups and memberships (MongoDB in cluster mode).
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Creates the user; `false` if the id is taken (nothing changes then).
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool>;
    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>>;
    /// Creates the group; `false` if the id is taken.
    async fn create_group(&self, group: &GroupRecord) -> StoreResult<bool>;
    /// The group, shared: a store that caches groups hands out its copy,
    /// so a send to a large group copies no member list.
    async fn get_group(&self, group_id: &str) -> StoreResult<Option<Arc<GroupRecord>>>;
    /// Adds a member; returns the updated group, `None` if there is no group.
    async fn add_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>>;
    /// Removes a member; returns the updated group, `None` if there is no group.
    async fn remove_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>>;
    /// Ids of the groups the user belongs to, sorted.
    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<String>>;
    /// Records that `device_id` of the user has logged in (idempotent).
    /// Messages are kept offline for every recorded device of a receiver.
    async fn add_device(&self, user_id: &str, device_id: &str) -> StoreResult<()>;
    /// The user's recorded devices, sorted.
    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>>;
    /// [`MetaStore::devices`] of each of `user_ids`, by user. The default
    /// looks them up concurrently; the embedded store reads them all in one
    /// read transaction, Redis in one pipeline (a consumer batch of a
    /// 1000-member group's messages asks for 1000 users at once).
    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<DevicesByUser> {
        let lookups =
            user_ids.iter().map(|&user| async move { Ok((user.to_owned(), self.devices(user).await?)) });
        futures::future::try_join_all(lookups).await.map(|found| found.into_iter().collect())
    }
}

/// The recorded devices of several users, by user
/// ([`MetaStore::devices_of_users`]). The offline consumer looks a user up
/// here for every message of a batch it receives, so the map hashes with
/// foldhash (seeded per process) rather than SipHash.
pub type DevicesByUser = HashMap<String, Vec<String>, foldhash::fast::RandomState>;

/// One record read from the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusRecord {
    /// Partition of the topic (always 0 on the embedded bus). Order holds
    /// within a partition; records with the same key share a partition.
    pub partition: u32,
    /// Position within the partition.
    pub offset: u64,
    pub key: Bytes,
    pub payload: Bytes,
}

/// The message bus between dispatchers and storage services (Kafka in
/// cluster mode): durable, ordered per key, consumed by named groups that
/// commit offsets after processing.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends a record and returns once it is durable.
    async fn publish(&self, topic: &str, key: Bytes, payload: Bytes) -> StoreResult<()>;
    /// A consumer in `group` that starts after the group's committed offset.
    async fn subscribe(&self, topic: &str, group: &str) -> StoreResult<Box<dyn BusConsumer>>;
}

/// A consumer of one topic. Records are delivered at least once: after a
/// crash, everything after the last commit is delivered again.
#[async_trait]
pub trait BusConsumer: Send + 'static {
    /// Waits up to `wait` for records and returns at most `max` of them, in
    /// order; an empty batch means nothing arrived in time.
    async fn poll(&mut self, max: usize, wait: Duration) -> StoreResult<Vec<BusRecord>>;
    /// Marks as processed, in each partition that appears in `records`,
    /// everything up to and including that partition's highest offset there.
    /// Consumers pass what they finished since their last commit (the
    /// records themselves, or just the newest of each partition).
    async fn commit(&mut self, records: &[BusRecord]) -> StoreResult<()>;
}

/// A live node as seen in the registry (ZooKeeper in cluster mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    /// Role name, e.g. "access-tcp" or "dispatcher".
    pub role: String,
    /// Address clients connect to (access nodes) or peers call (other roles).
    pub addr: String,
    /// Address of the node's internal RPC endpoint, when it differs from
    /// `addr` (an access node serves clients on `addr` and pushes here).
    #[serde(default)]
    pub internal_addr: String,
    /// Live connection count (access nodes).
    pub connections: u64,
}

/// Registry of live nodes.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Registers or replaces a node.
    async fn register(&self, node: &NodeInfo) -> StoreResult<()>;
    /// Updates a registered node's connection count.
    async fn update_connections(&self, node_id: &str, connections: u64) -> StoreResult<()>;
    async fn deregister(&self, node_id: &str) -> StoreResult<()>;
    /// Live nodes of a role, sorted by node id.
    async fn list(&self, role: &str) -> StoreResult<Vec<NodeInfo>>;
    /// Follows the membership of a role: the receiver holds the current
    /// list (as [`Registry::list`] returns it) and is updated when a node of
    /// the role joins or leaves. Connection-count changes need not notify.
    async fn watch(&self, role: &str) -> StoreResult<tokio::sync::watch::Receiver<Vec<NodeInfo>>>;
}
