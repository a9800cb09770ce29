//! Cluster mode: every role its own process on ZooKeeper, Redis and a
//! Kafka-protocol broker (run `scripts/engines.sh start` and export what
//! `scripts/engines.sh env` prints; the test script does both). Without the
//! engines these tests are skipped, unless TERN_REQUIRE_ENGINES says the run
//! needs them (CI), where they fail.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::Cluster;
use common::suite::WAIT;
use common::{next_message, no_message, text};
use tern_store::{Registry, SessionStore};

macro_rules! cluster_or_skip {
    ($access:expr, $dispatchers:expr) => {
        match Cluster::start($access, $dispatchers) {
            Some(cluster) => cluster,
            None => return,
        }
    };
}

#[tokio::test]
async fn suite_one_to_one() {
    let cluster = cluster_or_skip!(2, 2);
    common::suite::one_to_one(&cluster.deployment()).await;
}

#[tokio::test]
async fn suite_group_order() {
    let cluster = cluster_or_skip!(2, 2);
    common::suite::group_order(&cluster.deployment()).await;
}

#[tokio::test]
async fn suite_offline_three() {
    let cluster = cluster_or_skip!(2, 2);
    common::suite::offline_three(&cluster.deployment()).await;
}

#[tokio::test]
async fn suite_multi_device() {
    let cluster = cluster_or_skip!(2, 2);
    common::suite::multi_device(&cluster.deployment()).await;
}

/// Polls `registry` until `check` holds for the access-node counts.
async fn wait_counts(
    registry: &dyn Registry,
    within: Duration,
    check: impl Fn(&BTreeMap<String, u64>) -> bool,
) -> BTreeMap<String, u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let counts: BTreeMap<String, u64> = registry
            .list("access-tcp")
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id, n.connections))
            .collect();
        if check(&counts) || tokio::time::Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn clients_on_two_access_nodes_chat_and_ip_list_balances() {
    let cluster = cluster_or_skip!(2, 2);
    let on_a = cluster.deployment_on("access-1");
    let on_b = cluster.deployment_on("access-2");
    let (alice, mut alice_events) = on_a.client("alice").await;
    let (bob, mut bob_events) = on_b.client("bob").await;

    alice.send_single("bob", "across nodes").await.unwrap();
    assert_eq!(text(&next_message(&mut bob_events, WAIT).await), "across nodes");
    bob.send_single("alice", "and back").await.unwrap();
    assert_eq!(text(&next_message(&mut alice_events, WAIT).await), "and back");
    alice.create_group("pair", "", &["bob"]).await.unwrap();
    bob.send_group("pair", "group across nodes").await.unwrap();
    assert_eq!(text(&next_message(&mut alice_events, WAIT).await), "group across nodes");

    // Load access-1 more: ipList must now put access-2 first.
    let (_c1, _e1) = on_a.client("carol").await;
    let (_c2, _e2) = on_a.client("dave").await;
    let registry = cluster.registry().await;
    let counts = wait_counts(&registry, Duration::from_secs(8), |c| {
        c.get("access-1") == Some(&3) && c.get("access-2") == Some(&1)
    })
    .await;
    assert_eq!(counts, BTreeMap::from([("access-1".into(), 3), ("access-2".into(), 1)]));
    let nodes = tern_sdk::AuthClient::new(cluster.auth_url()).ip_list().await.unwrap();
    assert_eq!(nodes[0].node_id, "access-2", "ipList puts the less loaded node first: {nodes:?}");
    assert_eq!(nodes[0].addr, cluster.access_addr("access-2"));

    // A new client that follows ipList lands on access-2.
    let (erin, _erin_events) = cluster.deployment().client("erin").await;
    drop(erin);
}

#[tokio::test]
async fn registry_counts_follow_reality_and_a_killed_access_node_is_cleaned_up() {
    let mut cluster = cluster_or_skip!(2, 1);
    let registry = cluster.registry().await;
    let on_a = cluster.deployment_on("access-1");
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        clients.push(on_a.client(user).await);
    }
    // Counts are refreshed every 3 s.
    let started = std::time::Instant::now();
    let counts = wait_counts(&registry, Duration::from_secs(4), |c| c.get("access-1") == Some(&3)).await;
    assert_eq!(counts.get("access-1"), Some(&3), "after {:?}", started.elapsed());
    let (leaving, _) = clients.pop().unwrap();
    leaving.close().await;
    let counts = wait_counts(&registry, Duration::from_secs(4), |c| c.get("access-1") == Some(&2)).await;
    assert_eq!(counts.get("access-1"), Some(&2));

    let redis = cluster.redis().await;
    assert_eq!(redis.sessions.get("u1").await.unwrap().len(), 1);
    cluster.kill("access-1");
    // The ephemeral entry goes with the ZooKeeper session (3 s timeout)...
    let counts = wait_counts(&registry, Duration::from_secs(10), |c| !c.contains_key("access-1")).await;
    assert!(!counts.contains_key("access-1"), "access-1 still registered: {counts:?}");
    assert!(counts.contains_key("access-2"));
    // ...and router-auth clears its users' placements once it has stayed
    // away for a session timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !redis.sessions.get("u1").await.unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for user in ["u1", "u2"] {
        assert!(redis.sessions.get(user).await.unwrap().is_empty(), "{user} still placed on a dead node");
    }
}

#[tokio::test]
async fn dispatcher_killed_mid_conversation_loses_nothing_and_keeps_order() {
    let mut cluster = cluster_or_skip!(2, 2);
    let (alice, _alice_events) = cluster.deployment_on("access-1").client("alice").await;
    let (bob, mut bob_events) = cluster.deployment_on("access-2").client("bob").await;
    alice.create_group("g", "", &["bob"]).await.unwrap();

    const N: usize = 60;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..N {
                let group = alice.send_group("g", format!("g{i}")).await.expect("group send acknowledged");
                let single = alice.send_single("bob", format!("p{i}")).await.expect("send acknowledged");
                acks.push((group, single));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    cluster.kill("dispatcher-1");
    let acks = sender.await.unwrap();

    let mut group_seqs = Vec::new();
    let mut single_seqs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while group_seqs.len() < N || single_seqs.len() < N {
        let m = next_message(&mut bob_events, Duration::from_secs(30)).await;
        assert!(seen.insert(m.msg_id), "message {} shown twice", m.msg_id);
        if m.group_id == "g" {
            group_seqs.push((m.seq, text(&m)))
        } else {
            single_seqs.push((m.seq, text(&m)))
        }
    }
    no_message(&mut bob_events, Duration::from_millis(500)).await;
    // Every acknowledged message arrived, in sequence order.
    for (seqs, prefix, pick) in [(&group_seqs, "g", 0usize), (&single_seqs, "p", 1usize)] {
        assert!(seqs.windows(2).all(|w| w[0].0 < w[1].0), "{prefix} out of order: {seqs:?}");
        let texts: Vec<&str> = seqs.iter().map(|(_, t)| t.as_str()).collect();
        let expected: Vec<String> = (0..N).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(texts, expected, "{prefix}: lost or reordered");
        let acked: Vec<u64> = acks.iter().map(|(g, s)| if pick == 0 { g.seq } else { s.seq }).collect();
        assert_eq!(acked, seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    }
    drop(bob);
}

#[tokio::test]
async fn storage_services_resume_from_their_committed_offsets() {
    let mut cluster = cluster_or_skip!(1, 1);
    let d = cluster.deployment();
    d.register("bob").await;
    let (alice, _alice_events) = d.client("alice").await;
    alice.create_group("h", "", &["bob"]).await.unwrap();
    for i in 0..10 {
        alice.send_group("h", format!("before {i}")).await.unwrap();
    }
    cluster.kill("offline-svc");
    cluster.kill("group-svc");
    // Accepted while nothing consumes: the bus keeps them.
    for i in 0..10 {
        alice.send_group("h", format!("while down {i}")).await.unwrap();
    }
    cluster.restart("offline-svc");
    cluster.restart("group-svc");
    for i in 0..10 {
        alice.send_group("h", format!("after {i}")).await.unwrap();
    }

    let (bob, mut bob_events) = d.client("bob").await;
    let mut texts = Vec::new();
    for _ in 0..30 {
        texts.push(text(&next_message(&mut bob_events, Duration::from_secs(30)).await));
    }
    no_message(&mut bob_events, Duration::from_millis(800)).await;
    let expected: Vec<String> = ["before", "while down", "after"]
        .iter()
        .flat_map(|p| (0..10).map(move |i| format!("{p} {i}")))
        .collect();
    assert_eq!(texts, expected);

    // History holds each message exactly once.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = bob.group_history("h", 0, 200).await.unwrap();
        if page.messages.len() >= 30 || tokio::time::Instant::now() > deadline {
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=30).rev().collect::<Vec<_>>(), "history lost or duplicated a message");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn idgen_serves_snowflake_batches_and_segments() {
    use tern_idgen::rpc::{RemoteIdGen, SegmentAllocator};
    let cluster = cluster_or_skip!(1, 1);
    let channel = tern_store::discovery::channel(&cluster.listen_addr("idgen")).unwrap();
    let idgen = std::sync::Arc::new(RemoteIdGen::new(channel));
    let ids = idgen.next_ids(1000).await.unwrap();
    assert_eq!(ids.len(), 1000);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
    // The dispatcher leased worker 0 first; idgen holds another worker id.
    let workers: std::collections::BTreeSet<u16> =
        ids.iter().map(|id| tern_idgen::decompose(*id).worker).collect();
    assert_eq!(workers.len(), 1);
    let err = idgen.next_ids(0).await.unwrap_err();
    assert_eq!(err.code, tern_proto::ErrorCode::InvalidArgument);

    let a = SegmentAllocator::new(idgen.clone(), "orders").await.unwrap();
    let b = SegmentAllocator::new(idgen.clone(), "orders").await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2_500 {
        assert!(seen.insert(a.next_id().await.unwrap()), "segment ids overlap");
        assert!(seen.insert(b.next_id().await.unwrap()), "segment ids overlap");
    }
}

#[tokio::test]
async fn a_second_login_on_another_access_node_kicks_the_first() {
    use tern_sdk::pb::{self, NoticeKind};
    use tern_sdk::{ConnectOptions, Connection, ServerEvent, TlsMode};
    let cluster = cluster_or_skip!(2, 1);
    let token = tern_sdk::AuthClient::new(cluster.auth_url())
        .login_or_register("alice", common::PASSWORD)
        .await
        .unwrap()
        .token;
    let login = |access: &str| {
        let options = ConnectOptions::new(cluster.access_addr(access), TlsMode::CaFile(cluster.ca()));
        let request = pb::LoginRequest { token: token.clone(), device_id: "phone".into() };
        async move {
            let (conn, events) = Connection::connect(&options).await.unwrap();
            let _: pb::LoginResponse = conn.request(tern_proto::RequestType::Login, &request).await.unwrap();
            (conn, events)
        }
    };
    let (_first, mut first_events) = login("access-1").await;
    let (_second, _second_events) = login("access-2").await;
    let mut kicked = false;
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, first_events.recv()).await {
        match event {
            ServerEvent::Notice(n) if n.kind == NoticeKind::Kicked as i32 => kicked = true,
            ServerEvent::Closed(_) => break,
            _ => {}
        }
    }
    assert!(kicked, "the connection on access-1 was not kicked by the login on access-2");
}

#[tokio::test]
async fn large_group_burst_is_pulled_after_a_sync_notice() {
    // SYNC notices reach the connection through RemotePushGateway and the
    // access node's AccessPush endpoint, in order with the pushes.
    let config = common::suite::large_group_config();
    let Some(cluster) = Cluster::start_with_config(1, 1, &config) else { return };
    common::suite::large_group_burst(&cluster.deployment_on("access-1")).await;
}
