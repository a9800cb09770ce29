//! access-tcp: the TLS TCP access node.
//!
//! It holds client connections (one task per connection, which also drains
//! the connection's bounded outbound queue), turns frames into calls on the
//! services behind it, and delivers pushes to the connections it holds.
//!
//! Slow-consumer policy: the outbound queue of a connection is bounded
//! ([`AccessConfig::outbound_queue`]). Responses wait for room (the client's
//! own reads are slowed down); a push that finds the queue full closes the
//! connection (disconnect-and-resync): every pushed message is still in the
//! offline store, and the client pulls it after reconnecting. A SYNC notice
//! from offline-svc (a burst of large-group messages to pull) follows the
//! same policy.

mod connection;
pub mod rpc;
pub mod tls;
mod unacked;

/// Connections the kernel queues for `accept` on the client listener.
/// tokio's default (1,024) overflows in a reconnect storm (every client of a
/// failed node arriving at once): the kernel then drops handshakes and the
/// clients retry only after a 1 s SYN timeout, while this node idles. The
/// kernel caps it at `net.core.somaxconn` (4,096 by default).
pub const ACCEPT_BACKLOG: u32 = 4_096;

/// Binds the client listener on `addr` (`host:port`; the first address
/// that binds wins) with an [`ACCEPT_BACKLOG`]-deep accept queue.
pub async fn bind_client_listener(addr: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restarted node can rebind at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved).and_then(|()| socket.listen(ACCEPT_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr} resolves to no address"))
    }))
}

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
// Both maps below are used once or twice per pushed message; foldhash
// hashes a u64 in a few instructions, SipHash in dozens.
use foldhash::{HashMap, HashMapExt};
use tern_dispatcher::DispatchService;
use tern_group_svc::HistoryApi;
use tern_offline_svc::{OfflineApi, PushGateway};
use tern_proto::pb::{self, NoticeKind};
use tern_proto::{DEFAULT_MAX_BODY_LEN, Frame, RequestType};
use tern_router_auth::{ACCESS_TCP_ROLE, Identity, SessionAuthority};
use tern_store::{NodeInfo, Placement, Registry, SessionStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Settings of one access node.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Unique id of this node in the registry and in placements.
    pub node_id: String,
    /// Address clients are told to connect to (ipList).
    pub advertise_addr: String,
    /// Address of this node's internal gRPC endpoint (pushes from
    /// offline-svc in cluster mode); empty in standalone.
    pub internal_addr: String,
    /// Largest accepted frame body.
    pub max_body_len: u32,
    /// Heartbeat interval suggested to clients at login.
    pub heartbeat_interval: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for the TLS handshake, and then again for a successful
    /// LOGIN (heartbeats before it do not extend it).
    pub handshake_timeout: Duration,
    /// Frames queued per connection before the slow-consumer policy applies.
    pub outbound_queue: usize,
    /// A push not ACKed within this time makes the node tell the client to
    /// pull (NOTICE SYNC); the message itself stays in the offline store.
    pub push_ack_timeout: Duration,
    /// How long a drain waits for connections to close.
    pub drain_grace: Duration,
    /// How often the live connection count is written to the registry.
    pub load_report_interval: Duration,
}

impl AccessConfig {
    pub fn new(node_id: impl Into<String>, advertise_addr: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            advertise_addr: advertise_addr.into(),
            internal_addr: String::new(),
            max_body_len: DEFAULT_MAX_BODY_LEN,
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            handshake_timeout: Duration::from_secs(10),
            outbound_queue: 1024,
            push_ack_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(10),
            load_report_interval: Duration::from_secs(3),
        }
    }
}

/// Closes a connection on another access node (cluster mode), when a newer
/// login of the same device lands here. Best effort.
pub trait RemoteKick: Send + Sync + 'static {
    fn kick(&self, placement: &Placement, reason: &str);
}

/// The services an access node calls.
#[derive(Clone)]
pub struct AccessServices {
    pub auth: Arc<dyn SessionAuthority>,
    pub dispatch: Arc<dyn DispatchService>,
    pub offline: Arc<dyn OfflineApi>,
    pub history: Arc<dyn HistoryApi>,
    pub sessions: Arc<dyn SessionStore>,
    pub registry: Arc<dyn Registry>,
    /// Other access nodes, for kicks; `None` when this is the only one.
    pub remote_kick: Option<Arc<dyn RemoteKick>>,
}

/// A connection as seen from outside its task.
struct ConnHandle {
    /// Pushes and notices for the connection; also how it is asked to close
    /// (slow consumer, kick, drain).
    outbox: connection::Outbox,
    identity: Mutex<Option<Identity>>,
    /// Pushed message ids not yet ACKed, with the time of the push.
    unacked: Mutex<unacked::Unacked>,
}

impl ConnHandle {
    fn new(outbound_queue: usize) -> Self {
        Self {
            outbox: connection::Outbox::new(outbound_queue),
            identity: Mutex::new(None),
            unacked: Mutex::default(),
        }
    }
}

/// One access node: its connections and the services behind it.
pub struct AccessNode {
    config: AccessConfig,
    services: AccessServices,
    connections: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    next_connection_id: AtomicU64,
    /// Set when the drain starts: logins are refused from then on, so no
    /// placement outlives the node.
    draining: std::sync::atomic::AtomicBool,
}

impl AccessNode {
    pub fn new(config: AccessConfig, services: AccessServices) -> Arc<Self> {
        // Connection ids start from the clock so a restarted node does not
        // reuse ids that stale placements might still name.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Arc::new(Self {
            config,
            services,
            connections: Mutex::new(HashMap::new()),
            next_connection_id: AtomicU64::new(start),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    /// Live connections (logged in or not).
    pub fn connection_count(&self) -> usize {
        self.lock_connections().len()
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnHandle>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connection(&self, id: u64) -> Option<Arc<ConnHandle>> {
        self.lock_connections().get(&id).cloned()
    }

    /// The connection a placement names, if it is still logged in as that
    /// user and device (a placement can be stale).
    fn placed_connection(&self, placement: &Placement) -> Option<Arc<ConnHandle>> {
        let conn = self.connection(placement.connection_id)?;
        let matches = conn
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|id| id.user_id == placement.user_id && id.device_id == placement.device_id);
        matches.then_some(conn)
    }

    /// Closes the connection of `placement` (on this node) with a KICKED
    /// notice, if it still belongs to that user and device.
    pub fn kick(&self, placement: &Placement, reason: &str) {
        if self.placed_connection(placement).is_some() {
            self.close_with_notice(placement.connection_id, NoticeKind::Kicked, reason);
        }
    }

    /// Sends a notice to a connection and closes it.
    fn close_with_notice(&self, connection_id: u64, kind: NoticeKind, reason: &str) {
        if let Some(conn) = self.connection(connection_id) {
            let notice = pb::Notice { kind: kind as i32, reason: reason.to_owned() };
            let _ = conn.outbox.push(Frame::new(RequestType::Notice, 0, &notice));
            conn.outbox.close();
        }
    }

    async fn report_load(&self) {
        let count = self.connection_count() as u64;
        if let Err(e) = self.services.registry.update_connections(&self.config.node_id, count).await {
            tracing::warn!(error = %e, "connection count not reported");
        }
    }

    /// Accepts connections on `listener` until `shutdown` resolves, then
    /// drains: deregisters, tells every client to reconnect elsewhere, clears
    /// this node's placements and returns once the connections are closed or
    /// the grace period is over. `tls` `None` serves plaintext.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let registry = &self.services.registry;
        // Placements left by a previous run of this node (crash) are stale.
        if let Err(e) = self.services.auth.detach_node(&self.config.node_id).await {
            tracing::warn!(error = %e, "stale placements not cleared");
        }
        let info = NodeInfo {
            node_id: self.config.node_id.clone(),
            role: ACCESS_TCP_ROLE.to_owned(),
            addr: self.config.advertise_addr.clone(),
            internal_addr: self.config.internal_addr.clone(),
            connections: 0,
        };
        registry.register(&info).await.map_err(std::io::Error::other)?;
        tracing::info!(node = %self.config.node_id, addr = %self.config.advertise_addr, tls = tls.is_some(), "access-tcp serving");

        let stop_reporting = CancellationToken::new();
        let reporter = {
            let node = self.clone();
            let stop = stop_reporting.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(node.config.load_report_interval);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => node.report_load().await,
                    }
                }
            })
        };

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        connection::spawn(self.clone(), stream, peer, tls.as_ref());
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        stop_reporting.cancel();
        let _ = reporter.await;
        self.drain().await;
        Ok(())
    }

    async fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let node_id = &self.config.node_id;
        if let Err(e) = self.services.registry.deregister(node_id).await {
            tracing::warn!(error = %e, "deregistration failed");
        }
        let ids: Vec<u64> = self.lock_connections().keys().copied().collect();
        tracing::info!(connections = ids.len(), "draining: telling clients to reconnect");
        for id in ids {
            self.close_with_notice(id, NoticeKind::Reconnect, "server is shutting down; reconnect");
        }
        let deadline = Instant::now() + self.config.drain_grace;
        while self.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match self.services.auth.detach_node(node_id).await {
            Ok(n) => tracing::info!(placements = n, "drained"),
            Err(e) => tracing::warn!(error = %e, "placements not cleared at drain"),
        }
    }
}

impl AccessNode {
    /// Queues a server-initiated frame (push or notice) on `conn`. Policy
    /// when the outbound queue is full: disconnect-and-resync — the
    /// connection is closed, and the client pulls the offline store after
    /// reconnecting, which holds every pushed message and everything a
    /// SYNC notice pointed at.
    fn deliver(conn: &ConnHandle, placement: &Placement, frames: impl IntoIterator<Item = Frame>) {
        match conn.outbox.push_all(frames) {
            Ok(()) => {}
            Err(connection::Refused::Full) => {
                tracing::warn!(conn = placement.connection_id, user = %placement.user_id, "slow consumer: outbound queue full, disconnecting");
                conn.outbox.close();
            }
            Err(connection::Refused::Closed) => {}
        }
    }
}

impl PushGateway for AccessNode {
    fn push(&self, placement: &Placement, msg_id: u64, message: Bytes) {
        self.push_run(placement, &[(msg_id, message)]);
    }

    /// One connection lookup, one lock of its unACKed pushes and of its
    /// outbound queue, and one wake-up for the whole run.
    fn push_run(&self, placement: &Placement, messages: &[(u64, Bytes)]) {
        let Some(conn) = self.placed_connection(placement) else { return };
        let pushed = messages.iter().map(|(msg_id, _)| *msg_id);
        conn.unacked.lock().unwrap_or_else(|e| e.into_inner()).pushed(pushed, Instant::now());
        let frames = messages.iter().map(|(_, message)| Frame {
            client_version: tern_proto::PROTOCOL_VERSION,
            request_type: RequestType::PushMessage as u32,
            sequence: 0,
            body: message.clone(),
        });
        Self::deliver(&conn, placement, frames);
    }

    fn sync_notice(&self, placement: &Placement, reason: &str) {
        let Some(conn) = self.placed_connection(placement) else { return };
        let notice = pb::Notice { kind: NoticeKind::Sync as i32, reason: reason.to_owned() };
        Self::deliver(&conn, placement, [Frame::new(RequestType::Notice, 0, &notice)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More connections than tokio's default backlog (1,024) complete their
    /// handshake while nobody accepts: the storm waits in the queue instead
    /// of being dropped into SYN retries.
    #[tokio::test]
    async fn the_client_listener_queues_a_storm_beyond_the_default_backlog() {
        let listener = bind_client_listener("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut connections = Vec::new();
        for i in 0..1_100 {
            let connect = tokio::net::TcpStream::connect(addr);
            // A dropped SYN is retried after 1 s: far beyond this wait.
            match tokio::time::timeout(Duration::from_millis(500), connect).await {
                Ok(Ok(stream)) => connections.push(stream),
                Ok(Err(e)) => panic!("connection {i} failed: {e}"),
                Err(_) => panic!("connection {i} was not queued (accept queue full)"),
            }
        }
        let (_first, _) = listener.accept().await.expect("the queued connections are accepted");
    }

    #[tokio::test]
    async fn a_bad_listen_address_is_a_clear_error() {
        let e = bind_client_listener("no-port").await.expect_err("an address without a port");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        let e = bind_client_listener("192.0.2.1:0").await.expect_err("an address this host does not have");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable, "{e}");
    }
}
