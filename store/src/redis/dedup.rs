//! [`DedupStore`] on Redis: one string per (sender, client message id),
//! expiring with `PX`.

use std::time::Duration;

use async_trait::async_trait;

use super::{Shared, duration_ms, redis_err};
use crate::{DedupRecord, DedupStore, StoreError, StoreResult};

/// [`DedupStore`] on Redis; keys `P:dedup:<len>:{sender}:<client_msg_id>`.
#[derive(Clone)]
pub struct RedisDedupStore {
    shared: Shared,
}

impl RedisDedupStore {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// The sender's length comes first so that no (sender, client id) pair
    /// can produce the key of another pair, whatever characters they hold.
    fn key(&self, sender: &str, client_msg_id: &str) -> String {
        format!("{}:dedup:{}:{{{sender}}}:{client_msg_id}", self.shared.prefix, sender.len())
    }
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(sender, client_msg_id))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(redis_err)?;
        value.as_deref().map(decode).transpose()
    }

    /// One `MGET`: the keys share the sender's hash tag, so they live in
    /// one slot even on a Redis Cluster.
    async fn get_many(&self, sender: &str, client_msg_ids: &[&str]) -> StoreResult<Vec<Option<DedupRecord>>> {
        if client_msg_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for client_msg_id in client_msg_ids {
            mget.arg(self.key(sender, client_msg_id));
        }
        let values: Vec<Option<Vec<u8>>> =
            mget.query_async(&mut self.shared.conn()).await.map_err(redis_err)?;
        values.iter().map(|value| value.as_deref().map(decode).transpose()).collect()
    }

    async fn put(
        &self,
        sender: &str,
        client_msg_id: &str,
        record: DedupRecord,
        ttl: Duration,
    ) -> StoreResult<()> {
        let value = serde_json::to_vec(&record)
            .map_err(|e| StoreError::Backend(format!("encoding dedup record: {e}")))?;
        redis::cmd("SET")
            .arg(self.key(sender, client_msg_id))
            .arg(value)
            .arg("PX")
            .arg(duration_ms(ttl))
            .query_async::<()>(&mut self.shared.conn())
            .await
            .map_err(redis_err)
    }
}

fn decode(bytes: &[u8]) -> StoreResult<DedupRecord> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("dedup record: {e}")))
}
