//! `tern standalone`: every role in one process on embedded backends.
//!
//! The roles are wired exactly as in a cluster, through the same service
//! traits; only the backends (redb files, in-process bus and registry) and
//! the transport between roles (direct calls) differ.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_access_tcp::{AccessNode, AccessServices};
use tern_dispatcher::{Dispatcher, DispatcherBackends, DispatcherConfig};
use tern_group_svc::HistoryService;
use tern_offline_svc::{ConsumerBackends, Holding, OfflineService};
use tern_proto::BusNames;
use tern_router_auth::{AuthConfig, AuthService, TokenSigner};
use tern_store::embedded::EmbeddedBackends;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AccessTcpConfig, StandaloneConfig};

/// Id of the one access node of a standalone process.
pub const NODE_ID: &str = "standalone-access-tcp-0";

/// Where a started server can be reached.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub access_tcp: SocketAddr,
    pub router_auth: SocketAddr,
    /// CA certificate clients trust (None with plaintext or a configured cert).
    pub ca_cert: Option<PathBuf>,
    pub tls: bool,
}

/// Reads the token secret, creating 32 random bytes on first start. Kept in
/// the data directory so tokens survive restarts.
fn token_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join("token.key");
    if let Ok(hex) = std::fs::read_to_string(&path) {
        return decode_hex(hex.trim()).with_context(|| format!("{} is corrupt", path.display()));
    }
    let secret: [u8; 32] = rand::random();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &hex).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret.to_vec())
}

fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(hex.len() >= 32 && hex.len().is_multiple_of(2), "secret must be at least 16 hex bytes");
    (0..hex.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&hex[i..i + 2], 16)?)).collect()
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

/// The access node's TLS acceptor: the configured certificate, none with
/// `plaintext`, or a private CA and server certificate generated under
/// `<data_dir>/tls` on first start (whose CA path is returned for clients).
pub fn tls_setup(
    access: &AccessTcpConfig,
    data_dir: &Path,
) -> anyhow::Result<(Option<tokio_rustls::TlsAcceptor>, Option<PathBuf>)> {
    if access.plaintext {
        return Ok((None, None));
    }
    if !access.tls_cert.is_empty() {
        let paths = tern_access_tcp::tls::CertPaths {
            cert: access.tls_cert.clone().into(),
            key: access.tls_key.clone().into(),
        };
        return Ok((Some(tern_access_tcp::tls::acceptor(&[paths])?), None));
    }
    let generated = tern_access_tcp::tls::ensure_self_signed(&data_dir.join("tls"), &[])?;
    if generated.created {
        tracing::info!(ca = %generated.ca_cert.display(), "created a private CA and server certificates");
    }
    Ok((Some(tern_access_tcp::tls::acceptor(&generated.server)?), Some(generated.ca_cert)))
}

/// Access-node settings from the `[access_tcp]` section; the caller fills
/// in the node id and addresses.
pub fn access_config(a: &AccessTcpConfig, shutdown_grace_secs: u64) -> tern_access_tcp::AccessConfig {
    let mut config = tern_access_tcp::AccessConfig::new("", "");
    config.max_body_len = a.max_body_bytes;
    config.heartbeat_interval = Duration::from_millis(a.heartbeat_interval_ms);
    config.idle_timeout = Duration::from_millis(a.idle_timeout_ms);
    config.outbound_queue = a.outbound_queue;
    config.push_ack_timeout = Duration::from_millis(a.push_ack_timeout_ms);
    config.drain_grace = Duration::from_secs(shutdown_grace_secs).saturating_sub(Duration::from_secs(1));
    config
}

/// Starts every role and serves until `shutdown` resolves, then drains.
/// `ready` is called once all listeners are bound.
pub async fn run(
    config: StandaloneConfig,
    ready: impl FnOnce(&Endpoints),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let backends = EmbeddedBackends::open(data_dir).context("cannot open the embedded backends")?;

    let access_listener = tern_access_tcp::bind_client_listener(&config.access_tcp.listen)
        .await
        .with_context(|| format!("cannot bind access-tcp on {}", config.access_tcp.listen))?;
    let http_listener = TcpListener::bind(&config.router_auth.listen)
        .await
        .with_context(|| format!("cannot bind router-auth on {}", config.router_auth.listen))?;

    let (tls, ca_cert) = tls_setup(&config.access_tcp, data_dir)?;

    let ids = Arc::new(tern_idgen::Snowflake::new(0)?);
    let auth = Arc::new(AuthService::new(
        backends.meta.clone(),
        backends.sessions.clone(),
        backends.registry.clone(),
        TokenSigner::new(token_secret(data_dir)?),
        AuthConfig {
            token_ttl: Duration::from_secs(config.router_auth.token_ttl_secs),
            ..AuthConfig::default()
        },
    ));
    let dispatcher = Arc::new(Dispatcher::new(
        DispatcherBackends {
            meta: backends.meta.clone(),
            log: backends.log.clone(),
            dedup: backends.dedup.clone(),
            bus: backends.bus.clone(),
        },
        ids,
        DispatcherConfig {
            dedup_ttl: Duration::from_secs(config.dispatcher.dedup_ttl_secs),
            max_group_members: config.dispatcher.max_group_members,
            bus: BusNames::default(),
        },
    ));
    let offline_config = config.offline_svc.offline_config(config.access_tcp.push_ack_timeout_ms);
    let offline = Arc::new(OfflineService::new(backends.offline.clone(), offline_config.clone()));
    let held_writes = offline.held_writes();
    let history = Arc::new(HistoryService::new(backends.history.clone(), backends.meta.clone()));

    let access_addr = access_listener.local_addr()?;
    let advertise = if config.access_tcp.advertise.is_empty() {
        access_addr.to_string()
    } else {
        config.access_tcp.advertise.clone()
    };
    let mut access = access_config(&config.access_tcp, config.shutdown_grace_secs);
    access.node_id = NODE_ID.to_owned();
    access.advertise_addr = advertise;
    let node = AccessNode::new(
        access,
        AccessServices {
            auth: auth.clone(),
            dispatch: dispatcher,
            offline,
            history,
            sessions: backends.sessions.clone(),
            registry: backends.registry.clone(),
            remote_kick: None,
        },
    );

    let stop = CancellationToken::new();
    let consumer_failed = CancellationToken::new();
    let watch = (stop.clone(), consumer_failed.clone());
    let offline_consumer = tokio::spawn(watched(
        "offline-svc",
        watch.clone(),
        tern_offline_svc::run_consumer(
            backends.bus.clone(),
            BusNames::default(),
            ConsumerBackends {
                meta: backends.meta.clone(),
                store: backends.offline.clone(),
                sessions: backends.sessions.clone(),
                held: held_writes,
                holding: Holding::Always,
            },
            node.clone(),
            offline_config,
            stop.clone().cancelled_owned(),
        ),
    ));
    let group_consumer = tokio::spawn(watched(
        "group-svc",
        watch,
        tern_group_svc::run_consumer(
            backends.bus.clone(),
            BusNames::default(),
            backends.history.clone(),
            stop.clone().cancelled_owned(),
        ),
    ));
    let http_addr = http_listener.local_addr()?;
    let http =
        tokio::spawn(tern_router_auth::http::serve(auth, http_listener, stop.clone().cancelled_owned()));
    let access_stop = CancellationToken::new();
    let access =
        tokio::spawn(node.clone().run(access_listener, tls.clone(), access_stop.clone().cancelled_owned()));

    ready(&Endpoints { access_tcp: access_addr, router_auth: http_addr, ca_cert, tls: tls.is_some() });

    tokio::select! {
        _ = shutdown => {}
        _ = consumer_failed.cancelled() => {}
    }
    tracing::info!("shutting down: draining access-tcp");
    // Access first: clients are told to reconnect and their placements are
    // cleared while the services behind them still answer.
    access_stop.cancel();
    match access.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "access-tcp ended with an error"),
        Err(e) => tracing::warn!(error = %e, "access-tcp task failed"),
        Ok(Ok(())) => {}
    }
    stop.cancel();
    for task in [offline_consumer, group_consumer] {
        if let Ok(Err(e)) = task.await {
            tracing::warn!(error = %e, "consumer ended with an error");
        }
    }
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "router-auth ended with an error");
    }
    tracing::info!("stopped");
    if consumer_failed.is_cancelled() {
        anyhow::bail!("a bus consumer ended before shutdown (see the log); restart the server");
    }
    Ok(())
}

/// Runs a bus consumer. One that ends before `stop` (an error it cannot
/// recover from: the bus failed, or a batch could not be finished) cancels
/// `failed`, which stops the whole server with an error: without the
/// consumer, messages would be acknowledged and never delivered. A restart
/// resumes from the last committed batch.
async fn watched(
    name: &'static str,
    (stop, failed): (CancellationToken, CancellationToken),
    consumer: impl Future<Output = Result<(), tern_store::StoreError>>,
) -> Result<(), tern_store::StoreError> {
    let result = consumer.await;
    if !stop.is_cancelled() {
        let reason = result.as_ref().err().map_or_else(|| "it stopped".to_owned(), ToString::to_string);
        tracing::error!(consumer = name, %reason, "a bus consumer ended; stopping the server");
        failed.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_consumer_ending_before_shutdown_stops_the_server_and_one_ending_at_shutdown_does_not() {
        let (stop, failed) = (CancellationToken::new(), CancellationToken::new());
        let broken = async { Err(tern_store::StoreError::Backend("bus gone".into())) };
        assert!(watched("offline-svc", (stop.clone(), failed.clone()), broken).await.is_err());
        assert!(failed.is_cancelled(), "an early end stops the server");

        let (stop, failed) = (CancellationToken::new(), CancellationToken::new());
        stop.cancel();
        watched("group-svc", (stop, failed.clone()), async { Ok(()) }).await.unwrap();
        assert!(!failed.is_cancelled(), "an end at shutdown is no failure");
    }
}
