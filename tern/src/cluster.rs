//! Cluster mode: each role its own process on real engines — ZooKeeper for
//! discovery, Redis for placement, sequences, dedup and offline sets, Kafka
//! between the dispatchers and the storage services, and MongoDB/ScyllaDB
//! (or Redis, where those cannot run) for users, groups and history.
//!
//! [`run_role`] starts one role: it connects the engines, serves the role's
//! endpoints, registers the node in ZooKeeper, and on shutdown deregisters
//! before it stops serving so peers move away first.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tern_access_tcp::{AccessNode, AccessServices};
use tern_dispatcher::link::{DISPATCHER_ROLE, DispatcherLinks, LinkServer};
use tern_dispatcher::{Dispatcher, DispatcherBackends, DispatcherConfig};
use tern_group_svc::HistoryService;
use tern_group_svc::rpc::{GROUP_ROLE, RemoteHistory};
use tern_idgen::Snowflake;
use tern_idgen::rpc::{IDGEN_ROLE, IdGenService};
use tern_offline_svc::rpc::{OFFLINE_ROLE, RemoteOffline, RemotePushGateway};
use tern_offline_svc::{ConsumerBackends, Holding, OfflineService, SoleNode};
use tern_proto::BusNames;
use tern_router_auth::rpc::{ROUTER_AUTH_ROLE, RemoteSessionAuthority};
use tern_router_auth::{ACCESS_TCP_ROLE, AccessSelection, AuthConfig, AuthService, TokenSigner};
use tern_store::discovery::Peers;
use tern_store::kafka::{KafkaBus, KafkaOptions};
use tern_store::redis::RedisBackends;
use tern_store::zookeeper::ZkRegistry;
use tern_store::{HistoryStore, MetaStore, NodeInfo, Registry, SeparateStores};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AccessTcpConfig, ConfigError, DispatcherSection, OfflineSection};

/// The roles a cluster runs, one process each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    AccessTcp,
    RouterAuth,
    Dispatcher,
    OfflineSvc,
    GroupSvc,
    Idgen,
}

impl Role {
    /// The role's name in the registry and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::AccessTcp => ACCESS_TCP_ROLE,
            Role::RouterAuth => ROUTER_AUTH_ROLE,
            Role::Dispatcher => DISPATCHER_ROLE,
            Role::OfflineSvc => OFFLINE_ROLE,
            Role::GroupSvc => GROUP_ROLE,
            Role::Idgen => IDGEN_ROLE,
        }
    }
}

/// The configuration every role of a cluster reads (one file for all).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Holds generated TLS files when access nodes have no certificate.
    pub data_dir: PathBuf,
    pub engines: EnginesConfig,
    pub access_tcp: AccessTcpConfig,
    pub router_auth: ClusterAuthConfig,
    pub dispatcher: DispatcherSection,
    pub offline_svc: OfflineSection,
    pub idgen: IdgenConfig,
    /// Seconds a SIGTERM drain may take before the process exits anyway.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnginesConfig {
    /// Redis: placement, sequences, dedup, offline sets.
    pub redis_url: String,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// ZooKeeper connect string (`host:port[,host:port]`).
    pub zookeeper: String,
    /// Root znode under which tern registers.
    pub zookeeper_root: String,
    pub zookeeper_session_timeout_ms: u64,
    /// Kafka bootstrap brokers.
    pub kafka_brokers: String,
    /// Prefix of the topic and consumer-group names, so several
    /// deployments can share one broker.
    pub kafka_prefix: String,
    /// Partitions of the topics tern creates.
    pub kafka_partitions: u32,
    pub kafka_replication_factor: u32,
    /// Consumer session timeout: how long a dead consumer holds its partitions.
    pub kafka_session_timeout_ms: u64,
    /// One record per produced batch: needed on tansu 0.6, which skips the
    /// rest of a batch when a consumer resumes inside it; turn off on
    /// Apache Kafka or Redpanda for throughput (`KafkaOptions::single_record_batches`).
    pub kafka_single_record_batches: bool,
    /// A consumer without partitions for this long (at least two session
    /// timeouts) rejoins its group, a tansu 0.6 workaround; 0 turns it off,
    /// as it should be on Apache Kafka or Redpanda when consumers may
    /// outnumber partitions (`KafkaOptions::rejoin_when_unassigned`).
    pub kafka_rejoin_unassigned_secs: u64,
    /// How long the broker may hold a consumer's fetch that found no data
    /// (`fetch.wait.max.ms`). Apache Kafka answers a held fetch as soon as
    /// data arrives; tansu 0.6 holds it for the whole wait, so on tansu this
    /// bounds the bus hop's latency, at the price of one fetch per wait per
    /// idle consumer.
    pub kafka_fetch_wait_ms: u64,
    /// Users and groups: `redis`, or a `mongodb://` URI.
    pub meta: String,
    pub mongo_database: String,
    /// Group history: `redis`, or `scylla://host:port[,host:port]`.
    pub history: String,
    pub scylla_keyspace: String,
    pub scylla_replication_factor: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterAuthConfig {
    /// Hex-encoded HMAC secret for tokens, shared by every router-auth node
    /// (at least 32 hex digits). `TERN_TOKEN_SECRET` overrides it.
    pub token_secret: String,
    pub token_ttl_secs: u64,
    /// How ipList orders access nodes: `least-active`, `round-robin`,
    /// `random` or `consistent-hash` (by the `user` query parameter).
    pub access_selection: AccessSelection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdgenConfig {
    /// Ids per segment handed out by `NextSegment`.
    pub segment_step: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./tern-data"),
            engines: EnginesConfig::default(),
            access_tcp: AccessTcpConfig::default(),
            router_auth: ClusterAuthConfig::default(),
            dispatcher: DispatcherSection::default(),
            offline_svc: OfflineSection::default(),
            idgen: IdgenConfig::default(),
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for EnginesConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_prefix: "tern".into(),
            zookeeper: "127.0.0.1:2181".into(),
            zookeeper_root: "tern".into(),
            zookeeper_session_timeout_ms: 6_000,
            kafka_brokers: "127.0.0.1:9092".into(),
            kafka_prefix: "tern".into(),
            kafka_partitions: 4,
            kafka_replication_factor: 1,
            kafka_session_timeout_ms: 10_000,
            kafka_single_record_batches: true,
            kafka_rejoin_unassigned_secs: 12,
            kafka_fetch_wait_ms: 100,
            meta: "redis".into(),
            mongo_database: "tern".into(),
            history: "redis".into(),
            scylla_keyspace: "tern".into(),
            scylla_replication_factor: 1,
        }
    }
}

impl Default for ClusterAuthConfig {
    fn default() -> Self {
        Self {
            token_secret: String::new(),
            token_ttl_secs: 24 * 3600,
            access_selection: AccessSelection::LeastActive,
        }
    }
}

impl Default for IdgenConfig {
    fn default() -> Self {
        Self { segment_step: tern_idgen::rpc::DEFAULT_STEP }
    }
}

impl ClusterConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        crate::config::load_toml(path)
    }

    pub fn to_toml(&self) -> String {
        crate::config::to_toml(self)
    }

    /// Rejects values that would make a role misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::config::validate_access(&self.access_tcp)?;
        if self.router_auth.token_ttl_secs == 0 || self.dispatcher.max_group_members < 2 {
            return Err(ConfigError(
                "router_auth.token_ttl_secs must be > 0 and dispatcher.max_group_members at least 2".into(),
            ));
        }
        if self.engines.kafka_partitions == 0 || self.idgen.segment_step == 0 {
            return Err(ConfigError("engines.kafka_partitions and idgen.segment_step must be > 0".into()));
        }
        if !(1..=60_000).contains(&self.engines.kafka_fetch_wait_ms) {
            // 0 would make every idle consumer poll the broker in a busy loop.
            return Err(ConfigError("engines.kafka_fetch_wait_ms must be 1 to 60000".into()));
        }
        crate::config::validate_offline(&self.offline_svc)
    }
}

/// Per-process settings of one node (command line).
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    /// Main listener: clients for access-tcp, gRPC for the other roles.
    pub listen: String,
    /// Address peers or clients are given; empty = the bound address.
    pub advertise: String,
    /// access-tcp: the internal gRPC listener (pushes).
    pub internal_listen: String,
    /// router-auth: the HTTP API listener.
    pub http_listen: String,
}

/// Where a started role can be reached.
#[derive(Debug, Clone)]
pub struct RoleEndpoints {
    pub listen: std::net::SocketAddr,
    pub internal: Option<std::net::SocketAddr>,
    pub http: Option<std::net::SocketAddr>,
    pub ca_cert: Option<PathBuf>,
}

/// The engines a role uses, connected.
struct Engines {
    registry: Arc<ZkRegistry>,
    redis: RedisBackends,
}

impl Engines {
    async fn connect(config: &EnginesConfig) -> anyhow::Result<Self> {
        let registry = ZkRegistry::connect(
            &config.zookeeper,
            &config.zookeeper_root,
            Duration::from_millis(config.zookeeper_session_timeout_ms),
        )
        .await
        .with_context(|| format!("cannot reach ZooKeeper at {}", config.zookeeper))?;
        let redis = RedisBackends::connect(&config.redis_url, &config.redis_prefix)
            .await
            .with_context(|| format!("cannot reach Redis at {}", config.redis_url))?;
        Ok(Self { registry: Arc::new(registry), redis })
    }

    async fn bus(config: &EnginesConfig, client_id: &str) -> anyhow::Result<Arc<KafkaBus>> {
        let options = KafkaOptions {
            partitions: config.kafka_partitions,
            replication_factor: config.kafka_replication_factor,
            session_timeout: Duration::from_millis(config.kafka_session_timeout_ms),
            client_id: client_id.to_owned(),
            single_record_batches: config.kafka_single_record_batches,
            rejoin_when_unassigned: (config.kafka_rejoin_unassigned_secs > 0)
                .then(|| Duration::from_secs(config.kafka_rejoin_unassigned_secs)),
            fetch_wait: Duration::from_millis(config.kafka_fetch_wait_ms),
            ..KafkaOptions::default()
        };
        let bus = KafkaBus::connect(&config.kafka_brokers, options)
            .await
            .with_context(|| format!("cannot reach Kafka at {}", config.kafka_brokers))?;
        let names = BusNames::with_prefix(&config.kafka_prefix);
        bus.ensure_topics(&[names.messages_topic.as_str()])
            .await
            .context("cannot create the Kafka topics")?;
        Ok(Arc::new(bus))
    }

    async fn meta(&self, config: &EnginesConfig) -> anyhow::Result<Arc<dyn MetaStore>> {
        if config.meta == "redis" {
            return Ok(self.redis.meta.clone());
        }
        if config.meta.starts_with("mongodb://") || config.meta.starts_with("mongodb+srv://") {
            let store = tern_store::mongo::MongoMetaStore::connect(&config.meta, &config.mongo_database)
                .await
                .context("cannot reach MongoDB")?;
            return Ok(Arc::new(store));
        }
        anyhow::bail!("engines.meta must be \"redis\" or a mongodb:// URI, not {:?}", config.meta)
    }

    async fn history(&self, config: &EnginesConfig) -> anyhow::Result<Arc<dyn HistoryStore>> {
        if config.history == "redis" {
            return Ok(self.redis.history.clone());
        }
        if let Some(nodes) = config.history.strip_prefix("scylla://") {
            let store = tern_store::scylla::ScyllaHistoryStore::connect(
                nodes,
                &config.scylla_keyspace,
                config.scylla_replication_factor,
            )
            .await
            .context("cannot reach ScyllaDB")?;
            return Ok(Arc::new(store));
        }
        anyhow::bail!("engines.history must be \"redis\" or scylla://host:port,…, not {:?}", config.history)
    }
}

fn token_secret(config: &ClusterAuthConfig) -> anyhow::Result<Vec<u8>> {
    let hex = std::env::var("TERN_TOKEN_SECRET").unwrap_or_else(|_| config.token_secret.clone());
    anyhow::ensure!(
        hex.len() >= 32 && hex.len().is_multiple_of(2) && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "router_auth.token_secret (or TERN_TOKEN_SECRET) must be at least 32 hex digits, shared by every router-auth node"
    );
    (0..hex.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&hex[i..i + 2], 16)?)).collect()
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot bind {what} on {addr}"))
}

fn advertised(settings: &NodeSettings, bound: std::net::SocketAddr) -> String {
    if settings.advertise.is_empty() { bound.to_string() } else { settings.advertise.clone() }
}

/// Serves gRPC on `listener` until `stop` is cancelled.
async fn serve_grpc(
    listener: TcpListener,
    router: tonic::transport::server::Router,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // The builder's `tcp_nodelay` does not apply to an incoming stream of
    // our own: without TCP_NODELAY a small response waits for the peer's
    // delayed ACK (40 ms per call on Linux).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await.context("gRPC server failed")
}

/// Registers the node, runs `work` until `shutdown`, deregisters first on
/// the way out so peers stop sending before the service stops.
/// Runs a role's bus consumer. One that ends on its own (an error it cannot
/// recover from: the bus failed, or a batch could not be finished) stops the
/// role's server too, so the process exits with that error and its
/// supervisor restarts it, resuming from the last committed batch; a role
/// serving without its consumer would leave messages undelivered.
async fn consumer_stops_role<T>(stop: CancellationToken, consumer: impl Future<Output = T>) -> T {
    let result = consumer.await;
    stop.cancel();
    result
}

async fn registered<F>(
    registry: &ZkRegistry,
    node: NodeInfo,
    shutdown: impl Future<Output = ()>,
    stop: CancellationToken,
    work: F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    registry.register(&node).await.context("cannot register in ZooKeeper")?;
    tokio::pin!(work);
    let outcome = tokio::select! {
        result = &mut work => Some(result),
        _ = shutdown => None,
    };
    if let Err(e) = registry.deregister(&node.node_id).await {
        tracing::warn!(error = %e, "deregistration failed");
    }
    match outcome {
        Some(result) => result,
        None => {
            // Requests already routed here finish before the server stops.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.cancel();
            work.await
        }
    }
}

/// Runs one role until `shutdown` resolves. `ready` is called once its
/// listeners are bound.
pub async fn run_role(
    role: Role,
    config: ClusterConfig,
    settings: NodeSettings,
    ready: impl FnOnce(&RoleEndpoints),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let engines = Engines::connect(&config.engines).await?;
    let registry = engines.registry.clone();
    let stop = CancellationToken::new();
    let node = |addr: String, internal_addr: String| NodeInfo {
        node_id: settings.node_id.clone(),
        role: role.name().to_owned(),
        addr,
        internal_addr,
        connections: 0,
    };
    match role {
        Role::RouterAuth => {
            let grpc = bind(&settings.listen, "router-auth gRPC").await?;
            let http = bind(&settings.http_listen, "router-auth HTTP").await?;
            let auth = Arc::new(AuthService::new(
                engines.meta(&config.engines).await?,
                engines.redis.sessions.clone(),
                registry.clone(),
                TokenSigner::new(token_secret(&config.router_auth)?),
                AuthConfig {
                    token_ttl: Duration::from_secs(config.router_auth.token_ttl_secs),
                    access_selection: config.router_auth.access_selection,
                },
            ));
            let endpoints = RoleEndpoints {
                listen: grpc.local_addr()?,
                internal: None,
                http: Some(http.local_addr()?),
                ca_cert: None,
            };
            let info = node(advertised(&settings, endpoints.listen), String::new());
            let router =
                tonic::transport::Server::builder().add_service(tern_router_auth::rpc::service(auth.clone()));
            ready(&endpoints);
            let cleaner = tern_router_auth::clean_departed_placements(
                registry.clone(),
                engines.redis.sessions.clone(),
                // A node whose session merely expired re-registers within
                // about a session timeout.
                Duration::from_millis(config.engines.zookeeper_session_timeout_ms),
                stop.clone().cancelled_owned(),
            );
            let work = async {
                let http_server = tern_router_auth::http::serve(auth, http, stop.clone().cancelled_owned());
                let (grpc_result, http_result, cleaned) =
                    tokio::join!(serve_grpc(grpc, router, stop.clone()), http_server, cleaner);
                grpc_result?;
                cleaned.context("placement cleaner failed")?;
                http_result.context("router-auth HTTP failed")
            };
            registered(&registry, info, shutdown, stop.clone(), work).await
        }
        Role::Dispatcher => {
            let listener = bind(&settings.listen, "dispatcher gRPC").await?;
            let lease = registry.lease_worker_id("snowflake").await.context("cannot lease a worker id")?;
            tracing::info!(worker = lease.id, "leased snowflake worker id");
            let snowflake = Arc::new(Snowflake::new(lease.id)?);
            tokio::spawn(keep_worker_lease(registry.clone(), snowflake.clone(), lease, stop.clone()));
            let dispatcher = Arc::new(Dispatcher::new(
                {
                    let bus = Engines::bus(&config.engines, &settings.node_id).await?;
                    DispatcherBackends {
                        meta: engines.meta(&config.engines).await?,
                        log: Arc::new(SeparateStores {
                            sequences: engines.redis.sequences.clone(),
                            dedup: engines.redis.dedup.clone(),
                            bus: bus.clone(),
                        }),
                        dedup: engines.redis.dedup.clone(),
                        bus,
                    }
                },
                snowflake,
                DispatcherConfig {
                    dedup_ttl: Duration::from_secs(config.dispatcher.dedup_ttl_secs),
                    max_group_members: config.dispatcher.max_group_members,
                    bus: BusNames::with_prefix(&config.engines.kafka_prefix),
                },
            ));
            let endpoints =
                RoleEndpoints { listen: listener.local_addr()?, internal: None, http: None, ca_cert: None };
            let info = node(advertised(&settings, endpoints.listen), String::new());
            let router = tonic::transport::Server::builder()
                .add_service(LinkServer::new(dispatcher, stop.clone()).into_service());
            ready(&endpoints);
            let work = serve_grpc(listener, router, stop.clone());
            registered(&registry, info, shutdown, stop.clone(), work).await
        }
        Role::OfflineSvc => {
            let listener = bind(&settings.listen, "offline-svc gRPC").await?;
            let access_nodes = Peers::follow(&*registry, ACCESS_TCP_ROLE).await?;
            let bus = Engines::bus(&config.engines, &settings.node_id).await?;
            let offline_config = config.offline_svc.offline_config(config.access_tcp.push_ack_timeout_ms);
            let offline =
                Arc::new(OfflineService::new(engines.redis.offline.clone(), offline_config.clone()));
            let endpoints =
                RoleEndpoints { listen: listener.local_addr()?, internal: None, http: None, ca_cert: None };
            let info = node(advertised(&settings, endpoints.listen), String::new());
            let router = tonic::transport::Server::builder()
                .add_service(tern_offline_svc::rpc::service(offline.clone()));
            ready(&endpoints);
            let consumer = tern_offline_svc::run_consumer(
                bus,
                BusNames::with_prefix(&config.engines.kafka_prefix),
                ConsumerBackends {
                    meta: engines.meta(&config.engines).await?,
                    store: engines.redis.offline.clone(),
                    sessions: engines.redis.sessions.clone(),
                    held: offline.held_writes(),
                    holding: Holding::WhileSoleNode(SoleNode::follow(
                        Peers::follow(&*registry, OFFLINE_ROLE).await?,
                    )),
                },
                RemotePushGateway::start(access_nodes),
                offline_config,
                stop.clone().cancelled_owned(),
            );
            let work = async {
                let consumer = consumer_stops_role(stop.clone(), consumer);
                let (grpc, consumed) = tokio::join!(serve_grpc(listener, router, stop.clone()), consumer);
                grpc?;
                consumed.context("offline consumer failed")
            };
            registered(&registry, info, shutdown, stop.clone(), work).await
        }
        Role::GroupSvc => {
            let listener = bind(&settings.listen, "group-svc gRPC").await?;
            let bus = Engines::bus(&config.engines, &settings.node_id).await?;
            let history_store = engines.history(&config.engines).await?;
            let history =
                Arc::new(HistoryService::new(history_store.clone(), engines.meta(&config.engines).await?));
            let endpoints =
                RoleEndpoints { listen: listener.local_addr()?, internal: None, http: None, ca_cert: None };
            let info = node(advertised(&settings, endpoints.listen), String::new());
            let router =
                tonic::transport::Server::builder().add_service(tern_group_svc::rpc::service(history));
            ready(&endpoints);
            let names = BusNames::with_prefix(&config.engines.kafka_prefix);
            let consumer =
                tern_group_svc::run_consumer(bus, names, history_store, stop.clone().cancelled_owned());
            let work = async {
                let consumer = consumer_stops_role(stop.clone(), consumer);
                let (grpc, consumed) = tokio::join!(serve_grpc(listener, router, stop.clone()), consumer);
                grpc?;
                consumed.context("history consumer failed")
            };
            registered(&registry, info, shutdown, stop.clone(), work).await
        }
        Role::Idgen => {
            let listener = bind(&settings.listen, "idgen gRPC").await?;
            let lease = registry.lease_worker_id("snowflake").await.context("cannot lease a worker id")?;
            let snowflake = Arc::new(Snowflake::new(lease.id)?);
            tokio::spawn(keep_worker_lease(registry.clone(), snowflake.clone(), lease, stop.clone()));
            let service =
                IdGenService::new(snowflake, engines.redis.sequences.clone(), config.idgen.segment_step);
            let endpoints =
                RoleEndpoints { listen: listener.local_addr()?, internal: None, http: None, ca_cert: None };
            let info = node(advertised(&settings, endpoints.listen), String::new());
            let router = tonic::transport::Server::builder().add_service(service.into_service());
            ready(&endpoints);
            let work = serve_grpc(listener, router, stop.clone());
            registered(&registry, info, shutdown, stop.clone(), work).await
        }
        Role::AccessTcp => run_access(config, settings, engines, ready, shutdown).await,
    }
}

/// Keeps `snowflake` on a worker id this process holds. When the lease is
/// lost (ZooKeeper session expired, or disconnected long enough that it may
/// be), issuing stops at once — another process may take the id — and
/// resumes under a new lease.
async fn keep_worker_lease(
    registry: Arc<ZkRegistry>,
    snowflake: Arc<Snowflake>,
    mut lease: tern_store::zookeeper::WorkerLease,
    stop: CancellationToken,
) {
    loop {
        let mut lost = lease.lost.clone();
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = lease.release().await;
                return;
            }
            _ = async {
                // The guard wait_for returns must not live across an await.
                let _ = lost.wait_for(|lost| *lost).await.map(|_| ());
            } => {}
        }
        snowflake.suspend();
        tracing::warn!(worker = lease.id, "worker id lease lost; ids suspended until a new lease");
        drop(lease);
        lease = loop {
            match registry.lease_worker_id("snowflake").await {
                Ok(lease) => break lease,
                Err(e) => tracing::warn!(error = %e, "cannot lease a worker id yet"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        if snowflake.resume(lease.id).is_ok() {
            tracing::info!(worker = lease.id, "ids resumed under a new worker id");
        }
    }
}

async fn run_access(
    config: ClusterConfig,
    settings: NodeSettings,
    engines: Engines,
    ready: impl FnOnce(&RoleEndpoints),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let registry = engines.registry.clone();
    let listener = tern_access_tcp::bind_client_listener(&settings.listen)
        .await
        .with_context(|| format!("cannot bind access-tcp on {}", settings.listen))?;
    let internal_listen =
        if settings.internal_listen.is_empty() { "127.0.0.1:0" } else { &settings.internal_listen };
    let internal = bind(internal_listen, "access-tcp internal gRPC").await?;
    let (tls, ca_cert) = crate::standalone::tls_setup(&config.access_tcp, &config.data_dir)?;

    let dispatchers = Peers::follow(&*registry, DISPATCHER_ROLE).await?;
    let services = AccessServices {
        auth: Arc::new(RemoteSessionAuthority::new(Peers::follow(&*registry, ROUTER_AUTH_ROLE).await?)),
        dispatch: DispatcherLinks::start(settings.node_id.clone(), dispatchers),
        offline: Arc::new(RemoteOffline::new(Peers::follow(&*registry, OFFLINE_ROLE).await?)),
        history: Arc::new(RemoteHistory::new(Peers::follow(&*registry, GROUP_ROLE).await?)),
        sessions: engines.redis.sessions.clone(),
        registry: registry.clone(),
        remote_kick: Some(tern_access_tcp::rpc::PeerKick::new(
            Peers::follow(&*registry, ACCESS_TCP_ROLE).await?,
        )),
    };
    let listen = listener.local_addr()?;
    let internal_addr = internal.local_addr()?;
    let mut access_config = crate::standalone::access_config(&config.access_tcp, config.shutdown_grace_secs);
    access_config.node_id = settings.node_id.clone();
    access_config.advertise_addr = advertised(&settings, listen);
    access_config.internal_addr = internal_addr.to_string();
    let node = AccessNode::new(access_config, services);

    let stop_internal = CancellationToken::new();
    let router = tonic::transport::Server::builder().add_service(tern_access_tcp::rpc::service(node.clone()));
    let internal_server = tokio::spawn(serve_grpc(internal, router, stop_internal.clone()));
    ready(&RoleEndpoints { listen, internal: Some(internal_addr), http: None, ca_cert });
    // AccessNode::run registers, reports its load every 3 s, and drains.
    let result = node.run(listener, tls, shutdown).await.context("access-tcp failed");
    stop_internal.cancel();
    let _ = internal_server.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_a_zero_fetch_wait_is_refused() {
        let mut config = ClusterConfig::default();
        config.validate().unwrap();
        config.engines.kafka_fetch_wait_ms = 0;
        let refused = config.validate().unwrap_err();
        assert!(refused.to_string().contains("kafka_fetch_wait_ms"), "{refused}");
    }
}
