//! One user's corrupt stored value (the wrong type under a key, as Redis
//! reports it: `StoreError::Corrupt`) costs that user, never the consumer:
//! a corrupt device list sends the user's messages to their shared set, a
//! corrupt offline set is skipped, and the next batches go on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tern_offline_svc::{ConsumerBackends, Holding, OfflineConfig, OfflineService, PushGateway};
use tern_proto::BusNames;
use tern_store::embedded::EmbeddedBackends;
use tern_store::{
    Bus, GroupRecord, MetaStore, OfflineEntry, OfflineStore, Placement, StoreError, StoreResult, UserRecord,
};
use tokio::time::Instant;

mod common;
use common::{envelope, start_consumer};

/// Pushes nowhere: every receiver here is offline.
struct NoPushes;

impl PushGateway for NoPushes {
    fn push(&self, _: &Placement, _: u64, _: Bytes) {}
    fn sync_notice(&self, _: &Placement, _: &str) {}
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: WRONGTYPE Operation against a key holding the wrong kind of value"))
}

/// A meta store whose device list of `broken` is corrupt.
struct CorruptDevices {
    inner: Arc<dyn MetaStore>,
    broken: &'static str,
}

#[async_trait]
impl MetaStore for CorruptDevices {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        self.inner.create_user(user).await
    }
    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        self.inner.get_user(user_id).await
    }
    async fn create_group(&self, group: &GroupRecord) -> StoreResult<bool> {
        self.inner.create_group(group).await
    }
    async fn get_group(&self, group_id: &str) -> StoreResult<Option<std::sync::Arc<GroupRecord>>> {
        self.inner.get_group(group_id).await
    }
    async fn add_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        self.inner.add_member(group_id, user_id).await
    }
    async fn remove_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        self.inner.remove_member(group_id, user_id).await
    }
    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        self.inner.groups_of(user_id).await
    }
    async fn add_device(&self, user_id: &str, device_id: &str) -> StoreResult<()> {
        self.inner.add_device(user_id, device_id).await
    }
    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        if user_id == self.broken {
            return Err(corrupt(&format!("devices of {user_id}")));
        }
        self.inner.devices(user_id).await
    }
    // As one Redis pipeline: one bad reply fails the whole call.
    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<tern_store::DevicesByUser> {
        if user_ids.contains(&self.broken) {
            return Err(corrupt(&format!("devices of {}", self.broken)));
        }
        self.inner.devices_of_users(user_ids).await
    }
}

/// An offline store whose set `broken` is corrupt.
struct CorruptSet {
    inner: Arc<dyn OfflineStore>,
    broken: &'static str,
}

#[async_trait]
impl OfflineStore for CorruptSet {
    // As one Redis script over every key: one bad key fails the call.
    async fn insert(&self, receivers: &[String], entry: &OfflineEntry) -> StoreResult<()> {
        if receivers.iter().any(|r| r == self.broken) {
            return Err(corrupt(self.broken));
        }
        self.inner.insert(receivers, entry).await
    }
    async fn pull(&self, receiver: &str, after: u64, limit: usize) -> StoreResult<Vec<OfflineEntry>> {
        self.inner.pull(receiver, after, limit).await
    }
    async fn ack(&self, receiver: &str, msg_ids: &[u64], tombstone_ttl: Duration) -> StoreResult<()> {
        self.inner.ack(receiver, msg_ids, tombstone_ttl).await
    }
    async fn count(&self, receiver: &str) -> StoreResult<u64> {
        self.inner.count(receiver).await
    }
}

/// bob and carol have each logged in once (a recorded device); both are
/// offline now.
async fn offline_pair() -> (tempfile::TempDir, EmbeddedBackends) {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    backends.meta.add_device("bob", "phone").await.unwrap();
    backends.meta.add_device("carol", "desk").await.unwrap();
    (dir, backends)
}

async fn publish(backends: &EmbeddedBackends, id: u64, receivers: &[&str]) {
    let topic = BusNames::default().messages_topic;
    backends
        .bus
        .publish(&topic, Bytes::from_static(b"k"), envelope(id, "g", "alice", receivers))
        .await
        .unwrap();
}

async fn wait_for(backends: &EmbeddedBackends, inbox: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends.offline.count(inbox).await.unwrap() < count {
        assert!(Instant::now() < deadline, "{inbox} did not get {count} entries: the consumer stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_corrupt_device_list_sends_that_users_messages_to_the_shared_set() {
    let (_dir, backends) = offline_pair().await;
    publish(&backends, 1, &["bob", "carol"]).await;
    let config = OfflineConfig::default();
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let consumer_backends = ConsumerBackends {
        meta: Arc::new(CorruptDevices { inner: backends.meta.clone(), broken: "carol" }),
        store: backends.offline.clone(),
        sessions: backends.sessions.clone(),
        held: offline.held_writes(),
        holding: Holding::Always,
    };
    let (task, stop) = start_consumer(backends.bus.clone(), consumer_backends, Arc::new(NoPushes), config);
    wait_for(&backends, "bob/phone", 1).await;
    wait_for(&backends, "carol/", 1).await;
    assert_eq!(backends.offline.count("carol/desk").await.unwrap(), 0);
    // And the next batch goes on.
    publish(&backends, 2, &["bob", "carol"]).await;
    wait_for(&backends, "bob/phone", 2).await;
    wait_for(&backends, "carol/", 2).await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_corrupt_offline_set_is_skipped_and_the_others_are_written() {
    let (_dir, backends) = offline_pair().await;
    publish(&backends, 1, &["bob", "carol"]).await;
    let config = OfflineConfig::default();
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let consumer_backends = ConsumerBackends {
        meta: backends.meta.clone(),
        store: Arc::new(CorruptSet { inner: backends.offline.clone(), broken: "carol/desk" }),
        sessions: backends.sessions.clone(),
        held: offline.held_writes(),
        holding: Holding::Always,
    };
    let (task, stop) = start_consumer(backends.bus.clone(), consumer_backends, Arc::new(NoPushes), config);
    wait_for(&backends, "bob/phone", 1).await;
    publish(&backends, 2, &["bob"]).await;
    wait_for(&backends, "bob/phone", 2).await;
    assert_eq!(backends.offline.count("carol/desk").await.unwrap(), 0);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
