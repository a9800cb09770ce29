//! [`MetaStore`] on Redis: users, groups, the user → groups index and the
//! users' devices.
//!
//! Production deployments keep this data in MongoDB; this store exists so
//! cluster mode can run (and CI can test it) where no MongoDB server is
//! available.
//!
//! A group is a header string `P:group:{group}` (name, owner, creation
//! time) and a lexicographic sorted set of members `P:gmembers:{group}`
//! (sorted set ordering is byte order, the order of `String`). Both share
//! the group's slot, so create and member changes are single scripts. The
//! index `P:ugroups:{user}` lives in the user's slot: it is kept as a
//! superset of the truth (written before and after a member is added,
//! removed after a member is removed and then re-checked) and `groups_of`
//! checks each entry against the group's member set.
//!
//! A user's devices are a lexicographic sorted set `P:devices:{user}`
//! (score 0), so `ZADD` is idempotent and `ZRANGE` returns them sorted.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use redis::Script;
use serde::{Deserialize, Serialize};

use super::{FAN_OUT, Shared, redis_err, utf8};
use crate::{DevicesByUser, GroupRecord, MetaStore, StoreError, StoreResult, UserRecord};

/// KEYS: header, members. ARGV: header, then members. Creates the group
/// unless the id is taken; 1 if created.
static CREATE_GROUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 0, ARGV[i])
end
return 1
",
    )
});

/// KEYS: header, members. ARGV: `add` or `remove`, user. Reply: nil if the
/// group does not exist, else `[header, member…]` after the change.
static CHANGE_MEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local header = redis.call('GET', KEYS[1])
if not header then
  return false
end
if ARGV[1] == 'add' then
  redis.call('ZADD', KEYS[2], 0, ARGV[2])
else
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local reply = redis.call('ZRANGE', KEYS[2], 0, -1)
table.insert(reply, 1, header)
return reply
",
    )
});

/// What `P:group:{group}` holds; the id is in the key and the members in
/// their own set.
#[derive(Serialize, Deserialize)]
struct GroupHeader {
    name: String,
    owner: String,
    created_at_ms: u64,
}

/// [`MetaStore`] on Redis; keys `P:user:{user}`, `P:group:{group}`,
/// `P:gmembers:{group}`, `P:ugroups:{user}`, `P:devices:{user}`.
#[derive(Clone)]
pub struct RedisMetaStore {
    shared: Shared,
}

fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode_json<T: Serialize>(value: &T, what: &str) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encoding {what}: {e}")))
}

fn group_record(group_id: &str, header: &[u8], members: Vec<Vec<u8>>) -> StoreResult<GroupRecord> {
    let header: GroupHeader = decode_json(header, "group header")?;
    let members = members.into_iter().map(|m| utf8(m, "group member id")).collect::<StoreResult<_>>()?;
    Ok(GroupRecord {
        group_id: group_id.to_owned(),
        name: header.name,
        owner: header.owner,
        members,
        created_at_ms: header.created_at_ms,
    })
}

impl RedisMetaStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn group_keys(&self, group_id: &str) -> (String, String) {
        (self.shared.key("group", group_id), self.shared.key("gmembers", group_id))
    }

    async fn group_exists(&self, group_id: &str) -> StoreResult<bool> {
        redis::cmd("EXISTS")
            .arg(self.shared.key("group", group_id))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }

    /// Adds `group_id` to the index of every user in `users`.
    async fn index(&self, users: Vec<String>, group_id: &str) -> StoreResult<()> {
        futures::stream::iter(users)
            .map(|user: String| async move {
                redis::cmd("ZADD")
                    .arg(self.shared.key("ugroups", &user))
                    .arg(0)
                    .arg(group_id)
                    .query_async::<()>(&mut self.shared.conn())
                    .await
                    .map_err(redis_err)
            })
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn change_member(
        &self,
        group_id: &str,
        user_id: &str,
        add: bool,
    ) -> StoreResult<Option<GroupRecord>> {
        let (header, members) = self.group_keys(group_id);
        let reply: Option<Vec<Vec<u8>>> = CHANGE_MEMBER
            .key(header)
            .key(members)
            .arg(if add { "add" } else { "remove" })
            .arg(user_id)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        let Some(mut reply) = reply else {
            return Ok(None);
        };
        if reply.is_empty() {
            return Err(StoreError::Backend("member script returned no group header".to_owned()));
        }
        let members = reply.split_off(1);
        group_record(group_id, &reply[0], members).map(Some)
    }
}

#[async_trait]
impl MetaStore for RedisMetaStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<bool> {
        let created: Option<String> = redis::cmd("SET")
            .arg(self.shared.key("user", &user.user_id))
            .arg(encode_json(user, "user")?)
            .arg("NX")
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        Ok(created.is_some())
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.shared.key("user", user_id))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        value.map(|v| decode_json(&v, "user record")).transpose()
    }

    async fn create_group(&self, group: &GroupRecord) -> StoreResult<bool> {
        // The common refusal, without writing index entries for it.
        if self.group_exists(&group.group_id).await? {
            return Ok(false);
        }
        let members: BTreeSet<&str> = group.members.iter().map(String::as_str).collect();
        // Index first: a crash after this leaves entries that groups_of
        // filters out, never a member the index misses.
        self.index(members.iter().map(|m| (*m).to_owned()).collect(), &group.group_id).await?;
        let header = GroupHeader {
            name: group.name.clone(),
            owner: group.owner.clone(),
            created_at_ms: group.created_at_ms,
        };
        let (header_key, members_key) = self.group_keys(&group.group_id);
        let mut call = CREATE_GROUP.key(header_key);
        call.key(members_key).arg(encode_json(&header, "group header")?);
        for member in &members {
            call.arg(*member);
        }
        let created: i64 = call.invoke_async(&mut self.shared.conn()).await.map_err(redis_err)?;
        Ok(created == 1)
    }

    async fn get_group(&self, group_id: &str) -> StoreResult<Option<Arc<GroupRecord>>> {
        let (header_key, members_key) = self.group_keys(group_id);
        // MULTI/EXEC: header and members from the same instant.
        let (header, members): (Option<Vec<u8>>, Vec<Vec<u8>>) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(header_key)
            .cmd("ZRANGE")
            .arg(members_key)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        Ok(header.map(|h| group_record(group_id, &h, members)).transpose()?.map(Arc::new))
    }

    async fn add_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        if !self.group_exists(group_id).await? {
            return Ok(None);
        }
        self.index(vec![user_id.to_owned()], group_id).await?;
        let group = self.change_member(group_id, user_id, true).await?;
        // Again after the change: a concurrent remove_member may have
        // dropped the entry between the first write and the change.
        if group.is_some() {
            self.index(vec![user_id.to_owned()], group_id).await?;
        }
        Ok(group)
    }

    async fn remove_member(&self, group_id: &str, user_id: &str) -> StoreResult<Option<GroupRecord>> {
        let Some(group) = self.change_member(group_id, user_id, false).await? else {
            return Ok(None);
        };
        let index_key = self.shared.key("ugroups", user_id);
        redis::cmd("ZREM")
            .arg(&index_key)
            .arg(group_id)
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        // A concurrent add_member may have re-added the user after our
        // change: then the entry must stay.
        let member: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.shared.key("gmembers", group_id))
            .arg(user_id)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        if member.is_some() {
            self.index(vec![user_id.to_owned()], group_id).await?;
        }
        Ok(Some(group))
    }

    async fn groups_of(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let candidates: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(self.shared.key("ugroups", user_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let candidates =
            candidates.into_iter().map(|g| utf8(g, "group id")).collect::<StoreResult<Vec<_>>>()?;
        let mut check = redis::pipe();
        for group_id in &candidates {
            check.cmd("ZSCORE").arg(self.shared.key("gmembers", group_id)).arg(user_id);
        }
        let scores: Vec<Option<f64>> = check.query_async(&mut self.shared.conn()).await.map_err(redis_err)?;
        // The index is sorted, so the filtered list is too.
        Ok(candidates.into_iter().zip(scores).filter_map(|(g, s)| s.map(|_| g)).collect())
    }

    async fn add_device(&self, user_id: &str, device_id: &str) -> StoreResult<()> {
        redis::cmd("ZADD")
            .arg(self.shared.key("devices", user_id))
            .arg(0)
            .arg(device_id)
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }

    async fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let devices: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(self.shared.key("devices", user_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        // Members of equal score are in byte order, the order of `String`.
        devices.into_iter().map(|d| utf8(d, "device id")).collect()
    }

    async fn devices_of_users(&self, user_ids: &[&str]) -> StoreResult<DevicesByUser> {
        let lists: Vec<Vec<Vec<u8>>> = self
            .shared
            .per_id(user_ids, |pipe, user| {
                pipe.cmd("ZRANGE").arg(self.shared.key("devices", user)).arg(0).arg(-1);
            })
            .await?;
        user_ids
            .iter()
            .zip(lists)
            .map(|(&user, devices)| {
                let devices =
                    devices.into_iter().map(|d| utf8(d, "device id")).collect::<StoreResult<_>>()?;
                Ok((user.to_owned(), devices))
            })
            .collect()
    }
}
