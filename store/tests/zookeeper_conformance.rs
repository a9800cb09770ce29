//! Runs the registry conformance suite against ZooKeeper, and checks what
//! only the ZooKeeper registry adds: nodes are ephemeral, worker ids are
//! leased uniquely and freed, and an expired session is replaced with every
//! node registered again.
//!
//! Skipped unless `TERN_ZK_ADDR` names a server (`./scripts/engines.sh`
//! starts one). Every test uses its own root, so runs never collide.

use std::future::Future;
use std::time::Duration;

use tern_store::conformance::{self, engine_from_env};
use tern_store::zookeeper::{WORKER_IDS, ZkRegistry};
use tern_store::{NodeInfo, Registry};

/// Short, so a vanished process's nodes go quickly; the server clamps it to
/// its `minSessionTimeout`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(2);

fn unique_root() -> String {
    format!("tern-test/{}", conformance::unique_id("root"))
}

async fn connect(addr: &str, root: &str) -> ZkRegistry {
    ZkRegistry::connect(addr, root, SESSION_TIMEOUT).await.expect("connect to zookeeper")
}

fn node(id: &str, role: &str) -> NodeInfo {
    NodeInfo {
        node_id: id.to_owned(),
        role: role.to_owned(),
        addr: format!("127.0.0.1:{}", id.len()),
        internal_addr: String::new(),
        connections: 0,
    }
}

/// Waits up to `limit` for `condition`, polling.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_conforms() {
    let Some(addr) = engine_from_env("TERN_ZK_ADDR") else { return };
    let registry = connect(&addr, &unique_root()).await;
    conformance::registry(&registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_vanish_with_the_registry_that_registered_them() {
    let Some(addr) = engine_from_env("TERN_ZK_ADDR") else { return };
    let root = unique_root();
    let (owner, observer) = (connect(&addr, &root).await, connect(&addr, &root).await);
    let role = conformance::unique_id("role");
    let mine = node(&conformance::unique_id("n"), &role);
    owner.register(&mine).await.expect("register");

    let mut watched = observer.watch(&role).await.expect("watch");
    assert_eq!(*watched.borrow(), vec![mine.clone()], "another registry sees the node");

    let timeout = owner.session_timeout();
    drop(owner);
    tokio::time::timeout(timeout, watched.wait_for(|nodes| nodes.is_empty()))
        .await
        .expect("the node vanishes within the session timeout once its registry is dropped")
        .expect("watch open");
    assert!(observer.list(&role).await.expect("list").is_empty(), "list agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_ids_are_leased_uniquely_and_freed() {
    let Some(addr) = engine_from_env("TERN_ZK_ADDR") else { return };
    let root = unique_root();
    let (a, b) = (connect(&addr, &root).await, connect(&addr, &root).await);
    let namespace = conformance::unique_id("ids");

    let first = a.lease_worker_id(&namespace).await.expect("lease");
    let second = b.lease_worker_id(&namespace).await.expect("lease");
    let third = a.lease_worker_id(&namespace).await.expect("lease");
    assert_eq!([first.id, second.id, third.id], [0, 1, 2], "the lowest free id is leased, never twice");
    assert!(!*first.lost.borrow(), "a fresh lease is not lost");
    let elsewhere = a.lease_worker_id(&conformance::unique_id("ids")).await.expect("lease");
    assert_eq!(elsewhere.id, 0, "namespaces are independent");

    second.release().await.expect("release");
    let again = a.lease_worker_id(&namespace).await.expect("lease");
    assert_eq!(again.id, 1, "a released id is free again");

    // Dropping frees the id too, in the background.
    drop(first);
    eventually(Duration::from_secs(10), "a dropped lease's id is free again", || async {
        let lease = b.lease_worker_id(&namespace).await.expect("lease");
        let id = lease.id;
        lease.release().await.expect("release");
        id == 0
    })
    .await;

    // Fill the namespace: ids 1 and 2 are held, so 1022 more fit.
    let mut held = Vec::new();
    for _ in 0..WORKER_IDS - 2 {
        held.push(b.lease_worker_id(&namespace).await.expect("lease while ids are free"));
    }
    let mut ids: Vec<u16> = held.iter().map(|l| l.id).chain([again.id, third.id]).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..WORKER_IDS).collect::<Vec<_>>(), "every id leased exactly once");
    assert!(a.lease_worker_id(&namespace).await.is_err(), "no lease when all 1024 ids are held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_replaced_and_its_nodes_registered_again() {
    let Some(addr) = engine_from_env("TERN_ZK_ADDR") else { return };
    let root = unique_root();
    let (owner, observer) = (connect(&addr, &root).await, connect(&addr, &root).await);
    let role = conformance::unique_id("role");
    let mut first = node(&conformance::unique_id("n1"), &role);
    owner.register(&first).await.expect("register");
    owner.update_connections(&first.node_id, 5).await.expect("update_connections");
    first.connections = 5;
    let lease = owner.lease_worker_id(&conformance::unique_id("ids")).await.expect("lease");
    let mut lost = lease.lost.clone();
    let mut owner_watch = owner.watch(&role).await.expect("watch");
    let mut observer_watch = observer.watch(&role).await.expect("watch");

    let old_session = owner.session_id();
    owner.expire_session().await.expect("expire the session on the server");

    tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|lost| *lost))
        .await
        .expect("the lease is lost when its session expires")
        .expect("lost flag open");
    eventually(Duration::from_secs(15), "a new session replaces the expired one", || async {
        owner.session_id() != old_session
    })
    .await;

    // The node was re-created, with its latest data, in the new session.
    eventually(Duration::from_secs(10), "the node is registered again", || async {
        observer.list(&role).await.expect("list") == vec![first.clone()]
    })
    .await;
    let raw = zookeeper_client::Client::connect(&addr).await.expect("raw client");
    let stat = raw
        .check_stat(&format!("/{root}/nodes/{role}/{}", first.node_id))
        .await
        .expect("stat")
        .expect("the node exists");
    assert_eq!(stat.ephemeral_owner, owner.session_id(), "the node belongs to the new session");

    // Reads, writes and both registries' watches keep working.
    assert_eq!(owner.list(&role).await.expect("list"), vec![first.clone()], "the owner lists its node");
    let second = node(&conformance::unique_id("n2"), &role);
    owner.register(&second).await.expect("register after recovery");
    for watched in [&mut owner_watch, &mut observer_watch] {
        tokio::time::timeout(Duration::from_secs(10), watched.wait_for(|nodes| nodes.len() == 2))
            .await
            .expect("a watch sees a join after the session was replaced")
            .expect("watch open");
    }
    owner.update_connections(&first.node_id, 7).await.expect("update_connections");
    let listed = observer.list(&role).await.expect("list");
    assert_eq!(listed.iter().find(|n| n.node_id == first.node_id).map(|n| n.connections), Some(7));

    let fresh = owner.lease_worker_id(&conformance::unique_id("ids")).await.expect("lease after recovery");
    assert!(!*fresh.lost.borrow(), "a lease in the new session is not lost");
    drop(lease);

    owner.deregister(&first.node_id).await.expect("deregister");
    tokio::time::timeout(Duration::from_secs(10), observer_watch.wait_for(|nodes| nodes.len() == 1))
        .await
        .expect("a watch sees a leave after the session was replaced")
        .expect("watch open");
}
