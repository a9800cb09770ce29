//! Runs [`tern_store::conformance::meta_store`] against a real MongoDB.
//!
//! The suite runs only when `TERN_MONGO_URI` names a server (a
//! `mongodb://` connection string); otherwise it prints why and passes
//! without testing anything, unless `TERN_REQUIRE_ENGINES` asks for it.
//! Each run uses its own database and drops it once the suite has passed;
//! a failed run leaves it for inspection.

use tern_store::MetaStore;
use tern_store::conformance::{self, engine_from_env, unique_id};
use tern_store::mongo::MongoMetaStore;
use tern_store::scylla::sanitize_identifier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_meta_store_conforms() {
    let Some(uri) = engine_from_env("TERN_MONGO_URI") else {
        return;
    };
    let database = sanitize_identifier(&unique_id("tern_conf"));
    let store = MongoMetaStore::connect(&uri, &database).await.expect("connect to MongoDB");
    conformance::meta_store(&store).await;

    // Connecting again finds the index in place and the data written.
    let again = MongoMetaStore::connect(&uri, &database).await.expect("reconnect");
    let user =
        tern_store::UserRecord { user_id: unique_id("mu"), password_hash: "h".into(), created_at_ms: 1 };
    assert!(store.create_user(&user).await.expect("create_user"));
    assert_eq!(again.get_user(&user.user_id).await.expect("get_user"), Some(user));

    // Concurrent membership changes are atomic per document: none is lost,
    // and the group still reads back sorted.
    let group = tern_store::GroupRecord {
        group_id: unique_id("mg"),
        name: "busy".into(),
        owner: "o".into(),
        members: Vec::new(),
        created_at_ms: 1,
    };
    assert!(store.create_group(&group).await.expect("create_group"));
    let users: Vec<String> = (0..20).map(|_| unique_id("mm")).collect();
    let adds = users.iter().rev().map(|u| store.add_member(&group.group_id, u));
    for result in futures::future::join_all(adds).await {
        assert!(result.expect("add_member").is_some());
    }
    let mut expected = users.clone();
    expected.sort();
    let stored = again.get_group(&group.group_id).await.expect("get_group").expect("group");
    assert_eq!(stored.members, expected, "every concurrent add landed, members sorted");
    assert_eq!(store.groups_of(&users[3]).await.expect("groups_of"), vec![group.group_id.clone()]);

    store.database().drop().await.expect("drop the test database");
}
