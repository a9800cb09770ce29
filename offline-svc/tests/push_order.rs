//! When the consumer pushes, relative to the offline write, end to end
//! through `run_consumer` on the embedded backends: a connection online
//! when the batch is read is pushed before the write; one that logs in
//! between the first placement lookup and the write is pushed after the
//! write (its login-time pull may have missed the entry); the SYNC notice
//! of a large-group burst goes out only after the write; the gateway hears
//! that a pull finds the pushed messages only after the write. With a
//! session store that keeps a placements epoch, the lookup after the write
//! is made only if a login happened since the first one.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tern_offline_svc::{ConsumerBackends, Holding, OfflineConfig, PushGateway};
use tern_proto::BusNames;
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, MetaStore, OfflineEntry, OfflineStore, Placement, SessionStore, StoreResult};

mod common;
use common::{envelope, placement, start_consumer};

/// Everything the consumer did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Push { connection: u64, msg_id: u64 },
    Sync { connection: u64 },
    Insert { msg_id: u64 },
    Pullable,
}

type Log = Arc<Mutex<Vec<Event>>>;

struct Recorder(Log);

impl PushGateway for Recorder {
    fn push(&self, placement: &Placement, msg_id: u64, _message: Bytes) {
        self.0.lock().unwrap().push(Event::Push { connection: placement.connection_id, msg_id });
    }

    fn sync_notice(&self, placement: &Placement, _reason: &str) {
        self.0.lock().unwrap().push(Event::Sync { connection: placement.connection_id });
    }

    fn batch_pullable(&self, _number: u64) {
        self.0.lock().unwrap().push(Event::Pullable);
    }
}

/// The embedded offline store, logging each insert once it returned.
struct LoggedStore {
    inner: Arc<dyn OfflineStore>,
    log: Log,
}

#[async_trait]
impl OfflineStore for LoggedStore {
    async fn insert(&self, receivers: &[String], entry: &OfflineEntry) -> StoreResult<()> {
        self.inner.insert(receivers, entry).await?;
        self.log.lock().unwrap().push(Event::Insert { msg_id: entry.msg_id });
        Ok(())
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

/// The embedded session store, where `late` (if any) logs in right after
/// the first lookup of its placements (so the consumer's first lookup
/// misses it). Counts lookups; `epoch` says whether it passes the embedded
/// store's placements epoch on or, like the Redis store, has none.
struct LoginAfterFirstLookup {
    inner: Arc<dyn SessionStore>,
    late: Option<Placement>,
    logged_in: AtomicBool,
    epoch: bool,
    lookups: AtomicUsize,
}

impl LoginAfterFirstLookup {
    fn new(inner: Arc<dyn SessionStore>, late: Option<Placement>, epoch: bool) -> Self {
        Self { inner, late, logged_in: AtomicBool::new(false), epoch, lookups: AtomicUsize::new(0) }
    }
}

#[async_trait]
impl SessionStore for LoginAfterFirstLookup {
    async fn put(&self, placement: &Placement) -> StoreResult<Option<Placement>> {
        self.inner.put(placement).await
    }

    async fn remove(&self, placement: &Placement) -> StoreResult<bool> {
        self.inner.remove(placement).await
    }

    async fn get(&self, user_id: &str) -> StoreResult<Vec<Placement>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let found = self.inner.get(user_id).await?;
        if let Some(late) = self.late.as_ref().filter(|late| late.user_id == user_id)
            && !self.logged_in.swap(true, Ordering::SeqCst)
        {
            self.inner.put(late).await?;
        }
        Ok(found)
    }

    async fn remove_node(&self, node_id: &str) -> StoreResult<usize> {
        self.inner.remove_node(node_id).await
    }

    async fn online_users(&self, limit: usize) -> StoreResult<Vec<String>> {
        self.inner.online_users(limit).await
    }

    fn placements_epoch(&self) -> Option<u64> {
        self.epoch.then(|| self.inner.placements_epoch()).flatten()
    }
}

const BOB: u64 = 1;
const CAROL: u64 = 2;
const DAVE: u64 = 3;

#[tokio::test]
async fn online_receivers_are_pushed_before_the_write_and_newcomers_after_it() {
    pushes_around_the_write(true).await;
}

#[tokio::test]
async fn without_a_placements_epoch_newcomers_are_pushed_after_the_write() {
    pushes_around_the_write(false).await;
}

async fn pushes_around_the_write(epoch: bool) {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for (user, device) in [("bob", "phone"), ("carol", "desk"), ("dave", "tab")] {
        backends.meta.add_device(user, device).await.unwrap();
    }
    // bob and dave are online from the start; carol logs in while the
    // batch is being written.
    backends.sessions.put(&placement("bob", "phone", BOB)).await.unwrap();
    backends.sessions.put(&placement("dave", "tab", DAVE)).await.unwrap();
    let sessions = Arc::new(LoginAfterFirstLookup::new(
        backends.sessions.clone(),
        Some(placement("carol", "desk", CAROL)),
        epoch,
    ));
    let log: Log = Arc::default();
    let store = Arc::new(LoggedStore { inner: backends.offline.clone(), log: log.clone() });
    // Groups of 4 are large; more than 1 of their messages in a batch make
    // a device pull.
    // No copy is held back for an ACK here (see held_copies.rs).
    let config = OfflineConfig {
        large_group_members: 4,
        pull_notice_threshold: 1,
        ack_wait: Duration::ZERO,
        ..OfflineConfig::default()
    };

    // One batch: a 1:1 message to bob, one to carol, two to a large group
    // with dave.
    let names = BusNames::default();
    let records = [
        envelope(1, "", "alice", &["bob"]),
        envelope(2, "", "alice", &["carol"]),
        envelope(3, "g", "alice", &["dave", "x", "y"]),
        envelope(4, "g", "alice", &["dave", "x", "y"]),
    ];
    for record in records {
        backends.bus.publish(&names.messages_topic, Bytes::from_static(b"k"), record).await.unwrap();
    }
    let (consumer, stop_tx) = start_consumer(
        backends.bus.clone(),
        ConsumerBackends {
            meta: backends.meta.clone(),
            store,
            sessions,
            held: Arc::default(),
            holding: Holding::Always,
        },
        Arc::new(Recorder(log.clone())),
        config,
    );
    // 4 inserts, bob's and carol's pushes, dave's notice, the pullable report.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.lock().unwrap().len() < 8 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();

    let events = log.lock().unwrap().clone();
    let at = |event: &Event| {
        events.iter().position(|e| e == event).unwrap_or_else(|| panic!("{event:?} missing: {events:?}"))
    };
    let last_insert = (1..=4).map(|id| at(&Event::Insert { msg_id: id })).max().unwrap();
    assert!(
        at(&Event::Push { connection: BOB, msg_id: 1 }) < last_insert,
        "bob was online: pushed at once: {events:?}"
    );
    assert!(
        at(&Event::Push { connection: CAROL, msg_id: 2 }) > last_insert,
        "carol logged in meanwhile: pushed after the write: {events:?}"
    );
    assert!(
        at(&Event::Sync { connection: DAVE }) > last_insert,
        "a pull notice only once the entries exist: {events:?}"
    );
    assert!(
        at(&Event::Pullable) > last_insert,
        "pullable is reported only once everything of the batch was written: {events:?}"
    );
    assert_eq!(events.len(), 8, "nothing twice: {events:?}");
}

/// With no login during the batch, a store with a placements epoch is
/// asked for each pushed user's placements once per batch, not twice.
#[tokio::test]
async fn no_second_lookup_when_nobody_logged_in_meanwhile() {
    for (epoch, rounds) in [(true, 1), (false, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let backends = EmbeddedBackends::open(dir.path()).unwrap();
        backends.meta.add_device("bob", "phone").await.unwrap();
        backends.sessions.put(&placement("bob", "phone", BOB)).await.unwrap();
        let sessions = Arc::new(LoginAfterFirstLookup::new(backends.sessions.clone(), None, epoch));
        let log: Log = Arc::default();
        let names = BusNames::default();
        backends
            .bus
            .publish(&names.messages_topic, Bytes::from_static(b"k"), envelope(1, "", "alice", &["bob"]))
            .await
            .unwrap();
        let (consumer, stop_tx) = start_consumer(
            backends.bus.clone(),
            ConsumerBackends {
                meta: backends.meta.clone(),
                store: Arc::new(LoggedStore { inner: backends.offline.clone(), log: log.clone() }),
                sessions: sessions.clone(),
                held: Arc::default(),
                holding: Holding::Always,
            },
            Arc::new(Recorder(log.clone())),
            OfflineConfig { ack_wait: Duration::ZERO, ..OfflineConfig::default() },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().contains(&Event::Pullable) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(());
        consumer.await.unwrap().unwrap();
        let events = log.lock().unwrap().clone();
        assert!(events.contains(&Event::Push { connection: BOB, msg_id: 1 }), "bob was pushed: {events:?}");
        // bob, and alice for her other devices.
        assert_eq!(
            sessions.lookups.load(Ordering::SeqCst),
            2 * rounds,
            "placement lookups of the batch with epoch: {epoch}"
        );
    }
}
