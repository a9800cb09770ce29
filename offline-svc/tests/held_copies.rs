//! Copies held back for pushed devices, end to end through `run_consumer`
//! and `OfflineService::ack` on the embedded backends: an ACK within
//! `ack_wait` means the copy is never written; without one it is written
//! once the wait is over, and stays held until that write is done; the
//! batch's offset is committed only then, so a consumer that dies while
//! holding is replayed; a pull serves the held copies of its device from
//! memory, and its ACK settles them. The push gateway hears that a pull
//! finds the batch once it is written or held, without waiting for ACKs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tern_offline_svc::held::HeldWrites;
use tern_offline_svc::{
    ConsumerBackends, Holding, OfflineApi, OfflineConfig, OfflineService, PushGateway, SoleNode,
};
use tern_proto::BusNames;
use tern_store::discovery::Peers;
use tern_store::embedded::{EmbeddedBackends, InProcessRegistry};
use tern_store::{Bus, MetaStore, NodeInfo, OfflineStore, Placement, Registry, SessionStore, StoreError};
use tokio::time::Instant;

mod common;
use common::{consumer_backends, envelope, placement, start_consumer};

/// Records pushes (connection, message) and counts the batches reported
/// pullable.
#[derive(Default)]
struct Recorder {
    pushes: Mutex<Vec<(u64, u64)>>,
    /// Connections sent a SYNC notice.
    notices: Mutex<Vec<u64>>,
    pullable: AtomicU64,
}

impl PushGateway for Recorder {
    fn push(&self, placement: &Placement, msg_id: u64, _message: Bytes) {
        self.pushes.lock().unwrap().push((placement.connection_id, msg_id));
    }

    fn sync_notice(&self, placement: &Placement, _reason: &str) {
        self.notices.lock().unwrap().push(placement.connection_id);
    }

    fn batch_pullable(&self, _number: u64) {
        self.pullable.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn pushed(&self, connection: u64, msg_id: u64) -> bool {
        self.pushes.lock().unwrap().contains(&(connection, msg_id))
    }

    fn pullable(&self) -> u64 {
        self.pullable.load(Ordering::SeqCst)
    }
}

/// Stops the consumer and waits for it. A graceful stop finishes the
/// batches under way first, so with an `ack_wait` far longer than the
/// test this returns in time only if no copy is waiting any more.
async fn stop_promptly(
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
    stop: tokio::sync::oneshot::Sender<()>,
) {
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
    stopped.expect("the consumer still waits for a held copy").unwrap().unwrap();
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const BOB: u64 = 1;
const CAROL: u64 = 2;

/// Embedded backends where each (user, device) is recorded and the first
/// `online` of them are connected (connection ids 1, 2, …).
async fn backends_with(devices: &[(&str, &str)], online: usize) -> (tempfile::TempDir, EmbeddedBackends) {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for (i, (user, device)) in devices.iter().enumerate() {
        backends.meta.add_device(user, device).await.unwrap();
        if i < online {
            backends.sessions.put(&placement(user, device, i as u64 + 1)).await.unwrap();
        }
    }
    (dir, backends)
}

/// Publishes 1:1 message `id` from alice to `to`.
async fn publish(backends: &EmbeddedBackends, id: u64, to: &str) {
    let topic = BusNames::default().messages_topic;
    backends.bus.publish(&topic, Bytes::from_static(b"k"), envelope(id, "", "alice", &[to])).await.unwrap();
}

fn consumer(
    backends: &EmbeddedBackends,
    held: Arc<HeldWrites>,
    holding: Holding,
    gateway: Arc<Recorder>,
    config: OfflineConfig,
) -> (tokio::task::JoinHandle<Result<(), tern_store::StoreError>>, tokio::sync::oneshot::Sender<()>) {
    start_consumer(backends.bus.clone(), consumer_backends(backends, held, holding), gateway, config)
}

#[tokio::test]
async fn an_acked_copy_is_never_written_and_an_unacked_one_after_the_wait() {
    // bob (connection BOB) and carol (CAROL) are online, dave is not.
    let (_dir, backends) = backends_with(&[("bob", "phone"), ("carol", "desk"), ("dave", "tab")], 2).await;
    for (id, to) in [(1, "bob"), (2, "carol"), (3, "dave")] {
        publish(&backends, id, to).await;
    }
    let ack_wait = Duration::from_millis(1_500);
    let config = OfflineConfig { ack_wait, ..OfflineConfig::default() };
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let held = offline.held_writes();
    let gateway = Arc::new(Recorder::default());
    let started = Instant::now();
    let (task, stop) = consumer(&backends, held.clone(), Holding::Always, gateway.clone(), config);
    let count = |inbox: &'static str| {
        let store = backends.offline.clone();
        async move { store.count(inbox).await.unwrap() }
    };

    eventually("pushes to bob and carol", || gateway.pushed(BOB, 1) && gateway.pushed(CAROL, 2)).await;
    // dave was offline: written at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("dave/tab").await == 0 {
        assert!(Instant::now() < deadline, "dave's copy was not written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    offline.ack("bob", "phone", &[1]).await.unwrap();
    assert_eq!(count("bob/phone").await, 0, "bob ACKed within the wait: nothing written");
    assert_eq!(count("carol/desk").await, 0, "carol's copy waits for her ACK");
    eventually("the batch to be reported pullable", || gateway.pullable() == 1).await;
    assert_eq!(held.len(), 1, "reported while carol's copy is still held: a pull finds it");

    eventually("carol's copy to be written and released", || held.is_empty()).await;
    assert!(started.elapsed() >= ack_wait, "written before the wait was over");
    assert_eq!(count("carol/desk").await, 1, "carol did not ACK: her copy is written after the wait");
    assert_eq!(count("bob/phone").await, 0, "bob's ACKed copy is never written");
    assert!(gateway.notices.lock().unwrap().is_empty(), "carol's connection is not told to pull");
    let (pulled, _) = offline.pull("carol", "desk", 0, 10).await.unwrap();
    assert_eq!(pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [2]);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_consumer_that_dies_while_holding_is_replayed_and_acks_settle_the_batch_at_once() {
    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    publish(&backends, 1, "bob").await;
    // A wait far longer than the test: only ACKs settle the batch.
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };

    // The first consumer pushes, holds bob's copy and dies before the ACK.
    let first = Arc::new(Recorder::default());
    let (task, _stop) = consumer(&backends, Arc::default(), Holding::Always, first.clone(), config.clone());
    eventually("the first push", || first.pushed(BOB, 1)).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "the copy was held, not written");

    // Its offset was not committed: the next consumer gets the batch again.
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let second = Arc::new(Recorder::default());
    let (task, stop) = consumer(&backends, offline.held_writes(), Holding::Always, second.clone(), config);
    eventually("the replayed push", || second.pushed(BOB, 1)).await;
    assert_eq!(offline.held_writes().len(), 1);
    offline.ack("bob", "phone", &[1]).await.unwrap();
    stop_promptly(task, stop).await;
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "nothing written for an ACKed copy");
}

/// A device whose connection was cut while its copies were held pulls them
/// at once, in order and page by page, from memory: nothing is written, and
/// the ACK of the pull settles them as the ACK of a push would.
#[tokio::test]
async fn a_pull_serves_the_held_copies_of_its_device_and_its_ack_settles_them() {
    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    for id in [1, 2, 3] {
        publish(&backends, id, "bob").await;
    }
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let gateway = Arc::new(Recorder::default());
    let (task, stop) = consumer(&backends, offline.held_writes(), Holding::Always, gateway.clone(), config);
    eventually("the pushes", || (1..=3).all(|id| gateway.pushed(BOB, id))).await;
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "held, not written");
    assert_eq!(offline.pending("bob", "phone").await.unwrap(), 3, "held copies count as pending");

    let ids = |page: &[tern_proto::pb::Message]| page.iter().map(|m| m.msg_id).collect::<Vec<_>>();
    let (first, more) = offline.pull("bob", "phone", 0, 2).await.unwrap();
    assert_eq!((ids(&first), more), (vec![1, 2], true));
    let (rest, more) = offline.pull("bob", "phone", 2, 2).await.unwrap();
    assert_eq!((ids(&rest), more), (vec![3], false));
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "the pull wrote nothing");
    assert_eq!(offline.pending("bob", "phone").await.unwrap(), 3, "still held until ACKed");

    offline.ack("bob", "phone", &[1, 2, 3]).await.unwrap();
    assert_eq!(offline.pending("bob", "phone").await.unwrap(), 0);
    stop_promptly(task, stop).await;
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "nothing written for ACKed copies");
}

/// An offline store whose inserts wait until the test opens the gate, and
/// which records what it was asked to ACK.
struct GatedStore {
    inner: Arc<dyn OfflineStore>,
    gate: tokio::sync::Semaphore,
    inserting: AtomicU32,
    acked: Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl OfflineStore for GatedStore {
    async fn insert(
        &self,
        receivers: &[String],
        entry: &tern_store::OfflineEntry,
    ) -> tern_store::StoreResult<()> {
        self.inserting.fetch_add(1, Ordering::SeqCst);
        let _open = self.gate.acquire().await.expect("the gate is never closed");
        self.inner.insert(receivers, entry).await
    }

    async fn pull(
        &self,
        receiver: &str,
        after: u64,
        limit: usize,
    ) -> tern_store::StoreResult<Vec<tern_store::OfflineEntry>> {
        self.inner.pull(receiver, after, limit).await
    }

    async fn ack(
        &self,
        receiver: &str,
        msg_ids: &[u64],
        tombstone_ttl: Duration,
    ) -> tern_store::StoreResult<()> {
        self.acked.lock().unwrap().extend(msg_ids);
        self.inner.ack(receiver, msg_ids, tombstone_ttl).await
    }

    async fn count(&self, receiver: &str) -> tern_store::StoreResult<u64> {
        self.inner.count(receiver).await
    }
}

/// Once the wait is over, an unACKed copy stays held until its write is
/// done: a pull during the write still finds it (released first, it was
/// neither held nor stored, and a connection told to pull then found
/// nothing), and an ACK during the write reaches the store, whose
/// tombstone drops the write.
#[tokio::test]
async fn a_copy_being_written_is_still_pulled_and_an_ack_meanwhile_reaches_the_store() {
    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    publish(&backends, 1, "bob").await;
    let config = OfflineConfig { ack_wait: Duration::from_millis(200), ..OfflineConfig::default() };
    let gated = Arc::new(GatedStore {
        inner: backends.offline.clone(),
        gate: tokio::sync::Semaphore::new(0),
        inserting: AtomicU32::new(0),
        acked: Mutex::default(),
    });
    let offline = OfflineService::new(gated.clone(), config.clone());
    let gateway = Arc::new(Recorder::default());
    let consumer_backends = ConsumerBackends {
        meta: backends.meta.clone(),
        store: gated.clone(),
        sessions: backends.sessions.clone(),
        held: offline.held_writes(),
        holding: Holding::Always,
    };
    let (task, stop) = start_consumer(backends.bus.clone(), consumer_backends, gateway.clone(), config);
    eventually("the push to bob", || gateway.pushed(BOB, 1)).await;
    // bob does not ACK: after the wait his copy is written (and the write
    // waits at the gate).
    eventually("the write of bob's copy", || gated.inserting.load(Ordering::SeqCst) == 1).await;

    let (pulled, _) = offline.pull("bob", "phone", 0, 10).await.unwrap();
    assert_eq!(pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [1], "found while being written");
    assert_eq!(offline.pending("bob", "phone").await.unwrap(), 1);
    offline.ack("bob", "phone", &[1]).await.unwrap();
    assert_eq!(*gated.acked.lock().unwrap(), [1], "the ACK during the write went to the store");

    gated.gate.add_permits(1);
    eventually("the write to be done and the copy released", || offline.held_writes().is_empty()).await;
    assert_eq!(
        backends.offline.count("bob/phone").await.unwrap(),
        0,
        "the ACK's tombstone dropped the write"
    );
    let (pulled, _) = offline.pull("bob", "phone", 0, 10).await.unwrap();
    assert!(pulled.is_empty(), "an ACKed message comes back: {pulled:?}");
    stop_promptly(task, stop).await;
}

/// An offline-svc node as the registry lists it.
fn node(id: &str) -> NodeInfo {
    NodeInfo {
        node_id: id.into(),
        role: "offline-svc".into(),
        addr: "127.0.0.1:1".into(),
        internal_addr: String::new(),
        connections: 0,
    }
}

/// With several offline-svc nodes an ACK may reach one that does not hold
/// the copy, so the consumer writes every copy at once; alone, it holds.
#[tokio::test]
async fn copies_are_held_only_while_this_is_the_sole_offline_node() {
    let registry = InProcessRegistry::new();
    registry.register(&node("offline-1")).await.unwrap();
    registry.register(&node("offline-2")).await.unwrap();
    let peers = Peers::follow(&registry, "offline-svc").await.unwrap();

    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    publish(&backends, 1, "bob").await;
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };
    let held = Arc::new(HeldWrites::default());
    let gateway = Arc::new(Recorder::default());
    let holding = Holding::WhileSoleNode(SoleNode::follow(peers));
    let (task, stop) = consumer(&backends, held.clone(), holding, gateway.clone(), config);
    eventually("the batch of two nodes to be written", || gateway.pullable() == 1).await;
    assert!(gateway.pushed(BOB, 1));
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 1, "two nodes: written at once");
    assert!(held.is_empty());

    registry.deregister("offline-2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish(&backends, 2, "bob").await;
    eventually("the second push", || gateway.pushed(BOB, 2)).await;
    assert_eq!(held.len(), 1, "alone: bob's copy of message 2 is held");
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 1);
    // Not stopped gracefully: that would wait out the held copy's 600 s.
    drop(stop);
    task.abort();
}

/// A pull that reaches another offline-svc node does not find the copies
/// this one holds. If another node was live at any time while copies were
/// held (here it started and stopped again), their devices' connections
/// are told to pull once the copies are written.
#[tokio::test]
async fn copies_written_after_another_node_was_live_are_announced() {
    let registry = InProcessRegistry::new();
    registry.register(&node("offline-1")).await.unwrap();
    let peers = Peers::follow(&registry, "offline-svc").await.unwrap();

    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    publish(&backends, 1, "bob").await;
    let config = OfflineConfig { ack_wait: Duration::from_secs(1), ..OfflineConfig::default() };
    let held = Arc::new(HeldWrites::default());
    let gateway = Arc::new(Recorder::default());
    let holding = Holding::WhileSoleNode(SoleNode::follow(peers.clone()));
    let (task, stop) = consumer(&backends, held.clone(), holding, gateway.clone(), config);
    eventually("the push", || gateway.pushed(BOB, 1)).await;
    assert_eq!(held.len(), 1, "alone: bob's copy is held");

    registry.register(&node("offline-2")).await.unwrap();
    eventually("the second node to be seen", || peers.nodes().len() == 2).await;
    registry.deregister("offline-2").await.unwrap();
    eventually("the second node to be gone", || peers.nodes().len() == 1).await;
    eventually("bob's copy to be written", || held.is_empty()).await;
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 1);
    eventually("bob's connection to be told to pull", || *gateway.notices.lock().unwrap() == [BOB]).await;
    stop_promptly(task, stop).await;
}

/// An offline store that counts the calls made to it.
struct CountingStore {
    inner: Arc<dyn OfflineStore>,
    calls: AtomicU64,
}

impl CountingStore {
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn called(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl OfflineStore for CountingStore {
    async fn insert(
        &self,
        receivers: &[String],
        entry: &tern_store::OfflineEntry,
    ) -> tern_store::StoreResult<()> {
        self.called();
        self.inner.insert(receivers, entry).await
    }

    async fn pull(
        &self,
        receiver: &str,
        after: u64,
        limit: usize,
    ) -> tern_store::StoreResult<Vec<tern_store::OfflineEntry>> {
        self.called();
        self.inner.pull(receiver, after, limit).await
    }

    async fn ack(
        &self,
        receiver: &str,
        msg_ids: &[u64],
        tombstone_ttl: Duration,
    ) -> tern_store::StoreResult<()> {
        self.called();
        self.inner.ack(receiver, msg_ids, tombstone_ttl).await
    }

    async fn count(&self, receiver: &str) -> tern_store::StoreResult<u64> {
        self.called();
        self.inner.count(receiver).await
    }
}

/// The ACK of a push whose copy is held (the usual ACK) settles it in
/// memory and asks the store nothing, not even whether the user's shared
/// set has entries; an ACK of anything else still reaches the store, the
/// shared set included.
#[tokio::test]
async fn an_ack_of_held_copies_asks_the_store_nothing() {
    // bob is online; dave has never logged in, so his copy goes to his
    // shared set, until his tablet logs in and pulls it.
    let (_dir, backends) = backends_with(&[("bob", "phone")], 1).await;
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };
    let counting = Arc::new(CountingStore { inner: backends.offline.clone(), calls: AtomicU64::new(0) });
    let offline = OfflineService::new(counting.clone(), config.clone());
    let gateway = Arc::new(Recorder::default());
    let (task, stop) = consumer(&backends, offline.held_writes(), Holding::Always, gateway.clone(), config);
    // dave's message first, in a batch of its own.
    publish(&backends, 2, "dave").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends.offline.count("dave/").await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "dave's copy was not written to his shared set");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually("dave's batch to be written", || gateway.pullable() == 1).await;
    publish(&backends, 1, "bob").await;
    eventually("the push to bob", || gateway.pushed(BOB, 1)).await;

    offline.ack("bob", "phone", &[1]).await.unwrap();
    assert_eq!(counting.calls(), 0, "a held copy's ACK is settled in memory");
    assert!(offline.held_writes().is_empty());
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "nothing written for an ACKed copy");

    backends.meta.add_device("dave", "tab").await.unwrap();
    let (pulled, _) = offline.pull("dave", "tab", 0, 10).await.unwrap();
    assert_eq!(pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [2], "from the shared set");
    offline.ack("dave", "tab", &[2]).await.unwrap();
    assert!(counting.calls() > 0);
    assert_eq!(backends.offline.count("dave/").await.unwrap(), 0, "the ACK emptied the shared set");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A session store whose batch lookup always fails, and whose lookup of
/// `broken` fails `failures` times with `error`.
struct FlakySessions {
    inner: Arc<dyn SessionStore>,
    broken: &'static str,
    failures: AtomicU32,
    error: fn(String) -> StoreError,
}

impl FlakySessions {
    fn new(
        inner: Arc<dyn SessionStore>,
        broken: &'static str,
        failures: u32,
        error: fn(String) -> StoreError,
    ) -> Self {
        Self { inner, broken, failures: AtomicU32::new(failures), error }
    }
}

#[async_trait::async_trait]
impl SessionStore for FlakySessions {
    async fn put(&self, placement: &Placement) -> tern_store::StoreResult<Option<Placement>> {
        self.inner.put(placement).await
    }

    async fn remove(&self, placement: &Placement) -> tern_store::StoreResult<bool> {
        self.inner.remove(placement).await
    }

    async fn get(&self, user_id: &str) -> tern_store::StoreResult<Vec<Placement>> {
        if user_id == self.broken
            && self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Err((self.error)(format!("{user_id}: unreadable placement")));
        }
        self.inner.get(user_id).await
    }

    async fn get_many(&self, _user_ids: &[&str]) -> tern_store::StoreResult<Vec<Vec<Placement>>> {
        Err(StoreError::Backend("pipeline timed out".into()))
    }

    async fn remove_node(&self, node_id: &str) -> tern_store::StoreResult<usize> {
        self.inner.remove_node(node_id).await
    }

    async fn online_users(&self, limit: usize) -> tern_store::StoreResult<Vec<String>> {
        self.inner.online_users(limit).await
    }
}

/// A consumer over a store whose lookups of carol fail (`failures` times,
/// with `error`), once it has handled group message 1 to bob and carol
/// (both online) up to its offline write: carol's copy is written.
struct CarolFailing {
    _dir: tempfile::TempDir,
    backends: EmbeddedBackends,
    offline: OfflineService,
    gateway: Arc<Recorder>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn consume_with_carol_failing(failures: u32, error: fn(String) -> StoreError) -> CarolFailing {
    let (dir, backends) = backends_with(&[("bob", "phone"), ("carol", "desk")], 2).await;
    // One record, so one batch: a group message to bob and carol.
    let topic = BusNames::default().messages_topic;
    let message = envelope(1, "g", "alice", &["bob", "carol"]);
    backends.bus.publish(&topic, Bytes::from_static(b"k"), message).await.unwrap();
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let consumer_backends = ConsumerBackends {
        meta: backends.meta.clone(),
        store: backends.offline.clone(),
        sessions: Arc::new(FlakySessions::new(backends.sessions.clone(), "carol", failures, error)),
        held: offline.held_writes(),
        holding: Holding::Always,
    };
    let gateway = Arc::new(Recorder::default());
    let (task, stop) = start_consumer(backends.bus.clone(), consumer_backends, gateway.clone(), config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends.offline.count("carol/desk").await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "carol's copy was not written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    CarolFailing { _dir: dir, backends, offline, gateway, task, stop }
}

/// When the batch's placement lookup fails, users are looked up one by
/// one: a user whose own lookup fails too goes without the early push, the
/// others are pushed (and their copies held) as usual.
#[tokio::test]
async fn a_failed_batch_lookup_costs_only_the_failing_users_push() {
    let run = consume_with_carol_failing(1, StoreError::Backend).await;
    // The message's copies are written in one insert: once carol's is
    // there, bob's was written with it or held.
    assert!(run.gateway.pushed(BOB, 1), "bob's lookup worked: pushed");
    assert_eq!(
        run.backends.offline.count("bob/phone").await.unwrap(),
        0,
        "bob was pushed before the write: his copy is held, not written"
    );
    // The consumer stops once its batches are done: bob's held copy with
    // his ACK.
    run.offline.ack("bob", "phone", &[1]).await.unwrap();
    let _ = run.stop.send(());
    run.task.await.unwrap().unwrap();
}

/// A user whose placement cannot be read after the offline write (a
/// corrupt stored value; an error that persists) is given up on, so the
/// consumer goes on: the next batch is pushed. The old loop looked such a
/// user up again forever and stalled every later message.
#[tokio::test]
async fn an_unreadable_placement_does_not_stall_the_consumer() {
    let errors: [fn(String) -> StoreError; 2] = [StoreError::Corrupt, StoreError::Backend];
    for error in errors {
        // Message 1's write is done (carol's copy is there) before the
        // lookup after it; message 2 comes in a later batch.
        let run = consume_with_carol_failing(u32::MAX, error).await;
        assert!(run.gateway.pushed(BOB, 1));
        publish(&run.backends, 2, "bob").await;
        eventually("the push of the next batch", || run.gateway.pushed(BOB, 2)).await;
        run.offline.ack("bob", "phone", &[1, 2]).await.unwrap();
        let _ = run.stop.send(());
        run.task.await.unwrap().unwrap();
    }
}
