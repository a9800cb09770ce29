//! Runs every conformance suite against the embedded backends, and checks
//! what only the embedded backends promise: data survives closing and
//! reopening the data directory, writes are group-committed, expired
//! tombstones stop blocking inserts, and the bus log is trimmed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tempfile::TempDir;
use tern_store::embedded::{EmbeddedBackends, EmbeddedBus, EmbeddedOfflineStore, TRIM_EVERY_RECORDS};
use tern_store::{
    Bus, BusConsumer, DedupRecord, DedupStore, GroupRecord, HistoryStore, MetaStore, OfflineEntry,
    OfflineStore, Placement, SequenceStore, SessionStore, UserRecord, conformance,
};

fn backends() -> (TempDir, EmbeddedBackends) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backends = EmbeddedBackends::open(dir.path()).expect("open backends");
    (dir, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_store_conforms() {
    let (_dir, b) = backends();
    conformance::session_store(&*b.sessions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_store_conforms() {
    let (_dir, b) = backends();
    conformance::sequence_store(&*b.sequences).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_store_conforms() {
    let (_dir, b) = backends();
    conformance::dedup_store(&*b.dedup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_store_conforms() {
    let (_dir, b) = backends();
    conformance::offline_store(&*b.offline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_store_conforms() {
    let (_dir, b) = backends();
    conformance::history_store(&*b.history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_store_conforms() {
    let (_dir, b) = backends();
    conformance::meta_store(&*b.meta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_log_conforms() {
    let (_dir, b) = backends();
    conformance::message_log(&*b.log, &*b.dedup, &*b.sequences, &*b.bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_conforms() {
    let (_dir, b) = backends();
    conformance::bus(&*b.bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_conforms() {
    let (_dir, b) = backends();
    conformance::registry(&*b.registry).await;
}

/// The suites also pass on a current-thread runtime (no worker to spare).
#[tokio::test]
async fn suites_pass_on_a_current_thread_runtime() {
    let (_dir, b) = backends();
    conformance::sequence_store(&*b.sequences).await;
    conformance::bus(&*b.bus).await;
}

/// Everything acknowledged before the backends are closed is there after
/// they are reopened from the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let placement = Placement {
        user_id: "alice".into(),
        device_id: "phone".into(),
        node_id: "access-1".into(),
        connection_id: 7,
    };
    let dedup = DedupRecord { msg_id: 100, seq: 3, sent_at_ms: 1 };
    let user = UserRecord { user_id: "alice".into(), password_hash: "hash".into(), created_at_ms: 1 };
    let group = GroupRecord {
        group_id: "g1".into(),
        name: "friends".into(),
        owner: "alice".into(),
        members: vec!["bob".into(), "alice".into()],
        created_at_ms: 1,
    };
    let ttl = Duration::from_secs(600);
    let committed;
    {
        let b = EmbeddedBackends::open(dir.path()).expect("open");
        b.sessions.put(&placement).await.expect("put");
        for _ in 0..3 {
            b.sequences.incr("conv").await.expect("incr");
        }
        b.dedup.put("alice", "c1", dedup, ttl).await.expect("put");
        let receivers = ["bob".to_owned()];
        for id in [1, 2] {
            let entry = OfflineEntry { msg_id: id, payload: Bytes::from(format!("m{id}")) };
            b.offline.insert(&receivers, &entry).await.expect("insert");
        }
        b.offline.ack("bob", &[9], ttl).await.expect("ack");
        b.history.append("g1", 5, Bytes::from_static(b"h5")).await.expect("append");
        assert!(b.meta.create_user(&user).await.expect("create_user"));
        assert!(b.meta.create_group(&group).await.expect("create_group"));
        for i in 0..4u8 {
            b.bus.publish("topic", Bytes::from_static(b"k"), Bytes::from(vec![i])).await.expect("publish");
        }
        let mut consumer = b.bus.subscribe("topic", "svc").await.expect("subscribe");
        let records = consumer.poll(10, Duration::from_secs(5)).await.expect("poll");
        assert_eq!(records.len(), 4);
        committed = records[1].offset;
        consumer.commit(&records[..2]).await.expect("commit");
        // Closing: every handle (the consumer keeps the bus open) dropped.
        drop(consumer);
        drop(b);
    }

    let b = EmbeddedBackends::open(dir.path()).expect("reopen");
    // Placements name connections of the process that died with it.
    assert!(b.sessions.get("alice").await.expect("get").is_empty(), "placements do not outlive the process");
    assert_eq!(b.sequences.current("conv").await.expect("current"), 3);
    assert_eq!(b.sequences.incr("conv").await.expect("incr"), 4, "sequences continue after reopen");
    assert_eq!(b.dedup.get("alice", "c1").await.expect("get"), Some(dedup));
    assert_eq!(b.offline.count("bob").await.expect("count"), 2);
    let pulled = b.offline.pull("bob", 0, 10).await.expect("pull");
    assert_eq!(pulled.iter().map(|e| e.msg_id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(pulled[1].payload, Bytes::from_static(b"m2"));
    let late = OfflineEntry { msg_id: 9, payload: Bytes::from_static(b"late") };
    b.offline.insert(&["bob".to_owned()], &late).await.expect("insert");
    assert_eq!(b.offline.count("bob").await.expect("count"), 2, "tombstones survive reopen");
    assert_eq!(b.history.page("g1", 0, 10).await.expect("page"), vec![(5, Bytes::from_static(b"h5"))]);
    assert_eq!(b.meta.get_user("alice").await.expect("get_user"), Some(user));
    let stored = b.meta.get_group("g1").await.expect("get_group").expect("group");
    assert_eq!(stored.members, vec!["alice".to_owned(), "bob".to_owned()]);
    assert_eq!(b.meta.groups_of("bob").await.expect("groups_of"), vec!["g1".to_owned()]);

    // Bus: the committed offset survives, so the group resumes after it.
    let mut consumer = b.bus.subscribe("topic", "svc").await.expect("subscribe");
    let records = consumer.poll(10, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(
        records.iter().map(|r| r.payload.to_vec()).collect::<Vec<_>>(),
        vec![vec![2], vec![3]],
        "the group resumes after its committed offset"
    );
    assert_eq!(records[0].offset, committed + 1);
    // New records continue the offsets.
    b.bus.publish("topic", Bytes::from_static(b"k"), Bytes::from_static(&[4])).await.expect("publish");
    let next = consumer.poll(10, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].offset, records[1].offset + 1, "offsets continue after reopen");
    // Another group still sees every record published before the reopen.
    let mut fresh = b.bus.subscribe("topic", "other").await.expect("subscribe");
    let all = fresh.poll(10, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(all.len(), 5);
}

/// 1,000 concurrent publishes all succeed (group-committed) and are read
/// back once each, with distinct, increasing offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_group_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = Arc::new(EmbeddedBus::open(&dir.path().join("bus.redb")).expect("open"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1_000u32 {
        let bus = bus.clone();
        tasks.spawn(async move {
            bus.publish("load", Bytes::from(i.to_be_bytes().to_vec()), Bytes::from(format!("p{i}"))).await
        });
    }
    let started = std::time::Instant::now();
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("publish");
    }
    let publish_time = started.elapsed();

    let mut consumer = bus.subscribe("load", "reader").await.expect("subscribe");
    let mut records = Vec::new();
    while records.len() < 1_000 {
        let batch = consumer.poll(300, Duration::from_secs(5)).await.expect("poll");
        assert!(!batch.is_empty(), "records missing after {}", records.len());
        records.extend(batch);
    }
    assert_eq!(records.len(), 1_000);
    assert!(
        records.windows(2).all(|w| w[0].offset + 1 == w[1].offset),
        "offsets are distinct, increasing and dense"
    );
    let mut keys: Vec<u32> =
        records.iter().map(|r| u32::from_be_bytes(r.key[..].try_into().expect("4-byte key"))).collect();
    for r in &records {
        let i = u32::from_be_bytes(r.key[..].try_into().expect("4-byte key"));
        assert_eq!(r.payload, Bytes::from(format!("p{i}")), "payload matches key");
    }
    keys.sort_unstable();
    assert_eq!(keys, (0..1_000).collect::<Vec<_>>(), "every publish stored once");
    // One fsync per publish would take far longer on any disk than a few
    // batched commits; this only guards against losing batching entirely.
    assert!(publish_time < Duration::from_secs(20), "1,000 publishes took {publish_time:?}");
    assert!(consumer.poll(10, Duration::from_millis(100)).await.expect("poll").is_empty());
}

/// A tombstone blocks a late insert only for its ttl, and expired
/// tombstones are cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_tombstones_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedOfflineStore::open(&dir.path().join("offline.redb")).expect("open");
    let receivers = ["carol".to_owned()];
    let entry = |msg_id| OfflineEntry { msg_id, payload: Bytes::from_static(b"x") };
    store.ack("carol", &[1, 2], Duration::from_millis(300)).await.expect("ack");
    store.insert(&receivers, &entry(1)).await.expect("insert");
    assert_eq!(store.count("carol").await.expect("count"), 0, "tombstone blocks");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    // This write runs the lazy cleanup (more than a second since the last).
    store.insert(&receivers, &entry(2)).await.expect("insert");
    assert_eq!(
        store.pull("carol", 0, 10).await.expect("pull").iter().map(|e| e.msg_id).collect::<Vec<_>>(),
        vec![2],
        "an expired tombstone no longer blocks the insert"
    );
}

/// Polls and commits, batch by batch, until `count` records went through.
async fn read_and_commit(consumer: &mut dyn BusConsumer, count: u64) {
    let mut moved = 0;
    while moved < count {
        let batch = consumer.poll(1_000, Duration::from_secs(5)).await.expect("poll");
        moved += batch.len() as u64;
        consumer.commit(&batch).await.expect("commit");
    }
}

/// Records every subscribed group has committed are trimmed; records a
/// group has not committed are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_trims_committed_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = EmbeddedBus::open(&dir.path().join("bus.redb")).expect("open");
    for i in 0..10u8 {
        bus.publish("t", Bytes::new(), Bytes::from(vec![i])).await.expect("publish");
    }
    let mut fast = bus.subscribe("t", "fast").await.expect("subscribe");
    let mut slow = bus.subscribe("t", "slow").await.expect("subscribe");
    let records = fast.poll(100, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(records.len(), 10);
    fast.commit(&records[..10]).await.expect("commit");
    assert_eq!(bus.trim().await.expect("trim"), 0, "the slow group has committed nothing");
    slow.commit(&records[3..4]).await.expect("commit");
    assert_eq!(bus.trim().await.expect("trim"), 4, "records 0..=3 are committed by all");
    assert_eq!(bus.retained("t").await.expect("retained"), 6);
    // The slow group still gets everything it has not committed.
    drop(slow);
    let mut slow = bus.subscribe("t", "slow").await.expect("subscribe");
    let rest = slow.poll(100, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(rest.first().map(|r| r.offset), Some(records[4].offset));
    assert_eq!(rest.len(), 6);

    // Automatic trimming kicks in once commits have moved the offsets by
    // TRIM_EVERY_RECORDS records: not at the slow group's next commit...
    slow.commit(&records[9..10]).await.expect("commit");
    assert_eq!(bus.retained("t").await.expect("retained"), 6, "a few committed records are kept");
    // ...but once both groups have committed that many more.
    let publishes =
        (0..TRIM_EVERY_RECORDS).map(|i| bus.publish("t", Bytes::new(), Bytes::from(i.to_string())));
    futures::future::try_join_all(publishes).await.expect("publish");
    read_and_commit(&mut *fast, TRIM_EVERY_RECORDS).await;
    assert_eq!(
        bus.retained("t").await.expect("retained"),
        TRIM_EVERY_RECORDS,
        "the slow group's backlog is kept"
    );
    read_and_commit(&mut *slow, TRIM_EVERY_RECORDS).await;
    // The slow group's last commit crossed the threshold.
    assert_eq!(bus.retained("t").await.expect("retained"), 0, "trimmed automatically");
    // Offsets continue after the log was emptied by a trim.
    bus.publish("t", Bytes::new(), Bytes::from_static(&[10])).await.expect("publish");
    let last = fast.poll(100, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].offset, records[9].offset + TRIM_EVERY_RECORDS + 1);
}

/// No row stores a topic's head: after reopening, it is read off the last
/// record, or off the groups' offsets once a trim deleted every record, so
/// offsets continue where they stopped in every topic and a consumer
/// behind the head reads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_offsets_continue_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bus.redb");
    {
        let bus = EmbeddedBus::open(&path).expect("open");
        for i in 0..3u8 {
            bus.publish("kept", Bytes::new(), Bytes::from(vec![i])).await.expect("publish");
        }
        for i in 0..5u8 {
            bus.publish("emptied", Bytes::new(), Bytes::from(vec![i])).await.expect("publish");
        }
        let mut consumer = bus.subscribe("emptied", "g").await.expect("subscribe");
        let records = consumer.poll(100, Duration::from_secs(5)).await.expect("poll");
        assert_eq!(records.len(), 5);
        consumer.commit(&records).await.expect("commit");
        assert_eq!(bus.trim().await.expect("trim"), 5);
        assert_eq!(bus.retained("emptied").await.expect("retained"), 0);
    }
    let bus = EmbeddedBus::open(&path).expect("reopen");
    let offsets = |records: Vec<tern_store::BusRecord>| records.iter().map(|r| r.offset).collect::<Vec<_>>();
    // Known to be behind the head without a new record to wake it.
    let mut kept = bus.subscribe("kept", "g").await.expect("subscribe");
    let records = kept.poll(100, Duration::from_millis(500)).await.expect("poll");
    assert_eq!(offsets(records), vec![0, 1, 2]);
    bus.publish("kept", Bytes::new(), Bytes::from_static(&[3])).await.expect("publish");
    bus.publish("emptied", Bytes::new(), Bytes::from_static(&[5])).await.expect("publish");
    assert_eq!(offsets(kept.poll(100, Duration::from_secs(5)).await.expect("poll")), vec![3]);
    let mut emptied = bus.subscribe("emptied", "g").await.expect("subscribe");
    let records = emptied.poll(100, Duration::from_secs(5)).await.expect("poll");
    assert_eq!(offsets(records), vec![5], "no offset of the trimmed records is used again");
}

/// Environment variable naming the data directory of [`sigkill_child`].
const CHILD_DIR_ENV: &str = "TERN_STORE_SIGKILL_CHILD_DIR";

/// Run by [`acknowledged_writes_survive_sigkill`] in a child process: writes
/// as fast as it can from many tasks and prints `ACK` for every write that
/// returned `Ok`, until it is killed. A no-op when run normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let b = Arc::new(EmbeddedBackends::open(std::path::Path::new(&dir)).expect("open"));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..32u64 {
        let b = b.clone();
        tasks.spawn(async move {
            for i in 0.. {
                // Offline ids start at 1: `pull(after = 0)` excludes 0.
                let id = task * 1_000_000 + i + 1;
                let seq = b.sequences.incr("conv").await.expect("incr");
                println!("ACK seq {seq}");
                b.bus.publish("t", Bytes::new(), Bytes::from(id.to_string())).await.expect("publish");
                println!("ACK bus {id}");
                let entry = OfflineEntry { msg_id: id, payload: Bytes::from_static(b"x") };
                b.offline.insert(&["dave".to_owned()], &entry).await.expect("insert");
                println!("ACK offline {id}");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Every write acknowledged before a SIGKILL is found after reopening.
#[test]
fn acknowledged_writes_survive_sigkill() {
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", "sigkill_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (mut max_seq, mut bus, mut offline) = (0u64, BTreeSet::new(), BTreeSet::new());
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        let mut words = line.split_whitespace();
        if words.next() != Some("ACK") {
            continue;
        }
        let (kind, value) = (words.next(), words.next().and_then(|v| v.parse::<u64>().ok()));
        match (kind, value) {
            (Some("seq"), Some(v)) => max_seq = max_seq.max(v),
            (Some("bus"), Some(v)) => {
                bus.insert(v);
            }
            (Some("offline"), Some(v)) => {
                offline.insert(v);
            }
            _ => {}
        }
        if offline.len() >= 2_000 {
            // std's Child::kill is SIGKILL on Unix: no destructor runs.
            child.kill().expect("kill child");
            break;
        }
    }
    child.wait().expect("wait child");
    assert!(offline.len() >= 2_000, "the child stopped early");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let b = EmbeddedBackends::open(dir.path()).expect("reopen after SIGKILL");
        assert!(
            b.sequences.current("conv").await.expect("current") >= max_seq,
            "an acknowledged increment was lost"
        );
        let mut consumer = b.bus.subscribe("t", "check").await.expect("subscribe");
        let mut published = BTreeSet::new();
        loop {
            let batch = consumer.poll(10_000, Duration::from_millis(200)).await.expect("poll");
            if batch.is_empty() {
                break;
            }
            for r in batch {
                let text = String::from_utf8(r.payload.to_vec()).expect("utf8");
                published.insert(text.parse::<u64>().expect("id"));
            }
        }
        assert!(bus.is_subset(&published), "an acknowledged publish was lost");
        let stored: BTreeSet<u64> = b
            .offline
            .pull("dave", 0, usize::MAX)
            .await
            .expect("pull")
            .into_iter()
            .map(|e| e.msg_id)
            .collect();
        assert!(offline.is_subset(&stored), "an acknowledged offline insert was lost");
        assert_eq!(
            b.offline.count("dave").await.expect("count"),
            stored.len() as u64,
            "count matches the stored entries after a crash"
        );
    });
}
