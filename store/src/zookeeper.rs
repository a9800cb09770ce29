//! ZooKeeper implementation of [`Registry`], and the worker-id leases that
//! snowflake id generators take.
//!
//! Layout under a configurable root (default `/tern`):
//!
//! ```text
//! /<root>/nodes/<role>/<node_id>     EPHEMERAL, data: the NodeInfo as JSON
//! /<root>/workers/<namespace>/<id>   EPHEMERAL, id in 0..1024, data: who holds it
//! ```
//!
//! The folders above the ephemeral nodes are persistent and created on
//! demand.
//!
//! # Sessions
//!
//! An ephemeral node lives exactly as long as the ZooKeeper session that
//! created it. zookeeper-client reconnects on its own within a session, but
//! once the session has expired (or the client is closed) that client is dead
//! for good. A supervisor task follows the session state; when the session
//! ends it builds a new client, re-creates every node this registry
//! registered (with its latest data) and publishes the new client. Watch
//! tasks and readers that failed on the dead session wait for the new one and
//! carry on, so a long network partition costs a node its registration for a
//! moment, never for good.
//!
//! Worker-id leases are the exception: they are not re-created. Once the
//! session may have ended, the server may have freed the id and another
//! process may hold it, so the lease is reported lost and its holder must
//! stop issuing ids (see [`WorkerLease`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::{NodeInfo, Registry, StoreError, StoreResult};

/// Root folder used when the configuration names none.
pub const DEFAULT_ROOT: &str = "tern";

/// Number of worker ids a namespace has: a snowflake id has 10 bits for it.
pub const WORKER_IDS: u16 = 1024;

const FOLDER: zk::CreateOptions<'static> = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
const EPHEMERAL: zk::CreateOptions<'static> = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());

/// Longest pause between two attempts to reach ZooKeeper again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How many times a write retries when the node changes under it (a
/// concurrent delete or create), before giving up.
const WRITE_ATTEMPTS: usize = 5;

/// [`Registry`] on ZooKeeper ephemeral nodes, plus worker-id leases.
///
/// Dropping it closes its session: its nodes and leases vanish at once.
#[derive(Debug)]
pub struct ZkRegistry {
    shared: Arc<Shared>,
    /// Never sent on: dropping it tells the background tasks to stop, which
    /// drops the last client and closes the session.
    shutdown: watch::Sender<()>,
}

/// A worker id held in a namespace, for as long as this value lives and the
/// ZooKeeper session that took it does.
///
/// Dropping the lease frees the id (in the background; [`WorkerLease::release`]
/// waits for it).
#[derive(Debug)]
pub struct WorkerLease {
    /// The worker id, in `0..1024`.
    pub id: u16,
    /// Turns `true`, for good, once the lease can no longer be trusted: the
    /// session that holds it expired or was closed, or it has been
    /// disconnected so long (a third of the session timeout) that the server
    /// may expire it any moment and hand the id to another process. The
    /// holder must then stop issuing ids with it and take a new lease.
    pub lost: watch::Receiver<bool>,
    release: Option<Release>,
}

/// What dropping a [`WorkerLease`] needs to free its id.
#[derive(Debug)]
struct Release {
    shared: Weak<Shared>,
    path: String,
    /// Session that created the node: only that session may delete it (in a
    /// later session the id may belong to someone else).
    session_id: i64,
}

#[derive(Debug)]
struct Shared {
    addr: String,
    /// Absolute root path, e.g. `/tern`.
    root: String,
    /// Session timeout asked for when (re)connecting.
    requested_timeout: Duration,
    /// The live client, replaced after its session ends.
    session: watch::Sender<Session>,
    /// Nodes registered through this registry, by node id, with their
    /// latest data, so they can be re-created in a new session. The lock
    /// also serialises every write of them with that re-creation: a write
    /// that lands in a dying session is replayed from here afterwards.
    owned: tokio::sync::Mutex<BTreeMap<String, NodeInfo>>,
    leases: Mutex<LeaseBook>,
}

#[derive(Clone, Debug)]
struct Session {
    client: zk::Client,
    /// Bumped each time the client is replaced.
    generation: u64,
}

#[derive(Debug, Default)]
struct LeaseBook {
    /// Bumped each time the held leases are declared lost, so a lease taken
    /// while that happened is detected.
    epoch: u64,
    /// Senders of the `lost` flags of leases taken in the current session.
    held: Vec<watch::Sender<bool>>,
}

impl ZkRegistry {
    /// Connects to `addr` (`host:port[,host:port…]`) and keeps the registry
    /// under `root` (e.g. [`DEFAULT_ROOT`]; nested roots such as `a/b` work).
    /// `session_timeout` is what the server is asked for: the time after
    /// which a vanished process's nodes disappear.
    pub async fn connect(addr: &str, root: &str, session_timeout: Duration) -> StoreResult<Self> {
        let root = absolute_root(root)?;
        let client = connect_client(addr, session_timeout).await.map_err(store_error)?;
        // Fails early, with a clear error, on a server we cannot write to.
        client.mkdir(&format!("{root}/nodes"), &FOLDER).await.map_err(store_error)?;
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            root,
            requested_timeout: session_timeout,
            session: watch::channel(Session { client, generation: 0 }).0,
            owned: tokio::sync::Mutex::default(),
            leases: Mutex::default(),
        });
        let (shutdown, stopped) = watch::channel(());
        tokio::spawn(supervise(shared.clone(), stopped));
        Ok(Self { shared, shutdown })
    }

    /// The session timeout the server granted (it clamps the requested one
    /// to its `minSessionTimeout..maxSessionTimeout`).
    pub fn session_timeout(&self) -> Duration {
        self.shared.current().client.session_timeout()
    }

    /// Id of the current ZooKeeper session; it changes when the registry
    /// recovers from an expired session.
    pub fn session_id(&self) -> i64 {
        self.shared.current().client.session_id().0
    }

    /// Makes the server end this registry's current session, as a network
    /// partition longer than the session timeout would: opens a second
    /// connection on the same session (id and password) and closes the
    /// session through it. Returns once this registry's client has seen its
    /// session end; the registry then recovers as from any expiry. For tests.
    #[doc(hidden)]
    pub async fn expire_session(&self) -> StoreResult<()> {
        let (session, mut states) = {
            let current = self.shared.current();
            (current.client.session().clone(), current.client.state_watcher())
        };
        let mut last_error = None;
        // The server moves a session to its newest connection, and our own
        // client reconnects at once when its connection is taken: the twin
        // can lose that race, so it gets several tries (five were once all
        // lost, in a test run right after ZooKeeper started).
        for _ in 0..12 {
            if states.peek_state().is_terminated() {
                return Ok(());
            }
            match close_twin(&self.shared.addr, &session, self.shared.requested_timeout).await {
                Ok(()) => {}
                Err(e) => last_error = Some(e),
            }
            let ended = async { while !states.changed().await.is_terminated() {} };
            if tokio::time::timeout(Duration::from_secs(5), ended).await.is_ok() {
                return Ok(());
            }
        }
        Err(last_error.map_or_else(
            || StoreError::Unavailable("zookeeper: the session did not end".into()),
            store_error,
        ))
    }

    /// Leases the lowest free worker id in `0..1024` of `namespace` (e.g. one
    /// per id generator cluster) by creating an ephemeral node for it.
    ///
    /// Fails when all 1024 ids are held.
    pub async fn lease_worker_id(&self, namespace: &str) -> StoreResult<WorkerLease> {
        check_name("worker namespace", namespace)?;
        let folder = format!("{}/workers/{namespace}", self.shared.root);
        let mut session = self.shared.current();
        let mut retried = false;
        loop {
            let epoch = self.shared.leases().epoch;
            match claim_lowest_id(&session.client, &folder).await {
                Ok(Some((id, path))) => return self.hold_lease(&session.client, id, path, epoch).await,
                Ok(None) => {
                    return Err(StoreError::Backend(format!(
                        "all {WORKER_IDS} worker ids of namespace {namespace:?} are leased"
                    )));
                }
                Err(e) if session_ended(&e) && !retried => {
                    retried = true;
                    session = self.shared.wait_newer(session.generation).await?;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    }

    /// Records a claimed id as a lease, unless the leases were declared lost
    /// while it was being claimed (the claim may then predate the loss).
    async fn hold_lease(
        &self,
        client: &zk::Client,
        id: u16,
        path: String,
        epoch: u64,
    ) -> StoreResult<WorkerLease> {
        let lost = {
            let mut book = self.shared.leases();
            if book.epoch == epoch {
                let (sender, lost) = watch::channel(false);
                book.held.retain(|held| !held.is_closed());
                book.held.push(sender);
                Some(lost)
            } else {
                None
            }
        };
        let Some(lost) = lost else {
            // Best effort: if the session is gone, so is the node.
            let _ = client.delete(&path, None).await;
            return Err(StoreError::Unavailable(
                "zookeeper: the session was interrupted while leasing a worker id".into(),
            ));
        };
        let release =
            Release { shared: Arc::downgrade(&self.shared), path, session_id: client.session_id().0 };
        Ok(WorkerLease { id, lost, release: Some(release) })
    }

    /// Runs a read on the current session; if that session has just ended,
    /// waits for its replacement and runs it once more.
    async fn read<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: Fn(zk::Client) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, zk::Error>> + Send,
        T: Send,
    {
        let session = self.shared.current();
        match op(session.client).await {
            Err(e) if session_ended(&e) => {
                let session = self.shared.wait_newer(session.generation).await?;
                op(session.client).await.map_err(store_error)
            }
            result => result.map_err(store_error),
        }
    }
}

impl WorkerLease {
    /// Frees the id now, waiting until ZooKeeper has done it.
    pub async fn release(mut self) -> StoreResult<()> {
        match self.release.take() {
            Some(release) => release.run().await.map_err(store_error),
            None => Ok(()),
        }
    }
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        let Some(release) = self.release.take() else { return };
        // Without a runtime the node stays until the session ends, which
        // dropping the registry does.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Retried for a while: a connection loss should not leak the
                // id for the rest of the session.
                let mut backoff = Duration::from_millis(200);
                for attempt in 1..=5 {
                    match release.run().await {
                        Ok(()) => return,
                        Err(e) if attempt == 5 => {
                            tracing::warn!(path = %release.path, error = %e, "could not free a worker id");
                        }
                        Err(_) => {
                            tokio::time::sleep(backoff).await;
                            backoff *= 2;
                        }
                    }
                }
            });
        }
    }
}

impl Release {
    async fn run(&self) -> Result<(), zk::Error> {
        let Some(shared) = self.shared.upgrade() else { return Ok(()) };
        let client = shared.current().client;
        if client.session_id().0 != self.session_id {
            // The session that held the id ended, and the node with it.
            return Ok(());
        }
        match client.delete(&self.path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) if session_ended(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Registry for ZkRegistry {
    async fn register(&self, node: &NodeInfo) -> StoreResult<()> {
        check_name("role", &node.role)?;
        check_name("node id", &node.node_id)?;
        let data = encode(node)?;
        let mut owned = self.shared.owned.lock().await;
        let client = self.shared.current().client;
        let moved = owned
            .get(&node.node_id)
            .filter(|previous| previous.role != node.role)
            .map(|previous| self.shared.node_path(&previous.role, &previous.node_id));
        if let Some(old_path) = moved {
            // Same node under a new role: its old entry must go.
            match client.delete(&old_path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) if session_ended(&e) => {}
                Err(e) => return Err(store_error(e)),
            }
            owned.remove(&node.node_id);
        }
        match put_ephemeral(&client, &self.shared.node_path(&node.role, &node.node_id), &data).await {
            Ok(()) => {}
            // The session ended under us. The supervisor re-registers only
            // after we release `owned`, and then re-creates this node too.
            Err(e) if session_ended(&e) => {}
            Err(e) => return Err(store_error(e)),
        }
        owned.insert(node.node_id.clone(), node.clone());
        Ok(())
    }

    async fn update_connections(&self, node_id: &str, connections: u64) -> StoreResult<()> {
        let mut owned = self.shared.owned.lock().await;
        // A node this registry did not register (or deregistered) is
        // ignored, as the embedded registry ignores unknown nodes.
        let Some(node) = owned.get_mut(node_id) else { return Ok(()) };
        node.connections = connections;
        let data = encode(node)?;
        let path = self.shared.node_path(&node.role, &node.node_id);
        let client = self.shared.current().client;
        let written = match client.set_data(&path, &data, None).await {
            Ok(_) => Ok(()),
            // Deleted behind our back (by hand, or by a deregister elsewhere):
            // the node is alive, so it is registered again.
            Err(zk::Error::NoNode) => put_ephemeral(&client, &path, &data).await,
            Err(e) => Err(e),
        };
        match written {
            // A dead session: the re-registration carries the new count.
            Err(e) if !session_ended(&e) => Err(store_error(e)),
            _ => Ok(()),
        }
    }

    async fn deregister(&self, node_id: &str) -> StoreResult<()> {
        check_name("node id", node_id)?;
        let mut owned = self.shared.owned.lock().await;
        if let Some(node) = owned.remove(node_id) {
            let client = self.shared.current().client;
            return match client.delete(&self.shared.node_path(&node.role, node_id), None).await {
                Ok(()) | Err(zk::Error::NoNode) => Ok(()),
                // Its session is gone and, out of `owned`, it will not be
                // re-created.
                Err(e) if session_ended(&e) => Ok(()),
                Err(e) => Err(store_error(e)),
            };
        }
        drop(owned);
        // Not registered here (another process's node, or a register whose
        // reply was lost): look for it under every role.
        let nodes = format!("{}/nodes", self.shared.root);
        self.read(|client| {
            let nodes = &nodes;
            async move {
                let roles = match client.list_children(nodes).await {
                    Ok(roles) => roles,
                    Err(zk::Error::NoNode) => return Ok(()),
                    Err(e) => return Err(e),
                };
                for role in roles {
                    match client.delete(&format!("{nodes}/{role}/{node_id}"), None).await {
                        Ok(()) | Err(zk::Error::NoNode) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        })
        .await
    }

    async fn list(&self, role: &str) -> StoreResult<Vec<NodeInfo>> {
        check_name("role", role)?;
        let folder = self.shared.role_folder(role);
        self.read(|client| {
            let folder = &folder;
            async move {
                match client.list_children(folder).await {
                    Ok(children) => read_nodes(&client, folder, children).await,
                    Err(zk::Error::NoNode) => Ok(Vec::new()),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    async fn watch(&self, role: &str) -> StoreResult<watch::Receiver<Vec<NodeInfo>>> {
        check_name("role", role)?;
        let folder = self.shared.role_folder(role);
        let mut session = self.shared.current();
        let (nodes, watcher) = match arm(&session.client, &folder).await {
            Err(e) if session_ended(&e) => {
                session = self.shared.wait_newer(session.generation).await?;
                arm(&session.client, &folder).await
            }
            armed => armed,
        }
        .map_err(store_error)?;
        let (sender, receiver) = watch::channel(nodes);
        let follower =
            RoleFollower { shared: self.shared.clone(), folder, sender, stopped: self.shutdown.subscribe() };
        tokio::spawn(follower.run(watcher, session.generation));
        Ok(receiver)
    }
}

impl Shared {
    fn current(&self) -> Session {
        self.session.borrow().clone()
    }

    fn leases(&self) -> MutexGuard<'_, LeaseBook> {
        // Every change of the book is a single push, clear or increment, so
        // a panic elsewhere cannot leave it half-updated.
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn role_folder(&self, role: &str) -> String {
        format!("{}/nodes/{role}", self.root)
    }

    fn node_path(&self, role: &str, node_id: &str) -> String {
        format!("{}/nodes/{role}/{node_id}", self.root)
    }

    /// The session after `generation`, once the supervisor has one (and has
    /// re-registered this registry's nodes in it).
    async fn wait_newer(&self, generation: u64) -> StoreResult<Session> {
        // Reconnecting takes up to a session timeout when the server is
        // slow to answer; past twice that, the caller gets an error to retry.
        let patience = (self.requested_timeout * 2).max(Duration::from_secs(10));
        let mut sessions = self.session.subscribe();
        match tokio::time::timeout(patience, sessions.wait_for(|s| s.generation > generation)).await {
            Ok(Ok(session)) => Ok(session.clone()),
            _ => Err(StoreError::Unavailable("zookeeper: session expired and not yet replaced".into())),
        }
    }

    /// Marks every held lease lost.
    fn lose_leases(&self) {
        let mut book = self.leases();
        book.epoch += 1;
        for held in book.held.drain(..) {
            held.send_replace(true);
        }
    }
}

/// Follows one role for a [`Registry::watch`] receiver: a children watch on
/// the role's folder, re-armed after every event (ZooKeeper watches fire
/// once), and re-created in each new session.
struct RoleFollower {
    shared: Arc<Shared>,
    folder: String,
    sender: watch::Sender<Vec<NodeInfo>>,
    stopped: watch::Receiver<()>,
}

impl RoleFollower {
    /// Runs until the registry is dropped or nobody holds the receiver.
    async fn run(self, mut watcher: zk::OneshotWatcher, mut generation: u64) {
        let Self { shared, folder, sender, mut stopped } = self;
        loop {
            let Some(event) = until_stopped(&mut stopped, &sender, watcher.changed()).await else { return };
            if event.event_type == zk::EventType::Session && event.session_state.is_terminated() {
                let mut sessions = shared.session.subscribe();
                let newer = sessions.wait_for(|s| s.generation > generation);
                if until_stopped(&mut stopped, &sender, newer).await.is_none() {
                    return;
                }
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                let session = shared.current();
                let Some(armed) = until_stopped(&mut stopped, &sender, arm(&session.client, &folder)).await
                else {
                    return;
                };
                match armed {
                    Ok((nodes, next)) => {
                        sender.send_if_modified(|current| {
                            let changed = *current != nodes;
                            *current = nodes;
                            changed
                        });
                        watcher = next;
                        generation = session.generation;
                        break;
                    }
                    Err(e) if session_ended(&e) => {
                        let mut sessions = shared.session.subscribe();
                        let newer = sessions.wait_for(|s| s.generation > session.generation);
                        if until_stopped(&mut stopped, &sender, newer).await.is_none() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(folder = %folder, error = %e, "could not re-arm a registry watch");
                        let pause = tokio::time::sleep(backoff);
                        if until_stopped(&mut stopped, &sender, pause).await.is_none() {
                            return;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}

/// Runs `work`; `None` instead once the registry is dropped or nobody holds
/// the receiver `sender` feeds.
async fn until_stopped<T>(
    stopped: &mut watch::Receiver<()>,
    sender: &watch::Sender<Vec<NodeInfo>>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = stopped.changed() => None,
        () = sender.closed() => None,
        output = work => Some(output),
    }
}

/// Follows the session: when it ends, loses the leases, connects a new
/// client, re-creates the owned nodes and publishes the client. Returns when
/// the registry is dropped.
async fn supervise(shared: Arc<Shared>, mut stopped: watch::Receiver<()>) {
    loop {
        let (states, timeout) = {
            let session = shared.session.borrow();
            (session.client.state_watcher(), session.client.session_timeout())
        };
        if !follow_session(&shared, states, timeout, &mut stopped).await {
            break;
        }
        shared.lose_leases();
        tracing::warn!("zookeeper session ended; opening a new one and registering again");
        let Some(client) = replace_session(&shared, &mut stopped).await else { break };
        tracing::info!(session = %client.session_id(), "zookeeper session replaced");
        shared.session.send_modify(|session| {
            session.client = client;
            session.generation += 1;
        });
    }
    shared.lose_leases();
}

/// Waits until the session ends (`true`) or the registry is dropped
/// (`false`). Declares the leases lost when the session stays disconnected
/// for a third of its timeout: the client noticed the disconnection about
/// 0.45 timeouts after it last heard from the server, so that is ~0.8
/// timeouts in, before the server may expire the session and free the ids.
async fn follow_session(
    shared: &Shared,
    mut states: zk::StateWatcher,
    timeout: Duration,
    stopped: &mut watch::Receiver<()>,
) -> bool {
    let mut state = states.peek_state();
    let mut lose_at: Option<Instant> = None;
    let mut lost = false;
    loop {
        match state {
            s if s.is_terminated() => return true,
            zk::SessionState::Disconnected => {
                if !lost && lose_at.is_none() {
                    lose_at = Some(Instant::now() + timeout / 3);
                }
            }
            _ => {
                lose_at = None;
                lost = false;
            }
        }
        let deadline = lose_at;
        let lose = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.changed() => return false,
            next = states.changed() => state = next,
            () = lose => {
                tracing::warn!("zookeeper disconnected too long; worker-id leases are lost");
                shared.lose_leases();
                lose_at = None;
                lost = true;
            }
        }
    }
}

/// Connects a new client and re-creates the owned nodes in its session,
/// retrying until both work; `None` once the registry is dropped. Holds the
/// `owned` lock while re-creating, and the caller publishes the client after,
/// so registry writes wait and then see the new session.
async fn replace_session(shared: &Shared, stopped: &mut watch::Receiver<()>) -> Option<zk::Client> {
    let mut backoff = Duration::from_millis(100);
    // A new client whose session is fine but where re-creating failed
    // (connection loss) is kept for the next attempt.
    let mut kept: Option<zk::Client> = None;
    loop {
        let attempt = async {
            let client = match kept.take() {
                Some(client) if !client.state().is_terminated() => client,
                _ => connect_client(&shared.addr, shared.requested_timeout).await?,
            };
            let owned = shared.owned.lock().await;
            for node in owned.values() {
                let Ok(data) = encode(node) else { continue };
                let path = shared.node_path(&node.role, &node.node_id);
                if let Err(e) = put_ephemeral(&client, &path, &data).await {
                    kept = Some(client);
                    return Err(e);
                }
            }
            Ok(client)
        };
        let outcome = tokio::select! {
            _ = stopped.changed() => return None,
            outcome = attempt => outcome,
        };
        match outcome {
            Ok(client) => return Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "could not register again in a new zookeeper session; retrying")
            }
        }
        tokio::select! {
            _ = stopped.changed() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Attaches a second client to `session` and closes the session through it.
async fn close_twin(addr: &str, session: &zk::SessionInfo, timeout: Duration) -> Result<(), zk::Error> {
    let twin = zk::Client::connector()
        .with_session_timeout(timeout)
        .with_session(session.clone())
        .connect(addr)
        .await?;
    let mut states = twin.state_watcher();
    // Dropping the only handle of a (non-detached) client sends
    // CloseSession; the twin turns Closed once the server has done it.
    drop(twin);
    let closed = async { while !states.changed().await.is_terminated() {} };
    tokio::time::timeout(Duration::from_secs(5), closed).await.map_err(|_| zk::Error::Timeout)
}

async fn connect_client(addr: &str, session_timeout: Duration) -> Result<zk::Client, zk::Error> {
    zk::Client::connector().with_session_timeout(session_timeout).connect(addr).await
}

/// Creates the ephemeral node `path` with `data` in the client's session, or
/// rewrites it if the session already has it. A node at `path` left by
/// another session (this node's previous run, whose session has not timed
/// out yet) is replaced. Missing parent folders are created.
async fn put_ephemeral(client: &zk::Client, path: &str, data: &[u8]) -> Result<(), zk::Error> {
    let own_session = client.session_id().0;
    for _ in 0..WRITE_ATTEMPTS {
        match client.create(path, data, &EPHEMERAL).await {
            Ok(_) => return Ok(()),
            Err(zk::Error::NoNode) => client.mkdir(parent(path), &FOLDER).await?,
            Err(zk::Error::NodeExists) => match client.check_stat(path).await? {
                // Deleted since: create again.
                None => {}
                Some(stat) if stat.ephemeral_owner == own_session => {
                    match client.set_data(path, data, Some(stat.version)).await {
                        Ok(_) => return Ok(()),
                        Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(stat) => {
                    tracing::info!(
                        path,
                        owner = stat.ephemeral_owner,
                        "replacing a node left by another session"
                    );
                    match client.delete(path, Some(stat.version)).await {
                        Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                        Err(e) => return Err(e),
                    }
                }
            },
            Err(e) => return Err(e),
        }
    }
    Err(zk::Error::UnexpectedError(format!("{path} kept changing while being written")))
}

/// Lists a role folder and sets a children watch on it (creating the folder
/// if needed, since a folder that does not exist cannot be watched for
/// children).
async fn arm(client: &zk::Client, folder: &str) -> Result<(Vec<NodeInfo>, zk::OneshotWatcher), zk::Error> {
    client.mkdir(folder, &FOLDER).await?;
    let (children, watcher) = client.list_and_watch_children(folder).await?;
    let nodes = read_nodes(client, folder, children).await?;
    Ok((nodes, watcher))
}

/// Reads the nodes named `children` under `folder` in one round trip, sorted
/// by node id. A node deleted meanwhile is left out; so is one whose data is
/// not a NodeInfo (written by something else), with a warning, so that one
/// bad entry cannot hide a role's live nodes.
async fn read_nodes(
    client: &zk::Client,
    folder: &str,
    children: Vec<String>,
) -> Result<Vec<NodeInfo>, zk::Error> {
    let mut reader = client.new_multi_reader();
    for child in &children {
        reader.add_get_data(&format!("{folder}/{child}"))?;
    }
    let mut nodes = Vec::with_capacity(children.len());
    for (child, result) in children.iter().zip(reader.commit().await?) {
        match result {
            zk::MultiReadResult::Data { data, .. } => match serde_json::from_slice::<NodeInfo>(&data) {
                Ok(node) => nodes.push(node),
                Err(e) => {
                    tracing::warn!(folder, child, error = %e, "skipping a registry node that is not a NodeInfo")
                }
            },
            zk::MultiReadResult::Error { err: zk::Error::NoNode } => {}
            zk::MultiReadResult::Error { err } => return Err(err),
            // Only data reads were asked for.
            _ => {}
        }
    }
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(nodes)
}

/// Creates the node of the lowest free id under `folder`; `None` if all are
/// taken. Another process may take an id between the listing and the create:
/// the create then fails with `NodeExists` and the next free id is tried.
async fn claim_lowest_id(client: &zk::Client, folder: &str) -> Result<Option<(u16, String)>, zk::Error> {
    client.mkdir(folder, &FOLDER).await?;
    let taken: BTreeSet<u16> =
        client.list_children(folder).await?.iter().filter_map(|c| c.parse().ok()).collect();
    let holder = serde_json::json!({
        "pid": std::process::id(),
        "session": client.session_id().to_string(),
    })
    .to_string();
    for id in (0..WORKER_IDS).filter(|id| !taken.contains(id)) {
        let path = format!("{folder}/{id}");
        match client.create(&path, holder.as_bytes(), &EPHEMERAL).await {
            Ok(_) => return Ok(Some((id, path))),
            Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn encode(node: &NodeInfo) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(node).map_err(|e| StoreError::Backend(format!("encoding node info: {e}")))
}

fn parent(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[..i])
}

/// `root` as an absolute path: `tern`, `/tern` and `tern/` all give `/tern`.
fn absolute_root(root: &str) -> StoreResult<String> {
    let trimmed = root.trim_matches('/');
    if trimmed.is_empty() {
        return Err(StoreError::Backend("zookeeper root must not be empty".into()));
    }
    for part in trimmed.split('/') {
        check_name("zookeeper root component", part)?;
    }
    if trimmed.split('/').next() == Some("zookeeper") {
        return Err(StoreError::Backend("zookeeper root must not be under /zookeeper (reserved)".into()));
    }
    Ok(format!("/{trimmed}"))
}

/// Rejects a name that cannot be one path component.
fn check_name(what: &str, name: &str) -> StoreResult<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(StoreError::Backend(format!("invalid {what} {name:?} for a zookeeper path")));
    }
    Ok(())
}

/// Whether the error means the client's session is over for good.
fn session_ended(e: &zk::Error) -> bool {
    matches!(e, zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::SessionMoved)
}

fn store_error(e: zk::Error) -> StoreError {
    match e {
        zk::Error::ConnectionLoss
        | zk::Error::SessionExpired
        | zk::Error::ClientClosed
        | zk::Error::SessionMoved
        | zk::Error::Timeout
        | zk::Error::NoHosts
        | zk::Error::Throttled => StoreError::Unavailable(format!("zookeeper: {e}")),
        e => StoreError::Backend(format!("zookeeper: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_made_absolute() {
        assert_eq!(absolute_root("tern").expect("root"), "/tern");
        assert_eq!(absolute_root("/a/b/").expect("root"), "/a/b");
        assert!(absolute_root("/").is_err());
        assert!(absolute_root("a//b").is_err());
        assert!(absolute_root("zookeeper/x").is_err());
    }

    #[test]
    fn names_are_single_components() {
        assert!(check_name("role", "access-tcp").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(check_name("role", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parent_of_a_path() {
        assert_eq!(parent("/tern/nodes/r/n"), "/tern/nodes/r");
    }
}
