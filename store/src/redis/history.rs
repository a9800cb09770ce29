//! [`HistoryStore`] on Redis: per group, a lexicographic sorted set of hex
//! message ids and a hash of payloads.
//!
//! Production deployments keep history in ScyllaDB (rows keyed by group and
//! reversed message id); this store exists so cluster mode can run where no
//! ScyllaDB server is available, and holds every message in memory.

use std::sync::LazyLock;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Script;

use super::{Shared, decode_id_payload_pairs, hex_id, redis_err};
use crate::{HistoryStore, StoreResult};

/// Messages returned by one read script.
const PAGE: usize = 1_000;

/// KEYS: ids, payloads. ARGV: hex id, payload. The first write of an id
/// wins; a repeat (bus redelivery) changes nothing.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return 0
",
    )
});

/// KEYS: ids, payloads. ARGV: lex upper bound, limit. Reply: flat
/// `[id, payload, …]`, newest first.
static PAGE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[1], '-', 'LIMIT', 0, ARGV[2])
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

/// [`HistoryStore`] on Redis; keys `P:hist:{group}`, `P:histmsg:{group}`.
#[derive(Clone)]
pub struct RedisHistoryStore {
    shared: Shared,
}

impl RedisHistoryStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl HistoryStore for RedisHistoryStore {
    async fn append(&self, group_id: &str, msg_id: u64, payload: Bytes) -> StoreResult<()> {
        APPEND
            .key(self.shared.key("hist", group_id))
            .key(self.shared.key("histmsg", group_id))
            .arg(hex_id(msg_id))
            .arg(payload.as_ref())
            .invoke_async::<i64>(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>> {
        let ids = self.shared.key("hist", group_id);
        let payloads = self.shared.key("histmsg", group_id);
        let mut out = Vec::new();
        let mut below = before;
        while out.len() < limit {
            // `below == 0` means "from the newest" only on the first page;
            // a later page stopping at id 0 has nothing below it.
            let upper = if below == 0 {
                if !out.is_empty() {
                    break;
                }
                "+".to_owned()
            } else {
                format!("({}", hex_id(below))
            };
            let want = (limit - out.len()).min(PAGE);
            let flat: Vec<Option<Vec<u8>>> = PAGE_SCRIPT
                .key(&ids)
                .key(&payloads)
                .arg(upper)
                .arg(want)
                .invoke_async(&mut self.shared.conn())
                .await
                .map_err(redis_err)?;
            let page = decode_id_payload_pairs(flat)?;
            let full = page.len() == want;
            match page.last() {
                Some((last, _)) => below = *last,
                None => break,
            }
            out.extend(page);
            if !full {
                break;
            }
        }
        Ok(out)
    }
}
