//! Conformance suites, one per backend trait.
//!
//! Every implementation of a trait in this crate (embedded or a real engine)
//! must pass its suite: call it from a `#[tokio::test]` with the backend
//! under test. A suite panics, naming the broken rule, on the first
//! violation.
//!
//! The suites are written to run against shared, long-lived servers as well
//! as fresh embedded files: every id, key, topic and group they use carries a
//! suffix unique to the run, and they never assume the store is otherwise
//! empty.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{
    Bus, BusConsumer, BusRecord, DedupRecord, DedupStore, GroupRecord, HistoryStore, MessageLog, MetaStore,
    NewMessage, NodeInfo, OfflineEntry, OfflineStore, Placement, Registry, SequenceStore, SessionStore,
    UserRecord,
};

/// How long a suite waits for something a backend should do "soon" (a bus
/// record to arrive). Generous, because real engines (Kafka consumer group
/// joins) can take seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// An id unique to this run and call: `prefix-<time>-<pid>-<n>`, within the
/// id alphabet `[A-Za-z0-9_.@-]` and at most 64 bytes for short prefixes.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{nanos:x}-{:x}-{n}", std::process::id())
}

/// The address of a real engine for a conformance run, read from `var`.
///
/// Unset means "skip" (the function prints why and returns `None`), unless
/// `TERN_REQUIRE_ENGINES` is `all` or names `var` in a comma-separated list,
/// as the test script sets it once it has started the engines: then a
/// missing engine fails the test instead of silently skipping it.
pub fn engine_from_env(var: &str) -> Option<String> {
    if let Ok(value) = std::env::var(var)
        && !value.is_empty()
    {
        return Some(value);
    }
    let required = std::env::var("TERN_REQUIRE_ENGINES").unwrap_or_default();
    if required == "all" || required.split(',').any(|r| r.trim() == var) {
        panic!(
            "{var} is not set but TERN_REQUIRE_ENGINES={required:?} requires it (run ./scripts/engines.sh start)"
        );
    }
    eprintln!("skipped: {var} is not set, no server to run this suite against");
    None
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn sorted(mut placements: Vec<Placement>) -> Vec<Placement> {
    placements.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    placements
}

/// Checks every rule of [`SessionStore`].
pub async fn session_store(store: &dyn SessionStore) {
    let user = unique_id("su");
    let other = unique_id("su");
    let (node_a, node_b) = (unique_id("sn"), unique_id("sn"));
    let place = |user: &str, device: &str, node: &str, connection_id: u64| Placement {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        node_id: node.to_owned(),
        connection_id,
    };

    assert!(store.get(&user).await.expect("get").is_empty(), "session: an unknown user has no placements");

    let phone = place(&user, "phone", &node_a, 1);
    let laptop = place(&user, "laptop", &node_a, 2);
    let epoch = store.placements_epoch();
    assert_eq!(store.put(&phone).await.expect("put"), None, "session: a first login replaces nothing");
    if let Some(before) = epoch {
        let after =
            store.placements_epoch().expect("session: a store with a placements epoch always has one");
        assert!(after > before, "session: a put that returned grows the placements epoch");
    }
    assert_eq!(store.put(&laptop).await.expect("put"), None, "session: another device replaces nothing");
    assert_eq!(
        sorted(store.get(&user).await.expect("get")),
        vec![laptop.clone(), phone.clone()],
        "session: get returns every device of the user"
    );

    // A new login of the same device replaces the old placement.
    let phone2 = place(&user, "phone", &node_b, 3);
    assert_eq!(
        store.put(&phone2).await.expect("put"),
        Some(phone.clone()),
        "session: put returns the placement it replaced (to be closed)"
    );
    assert_eq!(
        sorted(store.get(&user).await.expect("get")),
        vec![laptop.clone(), phone2.clone()],
        "session: put replaces the placement of the same (user, device)"
    );

    // A stale disconnect (old node/connection) must not remove the new login.
    assert!(
        !store.remove(&phone).await.expect("remove"),
        "session: remove of a stale placement (other node) returns false"
    );
    assert!(
        !store.remove(&place(&user, "phone", &node_b, 99)).await.expect("remove"),
        "session: remove of a stale placement (other connection) returns false"
    );
    assert_eq!(
        store.get(&user).await.expect("get").len(),
        2,
        "session: a stale remove leaves the newer placement in place"
    );
    assert!(
        store.remove(&phone2).await.expect("remove"),
        "session: remove of the current placement returns true"
    );
    assert!(
        !store.remove(&phone2).await.expect("remove"),
        "session: removing twice returns false the second time"
    );
    assert_eq!(
        store.get(&user).await.expect("get"),
        vec![laptop.clone()],
        "session: remove deletes only that device"
    );

    // get_many answers each user as get does, in the order asked.
    let other_phone = place(&other, "phone", &node_b, 4);
    store.put(&other_phone).await.expect("put");
    let nobody = unique_id("su");
    assert_eq!(
        store.get_many(&[&other, &nobody, &user, &other]).await.expect("get_many"),
        vec![vec![other_phone.clone()], vec![], vec![laptop.clone()], vec![other_phone.clone()]],
        "session: get_many answers each user as get does, in order, repeats included"
    );
    assert!(store.get_many(&[]).await.expect("get_many").is_empty(), "session: get_many of nobody");
    assert!(store.remove(&other_phone).await.expect("remove"));

    // Logins of one device racing: each replaces exactly one other (or
    // none, for the first), so every login but the last one is returned
    // once, to be closed, and none is left open unplaced.
    let racer = unique_id("su");
    let logins: Vec<Placement> = (0..8).map(|i| place(&racer, "phone", &node_b, 100 + i)).collect();
    let replaced = futures::future::join_all(logins.iter().map(|p| store.put(p))).await;
    let mut seen: Vec<Placement> = replaced
        .into_iter()
        .filter_map(|r| r.expect("put"))
        .chain(store.get(&racer).await.expect("get"))
        .collect();
    seen.sort_by_key(|p| p.connection_id);
    assert_eq!(seen, logins, "session: racing puts of one device each replace a different login");
    assert!(store.remove(&store.get(&racer).await.expect("get")[0]).await.expect("remove"));

    // online_users: distinct, sorted, limited.
    let other_web = place(&other, "web", &node_a, 4);
    let other_tab = place(&other, "tablet", &node_b, 5);
    store.put(&other_web).await.expect("put");
    store.put(&other_tab).await.expect("put");
    let online = store.online_users(1_000_000).await.expect("online_users");
    assert!(online.windows(2).all(|w| w[0] < w[1]), "session: online_users is sorted and without duplicates");
    assert!(
        online.contains(&user) && online.contains(&other),
        "session: online_users lists users with a placement"
    );
    let first = store.online_users(1).await.expect("online_users");
    assert_eq!(first.len(), 1, "session: online_users honours its limit");
    assert_eq!(first[0], online[0], "session: online_users with a limit returns the first ids in order");
    assert!(
        store.online_users(0).await.expect("online_users").is_empty(),
        "session: online_users(0) is empty"
    );

    // remove_node removes every placement on that node and only those.
    let removed = store.remove_node(&node_a).await.expect("remove_node");
    assert_eq!(removed, 2, "session: remove_node returns how many placements it removed");
    assert!(
        store.get(&user).await.expect("get").is_empty(),
        "session: remove_node removes the node's placements"
    );
    assert_eq!(
        store.get(&other).await.expect("get"),
        vec![other_tab.clone()],
        "session: remove_node keeps placements on other nodes"
    );
    let online = store.online_users(1_000_000).await.expect("online_users");
    assert!(
        !online.contains(&user) && online.contains(&other),
        "session: online_users drops users without placements"
    );
    assert_eq!(
        store.remove_node(&node_a).await.expect("remove_node"),
        0,
        "session: remove_node of an empty node removes nothing"
    );

    store.remove(&other_tab).await.expect("remove");
}

/// Checks every rule of [`SequenceStore`], including uniqueness under
/// concurrent increments.
pub async fn sequence_store(store: &dyn SequenceStore) {
    let key = unique_id("seq");
    assert_eq!(store.current(&key).await.expect("current"), 0, "sequence: an unknown key is 0");
    assert_eq!(store.incr(&key).await.expect("incr"), 1, "sequence: the first incr returns 1");
    assert_eq!(store.incr(&key).await.expect("incr"), 2, "sequence: incr adds 1");
    assert_eq!(store.current(&key).await.expect("current"), 2, "sequence: current after incr");

    assert!(
        !store.rollback(&key, 1).await.expect("rollback"),
        "sequence: rollback with a stale expected value does nothing"
    );
    assert_eq!(store.current(&key).await.expect("current"), 2, "sequence: failed rollback keeps the value");
    assert!(
        store.rollback(&key, 2).await.expect("rollback"),
        "sequence: rollback of the current value succeeds"
    );
    assert_eq!(store.current(&key).await.expect("current"), 1, "sequence: rollback decrements by one");
    assert!(
        !store.rollback(&key, 2).await.expect("rollback"),
        "sequence: rollback twice of the same value fails the second time"
    );
    assert_eq!(store.incr(&key).await.expect("incr"), 2, "sequence: incr after rollback reuses the value");
    assert!(
        !store.rollback(&unique_id("seq"), 1).await.expect("rollback"),
        "sequence: rollback of an unknown key does nothing"
    );

    // 8 concurrent callers x 100 increments: every value handed out once,
    // and each caller sees its own values increase.
    let key = unique_id("seq");
    let worker = || async {
        let mut values = Vec::with_capacity(100);
        for _ in 0..100 {
            values.push(store.incr(&key).await.expect("incr"));
        }
        values
    };
    let (a, b, c, d, e, f, g, h) =
        tokio::join!(worker(), worker(), worker(), worker(), worker(), worker(), worker(), worker());
    let all = [a, b, c, d, e, f, g, h];
    for values in &all {
        assert!(values.windows(2).all(|w| w[0] < w[1]), "sequence: values seen by one caller increase");
    }
    let mut merged: Vec<u64> = all.concat();
    merged.sort_unstable();
    assert_eq!(
        merged,
        (1..=800).collect::<Vec<u64>>(),
        "sequence: concurrent increments hand out every value exactly once"
    );
    assert_eq!(store.current(&key).await.expect("current"), 800, "sequence: current after concurrent incr");
}

/// Checks every rule of [`DedupStore`], including expiry (takes ~1.5 s).
pub async fn dedup_store(store: &dyn DedupStore) {
    let sender = unique_id("ds");
    let record = DedupRecord { msg_id: 42, seq: 7, sent_at_ms: now_ms() };
    assert_eq!(
        store.get(&sender, "c1").await.expect("get"),
        None,
        "dedup: an unknown client id has no record"
    );
    store.put(&sender, "c1", record, Duration::from_secs(600)).await.expect("put");
    assert_eq!(
        store.get(&sender, "c1").await.expect("get"),
        Some(record),
        "dedup: get returns what put stored"
    );
    assert_eq!(store.get(&unique_id("ds"), "c1").await.expect("get"), None, "dedup: records are per sender");
    assert_eq!(
        store.get(&sender, "c2").await.expect("get"),
        None,
        "dedup: records are per client message id"
    );
    let second = DedupRecord { msg_id: 44, seq: 9, sent_at_ms: now_ms() };
    store.put(&sender, "c3", second, Duration::from_secs(600)).await.expect("put");
    assert_eq!(
        store.get_many(&sender, &["c3", "c2", "c1", "c3"]).await.expect("get_many"),
        vec![Some(second), None, Some(record), Some(second)],
        "dedup: get_many answers each id in order, repeats included"
    );
    assert_eq!(
        store.get_many(&sender, &[]).await.expect("get_many"),
        Vec::new(),
        "dedup: get_many of no ids"
    );
    assert_eq!(
        store.get_many(&unique_id("ds"), &["c1", "c3"]).await.expect("get_many"),
        vec![None, None],
        "dedup: get_many is per sender"
    );

    let short = DedupRecord { msg_id: 43, seq: 8, sent_at_ms: now_ms() };
    store.put(&sender, "c-short", short, Duration::from_millis(500)).await.expect("put");
    assert_eq!(
        store.get(&sender, "c-short").await.expect("get"),
        Some(short),
        "dedup: a record is kept during its ttl"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        store.get(&sender, "c-short").await.expect("get"),
        None,
        "dedup: a record is gone after its ttl"
    );
    assert_eq!(
        store.get_many(&sender, &["c-short", "c1"]).await.expect("get_many"),
        vec![None, Some(record)],
        "dedup: get_many leaves out expired records"
    );
    assert_eq!(
        store.get(&sender, "c1").await.expect("get"),
        Some(record),
        "dedup: expiry of one record leaves the others"
    );
}

fn entry(msg_id: u64) -> OfflineEntry {
    OfflineEntry { msg_id, payload: Bytes::from(format!("offline-{msg_id}")) }
}

fn ids(entries: &[OfflineEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.msg_id).collect()
}

/// Checks every rule of [`OfflineStore`].
pub async fn offline_store(store: &dyn OfflineStore) {
    let (r1, r2) = (unique_id("or"), unique_id("or"));
    let both = [r1.clone(), r2.clone()];
    let ttl = Duration::from_secs(600);

    assert_eq!(store.count(&r1).await.expect("count"), 0, "offline: an unknown receiver has 0 entries");
    assert!(
        store.pull(&r1, 0, 10).await.expect("pull").is_empty(),
        "offline: an unknown receiver has nothing to pull"
    );

    // Inserted out of order, pulled in msg_id order.
    for id in [30, 10, 20] {
        store.insert(&both, &entry(id)).await.expect("insert");
    }
    let pulled = store.pull(&r1, 0, 10).await.expect("pull");
    assert_eq!(ids(&pulled), vec![10, 20, 30], "offline: pull returns entries oldest first");
    assert_eq!(pulled[1], entry(20), "offline: pull returns the inserted payload");
    assert_eq!(store.count(&r1).await.expect("count"), 3, "offline: count of a receiver");

    // Idempotent per (receiver, msg_id).
    store.insert(&both, &entry(20)).await.expect("insert");
    store.insert(&[r1.clone(), r1.clone()], &entry(20)).await.expect("insert");
    assert_eq!(store.count(&r1).await.expect("count"), 3, "offline: a repeated insert is not counted twice");
    assert_eq!(
        ids(&store.pull(&r1, 0, 10).await.expect("pull")),
        vec![10, 20, 30],
        "offline: a repeated insert is stored once"
    );

    // Paging.
    assert_eq!(ids(&store.pull(&r1, 0, 2).await.expect("pull")), vec![10, 20], "offline: pull honours limit");
    assert_eq!(
        ids(&store.pull(&r1, 10, 1).await.expect("pull")),
        vec![20],
        "offline: pull starts after `after`"
    );
    assert_eq!(
        ids(&store.pull(&r1, 15, 10).await.expect("pull")),
        vec![20, 30],
        "offline: `after` need not be an id"
    );
    assert!(store.pull(&r1, 30, 10).await.expect("pull").is_empty(), "offline: nothing after the last id");

    // Ack deletes, only for that receiver.
    store.ack(&r1, &[10, 20], ttl).await.expect("ack");
    assert_eq!(ids(&store.pull(&r1, 0, 10).await.expect("pull")), vec![30], "offline: ack deletes entries");
    assert_eq!(store.count(&r1).await.expect("count"), 1, "offline: ack decrements count");
    assert_eq!(store.count(&r2).await.expect("count"), 3, "offline: ack affects only its receiver");

    // An ack of an entry that was there leaves no tombstone: a repeated
    // insert adds it again (the device drops the duplicate and ACKs it),
    // and the set and its count come back to what they were after the ack.
    store.insert(&both, &entry(10)).await.expect("insert");
    assert_eq!(
        ids(&store.pull(&r1, 0, 10).await.expect("pull")),
        vec![10, 30],
        "offline: an insert repeated after the ack adds the entry again"
    );
    assert_eq!(store.count(&r1).await.expect("count"), 2, "offline: count includes the repeated insert");
    assert_eq!(
        store.count(&r2).await.expect("count"),
        3,
        "offline: a repeated insert of a present entry is a no-op"
    );
    store.ack(&r1, &[10], ttl).await.expect("ack");
    assert_eq!(ids(&store.pull(&r1, 0, 10).await.expect("pull")), vec![30], "offline: ack deletes it again");
    assert_eq!(store.count(&r1).await.expect("count"), 1, "offline: count after the second ack");

    // Ack before insert: the tombstone blocks the late insert, for that
    // receiver only.
    store.ack(&r1, &[40], ttl).await.expect("ack");
    assert_eq!(store.count(&r1).await.expect("count"), 1, "offline: ack of a missing id changes no count");
    store.insert(&both, &entry(40)).await.expect("insert");
    assert_eq!(
        ids(&store.pull(&r1, 0, 10).await.expect("pull")),
        vec![30],
        "offline: an id acked before its insert is ignored when inserted"
    );
    assert_eq!(
        ids(&store.pull(&r2, 0, 10).await.expect("pull")),
        vec![10, 20, 30, 40],
        "offline: a tombstone of one receiver does not block another"
    );
    assert_eq!(store.count(&r2).await.expect("count"), 4, "offline: count after insert");

    store.ack(&r1, &[30], ttl).await.expect("ack");
    store.ack(&r2, &[10, 20, 30, 40], ttl).await.expect("ack");
    assert_eq!(store.count(&r1).await.expect("count"), 0, "offline: count is 0 once all are acked");
    assert!(store.pull(&r2, 0, 10).await.expect("pull").is_empty(), "offline: nothing left after acking all");
}

/// Checks every rule of [`HistoryStore`].
pub async fn history_store(store: &dyn HistoryStore) {
    let (group, other) = (unique_id("hg"), unique_id("hg"));
    let payload = |id: u64| Bytes::from(format!("history-{id}"));
    let page_ids = |page: Vec<(u64, Bytes)>| page.into_iter().map(|(id, _)| id).collect::<Vec<_>>();

    assert!(
        store.page(&group, 0, 10).await.expect("page").is_empty(),
        "history: an unknown group has no history"
    );
    for id in [3, 1, 5, 2, 4] {
        store.append(&group, id, payload(id)).await.expect("append");
    }
    store.append(&other, 6, payload(6)).await.expect("append");

    let page = store.page(&group, 0, 10).await.expect("page");
    assert_eq!(
        page.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![5, 4, 3, 2, 1],
        "history: page with before=0 returns newest first, only this group"
    );
    assert_eq!(page[0].1, payload(5), "history: page returns the appended payload");
    assert_eq!(
        page_ids(store.page(&group, 0, 2).await.expect("page")),
        vec![5, 4],
        "history: page honours limit"
    );
    assert_eq!(
        page_ids(store.page(&group, 4, 2).await.expect("page")),
        vec![3, 2],
        "history: page is below `before`"
    );
    assert_eq!(page_ids(store.page(&group, 2, 10).await.expect("page")), vec![1], "history: last page");
    assert!(store.page(&group, 1, 10).await.expect("page").is_empty(), "history: nothing below the oldest");

    store.append(&group, 3, payload(3)).await.expect("append");
    assert_eq!(
        page_ids(store.page(&group, 0, 10).await.expect("page")),
        vec![5, 4, 3, 2, 1],
        "history: append is idempotent per (group, msg_id)"
    );
}

/// Checks every rule of [`MetaStore`].
pub async fn meta_store(store: &dyn MetaStore) {
    let user = UserRecord {
        user_id: unique_id("mu"),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
        created_at_ms: now_ms(),
    };
    assert_eq!(store.get_user(&user.user_id).await.expect("get_user"), None, "meta: unknown user");
    assert!(
        store.create_user(&user).await.expect("create_user"),
        "meta: create_user of a new id returns true"
    );
    assert_eq!(
        store.get_user(&user.user_id).await.expect("get_user"),
        Some(user.clone()),
        "meta: get_user returns the created user"
    );
    let impostor = UserRecord { password_hash: "other".to_owned(), ..user.clone() };
    assert!(
        !store.create_user(&impostor).await.expect("create_user"),
        "meta: create_user of a taken id returns false"
    );
    assert_eq!(
        store.get_user(&user.user_id).await.expect("get_user"),
        Some(user.clone()),
        "meta: a refused create_user changes nothing"
    );

    let (a, b, c, d) = (unique_id("ma"), unique_id("mb"), unique_id("mc"), unique_id("md"));
    let group = GroupRecord {
        group_id: unique_id("mg"),
        name: "conformance".to_owned(),
        owner: a.clone(),
        members: vec![c.clone(), a.clone(), b.clone(), a.clone()],
        created_at_ms: now_ms(),
    };
    let mut expected = GroupRecord { members: vec![a.clone(), b.clone(), c.clone()], ..group.clone() };
    assert_eq!(store.get_group(&group.group_id).await.expect("get_group"), None, "meta: unknown group");
    assert!(
        store.create_group(&group).await.expect("create_group"),
        "meta: create_group of a new id returns true"
    );
    assert_eq!(
        store.get_group(&group.group_id).await.expect("get_group").as_deref(),
        Some(&expected),
        "meta: group members are stored sorted and without duplicates"
    );
    let taken = GroupRecord { name: "other".to_owned(), members: vec![d.clone()], ..group.clone() };
    assert!(
        !store.create_group(&taken).await.expect("create_group"),
        "meta: create_group of a taken id returns false"
    );
    assert_eq!(
        store.get_group(&group.group_id).await.expect("get_group").as_deref(),
        Some(&expected),
        "meta: a refused create_group changes nothing"
    );
    assert!(
        store.groups_of(&d).await.expect("groups_of").is_empty(),
        "meta: a refused create_group adds no membership"
    );

    // A second group with b, to check groups_of ordering.
    let group2 = GroupRecord {
        group_id: unique_id("mg"),
        name: "second".to_owned(),
        owner: b.clone(),
        members: vec![b.clone()],
        created_at_ms: now_ms(),
    };
    assert!(store.create_group(&group2).await.expect("create_group"), "meta: create second group");
    let mut both = vec![group.group_id.clone(), group2.group_id.clone()];
    both.sort();
    assert_eq!(
        store.groups_of(&b).await.expect("groups_of"),
        both,
        "meta: groups_of lists every group, sorted"
    );
    assert_eq!(
        store.groups_of(&a).await.expect("groups_of"),
        vec![group.group_id.clone()],
        "meta: groups_of after create_group"
    );

    // add_member keeps members sorted, unique.
    expected.members = vec![a.clone(), b.clone(), c.clone(), d.clone()];
    assert_eq!(
        store.add_member(&group.group_id, &d).await.expect("add_member"),
        Some(expected.clone()),
        "meta: add_member returns the updated group"
    );
    assert_eq!(
        store.add_member(&group.group_id, &d).await.expect("add_member"),
        Some(expected.clone()),
        "meta: adding an existing member changes nothing"
    );
    assert_eq!(
        store.get_group(&group.group_id).await.expect("get_group").as_deref(),
        Some(&expected),
        "meta: add_member is stored"
    );
    assert_eq!(
        store.groups_of(&d).await.expect("groups_of"),
        vec![group.group_id.clone()],
        "meta: groups_of after add_member"
    );
    let early = format!("0{}", unique_id("m"));
    let mut with_early = expected.clone();
    with_early.members.insert(0, early.clone());
    assert_eq!(
        store.add_member(&group.group_id, &early).await.expect("add_member"),
        Some(with_early),
        "meta: add_member inserts in sorted position"
    );
    assert!(
        store.remove_member(&group.group_id, &early).await.expect("remove_member").is_some(),
        "meta: remove_member of a member"
    );

    // remove_member.
    expected.members = vec![a.clone(), c.clone(), d.clone()];
    assert_eq!(
        store.remove_member(&group.group_id, &b).await.expect("remove_member"),
        Some(expected.clone()),
        "meta: remove_member returns the updated group"
    );
    assert_eq!(
        store.remove_member(&group.group_id, &b).await.expect("remove_member"),
        Some(expected.clone()),
        "meta: removing a non-member changes nothing"
    );
    assert_eq!(
        store.get_group(&group.group_id).await.expect("get_group").as_deref(),
        Some(&expected),
        "meta: remove_member is stored"
    );
    assert_eq!(
        store.groups_of(&b).await.expect("groups_of"),
        vec![group2.group_id.clone()],
        "meta: groups_of after remove_member"
    );

    let missing = unique_id("mg");
    assert_eq!(
        store.add_member(&missing, &a).await.expect("add_member"),
        None,
        "meta: add_member to an unknown group is None"
    );
    assert_eq!(
        store.remove_member(&missing, &a).await.expect("remove_member"),
        None,
        "meta: remove_member from an unknown group is None"
    );
    assert_eq!(
        store.groups_of(&a).await.expect("groups_of"),
        vec![group.group_id.clone()],
        "meta: add_member to an unknown group adds no membership"
    );

    // Devices: recorded per user, idempotent, sorted. The user need not
    // have a user record.
    let (owner, other) = (unique_id("mdu"), unique_id("mdu"));
    assert!(store.devices(&owner).await.expect("devices").is_empty(), "meta: a new user has no devices");
    store.add_device(&owner, "phone").await.expect("add_device");
    store.add_device(&owner, "phone").await.expect("add_device");
    assert_eq!(
        store.devices(&owner).await.expect("devices"),
        vec!["phone".to_owned()],
        "meta: add_device is idempotent"
    );
    for device in ["tablet", "Desk-1", "laptop.2", "a@b_c-d", "phone"] {
        store.add_device(&owner, device).await.expect("add_device");
    }
    let mut all = vec!["phone", "tablet", "Desk-1", "laptop.2", "a@b_c-d"];
    all.sort_unstable();
    assert_eq!(store.devices(&owner).await.expect("devices"), all, "meta: devices are sorted, unique");
    assert!(
        store.devices(&other).await.expect("devices").is_empty(),
        "meta: devices of one user do not show for another"
    );
    // A user id that extends another (a prefix in key order) stays apart.
    let longer = format!("{owner}0");
    store.add_device(&longer, "watch").await.expect("add_device");
    assert_eq!(
        store.devices(&longer).await.expect("devices"),
        vec!["watch".to_owned()],
        "meta: devices are kept per user"
    );
    assert_eq!(store.devices(&owner).await.expect("devices"), all, "meta: devices are kept per user");
    assert_eq!(
        store.devices(&user.user_id).await.expect("devices"),
        Vec::<String>::new(),
        "meta: creating a user records no device"
    );
    let several = store.devices_of_users(&[&owner, &longer, &other]).await.expect("devices_of_users");
    let expected: crate::DevicesByUser = [
        (owner.clone(), all.iter().map(|d| (*d).to_owned()).collect()),
        (longer.clone(), vec!["watch".to_owned()]),
        (other.clone(), Vec::new()),
    ]
    .into_iter()
    .collect();
    assert_eq!(several, expected, "meta: devices_of_users answers each user as devices does");
    assert!(store.devices_of_users(&[]).await.expect("devices_of_users").is_empty());
}

/// Polls until `n` records arrived (or [`PATIENCE`] ran out), checking that
/// no batch exceeds `max`.
async fn poll_n(consumer: &mut dyn BusConsumer, n: usize, max: usize) -> Vec<BusRecord> {
    let deadline = Instant::now() + PATIENCE;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let batch = consumer.poll(max, Duration::from_secs(1)).await.expect("poll");
        assert!(batch.len() <= max, "bus: poll returns at most `max` records");
        out.extend(batch);
    }
    out
}

fn payloads(records: &[BusRecord]) -> Vec<Bytes> {
    records.iter().map(|r| r.payload.clone()).collect()
}

fn assert_increasing(records: &[BusRecord], rule: &str) {
    assert!(records.windows(2).all(|w| w[0].offset < w[1].offset), "bus: {rule}");
}

/// Checks every rule of [`Bus`] and [`BusConsumer`] on a fresh topic.
pub async fn bus(bus: &dyn Bus) {
    let topic = unique_id("bt");
    let (group_a, group_b) = (unique_id("bga"), unique_id("bgb"));
    // One key: records with the same key are ordered.
    let key = Bytes::from_static(b"conformance-key");
    let payload = |i: usize| Bytes::from(format!("record-{i}"));
    let sent: Vec<Bytes> = (0..5).map(payload).collect();

    for p in &sent {
        bus.publish(&topic, key.clone(), p.clone()).await.expect("publish");
    }

    // A new group reads everything, in order.
    let mut a1 = bus.subscribe(&topic, &group_a).await.expect("subscribe");
    let got = poll_n(&mut *a1, 5, 100).await;
    assert_eq!(payloads(&got), sent, "bus: a new group receives every record in publish order");
    assert_increasing(&got, "offsets increase in publish order");
    assert!(got.iter().all(|r| r.key == key), "bus: records keep their key");

    // Commit the third record; a new consumer of the group resumes after it
    // and receives again what was delivered but not committed.
    a1.commit(&got[..3]).await.expect("commit");
    drop(a1);
    let mut a2 = bus.subscribe(&topic, &group_a).await.expect("subscribe");
    let again = poll_n(&mut *a2, 2, 100).await;
    assert_eq!(
        again,
        got[3..].to_vec(),
        "bus: a new consumer resumes right after the committed offset, redelivering uncommitted records"
    );
    let extra = a2.poll(100, Duration::from_millis(300)).await.expect("poll");
    assert!(extra.is_empty(), "bus: nothing is delivered twice to one consumer");

    // Another group sees everything, independently of group A's commits;
    // `max` bounds each batch.
    let mut b1 = bus.subscribe(&topic, &group_b).await.expect("subscribe");
    let all_b = poll_n(&mut *b1, 5, 2).await;
    assert_eq!(payloads(&all_b), sent, "bus: a second group receives every record");
    assert_eq!(all_b, got, "bus: both groups see the same offsets");

    // An idle poll returns an empty batch within about `wait`.
    let started = Instant::now();
    let empty = a2.poll(100, Duration::from_millis(200)).await.expect("poll");
    assert!(empty.is_empty(), "bus: an idle poll returns an empty batch");
    assert!(started.elapsed() < Duration::from_secs(5), "bus: an idle poll returns after about `wait`");

    // A waiting poll wakes on publish, well before its wait runs out.
    let started = Instant::now();
    let (woken, published) = tokio::join!(a2.poll(100, PATIENCE), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bus.publish(&topic, key.clone(), payload(5)).await
    });
    published.expect("publish");
    let woken = woken.expect("poll");
    assert_eq!(payloads(&woken), vec![payload(5)], "bus: a waiting poll returns the new record");
    assert!(
        started.elapsed() < PATIENCE / 3,
        "bus: a waiting poll wakes promptly on publish ({:?})",
        started.elapsed()
    );
    assert!(woken[0].offset > got[4].offset, "bus: offsets keep increasing");

    // Everything committed: a new consumer of the group has nothing to read.
    a2.commit(&woken[..1]).await.expect("commit");
    drop(a2);
    let mut a3 = bus.subscribe(&topic, &group_a).await.expect("subscribe");
    let none = a3.poll(100, Duration::from_millis(500)).await.expect("poll");
    assert!(none.is_empty(), "bus: committed records are not redelivered");

    // Group B has not committed: a new consumer starts from the beginning.
    drop(b1);
    let mut b2 = bus.subscribe(&topic, &group_b).await.expect("subscribe");
    let replay = poll_n(&mut *b2, 6, 100).await;
    assert_eq!(replay.len(), 6, "bus: without a commit, a group's records are all redelivered");
    assert_eq!(replay[..5].to_vec(), got, "bus: redelivery keeps offsets and order");
}

/// A message for [`message_log`] whose payload names its client id and the
/// sequence it was built with.
fn new_message(
    conversation: &str,
    sender: &str,
    client_msg_id: &str,
    msg_id: u64,
    topic: &str,
) -> NewMessage {
    let client = client_msg_id.to_owned();
    NewMessage {
        conversation: conversation.to_owned(),
        sender: sender.to_owned(),
        client_msg_id: client_msg_id.to_owned(),
        msg_id,
        sent_at_ms: now_ms(),
        dedup_ttl: Duration::from_secs(600),
        topic: topic.to_owned(),
        key: Bytes::from(conversation.to_owned()),
        payload: Box::new(move |seq| Bytes::from(format!("{client}:{seq}"))),
    }
}

/// Checks every rule of [`MessageLog`]; `dedup`, `sequences` and `bus` are
/// the backends the log writes to.
pub async fn message_log(
    log: &dyn MessageLog,
    dedup: &dyn DedupStore,
    sequences: &dyn SequenceStore,
    bus: &dyn Bus,
) {
    let topic = unique_id("mt");
    let conversation = unique_id("p");
    let sender = unique_id("alice");

    // Sequences count from 1 per conversation; each append reserves its ids.
    let mut appended = Vec::new();
    for i in 0..3u64 {
        let client = format!("c{i}");
        let ids = log
            .append(new_message(&conversation, &sender, &client, 1_000 + i, &topic))
            .await
            .expect("append");
        assert_eq!(ids.seq, i + 1, "message log: sequences are consecutive from 1 per conversation");
        assert_eq!(ids.msg_id, 1_000 + i, "message log: the caller's message id is kept");
        let reserved = dedup.get(&sender, &client).await.expect("dedup get");
        assert_eq!(reserved, Some(ids), "message log: the ids are reserved under the client message id");
        appended.push((client, ids));
    }
    assert_eq!(
        sequences.current(&conversation).await.expect("current"),
        3,
        "message log: the conversation's counter is advanced"
    );

    // Another conversation has its own counter, even under concurrency.
    let other = unique_id("g");
    let results = futures::future::join_all((0..20u64).map(|i| {
        let message = new_message(&other, &sender, &format!("o{i}"), 2_000 + i, &topic);
        log.append(message)
    }))
    .await;
    let mut seqs: Vec<u64> = results.into_iter().map(|r| r.expect("concurrent append").seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "message log: concurrent appends get distinct sequences");

    // A batch is appended in order: each conversation's sequences continue
    // where they were, interleaved conversations keep their own counters.
    let third = unique_id("p");
    let batch = [(&conversation, "b0"), (&third, "b1"), (&conversation, "b2"), (&third, "b3")];
    let messages = batch
        .iter()
        .enumerate()
        .map(|(i, (conv, client))| new_message(conv, &sender, client, 3_000 + i as u64, &topic))
        .collect();
    let results = log.append_batch(messages).await;
    assert_eq!(results.len(), batch.len(), "message log: one result per message of a batch");
    let seqs: Vec<u64> = results.iter().map(|r| r.as_ref().expect("batch append").seq).collect();
    assert_eq!(
        seqs,
        vec![4, 1, 5, 2],
        "message log: a batch takes each conversation's next sequences in order"
    );
    for ((_, client), result) in batch.iter().zip(&results) {
        let ids = *result.as_ref().expect("batch append");
        let reserved = dedup.get(&sender, client).await.expect("dedup get");
        assert_eq!(reserved, Some(ids), "message log: a batch reserves each message's ids");
        if ids.msg_id == 3_000 || ids.msg_id == 3_002 {
            appended.push(((*client).to_owned(), ids));
        }
    }
    for (conv, last) in [(&conversation, 5), (&third, 2)] {
        assert_eq!(
            sequences.current(conv).await.expect("current"),
            last,
            "message log: a batch leaves each conversation's counter at its last sequence"
        );
    }
    assert!(log.append_batch(Vec::new()).await.is_empty(), "message log: an empty batch stores nothing");

    // The bus holds one record per append, built with the sequence given.
    let mut consumer = bus.subscribe(&topic, &unique_id("mg")).await.expect("subscribe");
    let records = poll_n(&mut *consumer, 27, 100).await;
    let mine: Vec<String> = records
        .iter()
        .filter(|r| r.key == conversation.as_bytes())
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    let expected: Vec<String> =
        appended.iter().map(|(client, ids)| format!("{client}:{}", ids.seq)).collect();
    assert_eq!(mine, expected, "message log: each bus record carries its message's sequence, in order");
    for r in records.iter().filter(|r| r.key == other.as_bytes()) {
        let text = String::from_utf8_lossy(&r.payload).into_owned();
        let (client, seq) = text.split_once(':').expect("payload client:seq");
        let reserved = dedup.get(&sender, client).await.expect("dedup get").expect("reserved");
        assert_eq!(seq, reserved.seq.to_string(), "message log: bus record and reservation agree");
    }
    let thirds: Vec<String> = records
        .iter()
        .filter(|r| r.key == third.as_bytes())
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(thirds, vec!["b1:1", "b3:2"], "message log: a batch's records are in its order");
    assert_eq!(records.len(), 27, "message log: one bus record per append");
}

/// Checks every rule of [`Registry`].
pub async fn registry(registry: &dyn Registry) {
    let role = unique_id("role");
    let other_role = unique_id("role");
    let (id_a, id_b) = (unique_id("na"), unique_id("nb"));
    let node = |id: &str, role: &str, addr: &str| NodeInfo {
        node_id: id.to_owned(),
        role: role.to_owned(),
        addr: addr.to_owned(),
        internal_addr: format!("{addr}-internal"),
        connections: 0,
    };

    assert!(registry.list(&role).await.expect("list").is_empty(), "registry: an unused role lists nothing");
    // Registered out of order, listed sorted by node id.
    let b = node(&id_b, &role, "127.0.0.1:2");
    let a = node(&id_a, &role, "127.0.0.1:1");
    let elsewhere = node(&unique_id("nc"), &other_role, "127.0.0.1:3");
    registry.register(&b).await.expect("register");
    registry.register(&a).await.expect("register");
    registry.register(&elsewhere).await.expect("register");
    assert_eq!(
        registry.list(&role).await.expect("list"),
        vec![a.clone(), b.clone()],
        "registry: list returns the role's nodes sorted by node id"
    );

    let a2 = node(&id_a, &role, "127.0.0.1:11");
    registry.register(&a2).await.expect("register");
    assert_eq!(
        registry.list(&role).await.expect("list"),
        vec![a2.clone(), b.clone()],
        "registry: register replaces a node with the same id"
    );

    registry.update_connections(&id_b, 42).await.expect("update_connections");
    let listed = registry.list(&role).await.expect("list");
    assert_eq!(listed[1].connections, 42, "registry: update_connections is visible in list");
    assert_eq!(listed[1].addr, b.addr, "registry: update_connections keeps the rest of the node");

    registry.deregister(&id_a).await.expect("deregister");
    assert_eq!(
        registry.list(&role).await.expect("list").iter().map(|n| n.node_id.clone()).collect::<BTreeSet<_>>(),
        BTreeSet::from([id_b.clone()]),
        "registry: deregister removes the node"
    );
    assert_eq!(
        registry.list(&other_role).await.expect("list"),
        vec![elsewhere.clone()],
        "registry: list filters by role"
    );
    registry.deregister(&id_b).await.expect("deregister");
    registry.deregister(&elsewhere.node_id).await.expect("deregister");
    assert!(registry.list(&role).await.expect("list").is_empty(), "registry: all nodes deregistered");

    // watch follows joins and leaves of its role only.
    let mut watched = registry.watch(&role).await.expect("watch");
    assert!(watched.borrow().is_empty(), "registry: watch starts with the current list");
    let joined = node(&unique_id("nw"), &role, "127.0.0.1:4");
    registry.register(&joined).await.expect("register");
    let seen = tokio::time::timeout(Duration::from_secs(10), watched.wait_for(|nodes| nodes.len() == 1))
        .await
        .expect("registry: watch sees a join within 10 s")
        .expect("watch open")
        .clone();
    assert_eq!(seen[0].node_id, joined.node_id, "registry: watch lists the joined node");
    registry.deregister(&joined.node_id).await.expect("deregister");
    tokio::time::timeout(Duration::from_secs(10), watched.wait_for(|nodes| nodes.is_empty()))
        .await
        .expect("registry: watch sees a leave within 10 s")
        .expect("watch open");
}
