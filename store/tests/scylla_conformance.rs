//! Runs [`tern_store::conformance::history_store`] against a real ScyllaDB
//! (or Cassandra 4+) cluster.
//!
//! The suite runs only when `TERN_SCYLLA_NODES` names a server
//! (comma-separated `host:port` contact points); otherwise it prints why and
//! passes without testing anything, unless `TERN_REQUIRE_ENGINES` asks for
//! it. Each run creates its own keyspace (replication factor 1) and drops it
//! once the suite has passed; a failed run leaves it for inspection.

use bytes::Bytes;
use tern_store::HistoryStore;
use tern_store::conformance::{self, engine_from_env, unique_id};
use tern_store::scylla::{ScyllaHistoryStore, sanitize_identifier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_history_store_conforms() {
    let Some(nodes) = engine_from_env("TERN_SCYLLA_NODES") else {
        return;
    };
    let keyspace = sanitize_identifier(&unique_id("tern_conf"));
    let store = ScyllaHistoryStore::connect(&nodes, &keyspace, 1).await.expect("connect to ScyllaDB");
    conformance::history_store(&store).await;

    // A second store on the same keyspace finds the schema in place and
    // sees what the first one wrote.
    let again = ScyllaHistoryStore::connect(&nodes, &keyspace, 1).await.expect("reconnect");
    let group = unique_id("hg");
    store.append(&group, 7, Bytes::from_static(b"seven")).await.expect("append");
    assert_eq!(again.page(&group, 0, 10).await.expect("page"), vec![(7, Bytes::from_static(b"seven"))]);

    // Ids that a signed bigint cannot order are refused before any I/O.
    assert!(matches!(
        store.append(&group, 1 << 63, Bytes::new()).await,
        Err(tern_store::StoreError::Backend(_))
    ));
    assert!(store.page(&group, 0, 0).await.expect("page").is_empty(), "limit 0 is an empty page");

    // A page larger than one fetch (1,000 rows) is assembled across
    // several server pages and stops at its limit.
    let big = unique_id("hg");
    for chunk in (1..=2_500u64).collect::<Vec<_>>().chunks(100) {
        let writes = chunk.iter().map(|&id| store.append(&big, id, Bytes::from(id.to_string())));
        for result in futures::future::join_all(writes).await {
            result.expect("append");
        }
    }
    let page = store.page(&big, 2_401, 2_100).await.expect("page");
    assert_eq!(page.len(), 2_100, "a multi-fetch page honours its limit");
    assert!(page.iter().map(|(id, _)| *id).eq((301..=2_400).rev()), "newest first, below `before`");
    assert_eq!(page[0].1, Bytes::from("2400"));
    let rest = store.page(&big, 301, 10_000).await.expect("page");
    assert!(rest.iter().map(|(id, _)| *id).eq((1..=300).rev()), "the last page ends at the oldest row");

    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .expect("drop the test keyspace");
}
