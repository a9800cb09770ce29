//! router-auth: accounts, login tokens, the `ipList` lookup and session
//! placement.
//!
//! [`AuthService`] holds the logic; [`http::serve`] exposes it as the HTTP API
//! clients use before they connect (register, login, ipList), and access
//! nodes call it through the [`SessionAuthority`] trait to turn a token into
//! a placed session when a client logs in on a connection.

pub mod http;
pub mod rpc;
mod token;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use async_trait::async_trait;
use tern_proto::{ErrorCode, ServiceError, ServiceResult, validate_id};
use tern_store::{MetaStore, NodeInfo, Placement, Registry, SessionStore, UserRecord};

pub use token::{Claims, TokenSigner};

/// Registry role name of TLS TCP access nodes.
pub const ACCESS_TCP_ROLE: &str = "access-tcp";

pub const MIN_PASSWORD_LEN: usize = 6;
pub const MAX_PASSWORD_LEN: usize = 128;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why a register or login call failed. Kept apart from the wire
/// [`ErrorCode`]s: these only travel over the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("user id {0:?} is already registered")]
    UserExists(String),
    #[error("unknown user or wrong password")]
    BadCredentials,
    #[error("backend failure: {0}")]
    Internal(String),
    #[error("too many logins at once; retry shortly")]
    Busy,
}

/// A freshly issued token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IssuedToken {
    pub user_id: String,
    pub token: String,
    pub expires_at_ms: u64,
}

/// The identity a valid token and device resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub device_id: String,
}

/// What an access node needs from router-auth: verify a token and place the
/// session, and clear placements when connections end.
#[async_trait]
pub trait SessionAuthority: Send + Sync + 'static {
    /// Verifies `token` and records that `device_id` of its user is on
    /// `node_id` as `connection_id`. A previous placement of the same device
    /// is replaced; the previous placement, if any, is returned so the caller
    /// can close the connection it names.
    async fn attach(
        &self,
        token: &str,
        device_id: &str,
        node_id: &str,
        connection_id: u64,
    ) -> ServiceResult<(Identity, Option<Placement>)>;
    /// Removes a placement if it is still the current one for its device.
    async fn detach(&self, placement: &Placement) -> ServiceResult<()>;
    /// Removes every placement on a node (drain, or start after a crash).
    async fn detach_node(&self, node_id: &str) -> ServiceResult<usize>;
}

/// How `ipList` orders the access nodes it returns (clients take the first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessSelection {
    /// Fewest live connections first.
    #[default]
    LeastActive,
    /// A different first node on each call.
    RoundRobin,
    /// A random order.
    Random,
    /// The same first node for the same user (rendezvous hashing of the
    /// `user` query parameter); least active when no user is given.
    ConsistentHash,
}

/// Settings for [`AuthService`].
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub token_ttl: Duration,
    pub access_selection: AccessSelection,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(24 * 3600), access_selection: AccessSelection::LeastActive }
    }
}

/// Accounts, tokens, placement and the access-node lookup.
pub struct AuthService {
    meta: Arc<dyn MetaStore>,
    sessions: Arc<dyn SessionStore>,
    registry: Arc<dyn Registry>,
    signer: TokenSigner,
    config: AuthConfig,
    round_robin: std::sync::atomic::AtomicUsize,
    /// Password hashing costs ~19 MiB and tens of ms each: at most this many
    /// run at once, so a flood of logins cannot exhaust memory.
    hashing: tokio::sync::Semaphore,
}

/// Concurrent password hashes allowed; more wait up to [`HASH_WAIT`].
const HASH_PERMITS: usize = 4;
const HASH_WAIT: Duration = Duration::from_secs(5);

impl AuthService {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        sessions: Arc<dyn SessionStore>,
        registry: Arc<dyn Registry>,
        signer: TokenSigner,
        config: AuthConfig,
    ) -> Self {
        Self {
            meta,
            sessions,
            registry,
            signer,
            config,
            round_robin: Default::default(),
            hashing: tokio::sync::Semaphore::new(HASH_PERMITS),
        }
    }

    pub fn signer(&self) -> &TokenSigner {
        &self.signer
    }

    /// Creates an account.
    pub async fn register(&self, user_id: &str, password: &str) -> Result<(), AccountError> {
        validate_id("user_id", user_id).map_err(|e| AccountError::Invalid(e.message))?;
        if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.chars().count()) {
            return Err(AccountError::Invalid(format!(
                "password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters"
            )));
        }
        if self.meta.get_user(user_id).await.map_err(|e| AccountError::Internal(e.to_string()))?.is_some() {
            return Err(AccountError::UserExists(user_id.to_owned()));
        }
        let password = password.to_owned();
        let _permit = self.hashing_permit().await?;
        // Hashing is CPU-heavy by design: keep it off the async workers.
        let password_hash = tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await
        .map_err(|e| AccountError::Internal(e.to_string()))?
        .map_err(|e| AccountError::Internal(e.to_string()))?;
        let record = UserRecord { user_id: user_id.to_owned(), password_hash, created_at_ms: now_ms() };
        match self.meta.create_user(&record).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AccountError::UserExists(user_id.to_owned())),
            Err(e) => Err(AccountError::Internal(e.to_string())),
        }
    }

    /// Checks a password and issues a token.
    pub async fn login(&self, user_id: &str, password: &str) -> Result<IssuedToken, AccountError> {
        if validate_id("user_id", user_id).is_err() || password.len() > MAX_PASSWORD_LEN * 4 {
            return Err(AccountError::BadCredentials);
        }
        let user = self
            .meta
            .get_user(user_id)
            .await
            .map_err(|e| AccountError::Internal(e.to_string()))?
            .ok_or(AccountError::BadCredentials)?;
        let password = password.to_owned();
        let _permit = self.hashing_permit().await?;
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&user.password_hash)
                .map(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
                .unwrap_or(false)
        })
        .await
        .map_err(|e| AccountError::Internal(e.to_string()))?;
        if !ok {
            return Err(AccountError::BadCredentials);
        }
        Ok(self.issue_token(user_id))
    }

    async fn hashing_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AccountError> {
        match tokio::time::timeout(HASH_WAIT, self.hashing.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(AccountError::Busy),
        }
    }

    /// Issues a token without a password check (trusted callers and tests).
    pub fn issue_token(&self, user_id: &str) -> IssuedToken {
        let (token, claims) = self.signer.issue(user_id, now_ms(), self.config.token_ttl.as_millis() as u64);
        IssuedToken { user_id: user_id.to_owned(), token, expires_at_ms: claims.exp }
    }

    /// Live access nodes, ordered by the configured [`AccessSelection`];
    /// `user` feeds consistent hashing.
    pub async fn ip_list(&self, user: Option<&str>) -> ServiceResult<Vec<NodeInfo>> {
        let mut nodes = self.registry.list(ACCESS_TCP_ROLE).await.map_err(ServiceError::backend)?;
        order_nodes(&mut nodes, self.config.access_selection, user, &self.round_robin);
        Ok(nodes)
    }

    /// Whether a user exists (for receivers and group members).
    pub async fn user_exists(&self, user_id: &str) -> ServiceResult<bool> {
        Ok(self.meta.get_user(user_id).await.map_err(ServiceError::backend)?.is_some())
    }
}

/// Removes the placements of access nodes that leave the registry (a node
/// that crashed cannot clear its own; its ephemeral registration vanishes
/// when its ZooKeeper session expires). A node may also vanish only for a
/// moment — its session expired but it lives and re-registers, keeping its
/// connections — so placements are removed only if the node is still absent
/// after `grace`. Runs until `stop` resolves. Several router-auth nodes may
/// run it at once: removal is idempotent.
pub async fn clean_departed_placements(
    registry: Arc<dyn Registry>,
    sessions: Arc<dyn SessionStore>,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> tern_store::StoreResult<()> {
    let mut watched = registry.watch(ACCESS_TCP_ROLE).await?;
    let ids = |nodes: &[NodeInfo]| {
        nodes.iter().map(|n| n.node_id.clone()).collect::<std::collections::BTreeSet<_>>()
    };
    let mut known = ids(&watched.borrow_and_update());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            changed = watched.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
        let now = ids(&watched.borrow_and_update());
        for gone in known.difference(&now).cloned() {
            let (registry, sessions) = (registry.clone(), sessions.clone());
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                match registry.list(ACCESS_TCP_ROLE).await {
                    Ok(nodes) if nodes.iter().any(|n| n.node_id == gone) => {
                        tracing::info!(node = %gone, "access node is back; placements kept");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = %gone, error = %e, "registry unreadable; placements kept");
                        return;
                    }
                }
                match sessions.remove_node(&gone).await {
                    Ok(n) => {
                        tracing::info!(node = %gone, placements = n, "access node left; placements cleared")
                    }
                    Err(e) => {
                        tracing::warn!(node = %gone, error = %e, "placements of a departed node not cleared")
                    }
                }
            });
        }
        known = now;
    }
}

/// Orders `nodes` (sorted by id on entry) for ipList.
fn order_nodes(
    nodes: &mut [NodeInfo],
    selection: AccessSelection,
    user: Option<&str>,
    round_robin: &std::sync::atomic::AtomicUsize,
) {
    let least_active = |nodes: &mut [NodeInfo]| {
        nodes.sort_by(|a, b| a.connections.cmp(&b.connections).then_with(|| a.node_id.cmp(&b.node_id)));
    };
    match (selection, user) {
        (AccessSelection::LeastActive, _) | (AccessSelection::ConsistentHash, None) => least_active(nodes),
        (AccessSelection::ConsistentHash, Some(user)) => {
            nodes.sort_by_key(|n| {
                std::cmp::Reverse((tern_proto::rendezvous_weight(user, &n.node_id), n.node_id.clone()))
            });
        }
        (AccessSelection::RoundRobin, _) => {
            if !nodes.is_empty() {
                let turn = round_robin.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % nodes.len();
                nodes.rotate_left(turn);
            }
        }
        (AccessSelection::Random, _) => {
            use rand::seq::SliceRandom;
            nodes.shuffle(&mut rand::rng());
        }
    }
}

#[async_trait]
impl SessionAuthority for AuthService {
    async fn attach(
        &self,
        token: &str,
        device_id: &str,
        node_id: &str,
        connection_id: u64,
    ) -> ServiceResult<(Identity, Option<Placement>)> {
        let claims = self.signer.verify(token, now_ms())?;
        let device_id = if device_id.is_empty() { "default" } else { device_id };
        validate_id("device_id", device_id)?;
        // A token outlives nothing: an account that is gone cannot log in.
        if self.meta.get_user(&claims.sub).await.map_err(ServiceError::backend)?.is_none() {
            return Err(ServiceError::new(ErrorCode::InvalidToken, "invalid token: unknown user"));
        }
        // Recorded before the placement: from now on every message for the
        // user is also kept for this device.
        self.meta.add_device(&claims.sub, device_id).await.map_err(ServiceError::backend)?;
        let placement = Placement {
            user_id: claims.sub.clone(),
            device_id: device_id.to_owned(),
            node_id: node_id.to_owned(),
            connection_id,
        };
        // The login this one replaces (same device), to be closed.
        let previous = self.sessions.put(&placement).await.map_err(ServiceError::backend)?;
        Ok((Identity { user_id: claims.sub, device_id: device_id.to_owned() }, previous))
    }

    async fn detach(&self, placement: &Placement) -> ServiceResult<()> {
        self.sessions.remove(placement).await.map_err(ServiceError::backend)?;
        Ok(())
    }

    async fn detach_node(&self, node_id: &str) -> ServiceResult<usize> {
        self.sessions.remove_node(node_id).await.map_err(ServiceError::backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn nodes() -> Vec<NodeInfo> {
        [("a", 5), ("b", 1), ("c", 3)]
            .into_iter()
            .map(|(id, connections)| NodeInfo {
                node_id: id.into(),
                role: ACCESS_TCP_ROLE.into(),
                addr: format!("{id}:1"),
                internal_addr: String::new(),
                connections,
            })
            .collect()
    }

    fn first(selection: AccessSelection, user: Option<&str>, rr: &AtomicUsize) -> String {
        let mut list = nodes();
        order_nodes(&mut list, selection, user, rr);
        assert_eq!(list.len(), 3);
        list[0].node_id.clone()
    }

    #[test]
    fn selection_strategies() {
        let rr = AtomicUsize::new(0);
        assert_eq!(first(AccessSelection::LeastActive, None, &rr), "b");
        let turns: Vec<String> = (0..3).map(|_| first(AccessSelection::RoundRobin, None, &rr)).collect();
        assert_eq!(turns, ["a", "b", "c"]);
        let alice = first(AccessSelection::ConsistentHash, Some("alice"), &rr);
        for _ in 0..5 {
            assert_eq!(first(AccessSelection::ConsistentHash, Some("alice"), &rr), alice);
        }
        let spread: std::collections::BTreeSet<String> =
            (0..50).map(|i| first(AccessSelection::ConsistentHash, Some(&format!("user{i}")), &rr)).collect();
        assert_eq!(spread.len(), 3, "users spread over every node");
        assert_eq!(first(AccessSelection::ConsistentHash, None, &rr), "b");
        let randoms: std::collections::BTreeSet<String> =
            (0..100).map(|_| first(AccessSelection::Random, None, &rr)).collect();
        assert_eq!(randoms.len(), 3);
    }
}
