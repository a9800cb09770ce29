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
//! Two reads are also served from memory ([`MetaCache`]):
//! - the devices of recently asked users: the offline consumer asks for
//!   every receiver of every batch, and a read transaction with a range scan
//!   per user was 2% of the server's CPU in a 1:1 run (3% in a fan-out to
//!   1000 members);
//! - recently read groups: the dispatcher reads the group of every group
//!   send, and decoding a 1000-member record's JSON each time was 5% of the
//!   server's CPU in a fan-out to 1000 members at 1 M deliveries/s.

use std::path::Path;
use std::sync::{Arc, Mutex};

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
    /// What this transaction changed of what [`MetaCache`] keeps.
    changed: Changed,
}

/// The cached records a transaction changed, forgotten once it commits.
#[derive(Default)]
pub(crate) struct Changed {
    /// Users who got a device.
    devices: Vec<String>,
    /// Groups created or whose members changed.
    groups: Vec<String>,
}

impl Schema for Meta {
    const NAME: &'static str = "meta";
    type State = MetaCache;
    type Staged = Changed;
    type Tables<'t> = MetaTables<'t>;

    fn recover(txn: &WriteTransaction) -> StoreResult<MetaCache> {
        let cache = MetaCache::default();
        drop(Self::open_tables(txn, &cache)?);
        Ok(cache)
    }

    fn staged(tables: MetaTables<'_>) -> Changed {
        tables.changed
    }

    fn publish(cache: &MetaCache, changed: Changed) {
        cache.devices.forget(&changed.devices);
        cache.groups.forget(&changed.groups);
    }

    fn open_tables<'t>(txn: &'t WriteTransaction, _cache: &'t MetaCache) -> StoreResult<MetaTables<'t>> {
        Ok(MetaTables {
            users: txn.open_table(USERS).map_err(db_err)?,
            groups: txn.open_table(GROUPS).map_err(db_err)?,
            memberships: txn.open_table(MEMBERSHIPS).map_err(db_err)?,
            devices: txn.open_table(DEVICES).map_err(db_err)?,
            changed: Changed::default(),
        })
    }
}

/// Most users whose devices [`MetaCache`] keeps (about 100 bytes each).
const DEVICE_CACHE_USERS: usize = 100_000;

/// Most members, over all groups, that [`MetaCache`] keeps (about 60 bytes
/// each: 12 MB at most).
const GROUP_CACHE_MEMBERS: usize = 200_000;

/// The records the embedded meta store serves from memory.
pub(crate) struct MetaCache {
    devices: ReadCache<Vec<String>>,
    groups: ReadCache<Arc<GroupRecord>>,
}

impl Default for MetaCache {
    fn default() -> Self {
        Self {
            devices: ReadCache::new(DEVICE_CACHE_USERS, |_| 1),
            groups: ReadCache::new(GROUP_CACHE_MEMBERS, |group| group.members.len().max(1)),
        }
    }
}

/// Records read recently, by key, up to a total weight; when it would be
/// exceeded the cache starts again empty (a refill is one read per key, and
/// a bound keeps memory flat however many keys there are). A commit that
/// changes a record forgets it ([`Schema::publish`], before the writer
/// answers) and bumps a generation: a reader that started before such a
/// commit cannot tell whether its read saw it, so it does not cache what it
/// read.
pub(crate) struct ReadCache<V> {
    inner: Mutex<Cached<V>>,
    capacity: usize,
    weigh: fn(&V) -> usize,
}

struct Cached<V> {
    /// Commits that changed cached records so far.
    generation: u64,
    entries: foldhash::HashMap<String, V>,
    weight: usize,
}

impl<V: Clone> ReadCache<V> {
    fn new(capacity: usize, weigh: fn(&V) -> usize) -> Self {
        let cached = Cached { generation: 0, entries: foldhash::HashMap::new(), weight: 0 };
        Self { inner: Mutex::new(cached), capacity, weigh }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached<V>> {
        // Every statement leaves the map consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `found` with each cached key among `keys` and its record;
    /// returns the others, and the generation to pass to
    /// [`ReadCache::remember`] after reading them.
    fn look_up<'k>(&self, keys: &[&'k str], mut found: impl FnMut(&'k str, &V)) -> (Vec<&'k str>, u64) {
        let cached = self.lock();
        let mut missing = Vec::new();
        for &key in keys {
            match cached.entries.get(key) {
                Some(value) => found(key, value),
                None => missing.push(key),
            }
        }
        (missing, cached.generation)
    }

    /// The cached record of `key`, or the generation to pass to
    /// [`ReadCache::remember`] after reading it.
    fn get(&self, key: &str) -> Result<V, u64> {
        let cached = self.lock();
        cached.entries.get(key).cloned().ok_or(cached.generation)
    }

    /// Caches records read after [`ReadCache::look_up`] or
    /// [`ReadCache::get`] returned `generation`, unless a commit changed
    /// cached records since.
    fn remember<'a>(&self, generation: u64, read: impl Iterator<Item = (&'a String, &'a V)>)
    where
        V: 'a,
    {
        let mut cached = self.lock();
        if cached.generation != generation {
            return;
        }
        for (key, value) in read {
            let weight = (self.weigh)(value);
            if weight > self.capacity {
                continue;
            }
            if cached.weight + weight > self.capacity {
                cached.entries.clear();
                cached.weight = 0;
            }
            if let Some(old) = cached.entries.insert(key.clone(), value.clone()) {
                cached.weight -= (self.weigh)(&old);
            }
            cached.weight += weight;
        }
    }

    fn forget(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let mut cached = self.lock();
        cached.generation += 1;
        for key in keys {
            if let Some(old) = cached.entries.remove(key) {
                cached.weight -= (self.weigh)(&old);
            }
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
    t.changed.groups.push(group_id.to_owned());
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
                t.changed.groups.push(id.to_owned());
                for member in &group.members {
                    t.memberships.insert((member.as_str(), id), ()).map_err(db_err)?;
                }
                Ok(true)
            })
            .await
    }

    async fn get_group(&self, group_id: &str) -> StoreResult<Option<Arc<GroupRecord>>> {
        let cache = &self.store.state().groups;
        let generation = match cache.get(group_id) {
            Ok(group) => return Ok(Some(group)),
            Err(generation) => generation,
        };
        let Some(group) = self.get_json::<GroupRecord>(GROUPS, group_id).await? else {
            return Ok(None);
        };
        // Kept under the key it was read by (the same id, unless the stored
        // record is inconsistent: then the lookup by that key is what repeats).
        let (key, group) = (group_id.to_owned(), Arc::new(group));
        cache.remember(generation, std::iter::once((&key, &group)));
        Ok(Some(group))
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
                t.changed.devices.push(user.clone());
                Ok(())
            })
            .await
    }

    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let mut found = self.devices_of_users(&[user_id]).await?;
        Ok(found.remove(user_id).unwrap_or_default())
    }

    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<DevicesByUser> {
        let cache = &self.store.state().devices;
        let mut found = DevicesByUser::with_capacity(user_ids.len());
        let (missing, generation) = cache.look_up(user_ids, |user, devices| {
            found.insert(user.to_owned(), devices.clone());
        });
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

    fn device_cache() -> ReadCache<Vec<String>> {
        MetaCache::default().devices
    }

    /// `keys` as the cache has them: the found ones and the missing ones.
    fn look_up<'k>(
        cache: &ReadCache<Vec<String>>,
        keys: &[&'k str],
    ) -> (HashMap<String, Vec<String>>, Vec<&'k str>, u64) {
        let mut found = HashMap::new();
        let (missing, generation) = cache.look_up(keys, |k, v| {
            found.insert(k.to_owned(), v.clone());
        });
        (found, missing, generation)
    }

    #[test]
    fn a_read_that_overlapped_a_commit_is_not_cached() {
        let cache = device_cache();
        let (_, missing, generation) = look_up(&cache, &["bob"]);
        assert_eq!(missing, ["bob"]);
        // bob's new device commits while the read (which did not see it)
        // is under way.
        cache.forget(&["bob".to_owned()]);
        let stale = HashMap::from([("bob".to_owned(), devices(&["phone"]))]);
        cache.remember(generation, stale.iter());
        let (_, missing, generation) = look_up(&cache, &["bob"]);
        assert_eq!(missing, ["bob"], "the stale read was not kept");
        // A read with no commit meanwhile is kept, and a commit forgets it.
        let fresh = HashMap::from([("bob".to_owned(), devices(&["phone", "tablet"]))]);
        cache.remember(generation, fresh.iter());
        let (found, missing, _) = look_up(&cache, &["bob"]);
        assert!(missing.is_empty());
        assert_eq!(found["bob"], devices(&["phone", "tablet"]));
        cache.forget(&["bob".to_owned()]);
        let (_, missing, _) = look_up(&cache, &["bob"]);
        assert_eq!(missing, ["bob"]);
    }

    #[test]
    fn a_full_cache_starts_again_empty() {
        let cache = device_cache();
        let (_, _, generation) = look_up(&cache, &[]);
        let read: HashMap<String, Vec<String>> =
            (0..=DEVICE_CACHE_USERS).map(|i| (format!("u{i}"), devices(&["d"]))).collect();
        cache.remember(generation, read.iter());
        let held = cache.lock().entries.len();
        assert!((1..=DEVICE_CACHE_USERS).contains(&held), "bounded: {held}");
    }

    #[test]
    fn groups_are_weighed_by_their_members() {
        let cache = MetaCache::default().groups;
        let group = |id: &str, members: usize| {
            let members = (0..members).map(|i| format!("m{i}")).collect();
            let record = GroupRecord {
                group_id: id.to_owned(),
                name: String::new(),
                owner: "m0".into(),
                members,
                created_at_ms: 0,
            };
            (id.to_owned(), Arc::new(record))
        };
        let generation = cache.get("big").expect_err("empty");
        // Larger than the whole cache: served from the store every time.
        let too_big = group("big", GROUP_CACHE_MEMBERS + 1);
        cache.remember(generation, std::iter::once((&too_big.0, &too_big.1)));
        assert!(cache.get("big").is_err());
        // Two groups of more than half the bound do not fit together.
        let (a, b) = (group("a", GROUP_CACHE_MEMBERS / 2 + 1), group("b", GROUP_CACHE_MEMBERS / 2 + 1));
        cache.remember(generation, [(&a.0, &a.1), (&b.0, &b.1)].into_iter());
        assert!(cache.get("a").is_err(), "emptied to make room");
        assert_eq!(cache.get("b").expect("cached").members.len(), GROUP_CACHE_MEMBERS / 2 + 1);
        assert_eq!(cache.lock().weight, GROUP_CACHE_MEMBERS / 2 + 1);
        cache.forget(&["b".to_owned()]);
        assert_eq!(cache.lock().weight, 0);
    }

    #[tokio::test]
    async fn a_cached_group_follows_member_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Opening is blocking; nothing else runs on this test's runtime yet.
        let store = EmbeddedMetaStore::open(&dir.path().join("meta.redb")).expect("open");
        let created = GroupRecord {
            group_id: "g".into(),
            name: "team".into(),
            owner: "ann".into(),
            members: vec!["ann".into(), "bob".into()],
            created_at_ms: 1,
        };
        assert!(store.create_group(&created).await.expect("create"));
        let read = store.get_group("g").await.expect("get").expect("exists");
        assert_eq!(*read, created);
        assert!(store.store.state().groups.get("g").is_ok(), "the read was cached");
        store.add_member("g", "cid").await.expect("add");
        assert_eq!(store.get_group("g").await.expect("get").expect("exists").members, ["ann", "bob", "cid"]);
        store.remove_member("g", "ann").await.expect("remove");
        assert_eq!(store.get_group("g").await.expect("get").expect("exists").members, ["bob", "cid"]);
        assert_eq!(store.get_group("nope").await.expect("get"), None);
    }
}
