//! ScyllaDB implementation of [`HistoryStore`] (cluster mode), on the
//! `scylla` driver.
//!
//! # Schema
//!
//! [`ScyllaHistoryStore::connect`] creates, if missing:
//!
//! ```cql
//! CREATE KEYSPACE IF NOT EXISTS <keyspace> WITH replication =
//!     {'class': 'NetworkTopologyStrategy', 'replication_factor': <factor>};
//! CREATE TABLE IF NOT EXISTS <keyspace>.group_messages (
//!     group_id   text,
//!     msg_id_rev bigint,  -- i64::MAX - msg_id
//!     msg_id     bigint,  -- the id itself, for humans reading rows in cqlsh
//!     payload    blob,
//!     PRIMARY KEY ((group_id), msg_id_rev)
//! ) WITH CLUSTERING ORDER BY (msg_id_rev ASC);
//! ```
//!
//! One partition per group; inside it rows are ordered by the *reversed*
//! message id, so the newest message is the first row and a history page
//! ("the `limit` newest messages below `before`") is one forward slice from
//! the head of the partition: `msg_id_rev >= bound LIMIT n`.
//!
//! # Id reversal
//!
//! `msg_id_rev = i64::MAX - msg_id`. CQL `bigint` is signed, so this is only
//! order-reversing for ids below 2^63; snowflake ids (41-bit millisecond
//! timestamp, 10-bit worker, 12-bit sequence) always are. An id of 2^63 or
//! more is refused with [`StoreError::Backend`] rather than silently stored
//! out of order.
//!
//! # Idempotence
//!
//! An append is a plain `INSERT`: a redelivered message has the same primary
//! key and the same payload, so the second write overwrites the row with
//! identical data. (A *different* payload under the same id would win as
//! the last write; the embedded store keeps the first. Producers never do
//! that: a message id is assigned once. A lightweight transaction,
//! `IF NOT EXISTS`, would close the gap at the price of a Paxos round per
//! message, which history writes do not need.)
//!
//! # Partition size
//!
//! Partitions are not bucketed: a group's whole history is one partition.
//! Reads stay cheap however large it grows (a page is a slice from the head,
//! found through the clustering index), but compaction, repair and streaming
//! handle a partition as a unit, and ScyllaDB warns about partitions above
//! ~1 GB (`compaction_large_partition_warning_threshold_mb`) or 100,000 rows.
//! At ~1 KiB per message that is around a million messages in one group,
//! far beyond ordinary groups; a deployment expecting such groups should
//! move to a `((group_id, bucket), msg_id_rev)` key with a time bucket taken
//! from the snowflake timestamp (`msg_id >> 22` is milliseconds), plus a small
//! per-group table of non-empty buckets so a page can walk buckets newest
//! first. That is a new table, not a change to this one.
//!
//! Consistency is the driver default (`LOCAL_QUORUM`), as is the 30 s
//! request timeout. The connection is plain CQL; for TLS or authentication
//! build the [`Session`] yourself and use [`ScyllaHistoryStore::from_session`].
//!
//! No ScyllaDB server can be installed on the development machine, so the
//! conformance suite (`store/tests/scylla_conformance.rs`) runs only when
//! `TERN_SCYLLA_NODES` names a server; the pure logic below is unit-tested.

use async_trait::async_trait;
use bytes::Bytes;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;

use crate::{HistoryStore, StoreError, StoreResult};

/// Rows fetched per round trip when a page is large; a page of `limit`
/// rows costs `limit / PAGE_FETCH_SIZE + 1` round trips.
const PAGE_FETCH_SIZE: i32 = 1_000;

/// Longest keyspace name CQL accepts.
const MAX_KEYSPACE_LEN: usize = 48;

/// [`HistoryStore`] on a ScyllaDB (or Cassandra 4+) cluster.
pub struct ScyllaHistoryStore {
    session: Session,
    keyspace: String,
    insert: PreparedStatement,
    select: PreparedStatement,
}

impl std::fmt::Debug for ScyllaHistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaHistoryStore").field("keyspace", &self.keyspace).finish_non_exhaustive()
    }
}

impl ScyllaHistoryStore {
    /// Connects to the cluster through `nodes` (comma-separated `host:port`
    /// contact points; the driver discovers the others), creates the
    /// keyspace with `replication_factor` replicas per datacenter and the
    /// table if they are missing, and prepares the statements.
    ///
    /// `keyspace` must be a plain CQL identifier (see [`validate_keyspace`]);
    /// an existing keyspace keeps its replication settings.
    pub async fn connect(nodes: &str, keyspace: &str, replication_factor: u32) -> StoreResult<Self> {
        let nodes = parse_nodes(nodes)?;
        // Validate before any I/O so a typo fails fast, not after a connect.
        validate_keyspace(keyspace)?;
        let session = SessionBuilder::new().known_nodes(&nodes).build().await.map_err(new_session_err)?;
        Self::from_session(session, keyspace, replication_factor).await
    }

    /// Like [`ScyllaHistoryStore::connect`], over a session built by the
    /// caller (for TLS, authentication or driver tuning).
    pub async fn from_session(
        session: Session,
        keyspace: &str,
        replication_factor: u32,
    ) -> StoreResult<Self> {
        validate_keyspace(keyspace)?;
        if replication_factor == 0 {
            return Err(StoreError::Backend("ScyllaDB replication factor must be at least 1".to_owned()));
        }
        // The driver waits for schema agreement after each DDL statement,
        // so the table is usable on every node once these return.
        session
            .query_unpaged(create_keyspace_cql(keyspace, replication_factor), ())
            .await
            .map_err(execution_err)?;
        session.query_unpaged(create_table_cql(keyspace), ()).await.map_err(execution_err)?;

        let mut insert = session
            .prepare(format!(
                "INSERT INTO {keyspace}.group_messages (group_id, msg_id_rev, msg_id, payload) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await
            .map_err(prepare_err)?;
        // Rewriting the same row is harmless, so the driver may retry a
        // write whose outcome it does not know (timeouts, broken links).
        insert.set_is_idempotent(true);
        let mut select = session
            .prepare(format!(
                "SELECT msg_id_rev, msg_id, payload FROM {keyspace}.group_messages \
                 WHERE group_id = ? AND msg_id_rev >= ? LIMIT ?"
            ))
            .await
            .map_err(prepare_err)?;
        select.set_is_idempotent(true);
        select.set_page_size(PAGE_FETCH_SIZE);

        Ok(Self { session, keyspace: keyspace.to_owned(), insert, select })
    }

    /// The driver session, e.g. for health checks or cleanup.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The keyspace holding the history table.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }
}

#[async_trait]
impl HistoryStore for ScyllaHistoryStore {
    async fn append(&self, group_id: &str, msg_id: u64, payload: Bytes) -> StoreResult<()> {
        let rev = reverse(msg_id)?;
        let id = msg_id_column(msg_id)?;
        self.session
            .execute_unpaged(&self.insert, (group_id, rev, id, payload))
            .await
            .map_err(execution_err)?;
        Ok(())
    }

    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>> {
        // CQL refuses `LIMIT 0`; an empty page needs no round trip anyway.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let bound = lower_bound(before);
        // CQL limits are 32-bit; no page is anywhere near that in practice.
        let cql_limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let wanted = limit.min(cql_limit.unsigned_abs() as usize);
        let mut out = Vec::with_capacity(wanted.min(PAGE_FETCH_SIZE as usize));
        let mut paging_state = PagingState::start();
        // Paged rather than unpaged: a huge `limit` is then fetched in
        // PAGE_FETCH_SIZE-row responses instead of one giant one.
        loop {
            let (result, paging) = self
                .session
                .execute_single_page(&self.select, (group_id, bound, cql_limit), paging_state)
                .await
                .map_err(execution_err)?;
            let rows = result.into_rows_result().map_err(|e| StoreError::Backend(e.to_string()))?;
            // A type-check failure means the table is not the schema above.
            let typed = rows.rows::<(i64, i64, Bytes)>().map_err(|e| StoreError::Backend(e.to_string()))?;
            for row in typed {
                let (rev, id, payload) = row.map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push((decode_row_id(rev, id)?, payload));
                if out.len() >= wanted {
                    return Ok(out);
                }
            }
            match paging.into_paging_control_flow() {
                std::ops::ControlFlow::Continue(next) => paging_state = next,
                std::ops::ControlFlow::Break(()) => return Ok(out),
            }
        }
    }
}

/// `i64::MAX - msg_id`: larger ids sort first. Ids of 2^63 and above have no
/// order-preserving image in a signed `bigint` and are refused.
fn reverse(msg_id: u64) -> StoreResult<i64> {
    let id = msg_id_column(msg_id)?;
    Ok(i64::MAX - id)
}

/// The id as stored in the `msg_id bigint` column.
fn msg_id_column(msg_id: u64) -> StoreResult<i64> {
    i64::try_from(msg_id).map_err(|_| {
        StoreError::Backend(format!("message id {msg_id} is 2^63 or more; ScyllaDB history cannot order it"))
    })
}

/// Inverse of [`reverse`]; `None` for a negative (never written) value.
fn unreverse(rev: i64) -> Option<u64> {
    // rev >= 0 implies i64::MAX - rev is in 0..=i64::MAX: no overflow.
    if rev < 0 { None } else { u64::try_from(i64::MAX - rev).ok() }
}

/// The inclusive lower bound on `msg_id_rev` selecting `msg_id < before`
/// (`before == 0`: every id).
///
/// `msg_id < before` ⇔ `msg_id <= before - 1` ⇔
/// `msg_id_rev >= i64::MAX - (before - 1)`. Every storable id is below
/// 2^63, so a `before` above that selects everything, like 0 does.
fn lower_bound(before: u64) -> i64 {
    match before {
        0 => 0,
        b => i64::try_from(b - 1).map_or(0, |newest| i64::MAX - newest),
    }
}

/// Checks a row's two id columns against each other and returns the id.
fn decode_row_id(rev: i64, id: i64) -> StoreResult<u64> {
    match unreverse(rev) {
        Some(from_rev) if i64::try_from(from_rev) == Ok(id) => Ok(from_rev),
        _ => Err(StoreError::Corrupt(format!("history row with msg_id_rev {rev} and msg_id {id} disagree"))),
    }
}

/// Splits `host:port,host:port` into contact points, ignoring blanks.
fn parse_nodes(nodes: &str) -> StoreResult<Vec<String>> {
    let list: Vec<String> =
        nodes.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect();
    if list.is_empty() {
        return Err(StoreError::Backend(format!("no ScyllaDB contact point in {nodes:?}")));
    }
    Ok(list)
}

/// Checks that `name` is an unquoted CQL identifier usable as a keyspace:
/// an ASCII letter, then letters, digits or underscores, 48 at most.
///
/// The name is spliced into DDL text (CQL has no bind markers for schema
/// names), so anything else is refused. CQL folds unquoted names to lower
/// case: `Tern` and `tern` are the same keyspace.
pub fn validate_keyspace(name: &str) -> StoreResult<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if first_ok && name.len() <= MAX_KEYSPACE_LEN && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "invalid keyspace name {name:?}: use a letter, then letters, digits or '_', \
             at most {MAX_KEYSPACE_LEN} characters"
        )))
    }
}

/// Turns any string (such as [`crate::conformance::unique_id`]) into a name
/// [`validate_keyspace`] accepts: lower-cased, every other character
/// replaced by `_`, prefixed with `k` when it does not start with a letter,
/// and cut to 48 characters by keeping the first 16 and the last 32 (the
/// end of a unique id is what makes it unique). Also a valid MongoDB
/// database name.
pub fn sanitize_identifier(raw: &str) -> String {
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.insert(0, 'k');
    }
    if name.len() > MAX_KEYSPACE_LEN {
        // All ASCII by now, so byte offsets are character boundaries.
        const HEAD: usize = 16;
        let tail = &name[name.len() - (MAX_KEYSPACE_LEN - HEAD)..];
        name = format!("{}{tail}", &name[..HEAD]);
    }
    name
}

fn create_keyspace_cql(keyspace: &str, replication_factor: u32) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}}"
    )
}

fn create_table_cql(keyspace: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {keyspace}.group_messages (\
         group_id text, msg_id_rev bigint, msg_id bigint, payload blob, \
         PRIMARY KEY ((group_id), msg_id_rev)) \
         WITH CLUSTERING ORDER BY (msg_id_rev ASC)"
    )
}

fn new_session_err(e: NewSessionError) -> StoreError {
    StoreError::Unavailable(format!("connecting to ScyllaDB: {e}"))
}

fn prepare_err(e: PrepareError) -> StoreError {
    let unavailable = match &e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_is_unavailable(first_attempt),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(format!("ScyllaDB prepare: {e}"))
    } else {
        StoreError::Backend(format!("ScyllaDB prepare: {e}"))
    }
}

/// Unavailable for what a retry may cure (no live node, timeouts,
/// overload); Backend for the rest (bad statement, schema, permissions).
fn execution_err(e: ExecutionError) -> StoreError {
    let unavailable = match &e {
        ExecutionError::EmptyPlan
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        ExecutionError::LastAttemptError(attempt) => attempt_is_unavailable(attempt),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(format!("ScyllaDB: {e}"))
    } else {
        StoreError::Backend(format!("ScyllaDB: {e}"))
    }
}

fn attempt_is_unavailable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_) | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::RateLimitReached { .. }
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_ID: u64 = i64::MAX as u64;

    #[test]
    fn reversal_round_trips_and_reverses_order() {
        let ids = [0, 1, 2, 41, 1 << 22, (1 << 40) + 7, MAX_ID - 1, MAX_ID];
        for &id in &ids {
            let rev = reverse(id).expect("id below 2^63");
            assert!(rev >= 0, "reversed ids are non-negative");
            assert_eq!(unreverse(rev), Some(id), "reversal round-trips {id}");
            assert_eq!(decode_row_id(rev, id as i64).expect("consistent row"), id);
        }
        for pair in ids.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(a < b);
            assert!(reverse(a).expect("a") > reverse(b).expect("b"), "{a} < {b} must reverse");
        }
        assert_eq!(reverse(0).expect("0"), i64::MAX);
        assert_eq!(reverse(MAX_ID).expect("max"), 0);
    }

    #[test]
    fn reversal_refuses_ids_of_2_pow_63_and_above() {
        for id in [MAX_ID + 1, u64::MAX] {
            assert!(matches!(reverse(id), Err(StoreError::Backend(_))), "{id} refused");
        }
        assert_eq!(unreverse(-1), None);
        assert_eq!(unreverse(i64::MIN), None);
    }

    #[test]
    fn snowflake_ids_keep_their_order() {
        // 41-bit timestamp, 10-bit worker, 12-bit sequence: the largest
        // possible snowflake id still fits.
        let snowflake = |ms: u64, worker: u64, seq: u64| (ms << 22) | (worker << 12) | seq;
        let newest = snowflake((1 << 41) - 1, 1023, 4095);
        assert!(reverse(newest).is_ok());
        let older = snowflake(1_000, 5, 9);
        let newer = snowflake(1_001, 0, 0);
        assert!(reverse(newer).expect("newer") < reverse(older).expect("older"));
    }

    /// Which stored ids a page with `before` selects, evaluated the way
    /// the server evaluates `msg_id_rev >= bound`.
    fn selected(stored: &[u64], before: u64) -> Vec<u64> {
        let bound = lower_bound(before);
        let mut hits: Vec<u64> =
            stored.iter().copied().filter(|&id| reverse(id).expect("id") >= bound).collect();
        // Clustering order: ascending msg_id_rev, i.e. newest first.
        hits.sort_by_key(|&id| reverse(id).expect("id"));
        hits
    }

    #[test]
    fn bound_selects_exactly_the_ids_below_before() {
        let stored = [0, 1, 2, 3, 4, 5, 1 << 40, MAX_ID - 1, MAX_ID];
        let befores = [0, 1, 2, 3, 5, 6, 1 << 40, (1 << 40) + 1, MAX_ID, MAX_ID + 1, MAX_ID + 2, u64::MAX];
        for before in befores {
            let mut expected: Vec<u64> =
                stored.iter().copied().filter(|&id| before == 0 || id < before).collect();
            expected.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(selected(&stored, before), expected, "before = {before}");
        }
    }

    #[test]
    fn bound_edge_values() {
        assert_eq!(lower_bound(0), 0, "before = 0 means from the newest");
        assert_eq!(lower_bound(1), i64::MAX, "only id 0 is below 1");
        assert_eq!(lower_bound(MAX_ID + 1), 0, "2^63: every storable id");
        assert_eq!(lower_bound(u64::MAX), 0);
        assert_eq!(lower_bound(5), i64::MAX - 4);
    }

    #[test]
    fn the_conformance_pages_come_out_right() {
        let stored = [3, 1, 5, 2, 4];
        assert_eq!(selected(&stored, 0), vec![5, 4, 3, 2, 1]);
        assert_eq!(selected(&stored, 4)[..2], [3, 2]);
        assert_eq!(selected(&stored, 2), vec![1]);
        assert!(selected(&stored, 1).is_empty());
    }

    #[test]
    fn inconsistent_rows_are_corrupt() {
        assert!(matches!(decode_row_id(i64::MAX - 5, 6), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_row_id(-3, 0), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn keyspace_validation() {
        for ok in ["tern", "Tern_History", "t", "a1_b2", &"k".repeat(48)] {
            assert!(validate_keyspace(ok).is_ok(), "{ok:?} is valid");
        }
        for bad in ["", "1tern", "_tern", "tern-x", "tern.x", "tern x", "tërn", "t;DROP", &"k".repeat(49)] {
            assert!(validate_keyspace(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn sanitized_identifiers_are_valid_and_distinct() {
        let raw = crate::conformance::unique_id("tern-conf");
        let name = sanitize_identifier(&raw);
        validate_keyspace(&name).expect("sanitized unique id is a keyspace name");
        assert!(name.starts_with("tern_conf_"), "{name}");
        assert_ne!(name, sanitize_identifier(&crate::conformance::unique_id("tern-conf")));

        assert_eq!(sanitize_identifier("Hist-1.x"), "hist_1_x");
        assert_eq!(sanitize_identifier("9lives"), "k9lives");
        assert_eq!(sanitize_identifier(""), "k");
        assert_eq!(sanitize_identifier("é"), "k_");

        let long = format!("{}-{}", "p".repeat(60), "0123456789abcdef0123456789abcdef");
        let cut = sanitize_identifier(&long);
        assert_eq!(cut.len(), 48);
        assert!(cut.starts_with(&"p".repeat(16)));
        assert!(cut.ends_with("0123456789abcdef0123456789abcdef"), "keeps the unique tail: {cut}");
        validate_keyspace(&cut).expect("cut name is valid");
        for raw in ["", "-", "___", "Ω", &"9".repeat(100)] {
            validate_keyspace(&sanitize_identifier(raw)).expect("always valid");
        }
    }

    #[test]
    fn nodes_are_split_and_trimmed() {
        assert_eq!(
            parse_nodes(" 10.0.0.1:9042, 10.0.0.2:9042 ,,").expect("nodes"),
            vec!["10.0.0.1:9042".to_owned(), "10.0.0.2:9042".to_owned()]
        );
        assert!(parse_nodes(" , ").is_err());
        assert!(parse_nodes("").is_err());
    }

    #[test]
    fn ddl_text() {
        assert_eq!(
            create_keyspace_cql("tern", 3),
            "CREATE KEYSPACE IF NOT EXISTS tern WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
        );
        let table = create_table_cql("tern");
        assert!(table.starts_with("CREATE TABLE IF NOT EXISTS tern.group_messages ("));
        assert!(table.contains("PRIMARY KEY ((group_id), msg_id_rev)"));
        assert!(table.ends_with("WITH CLUSTERING ORDER BY (msg_id_rev ASC)"));
    }
}
