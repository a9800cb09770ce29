//! [`OfflineStore`] on Redis: per receiver, a lexicographic sorted set of
//! hex message ids, a hash of payloads and a sorted set of tombstones.

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use redis::Script;

use super::{FAN_OUT, Shared, decode_id_payload_pairs, duration_ms, hex_id, redis_err};
use crate::{OfflineEntry, OfflineStore, StoreResult};

/// Entries returned by one read script; larger pulls take several, so no
/// single reply (or Lua `unpack`) grows without bound.
const PAGE: usize = 1_000;
/// Ids acknowledged by one script call.
const ACK_BATCH: usize = 1_000;

/// KEYS: ids, payloads, tombstones. ARGV: hex id, payload.
///
/// Drops expired tombstones first (lazy cleanup, bounded by what expired),
/// then adds the entry unless a live tombstone names it or it is already
/// there.
static INSERT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%.0f', now))
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 0
end
if redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
",
    )
});

/// KEYS: ids, payloads, tombstones. ARGV: tombstone ttl in ms (0 = none),
/// then hex ids.
///
/// An id that is not in the set gets a tombstone: the ack overtook its
/// insert, which must not add it afterwards. An id that was there gets
/// none (see `OfflineStore::ack`), so tombstones stay as rare as overtaking
/// acks. The tombstone key expires with its longest-lived tombstone, so a
/// receiver that never comes back leaves nothing behind.
static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%.0f', now))
local ttl = tonumber(ARGV[1])
local expires = string.format('%.0f', now + ttl)
local tombstones = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[2], ARGV[i])
  elseif ttl > 0 then
    redis.call('ZADD', KEYS[3], expires, ARGV[i])
    tombstones = tombstones + 1
  end
end
if tombstones > 0 and redis.call('PTTL', KEYS[3]) < ttl then
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
return 0
",
    )
});

/// KEYS: ids, payloads. ARGV: lex lower bound, limit. Reply: flat
/// `[id, payload, …]`, oldest first; one script so ids and payloads come
/// from the same instant.
static PULL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, ARGV[2])
if #ids == 0 then
  return {}
end
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
local out = {}
for i = 1, #ids do
  out[2 * i - 1] = ids[i]
  out[2 * i] = payloads[i]
end
return out
",
    )
});

/// [`OfflineStore`] on Redis; keys `P:off:{receiver}`,
/// `P:offmsg:{receiver}`, `P:offtomb:{receiver}`.
#[derive(Clone)]
pub struct RedisOfflineStore {
    shared: Shared,
}

impl RedisOfflineStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn keys(&self, receiver: &str) -> [String; 3] {
        [
            self.shared.key("off", receiver),
            self.shared.key("offmsg", receiver),
            self.shared.key("offtomb", receiver),
        ]
    }
}

#[async_trait]
impl OfflineStore for RedisOfflineStore {
    async fn insert(&self, receivers: &[String], entry: &OfflineEntry) -> StoreResult<()> {
        let member = hex_id(entry.msg_id);
        let payload = entry.payload.as_ref();
        // Each receiver's keys live in their own slot: one script per
        // receiver, many in flight on the multiplexed connection.
        let unique: BTreeSet<String> = receivers.iter().cloned().collect();
        futures::stream::iter(unique)
            .map(|receiver: String| {
                let [ids, payloads, tombstones] = self.keys(&receiver);
                let member = &member;
                async move {
                    INSERT
                        .key(ids)
                        .key(payloads)
                        .key(tombstones)
                        .arg(member)
                        .arg(payload)
                        .invoke_async::<i64>(&mut self.shared.conn())
                        .await
                        .map_err(redis_err)
                }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    async fn pull(&self, receiver: &str, after: u64, limit: usize) -> StoreResult<Vec<OfflineEntry>> {
        let [ids, payloads, _] = self.keys(receiver);
        let mut out = Vec::new();
        let mut after = after;
        while out.len() < limit {
            if after == u64::MAX {
                break;
            }
            let want = (limit - out.len()).min(PAGE);
            let flat: Vec<Option<Vec<u8>>> = PULL
                .key(&ids)
                .key(&payloads)
                .arg(format!("({}", hex_id(after)))
                .arg(want)
                .invoke_async(&mut self.shared.conn())
                .await
                .map_err(redis_err)?;
            let page = decode_id_payload_pairs(flat)?;
            let full = page.len() == want;
            if let Some((last, _)) = page.last() {
                after = *last;
            }
            out.extend(page.into_iter().map(|(msg_id, payload)| OfflineEntry { msg_id, payload }));
            if !full {
                break;
            }
        }
        Ok(out)
    }

    async fn ack(&self, receiver: &str, msg_ids: &[u64], tombstone_ttl: Duration) -> StoreResult<()> {
        let [ids, payloads, tombstones] = self.keys(receiver);
        let ttl_ms = if tombstone_ttl.is_zero() { 0 } else { duration_ms(tombstone_ttl) };
        // Batches keep one script's run (Redis is single-threaded) short;
        // each batch is atomic, and acking again is harmless.
        for batch in msg_ids.chunks(ACK_BATCH) {
            let mut call = ACK.key(&ids);
            call.key(&payloads).key(&tombstones).arg(ttl_ms);
            for &id in batch {
                call.arg(hex_id(id));
            }
            call.invoke_async::<i64>(&mut self.shared.conn()).await.map_err(redis_err)?;
        }
        Ok(())
    }

    async fn count(&self, receiver: &str) -> StoreResult<u64> {
        redis::cmd("ZCARD")
            .arg(self.shared.key("off", receiver))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }
}
