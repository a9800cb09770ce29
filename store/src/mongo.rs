//! MongoDB implementation of [`MetaStore`] (cluster mode), on the `mongodb`
//! driver.
//!
//! # Documents
//!
//! Three collections in the configured database:
//!
//! - `users`: `{ _id: <user_id>, password_hash: <string>, created_at_ms: <int64> }`
//! - `groups`: `{ _id: <group_id>, name: <string>, owner: <string>,
//!   members: [<user_id>, …], created_at_ms: <int64> }`, with an index on
//!   `members` (multikey) so [`MetaStore::groups_of`] is an index lookup,
//!   not a scan.
//! - `devices`: `{ _id: <user_id>, devices: [<device_id>, …] }`, one
//!   document per user that has logged in. It is separate from `users` so
//!   a device is recorded even for a user without a `users` document; the
//!   document is upserted with `$addToSet` (idempotent, atomic on the
//!   document), so the array is in insertion order and reads sort it.
//!
//! The ids are the `_id`s, so MongoDB's unique `_id` index is what makes
//! `create_user` / `create_group` refuse a taken id: the insert fails with
//! the duplicate-key error (code 11000), reported as `Ok(false)`.
//!
//! `members` is written sorted and without duplicates, but membership
//! changes use `$addToSet` / `$pull` (atomic on one document, no
//! read-modify-write race) and `$addToSet` appends; so the stored order is
//! not significant and every read sorts and deduplicates in Rust.
//! `add_member` / `remove_member` use `findOneAndUpdate` returning the
//! updated document, so they report the group as their own change left it.
//!
//! Timestamps are BSON int64 (BSON has no unsigned integers); a value above
//! `i64::MAX` is refused on write and a negative one is reported as
//! corrupt on read. Unknown extra fields are ignored.
//!
//! # Timeouts and cancellation
//!
//! The driver must not have its operation futures dropped half-way (the
//! connection they hold is then discarded, and the server may still apply
//! a write the caller believes abandoned). Every operation therefore runs
//! in its own spawned task, and only the wait for that task's handle is
//! bounded (30 s by default, [`MongoMetaStore::with_op_timeout`]): on
//! timeout, or when a caller drops the future of a [`MetaStore`] method,
//! the driver operation still runs to completion in the background.
//! Write and read concerns, TLS and credentials come from the URI (the
//! server default write concern is `majority` since MongoDB 5.0).
//!
//! No MongoDB server can be installed on the development machine, so the
//! conformance suite (`store/tests/mongo_conformance.rs`) runs only when
//! `TERN_MONGO_URI` names a server; the document conversions and error
//! classification are unit-tested.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::ReturnDocument;
use mongodb::{Client, Collection, Database, IndexModel};

use crate::{GroupRecord, MetaStore, StoreError, StoreResult, UserRecord};

/// How long a caller waits for one driver operation by default.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// MongoDB's error code for a unique index violation.
const DUPLICATE_KEY: i32 = 11000;

const USERS: &str = "users";
const GROUPS: &str = "groups";
const DEVICES: &str = "devices";

/// [`MetaStore`] on a MongoDB deployment.
#[derive(Debug, Clone)]
pub struct MongoMetaStore {
    db: Database,
    users: Collection<Document>,
    groups: Collection<Document>,
    devices: Collection<Document>,
    op_timeout: Duration,
}

impl MongoMetaStore {
    /// Connects with a MongoDB connection string (`mongodb://…` or
    /// `mongodb+srv://…`), uses `database` (created by MongoDB on first
    /// write) and creates the `members` index if missing. Fails if the
    /// server does not answer within [`DEFAULT_OP_TIMEOUT`].
    pub async fn connect(uri: &str, database: &str) -> StoreResult<Self> {
        validate_database_name(database)?;
        let uri = uri.to_owned();
        // Parsing can involve DNS (SRV, TXT records): a driver future too.
        let client =
            bounded(DEFAULT_OP_TIMEOUT, "connect", async move { Client::with_uri_str(uri).await }).await?;
        let db = client.database(database);
        let store = Self {
            users: db.collection(USERS),
            groups: db.collection(GROUPS),
            devices: db.collection(DEVICES),
            db,
            op_timeout: DEFAULT_OP_TIMEOUT,
        };
        // Idempotent: creating an index that exists with the same keys is
        // a no-op. It is also the first round trip, so a wrong URI fails
        // here rather than on the first request.
        let groups = store.groups.clone();
        store
            .run("create index", async move {
                groups.create_index(IndexModel::builder().keys(doc! { "members": 1 }).build()).await
            })
            .await?;
        Ok(store)
    }

    /// Bounds the wait for each later operation by `timeout` instead of
    /// [`DEFAULT_OP_TIMEOUT`].
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The database holding the collections, e.g. for cleanup.
    pub fn database(&self) -> &Database {
        &self.db
    }

    async fn run<T: Send + 'static>(
        &self,
        what: &str,
        op: impl Future<Output = mongodb::error::Result<T>> + Send + 'static,
    ) -> StoreResult<T> {
        bounded(self.op_timeout, what, op).await
    }

    /// Applies a membership `update` and returns the group as it left it.
    async fn change_members(
        &self,
        what: &str,
        group_id: &str,
        update: Document,
    ) -> StoreResult<Option<GroupRecord>> {
        let groups = self.groups.clone();
        let filter = doc! { "_id": group_id };
        let updated = self
            .run(what, async move {
                groups.find_one_and_update(filter, update).return_document(ReturnDocument::After).await
            })
            .await?;
        updated.as_ref().map(group_from_doc).transpose()
    }
}

/// Runs a driver operation in its own task and waits at most `limit` for
/// it. Dropping the returned future, or the timeout firing, detaches the
/// task (a dropped `JoinHandle` does not cancel), so the driver future is
/// always polled to completion.
async fn bounded<T: Send + 'static>(
    limit: Duration,
    what: &str,
    op: impl Future<Output = mongodb::error::Result<T>> + Send + 'static,
) -> StoreResult<T> {
    match tokio::time::timeout(limit, tokio::spawn(op)).await {
        Ok(Ok(result)) => result.map_err(|e| mongo_err(what, &e)),
        Ok(Err(join)) => Err(StoreError::Backend(format!("MongoDB {what}: task failed: {join}"))),
        Err(_) => Err(StoreError::Unavailable(format!("MongoDB {what}: no answer within {limit:?}"))),
    }
}

#[async_trait]
impl MetaStore for MongoMetaStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        let document = user_to_doc(user)?;
        let users = self.users.clone();
        self.run("create_user", async move { created(users.insert_one(document).await) }).await
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let users = self.users.clone();
        let filter = doc! { "_id": user_id };
        let found = self.run("get_user", async move { users.find_one(filter).await }).await?;
        found.as_ref().map(user_from_doc).transpose()
    }

    async fn create_group(&self, group: &GroupRecord) -> StoreResult<bool> {
        let document = group_to_doc(group)?;
        let groups = self.groups.clone();
        self.run("create_group", async move { created(groups.insert_one(document).await) }).await
    }

    async fn get_group(&self, group_id: &str) -> StoreResult<Option<Arc<GroupRecord>>> {
        let groups = self.groups.clone();
        let filter = doc! { "_id": group_id };
        let found = self.run("get_group", async move { groups.find_one(filter).await }).await?;
        Ok(found.as_ref().map(group_from_doc).transpose()?.map(Arc::new))
    }

    async fn add_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        self.change_members("add_member", group_id, doc! { "$addToSet": { "members": user_id } }).await
    }

    async fn remove_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        self.change_members("remove_member", group_id, doc! { "$pull": { "members": user_id } }).await
    }

    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let groups = self.groups.clone();
        let filter = doc! { "members": user_id };
        let found: Vec<Document> = self
            .run("groups_of", async move {
                groups.find(filter).projection(doc! { "_id": 1 }).await?.try_collect().await
            })
            .await?;
        let mut ids = found.iter().map(|d| string_field(d, "_id")).collect::<StoreResult<Vec<_>>>()?;
        // Sorted here, not by the server: a collection default collation
        // could order strings differently from Rust's byte order.
        ids.sort();
        Ok(ids)
    }

    async fn add_device(&self, user_id: &str, device_id: &str) -> StoreResult<()> {
        let devices = self.devices.clone();
        let filter = doc! { "_id": user_id };
        let update = doc! { "$addToSet": { "devices": device_id } };
        self.run("add_device", async move {
            let upsert = || devices.update_one(filter.clone(), update.clone()).upsert(true);
            match upsert().await {
                // Two first logins of one user can both try to insert the
                // document; the loser finds it on a second try.
                Err(e) if is_duplicate_key(&e) => upsert().await.map(drop),
                other => other.map(drop),
            }
        })
        .await
    }

    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let devices = self.devices.clone();
        let filter = doc! { "_id": user_id };
        let found = self.run("devices", async move { devices.find_one(filter).await }).await?;
        found.as_ref().map_or_else(|| Ok(Vec::new()), devices_from_doc)
    }
}

/// `Ok(true)` for an insert that happened, `Ok(false)` for a taken `_id`.
fn created<T>(result: mongodb::error::Result<T>) -> mongodb::error::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_duplicate_key(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Unavailable for what a retry may cure (no reachable server, network
/// failures, errors the server labels retryable), Corrupt for documents
/// that do not decode, Backend for the rest.
fn mongo_err(what: &str, e: &MongoError) -> StoreError {
    let message = format!("MongoDB {what}: {e}");
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => StoreError::Unavailable(message),
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(message),
        _ if e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") => {
            StoreError::Unavailable(message)
        }
        _ => StoreError::Backend(message),
    }
}

/// Checks `name` against MongoDB's rules for database names: not empty,
/// under 64 bytes, none of `/\. "$*<>:|?` and no NUL.
pub fn validate_database_name(name: &str) -> StoreResult<()> {
    const FORBIDDEN: &[char] = &['/', '\\', '.', ' ', '"', '$', '*', '<', '>', ':', '|', '?', '\0'];
    if name.is_empty() || name.len() >= 64 || name.contains(FORBIDDEN) {
        return Err(StoreError::Backend(format!(
            "invalid MongoDB database name {name:?}: 1 to 63 bytes, without any of /\\. \"$*<>:|? or NUL"
        )));
    }
    Ok(())
}

fn millis_to_bson(field: &str, value: u64) -> StoreResult<Bson> {
    i64::try_from(value)
        .map(Bson::Int64)
        .map_err(|_| StoreError::Backend(format!("{field} {value} does not fit a BSON int64")))
}

fn user_to_doc(user: &UserRecord) -> StoreResult<Document> {
    Ok(doc! {
        "_id": user.user_id.as_str(),
        "password_hash": user.password_hash.as_str(),
        "created_at_ms": millis_to_bson("created_at_ms", user.created_at_ms)?,
    })
}

fn user_from_doc(document: &Document) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        user_id: string_field(document, "_id")?,
        password_hash: string_field(document, "password_hash")?,
        created_at_ms: millis_field(document, "created_at_ms")?,
    })
}

fn group_to_doc(group: &GroupRecord) -> StoreResult<Document> {
    let mut members = group.members.clone();
    members.sort();
    members.dedup();
    Ok(doc! {
        "_id": group.group_id.as_str(),
        "name": group.name.as_str(),
        "owner": group.owner.as_str(),
        "members": members,
        "created_at_ms": millis_to_bson("created_at_ms", group.created_at_ms)?,
    })
}

fn group_from_doc(document: &Document) -> StoreResult<GroupRecord> {
    let mut members = match document.get("members") {
        Some(Bson::Array(items)) => items
            .iter()
            .map(|item| match item {
                Bson::String(member) => Ok(member.clone()),
                other => Err(StoreError::Corrupt(format!("group member is not a string: {other:?}"))),
            })
            .collect::<StoreResult<Vec<String>>>()?,
        other => return Err(StoreError::Corrupt(format!("group field members is not an array: {other:?}"))),
    };
    members.sort();
    members.dedup();
    Ok(GroupRecord {
        group_id: string_field(document, "_id")?,
        name: string_field(document, "name")?,
        owner: string_field(document, "owner")?,
        members,
        created_at_ms: millis_field(document, "created_at_ms")?,
    })
}

/// The sorted, unique device ids of a `devices` document.
fn devices_from_doc(document: &Document) -> StoreResult<Vec<String>> {
    let mut devices = string_array(document, "devices")?;
    devices.sort();
    devices.dedup();
    Ok(devices)
}

fn string_array(document: &Document, field: &str) -> StoreResult<Vec<String>> {
    match document.get(field) {
        Some(Bson::Array(items)) => items
            .iter()
            .map(|item| match item {
                Bson::String(value) => Ok(value.clone()),
                other => {
                    Err(StoreError::Corrupt(format!("an item of field {field} is not a string: {other:?}")))
                }
            })
            .collect(),
        other => Err(StoreError::Corrupt(format!("field {field} is not an array: {other:?}"))),
    }
}

fn string_field(document: &Document, field: &str) -> StoreResult<String> {
    match document.get(field) {
        Some(Bson::String(value)) => Ok(value.clone()),
        other => Err(StoreError::Corrupt(format!("field {field} is not a string: {other:?}"))),
    }
}

fn millis_field(document: &Document, field: &str) -> StoreResult<u64> {
    // Accept int32 too: a document edited by hand in the shell may hold
    // small numbers as int32 (or as a double, which is refused).
    let value = match document.get(field) {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        other => return Err(StoreError::Corrupt(format!("field {field} is not an integer: {other:?}"))),
    };
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("field {field} is negative: {value}")))
}

#[cfg(test)]
mod tests {
    use mongodb::error::{CommandError, WriteError};

    use super::*;

    fn user() -> UserRecord {
        UserRecord { user_id: "alice".into(), password_hash: "$argon2id$v=19$x".into(), created_at_ms: 1_700 }
    }

    fn group() -> GroupRecord {
        GroupRecord {
            group_id: "g1".into(),
            name: "friends".into(),
            owner: "bob".into(),
            members: vec!["carol".into(), "alice".into(), "bob".into(), "alice".into()],
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn user_document_layout_and_round_trip() {
        let document = user_to_doc(&user()).expect("encode");
        assert_eq!(
            document,
            doc! { "_id": "alice", "password_hash": "$argon2id$v=19$x", "created_at_ms": 1_700_i64 }
        );
        assert_eq!(user_from_doc(&document).expect("decode"), user());
    }

    #[test]
    fn group_document_is_sorted_and_round_trips() {
        let document = group_to_doc(&group()).expect("encode");
        assert_eq!(
            document,
            doc! {
                "_id": "g1",
                "name": "friends",
                "owner": "bob",
                "members": ["alice", "bob", "carol"],
                "created_at_ms": 1_700_000_000_000_i64,
            }
        );
        let expected = GroupRecord { members: vec!["alice".into(), "bob".into(), "carol".into()], ..group() };
        assert_eq!(group_from_doc(&document).expect("decode"), expected);
    }

    #[test]
    fn members_are_sorted_on_read() {
        // What `$addToSet` leaves behind: the new member appended.
        let document = doc! {
            "_id": "g1", "name": "n", "owner": "o",
            "members": ["b", "d", "a", "b"], "created_at_ms": 5_i64, "extra": true,
        };
        let group = group_from_doc(&document).expect("decode");
        assert_eq!(group.members, vec!["a", "b", "d"]);
        let empty = doc! { "_id": "g1", "name": "n", "owner": "o", "members": [], "created_at_ms": 0_i64 };
        assert!(group_from_doc(&empty).expect("decode").members.is_empty());
    }

    #[test]
    fn devices_are_sorted_on_read() {
        // What `$addToSet` leaves behind: devices in login order.
        let document = doc! { "_id": "alice", "devices": ["phone", "laptop", "desk"] };
        assert_eq!(devices_from_doc(&document).expect("decode"), vec!["desk", "laptop", "phone"]);
        let corrupt = |d: Document| matches!(devices_from_doc(&d), Err(StoreError::Corrupt(_)));
        assert!(corrupt(doc! { "_id": "alice" }));
        assert!(corrupt(doc! { "_id": "alice", "devices": "phone" }));
        assert!(corrupt(doc! { "_id": "alice", "devices": ["phone", 1_i32] }));
    }

    #[test]
    fn int32_timestamps_are_read() {
        let document = doc! { "_id": "u", "password_hash": "h", "created_at_ms": 7_i32 };
        assert_eq!(user_from_doc(&document).expect("decode").created_at_ms, 7);
    }

    #[test]
    fn malformed_documents_are_corrupt() {
        let corrupt = |r: StoreResult<UserRecord>| matches!(r, Err(StoreError::Corrupt(_)));
        assert!(corrupt(user_from_doc(&doc! { "_id": "u", "created_at_ms": 1_i64 })));
        assert!(corrupt(user_from_doc(&doc! { "_id": 5_i32, "password_hash": "h", "created_at_ms": 1_i64 })));
        assert!(corrupt(user_from_doc(&doc! { "_id": "u", "password_hash": "h", "created_at_ms": -1_i64 })));
        assert!(corrupt(user_from_doc(&doc! { "_id": "u", "password_hash": "h", "created_at_ms": 1.5 })));
        let group_corrupt = |d: Document| matches!(group_from_doc(&d), Err(StoreError::Corrupt(_)));
        assert!(group_corrupt(doc! { "_id": "g", "name": "n", "owner": "o", "created_at_ms": 1_i64 }));
        assert!(group_corrupt(
            doc! { "_id": "g", "name": "n", "owner": "o", "members": "a", "created_at_ms": 1_i64 }
        ));
        assert!(group_corrupt(
            doc! { "_id": "g", "name": "n", "owner": "o", "members": ["a", 1_i32], "created_at_ms": 1_i64 }
        ));
    }

    #[test]
    fn timestamps_beyond_int64_are_refused() {
        let late = UserRecord { created_at_ms: u64::MAX, ..user() };
        assert!(matches!(user_to_doc(&late), Err(StoreError::Backend(_))));
        let late = GroupRecord { created_at_ms: i64::MAX as u64 + 1, ..group() };
        assert!(matches!(group_to_doc(&late), Err(StoreError::Backend(_))));
    }

    fn write_error(code: i32) -> MongoError {
        // The driver's error types are non-exhaustive; build them the way
        // the driver does, from the server's reply.
        let error: WriteError = serde_json::from_value(serde_json::json!({
            "code": code,
            "codeName": "DuplicateKey",
            "errmsg": "E11000 duplicate key error collection: tern.users index: _id_",
        }))
        .expect("write error");
        MongoError::from(ErrorKind::Write(WriteFailure::WriteError(error)))
    }

    #[test]
    fn duplicate_key_means_taken() {
        assert!(is_duplicate_key(&write_error(11000)));
        assert!(!is_duplicate_key(&write_error(121)));
        let command: CommandError =
            serde_json::from_value(serde_json::json!({ "code": 11000, "codeName": "DuplicateKey" }))
                .expect("command error");
        assert!(is_duplicate_key(&MongoError::from(ErrorKind::Command(command))));
        assert!(!is_duplicate_key(&MongoError::custom("other")));

        assert!(!created::<()>(Err(write_error(11000))).expect("taken is not an error"));
        assert!(created(Ok(())).expect("inserted"));
        assert!(created::<()>(Err(write_error(121))).is_err(), "other write errors stay errors");
    }

    #[test]
    fn errors_are_classified() {
        let io = MongoError::from(ErrorKind::Io(std::sync::Arc::new(std::io::Error::other("reset"))));
        assert!(matches!(mongo_err("op", &io), StoreError::Unavailable(_)));
        assert!(matches!(
            mongo_err("op", &MongoError::from(ErrorKind::Shutdown)),
            StoreError::Unavailable(_)
        ));
        match mongo_err("insert", &write_error(121)) {
            StoreError::Backend(message) => assert!(message.starts_with("MongoDB insert: "), "{message}"),
            other => panic!("a validation failure is a backend error: {other:?}"),
        }
    }

    #[test]
    fn database_names() {
        for ok in ["tern", "tern_conf_1", "Tern-2", &"d".repeat(63)] {
            assert!(validate_database_name(ok).is_ok(), "{ok:?} is valid");
        }
        for bad in ["", "a.b", "a b", "a/b", "a$b", "a\0b", &"d".repeat(64)] {
            assert!(validate_database_name(bad).is_err(), "{bad:?} is refused");
        }
        let unique = crate::scylla::sanitize_identifier(&crate::conformance::unique_id("tern-conf"));
        validate_database_name(&unique).expect("sanitized ids are database names");
    }

    #[tokio::test]
    async fn bounded_waits_for_the_task_and_times_out() {
        assert_eq!(bounded(Duration::from_secs(5), "ok", async { Ok(7) }).await.expect("ok"), 7);
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        let slow = async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = finished_tx.send(());
            Ok(())
        };
        let result = bounded(Duration::from_millis(20), "slow", slow).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        // The operation was not dropped: it still finishes.
        tokio::time::timeout(Duration::from_secs(5), finished_rx)
            .await
            .expect("detached task finishes")
            .expect("sender not dropped");
    }
}
