//! [`SessionStore`] on Redis.
//!
//! The placements of a user live in one hash, `P:sess:{user}` (device →
//! `"<connection_id> <node_id>"`; the connection id holds no space, so the
//! node id is everything after the first one). Two indexes make
//! `remove_node` and `online_users` cheap: the set `P:node:{node}` of
//! (user, device) pairs and the lexicographic sorted set `P:online` of user
//! ids. They live in other slots than the hash, so they are maintained as
//! supersets (see the module docs of [`crate::redis`]) and every reader
//! checks their entries against the hash.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use redis::Script;

use super::{FAN_OUT, Shared, redis_err, utf8};
use crate::{Placement, SessionStore, StoreError, StoreResult};

/// Node index entries handled per `SSCAN` step of `remove_node`.
const SCAN_COUNT: usize = 500;
/// Online-set entries read per step of `online_users`.
const ONLINE_BATCH: usize = 500;

/// KEYS: user hash. ARGV: device, value. Sets the placement and returns the
/// one it replaced (nil if none), whose node index entry the caller drops.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
",
    )
});

/// KEYS: user hash. ARGV: device, expected value. Deletes the placement
/// only if it is still exactly this login. Returns the number of devices
/// left, or -1 if nothing was removed.
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('HLEN', KEYS[1])
",
    )
});

/// KEYS: user hash. ARGV: device, node. Deletes the placement if it is on
/// that node (any connection). Returns the number of devices left, or -1 if
/// nothing was removed.
static REMOVE_ON_NODE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return -1
end
local space = string.find(v, ' ', 1, true)
if not space or string.sub(v, space + 1) ~= ARGV[2] then
  return -1
end
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('HLEN', KEYS[1])
",
    )
});

/// [`SessionStore`] on Redis; keys `P:sess:{user}`, `P:node:{node}`,
/// `P:online`.
#[derive(Clone)]
pub struct RedisSessionStore {
    shared: Shared,
}

fn encode_value(p: &Placement) -> String {
    format!("{} {}", p.connection_id, p.node_id)
}

/// A user's hash: device id → encoded placement.
type UserHash = Vec<(Vec<u8>, Vec<u8>)>;

/// The placements in a user's hash, by device id.
fn placements_of(user_id: &str, fields: UserHash) -> StoreResult<Vec<Placement>> {
    let mut out = Vec::with_capacity(fields.len());
    for (device, value) in fields {
        let device_id = utf8(device, "session device id")?;
        let value = utf8(value, "session placement")?;
        let (node_id, connection_id) = decode_value(&value)?;
        out.push(Placement {
            user_id: user_id.to_owned(),
            device_id,
            node_id: node_id.to_owned(),
            connection_id,
        });
    }
    out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(out)
}

/// `(node_id, connection_id)` of a stored value.
fn decode_value(value: &str) -> StoreResult<(&str, u64)> {
    value
        .split_once(' ')
        .and_then(|(connection, node)| Some((node, connection.parse().ok()?)))
        .ok_or_else(|| StoreError::Corrupt(format!("session placement {value:?}")))
}

fn node_member(user_id: &str, device_id: &str) -> StoreResult<String> {
    serde_json::to_string(&(user_id, device_id))
        .map_err(|e| StoreError::Backend(format!("encoding node index entry: {e}")))
}

fn decode_node_member(member: &[u8]) -> StoreResult<(String, String)> {
    serde_json::from_slice(member).map_err(|e| StoreError::Corrupt(format!("node index entry: {e}")))
}

impl RedisSessionStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn user_key(&self, user_id: &str) -> String {
        self.shared.key("sess", user_id)
    }

    fn node_key(&self, node_id: &str) -> String {
        self.shared.key("node", node_id)
    }

    fn online_key(&self) -> String {
        self.shared.global_key("online")
    }

    /// The stored value of one device, if any.
    async fn current(&self, user_id: &str, device_id: &str) -> StoreResult<Option<String>> {
        let value: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(self.user_key(user_id))
            .arg(device_id)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        value.map(|v| utf8(v, "session placement")).transpose()
    }

    /// Drops the (user, device) entry of `node`'s index after its placement
    /// left that node, then re-adds it if a concurrent login put the device
    /// back on the node in the meantime: the index must never miss a
    /// placement, or `remove_node` would leave it behind.
    async fn unindex_node(&self, node_id: &str, user_id: &str, device_id: &str) -> StoreResult<()> {
        let member = node_member(user_id, device_id)?;
        let node_key = self.node_key(node_id);
        redis::cmd("SREM")
            .arg(&node_key)
            .arg(&member)
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        if let Some(value) = self.current(user_id, device_id).await?
            && decode_value(&value)?.0 == node_id
        {
            redis::cmd("SADD")
                .arg(&node_key)
                .arg(&member)
                .query_async::<()>(&mut self.shared.conn())
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    /// Drops a user from the online set after their last device went, then
    /// re-adds them if a concurrent login gave them a device again.
    async fn unindex_online(&self, user_id: &str) -> StoreResult<()> {
        let online = self.online_key();
        redis::cmd("ZREM")
            .arg(&online)
            .arg(user_id)
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.user_key(user_id))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        if exists {
            self.index_online(user_id).await?;
        }
        Ok(())
    }

    async fn index_online(&self, user_id: &str) -> StoreResult<()> {
        redis::cmd("ZADD")
            .arg(self.online_key())
            .arg(0)
            .arg(user_id)
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }

    /// Writes both index entries of a placement (before and after the
    /// placement itself; see the module docs).
    async fn index(&self, p: &Placement, member: &str) -> StoreResult<()> {
        redis::pipe()
            .cmd("SADD")
            .arg(self.node_key(&p.node_id))
            .arg(member)
            .ignore()
            .cmd("ZADD")
            .arg(self.online_key())
            .arg(0)
            .arg(&p.user_id)
            .ignore()
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }

    /// Removes one (user, device) of `node_id`'s index if its placement is
    /// on that node; true if a placement was removed.
    async fn remove_on_node(&self, node_id: &str, user_id: &str, device_id: &str) -> StoreResult<bool> {
        let left: i64 = REMOVE_ON_NODE
            .key(self.user_key(user_id))
            .arg(device_id)
            .arg(node_id)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        // Stale or not, the entry goes; unindex re-adds it if needed.
        self.unindex_node(node_id, user_id, device_id).await?;
        if left == 0 {
            self.unindex_online(user_id).await?;
        }
        Ok(left >= 0)
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn put(&self, placement: &Placement) -> StoreResult<Option<Placement>> {
        let p = placement;
        let member = node_member(&p.user_id, &p.device_id)?;
        self.index(p, &member).await?;
        let old: Option<Vec<u8>> = PUT
            .key(self.user_key(&p.user_id))
            .arg(&p.device_id)
            .arg(encode_value(p))
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        self.index(p, &member).await?;
        let Some(old) = old else { return Ok(None) };
        let old = utf8(old, "session placement")?;
        let (old_node, connection_id) = decode_value(&old)?;
        if old_node != p.node_id {
            self.unindex_node(old_node, &p.user_id, &p.device_id).await?;
        }
        Ok(Some(Placement {
            user_id: p.user_id.clone(),
            device_id: p.device_id.clone(),
            node_id: old_node.to_owned(),
            connection_id,
        }))
    }

    async fn remove(&self, placement: &Placement) -> StoreResult<bool> {
        let p = placement;
        let left: i64 = REMOVE
            .key(self.user_key(&p.user_id))
            .arg(&p.device_id)
            .arg(encode_value(p))
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        if left < 0 {
            return Ok(false);
        }
        self.unindex_node(&p.node_id, &p.user_id, &p.device_id).await?;
        if left == 0 {
            self.unindex_online(&p.user_id).await?;
        }
        Ok(true)
    }

    async fn get(&self, user_id: &str) -> StoreResult<Vec<Placement>> {
        let fields: UserHash = redis::cmd("HGETALL")
            .arg(self.user_key(user_id))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        placements_of(user_id, fields)
    }

    async fn get_many(&self, user_ids: &[&str]) -> StoreResult<Vec<Vec<Placement>>> {
        let hashes: Vec<UserHash> = self
            .shared
            .per_id(user_ids, |pipe, user| {
                pipe.cmd("HGETALL").arg(self.user_key(user));
            })
            .await?;
        user_ids.iter().zip(hashes).map(|(user, fields)| placements_of(user, fields)).collect()
    }

    async fn remove_node(&self, node_id: &str) -> StoreResult<usize> {
        let node_key = self.node_key(node_id);
        let mut cursor: u64 = 0;
        // SSCAN may return an entry twice; the second removal finds nothing
        // and is not counted. Entries are removed while scanning, which
        // SSCAN allows.
        let mut removed = 0;
        loop {
            let (next, members): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
                .arg(&node_key)
                .arg(cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.shared.conn())
                .await
                .map_err(redis_err)?;
            // An entry that does not decode names no placement: it is
            // dropped from the index, and the others are still removed.
            let mut pairs = Vec::with_capacity(members.len());
            for member in &members {
                match decode_node_member(member) {
                    Ok(pair) => pairs.push(pair),
                    Err(e) => {
                        tracing::warn!(node = node_id, error = %e, "undecodable node index entry dropped");
                        redis::cmd("SREM")
                            .arg(&node_key)
                            .arg(member)
                            .query_async::<()>(&mut self.shared.conn())
                            .await
                            .map_err(redis_err)?;
                    }
                }
            }
            let results: Vec<bool> = futures::stream::iter(pairs)
                .map(|(user, device)| async move { self.remove_on_node(node_id, &user, &device).await })
                .buffer_unordered(FAN_OUT)
                .try_collect()
                .await?;
            removed += results.into_iter().filter(|&r| r).count();
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(removed)
    }

    async fn online_users(&self, limit: usize) -> StoreResult<Vec<String>> {
        let online = self.online_key();
        let mut out = Vec::new();
        let mut lower = "-".to_owned();
        while out.len() < limit {
            let batch: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
                .arg(&online)
                .arg(&lower)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(ONLINE_BATCH)
                .query_async(&mut self.shared.conn())
                .await
                .map_err(redis_err)?;
            let users =
                batch.into_iter().map(|u| utf8(u, "online user id")).collect::<StoreResult<Vec<_>>>()?;
            let Some(last) = users.last() else {
                break;
            };
            lower = format!("({last}");
            let mut check = redis::pipe();
            for user in &users {
                check.cmd("EXISTS").arg(self.user_key(user));
            }
            let exists: Vec<bool> = check.query_async(&mut self.shared.conn()).await.map_err(redis_err)?;
            let mut stale = BTreeSet::new();
            for (user, exists) in users.iter().zip(exists) {
                if !exists {
                    stale.insert(user.as_str());
                } else if out.len() < limit {
                    out.push(user.clone());
                }
            }
            // Entries left by a crash between the steps of a remove.
            for user in stale {
                self.unindex_online(user).await?;
            }
            if users.len() < ONLINE_BATCH {
                break;
            }
        }
        Ok(out)
    }
}
