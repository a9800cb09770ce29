//! Users, groups and memberships in `meta.redb`.
//!
//! Tables:
//! - `users`: user id → JSON [`UserRecord`];
//! - `groups`: group id → JSON [`GroupRecord`] (members sorted, unique);
//! - `memberships`: (user, group) → (), the reverse index behind
//!   [`MetaStore::groups_of`], updated in the same transaction as `groups`;
//! - `devices`: (user, device) → (), the devices each user has logged in
//!   with ([`MetaStore::devices`]).

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::writer::{Schema, Store, db_err};
use crate::{GroupRecord, MetaStore, StoreError, StoreResult, UserRecord};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const MEMBERSHIPS: TableDefinition<(&str, &str), ()> = TableDefinition::new("memberships");
const DEVICES: TableDefinition<(&str, &str), ()> = TableDefinition::new("devices");

pub(crate) struct Meta;

pub(crate) struct MetaTables<'t> {
    users: Table<'t, &'static str, &'static [u8]>,
    groups: Table<'t, &'static str, &'static [u8]>,
    memberships: Table<'t, (&'static str, &'static str), ()>,
    devices: Table<'t, (&'static str, &'static str), ()>,
}

impl Schema for Meta {
    const NAME: &'static str = "meta";
    type State = ();
    type Staged = ();
    type Tables<'t> = MetaTables<'t>;

    fn recover(txn: &WriteTransaction) -> StoreResult<()> {
        drop(Self::open_tables(txn, &())?);
        Ok(())
    }

    fn staged(_tables: MetaTables<'_>) {}

    fn publish(_state: &(), _staged: ()) {}

    fn open_tables<'t>(txn: &'t WriteTransaction, _state: &'t ()) -> StoreResult<MetaTables<'t>> {
        Ok(MetaTables {
            users: txn.open_table(USERS).map_err(db_err)?,
            groups: txn.open_table(GROUPS).map_err(db_err)?,
            memberships: txn.open_table(MEMBERSHIPS).map_err(db_err)?,
            devices: txn.open_table(DEVICES).map_err(db_err)?,
        })
    }
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encoding record: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Adds or removes `user` in the stored group and the membership index.
/// `None` if the group does not exist.
fn change_member(
    t: &mut MetaTables<'_>,
    group_id: &str,
    user_id: &str,
    add: bool,
) -> StoreResult<Option<GroupRecord>> {
    let Some(mut group) =
        t.groups.get(group_id).map_err(db_err)?.map(|v| decode::<GroupRecord>(v.value())).transpose()?
    else {
        return Ok(None);
    };
    let position = group.members.binary_search_by(|m| m.as_str().cmp(user_id));
    match (add, position) {
        (true, Err(at)) => {
            group.members.insert(at, user_id.to_owned());
            t.memberships.insert((user_id, group_id), ()).map_err(db_err)?;
        }
        (false, Ok(at)) => {
            group.members.remove(at);
            t.memberships.remove((user_id, group_id)).map_err(db_err)?;
        }
        // Already a member / already not one: nothing to write.
        _ => return Ok(Some(group)),
    }
    t.groups.insert(group_id, encode(&group)?.as_slice()).map_err(db_err)?;
    Ok(Some(group))
}

/// [`MetaStore`] on redb.
pub struct EmbeddedMetaStore {
    store: Store<Meta>,
}

impl EmbeddedMetaStore {
    /// Opens (creating if needed) the metadata file at `path`. Blocking.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Self { store: Store::open(path, super::SMALL_CACHE_BYTES)? })
    }

    async fn get_json<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: &str,
    ) -> StoreResult<Option<T>> {
        let id = id.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(table).map_err(db_err)?;
                table.get(id.as_str()).map_err(db_err)?.map(|v| decode(v.value())).transpose()
            })
            .await
    }

    /// Whether `(first, second)` is in a (user, x) → () table.
    async fn contains(&self, table: PairTable, first: &str, second: &str) -> StoreResult<bool> {
        let (first, second) = (first.to_owned(), second.to_owned());
        self.store
            .read(move |txn| {
                let table = txn.open_table(table).map_err(db_err)?;
                Ok(table.get((first.as_str(), second.as_str())).map_err(db_err)?.is_some())
            })
            .await
    }

    /// The second halves of the keys of a (user, x) → () table whose first
    /// half is `first`, in key (byte) order.
    async fn second_keys(&self, table: PairTable, first: &str) -> StoreResult<Vec<String>> {
        let first = first.to_owned();
        self.store
            .read(move |txn| {
                let table = txn.open_table(table).map_err(db_err)?;
                pair_seconds(&table, &first)
            })
            .await
    }
}

/// The second halves of the keys of `table` whose first half is `first`.
fn pair_seconds(
    table: &impl ReadableTable<(&'static str, &'static str), ()>,
    first: &str,
) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for entry in table.range((first, "")..).map_err(db_err)? {
        let (k, _) = entry.map_err(db_err)?;
        let (f, second) = k.value();
        if f != first {
            break;
        }
        out.push(second.to_owned());
    }
    Ok(out)
}

/// A table keyed by (user, x) pairs with no value: an index.
type PairTable = TableDefinition<'static, (&'static str, &'static str), ()>;

#[async_trait]
impl MetaStore for EmbeddedMetaStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        let id = user.user_id.clone();
        let bytes = encode(user)?;
        self.store
            .write(move |t: &mut MetaTables<'_>| {
                if t.users.get(id.as_str()).map_err(db_err)?.is_some() {
                    return Ok(false);
                }
                t.users.insert(id.as_str(), bytes.as_slice()).map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        self.get_json(USERS, user_id).await
    }

    async fn create_group(&self, group: &GroupRecord) -> StoreResult<bool> {
        let mut group = group.clone();
        group.members.sort();
        group.members.dedup();
        let bytes = encode(&group)?;
        self.store
            .write(move |t: &mut MetaTables<'_>| {
                let id = group.group_id.as_str();
                if t.groups.get(id).map_err(db_err)?.is_some() {
                    return Ok(false);
                }
                t.groups.insert(id, bytes.as_slice()).map_err(db_err)?;
                for member in &group.members {
                    t.memberships.insert((member.as_str(), id), ()).map_err(db_err)?;
                }
                Ok(true)
            })
            .await
    }

    async fn get_group(&self, group_id: &str) -> StoreResult<Option<GroupRecord>> {
        self.get_json(GROUPS, group_id).await
    }

    async fn add_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        let (group, user) = (group_id.to_owned(), user_id.to_owned());
        self.store.write(move |t: &mut MetaTables<'_>| change_member(t, &group, &user, true)).await
    }

    async fn remove_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        let (group, user) = (group_id.to_owned(), user_id.to_owned());
        self.store.write(move |t: &mut MetaTables<'_>| change_member(t, &group, &user, false)).await
    }

    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        self.second_keys(MEMBERSHIPS, user_id).await
    }

    async fn add_device(&self, user_id: &str, device_id: &str) -> StoreResult<()> {
        // Called on every login: skip the write (and its commit) when the
        // device is already recorded, as it almost always is.
        if self.contains(DEVICES, user_id, device_id).await? {
            return Ok(());
        }
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.store
            .write(move |t: &mut MetaTables<'_>| {
                t.devices.insert((user.as_str(), device.as_str()), ()).map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        self.second_keys(DEVICES, user_id).await
    }

    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<HashMap<String, Vec<String>>> {
        let users: Vec<String> = user_ids.iter().map(|&u| u.to_owned()).collect();
        self.store
            .read(move |txn| {
                let table = txn.open_table(DEVICES).map_err(db_err)?;
                let mut found = HashMap::with_capacity(users.len());
                for user in users {
                    let devices = pair_seconds(&table, &user)?;
                    found.insert(user, devices);
                }
                Ok(found)
            })
            .await
    }
}
