//! Runs the conformance suites against the Redis backends when
//! `TERN_REDIS_URL` points at a server (each test skips otherwise, unless
//! `TERN_REQUIRE_ENGINES` demands Redis), and checks what only the Redis
//! backends promise: they survive a dropped connection and a flushed script
//! cache, keys follow the documented layout with one hash-tag slot per id,
//! 64-bit message ids keep their exact order, tombstones expire, stale index
//! entries are ignored, and corrupt values are reported as such.
//!
//! Every test uses its own key prefix, so runs and tests never collide on a
//! shared server; each removes its keys when it passes.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use tern_store::redis::RedisBackends;
use tern_store::{
    DedupRecord, DedupStore, GroupRecord, HistoryStore, MetaStore, OfflineEntry, OfflineStore, Placement,
    SequenceStore, SessionStore, StoreError, UserRecord, conformance,
};

/// A fresh set of backends under a unique prefix, and a separate plain
/// connection for poking at the server; `None` when no server is configured.
async fn setup() -> Option<(RedisBackends, MultiplexedConnection)> {
    let url = conformance::engine_from_env("TERN_REDIS_URL")?;
    let prefix = conformance::unique_id("t");
    let backends = RedisBackends::connect(&url, &prefix).await.expect("connect to Redis");
    let raw = redis::Client::open(url.as_str())
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    Some((backends, raw))
}

/// Every key under the backends' prefix.
async fn keys_of(b: &RedisBackends, raw: &mut MultiplexedConnection) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", b.key_prefix()))
            .arg("COUNT")
            .arg(1_000)
            .query_async(raw)
            .await
            .expect("SCAN");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return keys;
        }
    }
}

/// Deletes every key of the test's prefix.
async fn cleanup(b: &RedisBackends, raw: &mut MultiplexedConnection) {
    for key in keys_of(b, raw).await {
        redis::cmd("DEL").arg(key).query_async::<()>(raw).await.expect("DEL");
    }
}

async fn raw_cmd<T: redis::FromRedisValue>(raw: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(raw).await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::session_store(&*b.sessions).await;
    cleanup(&b, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::sequence_store(&*b.sequences).await;
    cleanup(&b, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::dedup_store(&*b.dedup).await;
    cleanup(&b, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::offline_store(&*b.offline).await;
    cleanup(&b, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::history_store(&*b.history).await;
    cleanup(&b, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_store_conforms() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::meta_store(&*b.meta).await;
    cleanup(&b, &mut raw).await;
}

/// The suites also pass on a current-thread runtime.
#[tokio::test]
async fn suites_pass_on_a_current_thread_runtime() {
    let Some((b, mut raw)) = setup().await else { return };
    conformance::sequence_store(&*b.sequences).await;
    conformance::session_store(&*b.sessions).await;
    conformance::offline_store(&*b.offline).await;
    cleanup(&b, &mut raw).await;
}

/// After the server drops the stores' connection, the connection manager
/// reconnects: a bounded number of retries succeeds, and every store works
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_recover_after_the_connection_is_killed() {
    let Some((b, mut raw)) = setup().await else { return };
    let key = conformance::unique_id("seq");
    assert_eq!(b.sequences.incr(&key).await.expect("incr"), 1);

    // Kill only the stores' own connection (not every normal client, which
    // would break tests running in parallel against the same server).
    let mut conn = b.connection();
    let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await.expect("CLIENT ID");
    let killed: i64 = raw_cmd(&mut raw, &["CLIENT", "KILL", "ID", &id.to_string()]).await;
    assert_eq!(killed, 1, "the stores' connection was killed");

    // A read is safe to retry: the first attempts may fail while the
    // manager notices the dead link and reconnects.
    let mut failures = 0;
    let value = loop {
        match b.sequences.current(&key).await {
            Ok(value) => break value,
            Err(StoreError::Unavailable(e)) => {
                failures += 1;
                assert!(failures < 50, "still unavailable after {failures} attempts: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a dropped connection must surface as Unavailable, got {e}"),
        }
    };
    eprintln!("reconnected after {failures} failed attempt(s)");
    assert_eq!(value, 1, "the counter survived the reconnect");
    let new_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await.expect("CLIENT ID");
    assert_ne!(new_id, id, "the manager opened a new connection");

    assert_eq!(b.sequences.incr(&key).await.expect("incr after reconnect"), 2);
    b.ping().await.expect("ping after reconnect");
    // Scripts too, whatever the server's script cache holds.
    conformance::offline_store(&*b.offline).await;
    conformance::session_store(&*b.sessions).await;
    cleanup(&b, &mut raw).await;
}

/// Scripts are reloaded when the server lost them (restart, failover,
/// `SCRIPT FLUSH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_a_script_flush() {
    let Some((b, mut raw)) = setup().await else { return };
    let key = conformance::unique_id("seq");
    b.sequences.incr(&key).await.expect("incr");
    assert!(b.sequences.rollback(&key, 1).await.expect("rollback"));
    raw_cmd::<()>(&mut raw, &["SCRIPT", "FLUSH"]).await;
    b.sequences.incr(&key).await.expect("incr");
    assert!(b.sequences.rollback(&key, 1).await.expect("rollback after SCRIPT FLUSH"));
    cleanup(&b, &mut raw).await;
}

/// CRC16/XMODEM, the hash of Redis Cluster key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The Redis Cluster slot of a key: the hash of its hash tag (the text
/// between the first `{` and the next `}`, if non-empty), else of the key.
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            rest.iter().position(|&b| b == b'}').filter(|&len| len > 0).map(|len| &rest[..len])
        })
        .unwrap_or(bytes);
    crc16(hashed) % 16_384
}

/// The keys are the documented ones; every key of one id carries the id as
/// its hash tag, so a receiver's (or group's) keys share one cluster slot
/// and the multi-key scripts stay single-slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_follow_the_layout_with_one_hash_tag_per_id() {
    // Reference values from `CLUSTER KEYSLOT`.
    assert_eq!(key_slot("foo"), 12_182);
    assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
    let Some((b, mut raw)) = setup().await else { return };
    let ttl = Duration::from_secs(600);

    b.sessions
        .put(&Placement {
            user_id: "alice".into(),
            device_id: "phone".into(),
            node_id: "access-1".into(),
            connection_id: 7,
        })
        .await
        .expect("put");
    b.sequences.incr("conv-1").await.expect("incr");
    b.dedup
        .put("alice", "c1", DedupRecord { msg_id: 1, seq: 1, sent_at_ms: 1 }, ttl)
        .await
        .expect("dedup put");
    let entry = OfflineEntry { msg_id: 5, payload: Bytes::from_static(b"hello") };
    b.offline.insert(&["bob".to_owned()], &entry).await.expect("insert");
    b.offline.ack("bob", &[4], ttl).await.expect("ack");
    b.history.append("g1", 9, Bytes::from_static(b"h")).await.expect("append");
    b.meta
        .create_user(&UserRecord { user_id: "alice".into(), password_hash: "x".into(), created_at_ms: 1 })
        .await
        .expect("create_user");
    b.meta
        .create_group(&GroupRecord {
            group_id: "g1".into(),
            name: "n".into(),
            owner: "alice".into(),
            members: vec!["alice".into(), "bob".into()],
            created_at_ms: 1,
        })
        .await
        .expect("create_group");
    b.meta.add_device("alice", "phone").await.expect("add_device");

    let p = b.key_prefix().to_owned();
    let expected: BTreeSet<String> = [
        "sess:{alice}",
        "node:{access-1}",
        "online",
        "seq:{conv-1}",
        "dedup:5:{alice}:c1",
        "off:{bob}",
        "offmsg:{bob}",
        "offtomb:{bob}",
        "hist:{g1}",
        "histmsg:{g1}",
        "user:{alice}",
        "group:{g1}",
        "gmembers:{g1}",
        "ugroups:{alice}",
        "ugroups:{bob}",
        "devices:{alice}",
    ]
    .iter()
    .map(|k| format!("{p}:{k}"))
    .collect();
    let keys = keys_of(&b, &mut raw).await;
    assert_eq!(keys, expected, "the keys are the documented layout");

    for key in keys.iter().filter(|k| !k.ends_with(":online")) {
        assert!(key.contains('{') && key.contains('}'), "{key} has a hash tag");
    }
    let slot = |k: &str| key_slot(&format!("{p}:{k}"));
    assert_eq!(slot("off:{bob}"), slot("offmsg:{bob}"), "a receiver's keys share a slot");
    assert_eq!(slot("off:{bob}"), slot("offtomb:{bob}"), "a receiver's keys share a slot");
    assert_eq!(slot("off:{bob}"), key_slot("bob"), "the slot is the receiver id's, not the prefix's");
    assert_eq!(slot("hist:{g1}"), slot("histmsg:{g1}"), "a group's history keys share a slot");
    assert_eq!(slot("group:{g1}"), slot("gmembers:{g1}"), "a group's keys share a slot");
    assert_eq!(slot("user:{alice}"), slot("devices:{alice}"), "a user's keys share a slot");

    // Hash-tagged keys spread: many receivers land in many slots.
    let slots: BTreeSet<u16> = (0..100).map(|i| slot(&format!("off:{{user-{i}}}"))).collect();
    assert!(slots.len() > 90, "receivers spread over slots ({} distinct of 100)", slots.len());

    // Each key has the documented type.
    for (key, kind) in [
        ("sess:{alice}", "hash"),
        ("node:{access-1}", "set"),
        ("online", "zset"),
        ("seq:{conv-1}", "string"),
        ("off:{bob}", "zset"),
        ("offmsg:{bob}", "hash"),
        ("offtomb:{bob}", "zset"),
        ("hist:{g1}", "zset"),
        ("histmsg:{g1}", "hash"),
        ("gmembers:{g1}", "zset"),
        ("devices:{alice}", "zset"),
    ] {
        let actual: String = raw_cmd(&mut raw, &["TYPE", &format!("{p}:{key}")]).await;
        assert_eq!(actual, kind, "type of {key}");
    }
    let member: Vec<String> = raw_cmd(&mut raw, &["ZRANGE", &format!("{p}:off:{{bob}}"), "0", "-1"]).await;
    assert_eq!(member, vec!["0000000000000005".to_owned()], "offline members are 16-digit hex ids");
    let pttl: i64 = raw_cmd(&mut raw, &["PTTL", &format!("{p}:offtomb:{{bob}}")]).await;
    assert!(pttl > 0, "the tombstone set expires");
    let pttl: i64 = raw_cmd(&mut raw, &["PTTL", &format!("{p}:dedup:5:{{alice}}:c1")]).await;
    assert!(pttl > 0, "dedup records expire");
    cleanup(&b, &mut raw).await;
}

/// Ids above 2^53 differ by less than an `f64` can tell apart; the
/// lexicographic members keep them exact and ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_bit_ids_keep_their_exact_order() {
    let Some((b, mut raw)) = setup().await else { return };
    let big = 1u64 << 53;
    let ids = [u64::MAX, u64::MAX - 1, big + 1, big, 1];
    let receiver = conformance::unique_id("r");
    let group = conformance::unique_id("g");
    for id in ids {
        let entry = OfflineEntry { msg_id: id, payload: Bytes::from(id.to_string()) };
        b.offline.insert(std::slice::from_ref(&receiver), &entry).await.expect("insert");
        b.history.append(&group, id, Bytes::from(id.to_string())).await.expect("append");
    }
    let pulled = |entries: Vec<OfflineEntry>| {
        for e in &entries {
            assert_eq!(e.payload, Bytes::from(e.msg_id.to_string()), "payload of {}", e.msg_id);
        }
        entries.into_iter().map(|e| e.msg_id).collect::<Vec<_>>()
    };
    assert_eq!(
        pulled(b.offline.pull(&receiver, 0, 10).await.expect("pull")),
        vec![1, big, big + 1, u64::MAX - 1, u64::MAX]
    );
    assert_eq!(
        pulled(b.offline.pull(&receiver, big, 10).await.expect("pull")),
        vec![big + 1, u64::MAX - 1, u64::MAX]
    );
    assert_eq!(pulled(b.offline.pull(&receiver, u64::MAX - 1, 10).await.expect("pull")), vec![u64::MAX]);
    assert!(b.offline.pull(&receiver, u64::MAX, 10).await.expect("pull").is_empty());

    let ttl = Duration::from_secs(600);
    let insert = |id: u64| {
        let entry = OfflineEntry { msg_id: id, payload: Bytes::from(id.to_string()) };
        let (offline, receiver) = (b.offline.clone(), receiver.clone());
        async move { offline.insert(std::slice::from_ref(&receiver), &entry).await.expect("insert") }
    };
    b.offline.ack(&receiver, &[big], ttl).await.expect("ack");
    assert_eq!(
        pulled(b.offline.pull(&receiver, 0, 10).await.expect("pull")),
        vec![1, big + 1, u64::MAX - 1, u64::MAX],
        "the ack hits exactly one of two ids an f64 cannot tell apart"
    );
    // big + 1 acked twice: the second ack finds nothing and leaves a
    // tombstone, which must block big + 1 and not big.
    b.offline.ack(&receiver, &[big + 1], ttl).await.expect("ack");
    b.offline.ack(&receiver, &[big + 1], ttl).await.expect("ack");
    insert(big + 1).await;
    insert(big).await;
    assert_eq!(
        pulled(b.offline.pull(&receiver, 0, 10).await.expect("pull")),
        vec![1, big, u64::MAX - 1, u64::MAX],
        "the tombstone hits exactly one of two ids an f64 cannot tell apart"
    );

    let page_ids = |page: Vec<(u64, Bytes)>| page.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(
        page_ids(b.history.page(&group, 0, 10).await.expect("page")),
        vec![u64::MAX, u64::MAX - 1, big + 1, big, 1]
    );
    assert_eq!(page_ids(b.history.page(&group, big + 1, 10).await.expect("page")), vec![big, 1]);
    assert_eq!(page_ids(b.history.page(&group, u64::MAX, 1).await.expect("page")), vec![u64::MAX - 1]);
    cleanup(&b, &mut raw).await;
}

/// Pulls and pages larger than one script's page are assembled from
/// several, in order and without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pulls_and_pages_span_several_reads() {
    let Some((b, mut raw)) = setup().await else { return };
    let receiver = conformance::unique_id("r");
    let group = conformance::unique_id("g");
    let n = 2_345u64;
    let mut tasks = tokio::task::JoinSet::new();
    let offline = b.offline.clone();
    let history = b.history.clone();
    for id in 1..=n {
        let (offline, history, receiver, group) =
            (offline.clone(), history.clone(), receiver.clone(), group.clone());
        tasks.spawn(async move {
            let entry = OfflineEntry { msg_id: id, payload: Bytes::from(id.to_string()) };
            offline.insert(&[receiver], &entry).await.expect("insert");
            history.append(&group, id, Bytes::from(id.to_string())).await.expect("append");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    assert_eq!(b.offline.count(&receiver).await.expect("count"), n);
    let all = b.offline.pull(&receiver, 0, usize::MAX).await.expect("pull");
    assert_eq!(all.iter().map(|e| e.msg_id).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
    let some = b.offline.pull(&receiver, 10, 1_500).await.expect("pull");
    assert_eq!(some.iter().map(|e| e.msg_id).collect::<Vec<_>>(), (11..=1_510).collect::<Vec<_>>());

    let page = b.history.page(&group, 0, usize::MAX).await.expect("page");
    assert_eq!(page.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (1..=n).rev().collect::<Vec<_>>());
    let page = b.history.page(&group, 2_000, 1_200).await.expect("page");
    assert_eq!(page.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (800..2_000).rev().collect::<Vec<_>>());

    let ids: Vec<u64> = (1..=n).collect();
    b.offline.ack(&receiver, &ids, Duration::from_secs(600)).await.expect("ack in batches");
    assert_eq!(b.offline.count(&receiver).await.expect("count"), 0);
    cleanup(&b, &mut raw).await;
}

/// A tombstone blocks a late insert only for its ttl; the tombstone set
/// expires with its last tombstone; a zero ttl writes no tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_tombstones_expire() {
    let Some((b, mut raw)) = setup().await else { return };
    let receiver = conformance::unique_id("r");
    let receivers = [receiver.clone()];
    let entry = |msg_id| OfflineEntry { msg_id, payload: Bytes::from_static(b"x") };
    let tomb_key = format!("{}:offtomb:{{{receiver}}}", b.key_prefix());

    b.offline.ack(&receiver, &[1, 2], Duration::from_millis(300)).await.expect("ack");
    b.offline.insert(&receivers, &entry(1)).await.expect("insert");
    assert_eq!(b.offline.count(&receiver).await.expect("count"), 0, "tombstone blocks");
    let pttl: i64 = raw_cmd(&mut raw, &["PTTL", &tomb_key]).await;
    assert!(pttl > 0 && pttl <= 300, "the tombstone set expires with its tombstones ({pttl} ms)");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let exists: bool = raw_cmd(&mut raw, &["EXISTS", &tomb_key]).await;
    assert!(!exists, "an expired tombstone set is gone");
    b.offline.insert(&receivers, &entry(2)).await.expect("insert");
    assert_eq!(
        b.offline.pull(&receiver, 0, 10).await.expect("pull").iter().map(|e| e.msg_id).collect::<Vec<_>>(),
        vec![2],
        "an expired tombstone no longer blocks the insert"
    );

    // A long ack extends the set's expiry; a later short one does not cut it.
    b.offline.ack(&receiver, &[10], Duration::from_secs(600)).await.expect("ack");
    b.offline.ack(&receiver, &[11], Duration::from_millis(300)).await.expect("ack");
    let pttl: i64 = raw_cmd(&mut raw, &["PTTL", &tomb_key]).await;
    assert!(pttl > 500_000, "the set lives as long as its longest tombstone ({pttl} ms)");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Expired tombstones are dropped lazily by the next write.
    b.offline.insert(&receivers, &entry(11)).await.expect("insert");
    let tombstones: Vec<String> = raw_cmd(&mut raw, &["ZRANGE", &tomb_key, "0", "-1"]).await;
    assert_eq!(tombstones, vec![format!("{:016x}", 10)], "expired tombstones are cleaned up");
    b.offline.insert(&receivers, &entry(10)).await.expect("insert");
    assert_eq!(b.offline.count(&receiver).await.expect("count"), 2, "only the live tombstone blocks");

    // No ttl, no tombstone: the entry may come back.
    b.offline.ack(&receiver, &[2], Duration::ZERO).await.expect("ack");
    b.offline.insert(&receivers, &entry(2)).await.expect("insert");
    assert_eq!(
        b.offline.pull(&receiver, 0, 10).await.expect("pull").iter().map(|e| e.msg_id).collect::<Vec<_>>(),
        vec![2, 11],
        "an ack without ttl does not block"
    );
    cleanup(&b, &mut raw).await;
}

/// Index entries left behind (by a crash between the steps of a
/// multi-slot operation) are ignored, and cleaned up where that is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_index_entries_are_ignored() {
    let Some((b, mut raw)) = setup().await else { return };
    let p = b.key_prefix().to_owned();

    raw_cmd::<()>(&mut raw, &["ZADD", &format!("{p}:online"), "0", "ghost"]).await;
    let live =
        Placement { user_id: "alive".into(), device_id: "d".into(), node_id: "n1".into(), connection_id: 1 };
    b.sessions.put(&live).await.expect("put");
    assert_eq!(
        b.sessions.online_users(10).await.expect("online_users"),
        vec!["alive".to_owned()],
        "a user without placements is not online"
    );
    let score: Option<f64> = raw_cmd(&mut raw, &["ZSCORE", &format!("{p}:online"), "ghost"]).await;
    assert_eq!(score, None, "the stale online entry was removed");

    raw_cmd::<()>(&mut raw, &["SADD", &format!("{p}:node:{{n1}}"), r#"["ghost","phone"]"#]).await;
    let moved = Placement { node_id: "n2".into(), device_id: "e".into(), connection_id: 2, ..live.clone() };
    b.sessions.put(&moved).await.expect("put");
    // A stale entry naming a placement that moved to another node.
    raw_cmd::<()>(&mut raw, &["SADD", &format!("{p}:node:{{n1}}"), r#"["alive","e"]"#]).await;
    // And one that does not decode: dropped, the others still removed.
    raw_cmd::<()>(&mut raw, &["SADD", &format!("{p}:node:{{n1}}"), "not json"]).await;
    assert_eq!(b.sessions.remove_node("n1").await.expect("remove_node"), 1, "only real placements count");
    assert_eq!(b.sessions.get("alive").await.expect("get"), vec![moved.clone()]);
    let exists: bool = raw_cmd(&mut raw, &["EXISTS", &format!("{p}:node:{{n1}}")]).await;
    assert!(!exists, "the drained node's index is empty");

    raw_cmd::<()>(&mut raw, &["ZADD", &format!("{p}:ugroups:{{alive}}"), "0", "no-such-group"]).await;
    assert!(b.meta.groups_of("alive").await.expect("groups_of").is_empty(), "a stale group entry is ignored");
    cleanup(&b, &mut raw).await;
}

/// Concurrent logins, logouts and drains of the same devices never leave a
/// placement outside its node's index (draining every node empties the
/// store) nor a user with placements outside the online set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_indexes_survive_concurrent_changes() {
    let Some((b, mut raw)) = setup().await else { return };
    let nodes = ["n0", "n1", "n2"];
    for round in 0..10u64 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let sessions = b.sessions.clone();
            tasks.spawn(async move {
                let p = Placement {
                    user_id: format!("u{}", i % 2),
                    device_id: format!("d{}", i % 3),
                    node_id: nodes[(i / 6 % 3) as usize].to_owned(),
                    connection_id: round * 1_000 + i,
                };
                sessions.put(&p).await.expect("put");
                if i % 5 == 0 {
                    sessions.remove(&p).await.expect("remove");
                }
                if i % 17 == 0 {
                    sessions.remove_node(nodes[(i % 3) as usize]).await.expect("remove_node");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        let mut expected_online = Vec::new();
        for u in 0..2 {
            if !b.sessions.get(&format!("u{u}")).await.expect("get").is_empty() {
                expected_online.push(format!("u{u}"));
            }
        }
        assert_eq!(
            b.sessions.online_users(100).await.expect("online_users"),
            expected_online,
            "round {round}: the online set lists exactly the users with placements"
        );
        // Every remaining placement is found through its node's index.
        for node in nodes {
            b.sessions.remove_node(node).await.expect("remove_node");
        }
        for u in 0..2 {
            assert!(
                b.sessions.get(&format!("u{u}")).await.expect("get").is_empty(),
                "round {round}: draining every node removed every placement of u{u}"
            );
        }
        assert!(
            b.sessions.online_users(100).await.expect("online_users").is_empty(),
            "round {round}: nobody is online after draining every node"
        );
    }
    cleanup(&b, &mut raw).await;
}

/// A logout racing with a new login of the same device never leaves the
/// user offline while the new placement exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_set_survives_a_logout_racing_a_login() {
    let Some((b, mut raw)) = setup().await else { return };
    let place = |connection_id| Placement {
        user_id: "solo".into(),
        device_id: "phone".into(),
        node_id: format!("n{}", connection_id % 2),
        connection_id,
    };
    for round in 0..50u64 {
        let (old, new) = (place(2 * round), place(2 * round + 1));
        b.sessions.put(&old).await.expect("put");
        let (removed, put) = tokio::join!(b.sessions.remove(&old), b.sessions.put(&new));
        removed.expect("remove");
        put.expect("put");
        assert_eq!(b.sessions.get("solo").await.expect("get"), vec![new.clone()], "round {round}");
        assert_eq!(
            b.sessions.online_users(10).await.expect("online_users"),
            vec!["solo".to_owned()],
            "round {round}: the user with the new login is online"
        );
        assert_eq!(b.sessions.remove_node(&new.node_id).await.expect("remove_node"), 1, "round {round}");
        assert!(b.sessions.online_users(10).await.expect("online_users").is_empty(), "round {round}");
    }
    cleanup(&b, &mut raw).await;
}

/// Concurrent adds and removes of one member keep `groups_of` equal to the
/// group's member list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_index_survives_concurrent_changes() {
    let Some((b, mut raw)) = setup().await else { return };
    let group = GroupRecord {
        group_id: "g".into(),
        name: "n".into(),
        owner: "o".into(),
        members: vec!["o".into()],
        created_at_ms: 1,
    };
    assert!(b.meta.create_group(&group).await.expect("create_group"));
    for round in 0..20 {
        let (meta_a, meta_b) = (b.meta.clone(), b.meta.clone());
        let (added, removed) = tokio::join!(async move { meta_a.add_member("g", "x").await }, async move {
            meta_b.remove_member("g", "x").await
        });
        added.expect("add_member");
        removed.expect("remove_member");
        let member =
            b.meta.get_group("g").await.expect("get_group").expect("group").members.contains(&"x".into());
        let indexed = b.meta.groups_of("x").await.expect("groups_of") == vec!["g".to_owned()];
        assert_eq!(member, indexed, "round {round}: groups_of agrees with the member list");
    }
    cleanup(&b, &mut raw).await;
}

/// Values that are not what the stores wrote are reported as corrupt, not
/// as a backend failure and not silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_values_are_reported() {
    let Some((b, mut raw)) = setup().await else { return };
    let p = b.key_prefix().to_owned();
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:seq:{{bad}}"), "abc"]).await;
    assert!(
        matches!(b.sequences.current("bad").await, Err(StoreError::Corrupt(_))),
        "current of a non-number"
    );
    assert!(matches!(b.sequences.incr("bad").await, Err(StoreError::Corrupt(_))), "incr of a non-number");
    raw_cmd::<()>(&mut raw, &["HSET", &format!("{p}:seq:{{hash}}"), "f", "v"]).await;
    assert!(matches!(b.sequences.incr("hash").await, Err(StoreError::Corrupt(_))), "incr of a hash");
    raw_cmd::<()>(&mut raw, &["HSET", &format!("{p}:sess:{{u}}"), "phone", "garbage"]).await;
    assert!(matches!(b.sessions.get("u").await, Err(StoreError::Corrupt(_))), "a bad placement");
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:user:{{u}}"), "{not json"]).await;
    assert!(matches!(b.meta.get_user("u").await, Err(StoreError::Corrupt(_))), "a bad user record");
    raw_cmd::<()>(&mut raw, &["ZADD", &format!("{p}:off:{{r}}"), "0", "not-hex"]).await;
    assert!(matches!(b.offline.pull("r", 0, 10).await, Err(StoreError::Corrupt(_))), "a bad offline id");
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:dedup:1:{{s}}:bad"), "{not json"]).await;
    assert!(matches!(b.dedup.get("s", "bad").await, Err(StoreError::Corrupt(_))), "a bad dedup record");
    assert!(
        matches!(b.dedup.get_many("s", &["fine", "bad"]).await, Err(StoreError::Corrupt(_))),
        "a bad dedup record among others"
    );
    // A key of the wrong type, met by a script or a pipeline: the consumers
    // give up on that one user or set instead of retrying for ever.
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:off:{{w/d}}"), "a string"]).await;
    let entry = OfflineEntry { msg_id: 1, payload: Bytes::from_static(b"m") };
    assert!(
        matches!(b.offline.insert(&["w/d".to_owned()], &entry).await, Err(StoreError::Corrupt(_))),
        "an offline set of the wrong type"
    );
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:devices:{{w}}"), "a string"]).await;
    assert!(
        matches!(b.meta.devices("w").await, Err(StoreError::Corrupt(_))),
        "a device list of the wrong type"
    );
    assert!(
        matches!(b.meta.devices_of_users(&["x", "w"]).await, Err(StoreError::Corrupt(_))),
        "a device list of the wrong type in a pipeline"
    );
    raw_cmd::<()>(&mut raw, &["SET", &format!("{p}:hist:{{wg}}"), "a string"]).await;
    assert!(
        matches!(b.history.append("wg", 1, Bytes::from_static(b"m")).await, Err(StoreError::Corrupt(_))),
        "a group history of the wrong type"
    );
    cleanup(&b, &mut raw).await;
}

/// A prefix with a brace would make it every key's hash tag; it is refused
/// before connecting. An unreachable server is `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused() {
    for prefix in ["", "te{rn", "te}rn"] {
        assert!(
            matches!(
                RedisBackends::connect("redis://127.0.0.1:1/", prefix).await,
                Err(StoreError::Backend(_))
            ),
            "prefix {prefix:?} is refused"
        );
    }
    assert!(matches!(RedisBackends::connect("not a url", "tern").await, Err(StoreError::Backend(_))));
    let started = std::time::Instant::now();
    let unreachable = RedisBackends::connect("redis://127.0.0.1:1/", "tern").await;
    assert!(matches!(unreachable, Err(StoreError::Unavailable(_))), "no server there");
    assert!(started.elapsed() < Duration::from_secs(30), "gives up in bounded time");
}
