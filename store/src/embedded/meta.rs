//! Users, groups and memberships in `meta.redb`.
//!
//! Tables:
//! - `users`: user id → JSON [`UserRecord`];
//! - `groups`: group id → JSON [`GroupRecord`] (members sorted, unique);
//! - `memberships`: (user, group) → (), the reverse index behind
//!   [`MetaStore::groups_of`], updated in the same transaction as `groups`;
//! - `devices`: (user, device) → (), the devices each user has logged in
//!   with ([`MetaStore::devices`]).
//!
//! The devices of recently asked users are also kept in memory
//! ([`DeviceCache`]): the offline consumer asks for every receiver of every
//! batch, and a read transaction with a range scan per user was 2% of the
//! server's CPU in a 1:1 run (3% in a fan-out to 1000 members).

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::writer::{Schema, Store, db_err};
use crate::{DevicesByUser, GroupRecord, MetaStore, StoreError, StoreResult, UserRecord};
use foldhash::HashMapExt;

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
    /// Users whose devices this transaction changed.
    devices_changed: Vec<String>,
}

impl Schema for Meta {
    const NAME: &'static str = "meta";
    type State = DeviceCache;
    /// Users whose devices changed.
    type Staged = Vec<String>;
    type Tables<'t> = MetaTables<'t>;

    fn recover(txn: &WriteTransaction) -> StoreResult<DeviceCache> {
        drop(Self::open_tables(txn, &DeviceCache::default())?);
        Ok(DeviceCache::default())
    }

    fn staged(tables: MetaTables<'_>) -> Vec<String> {
        tables.devices_changed
    }

    fn publish(cache: &DeviceCache, changed: Vec<String>) {
        cache.forget(&changed);
    }

    fn open_tables<'t>(txn: &'t WriteTransaction, _cache: &'t DeviceCache) -> StoreResult<MetaTables<'t>> {
        Ok(MetaTables {
            users: txn.open_table(USERS).map_err(db_err)?,
            groups: txn.open_table(GROUPS).map_err(db_err)?,
            memberships: txn.open_table(MEMBERSHIPS).map_err(db_err)?,
            devices: txn.open_table(DEVICES).map_err(db_err)?,
            devices_changed: Vec::new(),
        })
    }
}

/// Most users whose devices [`DeviceCache`] keeps; when it is full it
/// starts again empty (a refill is one read per user, and a bound keeps
/// memory flat however many users there are: about 100 bytes per user).
const DEVICE_CACHE_USERS: usize = 100_000;

/// The devices of users read recently. A commit that records a device
/// forgets that user ([`Schema::publish`], before the writer answers), and
/// bumps a generation: a reader that started before such a commit cannot
/// tell whether its read saw it, so it does not cache what it read.
#[derive(Default)]
pub(crate) struct DeviceCache {
    inner: Mutex<CachedDevices>,
}

#[derive(Default)]
struct CachedDevices {
    /// Commits that changed devices so far.
    generation: u64,
    users: DevicesByUser,
}

impl DeviceCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CachedDevices> {
        // Every statement leaves the map consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached users among `users` (into `found`), the others, and the
    /// generation to pass to [`DeviceCache::remember`] after reading them.
    fn look_up<'u>(&self, users: &[&'u str], found: &mut DevicesByUser) -> (Vec<&'u str>, u64) {
        let cached = self.lock();
        let mut missing = Vec::new();
        for &user in users {
            match cached.users.get(user) {
                Some(devices) => {
                    found.insert(user.to_owned(), devices.clone());
                }
                None => missing.push(user),
            }
        }
        (missing, cached.generation)
    }

    /// Caches devices read after [`DeviceCache::look_up`] returned
    /// `generation`, unless a device was recorded since.
    fn remember<'a>(&self, generation: u64, read: impl Iterator<Item = (&'a String, &'a Vec<String>)>) {
        let mut cached = self.lock();
        if cached.generation != generation {
            return;
        }
        for (user, devices) in read {
            if cached.users.len() >= DEVICE_CACHE_USERS {
                cached.users.clear();
            }
            cached.users.insert(user.clone(), devices.clone());
        }
    }

    fn forget(&self, users: &[String]) {
        if users.is_empty() {
            return;
        }
        let mut cached = self.lock();
        cached.generation += 1;
        for user in users {
            cached.users.remove(user);
        }
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
                t.devices_changed.push(user.clone());
                Ok(())
            })
            .await
    }

    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let mut found = self.devices_of_users(&[user_id]).await?;
        Ok(found.remove(user_id).unwrap_or_default())
    }

    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<DevicesByUser> {
        let cache = self.store.state();
        let mut found = DevicesByUser::with_capacity(user_ids.len());
        let (missing, generation) = cache.look_up(user_ids, &mut found);
        if missing.is_empty() {
            return Ok(found);
        }
        let users: Vec<String> = missing.iter().map(|&u| u.to_owned()).collect();
        let read = self
            .store
            .read(move |txn| {
                let table = txn.open_table(DEVICES).map_err(db_err)?;
                let mut read = DevicesByUser::with_capacity(users.len());
                for user in users {
                    let devices = pair_seconds(&table, &user)?;
                    read.insert(user, devices);
                }
                Ok(read)
            })
            .await?;
        cache.remember(generation, read.iter());
        found.extend(read);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn devices(list: &[&str]) -> Vec<String> {
        list.iter().map(|d| (*d).to_owned()).collect()
    }

    #[test]
    fn a_read_that_overlapped_a_device_commit_is_not_cached() {
        let cache = DeviceCache::default();
        let mut found = DevicesByUser::new();
        let (missing, generation) = cache.look_up(&["bob"], &mut found);
        assert_eq!(missing, ["bob"]);
        // bob's new device commits while the read (which did not see it)
        // is under way.
        cache.forget(&["bob".to_owned()]);
        let stale = HashMap::from([("bob".to_owned(), devices(&["phone"]))]);
        cache.remember(generation, stale.iter());
        let (missing, generation) = cache.look_up(&["bob"], &mut found);
        assert_eq!(missing, ["bob"], "the stale read was not kept");
        // A read with no commit meanwhile is kept, and a commit forgets it.
        let fresh = HashMap::from([("bob".to_owned(), devices(&["phone", "tablet"]))]);
        cache.remember(generation, fresh.iter());
        let (missing, _) = cache.look_up(&["bob"], &mut found);
        assert!(missing.is_empty());
        assert_eq!(found["bob"], devices(&["phone", "tablet"]));
        cache.forget(&["bob".to_owned()]);
        let (missing, _) = cache.look_up(&["bob"], &mut found);
        assert_eq!(missing, ["bob"]);
    }

    #[test]
    fn a_full_cache_starts_again_empty() {
        let cache = DeviceCache::default();
        let (_, generation) = cache.look_up(&[], &mut DevicesByUser::new());
        let read: HashMap<String, Vec<String>> =
            (0..=DEVICE_CACHE_USERS).map(|i| (format!("u{i}"), devices(&["d"]))).collect();
        cache.remember(generation, read.iter());
        let held = cache.lock().users.len();
        assert!((1..=DEVICE_CACHE_USERS).contains(&held), "bounded: {held}");
    }
}
