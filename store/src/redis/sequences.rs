//! [`SequenceStore`] on Redis: one integer key per conversation, `INCR`.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::{Shared, redis_err, utf8};
use crate::{SequenceStore, StoreError, StoreResult};

/// Compare-and-decrement: `GET` then `DECR` must not be split, or a
/// concurrent `INCR` in between would be undone instead.
static ROLLBACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DECR', KEYS[1])
  return 1
end
return 0
",
    )
});

/// [`SequenceStore`] on Redis; keys `P:seq:{key}`.
#[derive(Clone)]
pub struct RedisSequenceStore {
    shared: Shared,
}

impl RedisSequenceStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

fn to_u64(value: i64) -> StoreResult<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative sequence value {value}")))
}

/// Redis refuses `INCR` of a value that is not an integer: that is a
/// corrupt counter, not a backend failure.
fn incr_err(e: redis::RedisError) -> StoreError {
    if e.detail().is_some_and(|d| d.contains("not an integer")) {
        StoreError::Corrupt(format!("sequence value: {e}"))
    } else {
        redis_err(e)
    }
}

#[async_trait]
impl SequenceStore for RedisSequenceStore {
    async fn incr(&self, key: &str) -> StoreResult<u64> {
        let value: i64 = redis::cmd("INCR")
            .arg(self.shared.key("seq", key))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(incr_err)?;
        to_u64(value)
    }

    async fn current(&self, key: &str) -> StoreResult<u64> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.shared.key("seq", key))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        match value {
            None => Ok(0),
            Some(bytes) => {
                let text = utf8(bytes, "sequence value")?;
                let value: i64 =
                    text.parse().map_err(|_| StoreError::Corrupt(format!("sequence value {text:?}")))?;
                to_u64(value)
            }
        }
    }

    async fn rollback(&self, key: &str, expected: u64) -> StoreResult<bool> {
        if expected == 0 {
            return Ok(false);
        }
        let done: i64 = ROLLBACK
            .key(self.shared.key("seq", key))
            .arg(expected.to_string())
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        Ok(done == 1)
    }
}
