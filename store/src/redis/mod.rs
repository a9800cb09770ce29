//! Redis implementations of the session, sequence, dedup, offline, meta and
//! history stores, for cluster mode.
//!
//! [`RedisBackends::connect`] opens ONE [`ConnectionManager`] (a multiplexed
//! connection that reconnects by itself after the link drops; a bare
//! `MultiplexedConnection` does not) and hands a cheap clone of it to every
//! store. Every key starts with a configurable prefix (default
//! [`DEFAULT_KEY_PREFIX`]) so several deployments or test runs can share one
//! server.
//!
//! The design puts sessions, sequences, dedup records and offline sets in
//! Redis. [`RedisMetaStore`] (users, groups) and [`RedisHistoryStore`] (group
//! timelines) belong in MongoDB and ScyllaDB in production; they exist here
//! because neither server can be installed on the CI machine, so Redis is the
//! cluster-mode engine CI can actually run. Keeping every group's full
//! history in Redis memory does not scale the way ScyllaDB does.
//!
//! # Key layout
//!
//! `P` is the prefix; `{…}` is a literal Redis Cluster hash tag, so every
//! key of one user, receiver, group or node lands in one slot and a script
//! touching several of them stays single-slot, while different ids spread
//! over the cluster.
//!
//! | key | type | contents |
//! |---|---|---|
//! | `P:sess:{user}` | hash | device → `"<connection_id> <node_id>"` |
//! | `P:node:{node}` | set | JSON `["user","device"]` of every placement on the node (index) |
//! | `P:online` | sorted set, lex | ids of users with at least one placement (index) |
//! | `P:seq:{key}` | string | counter (`INCR`) |
//! | `P:dedup:<len>:{sender}:<client_msg_id>` | string, `PX` ttl | JSON [`DedupRecord`](crate::DedupRecord); `<len>` is the sender's byte length, so the key is unambiguous |
//! | `P:off:{receiver}` | sorted set, lex | msg ids as 16-digit lowercase hex, score 0 |
//! | `P:offmsg:{receiver}` | hash | hex msg id → payload |
//! | `P:offtomb:{receiver}` | sorted set | hex msg id, score = tombstone expiry (ms, server clock); the key expires with its last tombstone |
//! | `P:hist:{group}` | sorted set, lex | hex msg ids, score 0 |
//! | `P:histmsg:{group}` | hash | hex msg id → payload |
//! | `P:user:{user}` | string | JSON [`UserRecord`](crate::UserRecord) |
//! | `P:group:{group}` | string | JSON group header (name, owner, created_at_ms) |
//! | `P:gmembers:{group}` | sorted set, lex | member ids (sorted by byte order, like `String`) |
//! | `P:ugroups:{user}` | sorted set, lex | ids of the user's groups (index) |
//! | `P:devices:{user}` | sorted set, lex | ids of the user's recorded devices, score 0 |
//!
//! Message ids are 64-bit; sorted-set scores are `f64` and cannot hold them
//! exactly, so the ordered sets use score 0 and order by member
//! (`ZRANGEBYLEX`), the member being the zero-padded hex id whose byte order
//! is numeric order. Tombstone expiry times (ms since 1970, < 2^53) fit a
//! score exactly.
//!
//! # Atomicity
//!
//! Each operation on one id is a single command, a `MULTI`/`EXEC` block or a
//! Lua script (EVALSHA, loaded automatically after a `NOSCRIPT`), so it is
//! atomic. Scripts take the server's `TIME`, so tombstone expiry does not
//! depend on the clocks of the tern nodes.
//!
//! Some operations span ids (a placement, its node's index and the online
//! set; a group and its members' `ugroups` indexes). A Redis Cluster cannot
//! run one script over several slots, so those are several steps, and the
//! indexes are kept as *supersets* checked against the primary record on
//! read:
//!
//! - an index entry is written before the primary write (so a crash between
//!   the two leaves an extra entry, never a missing one) and again after it
//!   (so a concurrent removal in between cannot erase it);
//! - an index entry is removed after the primary removal, then the primary
//!   is read again and the entry re-added if it is needed after all (a
//!   concurrent write of the same id);
//! - readers of an index (`remove_node`, `online_users`, `groups_of`) check
//!   every entry against the primary record and ignore stale ones.
//!
//! `P:online` is one key (one slot) because `online_users` returns a sorted
//! prefix of all users; it is the one key that does not spread.
//!
//! # Requirements
//!
//! Redis 5 or later (scripts that call `TIME` before writing rely on effect
//! replication, the default since 5.0); CI runs Redis 7. The connection is
//! to one server (or a proxy): the keys and scripts are cluster-ready, but
//! talking to a Redis Cluster directly needs the `redis` crate's cluster
//! client, which is not wired in.

mod dedup;
mod history;
mod meta;
mod offline;
mod sequences;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

pub use dedup::RedisDedupStore;
pub use history::RedisHistoryStore;
pub use meta::RedisMetaStore;
pub use offline::RedisOfflineStore;
pub use sequences::RedisSequenceStore;
pub use sessions::RedisSessionStore;

use crate::{StoreError, StoreResult};

/// Key prefix used when the configuration names none.
pub const DEFAULT_KEY_PREFIX: &str = "tern";

/// How long one command may take before it fails (and the connection is
/// treated as broken). Scripts fanning out over a large group can take a
/// while, hence more than the crate's 500 ms default.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of the reconnect backoff, so a restarted server is found
/// again within about a second.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How many independent commands (one per receiver, member, …) one
/// operation keeps in flight on the multiplexed connection.
const FAN_OUT: usize = 64;

/// Every Redis store of a cluster-mode process, sharing one connection.
pub struct RedisBackends {
    pub sessions: Arc<RedisSessionStore>,
    pub sequences: Arc<RedisSequenceStore>,
    pub dedup: Arc<RedisDedupStore>,
    pub offline: Arc<RedisOfflineStore>,
    pub history: Arc<RedisHistoryStore>,
    pub meta: Arc<RedisMetaStore>,
    shared: Shared,
}

impl RedisBackends {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS where the crate supports it) and builds every
    /// store with keys under `key_prefix`.
    ///
    /// Fails with [`StoreError::Unavailable`] when the server cannot be
    /// reached, and with [`StoreError::Backend`] for a bad URL or a prefix
    /// that is empty or contains `{` or `}` (a brace in the prefix would
    /// become the hash tag of every key and put them all in one slot).
    pub async fn connect(url: &str, key_prefix: &str) -> StoreResult<Self> {
        let shared = Shared::connect(url, key_prefix).await?;
        Ok(Self {
            sessions: Arc::new(RedisSessionStore::new(shared.clone())),
            sequences: Arc::new(RedisSequenceStore::new(shared.clone())),
            dedup: Arc::new(RedisDedupStore::new(shared.clone())),
            offline: Arc::new(RedisOfflineStore::new(shared.clone())),
            history: Arc::new(RedisHistoryStore::new(shared.clone())),
            meta: Arc::new(RedisMetaStore::new(shared.clone())),
            shared,
        })
    }

    /// The key prefix every store uses.
    pub fn key_prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// A clone of the shared connection, for health checks and tooling.
    pub fn connection(&self) -> ConnectionManager {
        self.shared.conn.clone()
    }

    /// Round trip to the server (`PING`), for readiness checks.
    pub async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.shared.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(redis_err)
    }
}

/// What every store holds: the shared connection and the key prefix.
#[derive(Clone)]
pub(crate) struct Shared {
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl Shared {
    async fn connect(url: &str, key_prefix: &str) -> StoreResult<Self> {
        if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
            return Err(StoreError::Backend(format!(
                "invalid Redis key prefix {key_prefix:?}: it must be non-empty and contain no braces"
            )));
        }
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Backend(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(MAX_RECONNECT_DELAY);
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(|e| {
            let e = redis_err(e);
            match e {
                StoreError::Unavailable(_) => e,
                other => StoreError::Unavailable(format!("connecting to Redis: {other}")),
            }
        })?;
        Ok(Self { conn, prefix: key_prefix.into() })
    }

    /// A handle for one operation: clones of the manager share its
    /// connection.
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// `P:kind:{id}`: a key of one id, hash-tagged by the id. The prefix and
    /// kind hold no braces, so the tag (the text between the first `{` and
    /// the next `}`) depends on the id alone, and keys of different kinds for
    /// the same id share a slot even if the id itself contains braces.
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{{{id}}}", self.prefix)
    }

    /// A key that belongs to no id.
    fn global_key(&self, kind: &str) -> String {
        format!("{}:{kind}", self.prefix)
    }

    /// One command per id, sent in pipelines of up to [`PIPELINE_IDS`]
    /// commands (a round trip each, replies of bounded size); the replies in
    /// the order of `ids`. `command` adds one id's command to the pipeline.
    async fn per_id<T: redis::FromRedisValue>(
        &self,
        ids: &[&str],
        command: impl Fn(&mut redis::Pipeline, &str),
    ) -> StoreResult<Vec<T>> {
        let mut replies = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(PIPELINE_IDS) {
            let mut pipe = redis::pipe();
            for id in chunk {
                command(&mut pipe, id);
            }
            let chunk_replies: Vec<T> = pipe.query_async(&mut self.conn()).await.map_err(redis_err)?;
            replies.extend(chunk_replies);
        }
        Ok(replies)
    }
}

/// Most commands [`Shared::per_id`] sends in one pipeline.
const PIPELINE_IDS: usize = 1_000;

/// Maps a client error: connection trouble (the request may succeed when
/// retried) is [`StoreError::Unavailable`], a value of the wrong type under
/// one of our keys is [`StoreError::Corrupt`], anything else
/// [`StoreError::Backend`].
pub(crate) fn redis_err(e: RedisError) -> StoreError {
    let unavailable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        );
    if unavailable {
        StoreError::Unavailable(format!("redis: {e}"))
    } else if is_wrong_type(&e) {
        StoreError::Corrupt(format!("redis: {e}"))
    } else {
        StoreError::Backend(format!("redis: {e}"))
    }
}

/// Whether Redis refused a command for a key of the wrong type, alone or
/// as one of a pipeline's commands (whose error carries each failed
/// command's error instead of a code of its own).
fn is_wrong_type(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, err)| err.code() == "WRONGTYPE"))
}

/// The sorted-set member for a message id: 16 lowercase hex digits, so byte
/// order is numeric order.
fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses a member written by [`hex_id`].
fn parse_hex_id(member: &[u8]) -> StoreResult<u64> {
    std::str::from_utf8(member)
        .ok()
        .filter(|s| s.len() == 16)
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!("bad message id member {:?}", String::from_utf8_lossy(member)))
        })
}

fn utf8(bytes: Vec<u8>, what: &str) -> StoreResult<String> {
    String::from_utf8(bytes).map_err(|_| StoreError::Corrupt(format!("{what} is not UTF-8")))
}

/// Milliseconds of a duration for `PX`/`PEXPIRE`, at least 1 (0 is
/// rejected by Redis) and at most about 34 years, far below what an `f64`
/// score or Redis' expiry arithmetic can hold.
fn duration_ms(d: Duration) -> u64 {
    const MAX_MS: u64 = 1 << 40;
    u64::try_from(d.as_millis()).unwrap_or(MAX_MS).clamp(1, MAX_MS)
}

/// Decodes the flat `[hex id, payload, hex id, payload, …]` reply of the
/// offline and history read scripts.
fn decode_id_payload_pairs(flat: Vec<Option<Vec<u8>>>) -> StoreResult<Vec<(u64, bytes::Bytes)>> {
    if !flat.len().is_multiple_of(2) {
        return Err(StoreError::Backend("script returned an odd-length reply".to_owned()));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let (Some(member), Some(payload)) = (items.next(), items.next()) {
        let member = member.ok_or_else(|| StoreError::Corrupt("missing message id".to_owned()))?;
        let id = parse_hex_id(&member)?;
        // Id and payload are written by one script, so one without the
        // other means the keys were changed behind our back.
        let payload = payload.ok_or_else(|| StoreError::Corrupt(format!("message {id} has no payload")))?;
        out.push((id, bytes::Bytes::from(payload)));
    }
    Ok(out)
}
