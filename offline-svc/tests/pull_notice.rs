//! The consumer's push decision for large groups, end to end through
//! `run_consumer` on the embedded backends: every copy not held back for an
//! online device goes to the offline sets; per connection, a batch with more than
//! `pull_notice_threshold` large-group messages becomes one SYNC notice
//! instead of their pushes, while 1:1 and small-group messages (and a large
//! group at or under the threshold) are pushed as before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tern_offline_svc::{Holding, OfflineApi, OfflineConfig, OfflineService, PushGateway};
use tern_proto::{BusNames, pb};
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, MetaStore, OfflineStore, Placement, SessionStore};

mod common;
use common::{consumer_backends, envelope, placement, start_consumer};

/// What the consumer handed to the gateway, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Push { connection: u64, msg_id: u64 },
    Sync { connection: u64, reason: String },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Sent>>);

impl Recorder {
    fn sent(&self) -> Vec<Sent> {
        self.0.lock().unwrap().clone()
    }
}

impl PushGateway for Recorder {
    fn push(&self, placement: &Placement, msg_id: u64, _message: Bytes) {
        self.0.lock().unwrap().push(Sent::Push { connection: placement.connection_id, msg_id });
    }

    fn sync_notice(&self, placement: &Placement, reason: &str) {
        let sent = Sent::Sync { connection: placement.connection_id, reason: reason.to_owned() };
        self.0.lock().unwrap().push(sent);
    }
}

const BOB: u64 = 1;
const CAROL: u64 = 2;
const ERIN: u64 = 3;

#[tokio::test]
async fn a_burst_of_large_group_messages_becomes_one_sync_notice_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for (user, device, connection) in [("bob", "phone", BOB), ("carol", "desk", CAROL), ("erin", "e", ERIN)] {
        backends.meta.add_device(user, device).await.unwrap();
        backends.sessions.put(&placement(user, device, connection)).await.unwrap();
    }
    // Groups of 4 members are large, and more than 3 of their messages in
    // one batch make a device pull.
    let config =
        OfflineConfig { large_group_members: 4, pull_notice_threshold: 3, ..OfflineConfig::default() };
    let big = ["bob", "carol", "dave"]; // + alice: 4 members
    let other_big = ["carol", "erin", "frank", "gina"]; // + alice: 5 members
    let small = ["bob", "dave"]; // + alice: 3 members

    // Everything is on the bus before the consumer starts: one batch.
    let mut records = Vec::new();
    let mut next_id = 0;
    let mut add = |group: &str, receivers: &[&str]| {
        next_id += 1;
        records.push(envelope(next_id, group, "alice", receivers));
        next_id
    };
    let big_ids: Vec<u64> = (0..5).map(|_| add("big", &big)).collect();
    let small_ids: Vec<u64> = (0..2).map(|_| add("small", &small)).collect();
    let single_id = add("", &["bob"]);
    // Exactly the threshold for erin: still pushed; carol now has 8.
    let other_big_ids: Vec<u64> = (0..3).map(|_| add("other-big", &other_big)).collect();
    // Interleave the conversations so order is checked across them.
    records.swap(1, 5);
    records.swap(3, 7);
    let names = BusNames::default();
    let published: Vec<u64> =
        records.iter().map(|r| pb::BusEnvelope::decode(r.clone()).unwrap().message.unwrap().msg_id).collect();
    for record in records {
        backends.bus.publish(&names.messages_topic, Bytes::from_static(b"k"), record).await.unwrap();
    }

    // bob: 2 small + 1 single pushed, 1 notice; carol: 1 notice; erin: 3 pushes.
    let expected_events = 3 + 1 + 1 + 3;
    let sent = consume_recorded(&backends, config.clone(), expected_events).await;
    let pushes_to = |connection: u64| -> Vec<u64> {
        sent.iter()
            .filter_map(|s| match s {
                Sent::Push { connection: c, msg_id } if *c == connection => Some(*msg_id),
                _ => None,
            })
            .collect()
    };
    let notices_to = |connection: u64| -> Vec<String> {
        sent.iter()
            .filter_map(|s| match s {
                Sent::Sync { connection: c, reason } if *c == connection => Some(reason.clone()),
                _ => None,
            })
            .collect()
    };
    let in_bus_order =
        |ids: &[u64]| -> Vec<u64> { published.iter().copied().filter(|id| ids.contains(id)).collect() };

    // bob: the 5 large-group messages become one notice; the small-group and
    // 1:1 messages are pushed, in bus order.
    let bob_pushed: Vec<u64> = small_ids.iter().copied().chain([single_id]).collect();
    assert_eq!(pushes_to(BOB), in_bus_order(&bob_pushed), "{sent:?}");
    assert_eq!(notices_to(BOB), ["5 new messages in group big; pull"], "{sent:?}");
    // carol: only large-group messages, of two groups, all by pull.
    assert!(pushes_to(CAROL).is_empty(), "{sent:?}");
    assert_eq!(notices_to(CAROL), ["8 new messages in groups big (5), other-big (3); pull"], "{sent:?}");
    // erin: a large group, but not more than the threshold: pushed.
    assert_eq!(pushes_to(ERIN), other_big_ids, "{sent:?}");
    assert!(notices_to(ERIN).is_empty(), "{sent:?}");
    assert_eq!(sent.len(), expected_events, "{sent:?}");

    // Nothing changes for the offline sets: bob pulls all 8, carol all 5
    // (the copies held back for pushed devices were written when the
    // consumer stopped, since nobody ACKed them).
    let offline = OfflineService::new(backends.offline.clone(), config);
    let (bob_pulled, more) = offline.pull("bob", "phone", 0, 100).await.unwrap();
    assert!(!more);
    let mut bob_all: Vec<u64> = big_ids.iter().chain(&small_ids).copied().chain([single_id]).collect();
    bob_all.sort_unstable();
    assert_eq!(bob_pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), bob_all);
    let (carol_pulled, _) = offline.pull("carol", "desk", 0, 100).await.unwrap();
    let carol_all: Vec<u64> = big_ids.iter().chain(&other_big_ids).copied().collect();
    assert_eq!(carol_pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), carol_all);
}

/// Pulling costs the server an offline write per member and message, so
/// the default threshold leaves steady large-group traffic pushed: a batch
/// of 300 messages of a 200-member group (large by default), more than a
/// consumer reads at once under a steady 1,000 messages per second to a
/// group of 1,000, is pushed.
#[tokio::test]
async fn steady_large_group_traffic_is_pushed_with_the_default_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    backends.meta.add_device("bob", "phone").await.unwrap();
    backends.sessions.put(&placement("bob", "phone", BOB)).await.unwrap();
    let config = OfflineConfig::default();
    let others: Vec<String> = (0..198).map(|i| format!("member-{i}")).collect();
    let receivers: Vec<&str> = std::iter::once("bob").chain(others.iter().map(String::as_str)).collect();
    assert_eq!(receivers.len() + 1, config.large_group_members, "the group is large");

    // Everything is on the bus before the consumer starts: one batch.
    let names = BusNames::default();
    let ids: Vec<u64> = (1..=300).collect();
    for &id in &ids {
        let record = envelope(id, "crowd", "alice", &receivers);
        backends.bus.publish(&names.messages_topic, Bytes::from_static(b"k"), record).await.unwrap();
    }
    let sent = consume_recorded(&backends, config, ids.len()).await;

    let pushed: Vec<Sent> = ids.iter().map(|&msg_id| Sent::Push { connection: BOB, msg_id }).collect();
    assert_eq!(sent, pushed);
}

/// A device told to pull has its copies of the burst held, like a pushed
/// device's: its pull serves them from memory and its ACK settles them, so
/// the burst costs no offline write for an online member (writing them was
/// a write per member and message, which under a large group's overload
/// stalled every commit for seconds). The offline member's copies are
/// written as ever.
#[tokio::test]
async fn a_device_told_to_pull_is_served_its_held_copies_without_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for (user, device) in [("bob", "phone"), ("carol", "desk")] {
        backends.meta.add_device(user, device).await.unwrap();
    }
    backends.sessions.put(&placement("bob", "phone", BOB)).await.unwrap();
    let config = OfflineConfig {
        large_group_members: 4,
        pull_notice_threshold: 3,
        ack_wait: Duration::from_secs(600),
        ..OfflineConfig::default()
    };
    let names = BusNames::default();
    let ids: Vec<u64> = (1..=5).collect();
    for &id in &ids {
        let record = envelope(id, "big", "alice", &["bob", "carol", "dave"]);
        backends.bus.publish(&names.messages_topic, Bytes::from_static(b"k"), record).await.unwrap();
    }
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let recorder = Arc::new(Recorder::default());
    let stores = consumer_backends(&backends, offline.held_writes(), Holding::Always);
    let (consumer, stop_tx) = start_consumer(backends.bus.clone(), stores, recorder.clone(), config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while recorder.sent().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let notice = Sent::Sync { connection: BOB, reason: "5 new messages in group big; pull".into() };
    assert_eq!(recorder.sent(), [notice]);
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "held, not written");
    assert_eq!(backends.offline.count("carol/desk").await.unwrap(), 5, "offline: written");
    assert_eq!(backends.offline.count("dave/").await.unwrap(), 5, "no device yet: the shared set");

    let (pulled, more) = offline.pull("bob", "phone", 0, 100).await.unwrap();
    assert_eq!((pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(), more), (ids.clone(), false));
    offline.ack("bob", "phone", &ids).await.unwrap();
    assert_eq!(offline.pending("bob", "phone").await.unwrap(), 0);
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();
    assert_eq!(backends.offline.count("bob/phone").await.unwrap(), 0, "nothing written for bob");
}

/// Runs the consumer on `backends` (every pushed copy held) until the
/// gateway got `events` pushes and notices, or 10 s passed, and 200 ms
/// more (so that anything beyond them shows too); returns what it got.
async fn consume_recorded(backends: &EmbeddedBackends, config: OfflineConfig, events: usize) -> Vec<Sent> {
    let recorder = Arc::new(Recorder::default());
    let (consumer, stop_tx) = start_consumer(
        backends.bus.clone(),
        consumer_backends(backends, Arc::default(), Holding::Always),
        recorder.clone(),
        config,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while recorder.sent().len() < events && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();
    recorder.sent()
}
