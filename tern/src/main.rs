//! The `tern` command: parses arguments, sets up logging, waits for signals.
//! Everything else lives in the library crates.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tern::chat::ChatOptions;
use tern::cluster::{ClusterConfig, NodeSettings, Role};
use tern::config::StandaloneConfig;

#[derive(Parser)]
#[command(name = "tern", version, about = "tern: a distributed instant-messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process on embedded, on-disk backends.
    Standalone {
        /// TOML configuration file (see `tern config defaults`).
        #[arg(long, env = "TERN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long, env = "TERN_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// access-tcp listen address (overrides the file).
        #[arg(long, env = "TERN_ACCESS_LISTEN")]
        access_listen: Option<String>,
        /// router-auth HTTP listen address (overrides the file).
        #[arg(long, env = "TERN_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Serve plaintext TCP instead of TLS (trusted networks only).
        #[arg(long)]
        plaintext: bool,
    },
    /// Interactive terminal chat client.
    Chat {
        /// router-auth URL.
        #[arg(long, env = "TERN_AUTH_URL", default_value = "http://127.0.0.1:7880")]
        auth: String,
        #[arg(long, env = "TERN_USER")]
        user: String,
        /// Password; the account is created on first login.
        #[arg(long, env = "TERN_PASSWORD")]
        password: String,
        #[arg(long, default_value = "default")]
        device: String,
        /// CA certificate to trust (standalone writes it to <data-dir>/tls/ca.pem).
        #[arg(long, env = "TERN_CA", default_value = "./tern-data/tls/ca.pem")]
        ca: PathBuf,
        /// Connect without TLS (server started with --plaintext).
        #[arg(long)]
        plaintext: bool,
        /// Access node host:port; default: the least loaded one from ipList.
        #[arg(long)]
        access: Option<String>,
    },
    /// Cluster role: hold client connections (TLS TCP).
    AccessTcp(RoleArgs),
    /// Cluster role: accounts, tokens, ipList (HTTP) and session placement (gRPC).
    RouterAuth(RoleArgs),
    /// Cluster role: route messages, assign sequences, publish to Kafka.
    Dispatcher(RoleArgs),
    /// Cluster role: offline sets in Redis, pushes to access nodes.
    OfflineSvc(RoleArgs),
    /// Cluster role: group history.
    GroupSvc(RoleArgs),
    /// Cluster role: snowflake ids and Leaf-style segments over gRPC.
    Idgen(RoleArgs),
    /// Kill processes at random under simulated chat traffic, then check
    /// that every acknowledged message arrived once and in order.
    Chaos(tern_chaos::ChaosOptions),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// What every cluster role takes on its command line.
#[derive(Args)]
struct RoleArgs {
    /// Cluster TOML file, shared by every role (see `tern config cluster-defaults`).
    #[arg(long, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Unique id of this node; default: the role name and a random suffix.
    #[arg(long, env = "TERN_NODE_ID")]
    node_id: Option<String>,
    /// Main listen address (client TLS for access-tcp, gRPC for the others).
    #[arg(long, env = "TERN_LISTEN")]
    listen: Option<String>,
    /// Address given to clients or peers; default: the bound address.
    #[arg(long, default_value = "")]
    advertise: String,
    /// access-tcp: internal gRPC listen address (pushes).
    #[arg(long, default_value = "127.0.0.1:0")]
    internal_listen: String,
    /// router-auth: HTTP API listen address.
    #[arg(long, default_value = "127.0.0.1:7880")]
    http_listen: String,
    /// Redis URL (overrides the file).
    #[arg(long, env = "TERN_REDIS_URL")]
    redis_url: Option<String>,
    /// ZooKeeper connect string (overrides the file).
    #[arg(long, env = "TERN_ZK_ADDR")]
    zookeeper: Option<String>,
    /// Kafka bootstrap brokers (overrides the file).
    #[arg(long, env = "TERN_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// access-tcp: serve plaintext TCP instead of TLS.
    #[arg(long)]
    plaintext: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default standalone configuration as TOML.
    Defaults,
    /// Print the default cluster configuration as TOML.
    ClusterDefaults,
}

fn default_listen(role: Role) -> &'static str {
    match role {
        Role::AccessTcp => "127.0.0.1:7800",
        Role::RouterAuth => "127.0.0.1:7881",
        Role::Dispatcher => "127.0.0.1:7810",
        Role::OfflineSvc => "127.0.0.1:7820",
        Role::GroupSvc => "127.0.0.1:7830",
        Role::Idgen => "127.0.0.1:7840",
    }
}

async fn run_role(role: Role, args: RoleArgs) -> anyhow::Result<()> {
    init_logging("info");
    let mut config = match &args.config {
        Some(path) => ClusterConfig::from_file(path)?,
        None => ClusterConfig::default(),
    };
    if let Some(url) = args.redis_url {
        config.engines.redis_url = url;
    }
    if let Some(zk) = args.zookeeper {
        config.engines.zookeeper = zk;
    }
    if let Some(brokers) = args.kafka_brokers {
        config.engines.kafka_brokers = brokers;
    }
    config.access_tcp.plaintext |= args.plaintext;
    let settings = NodeSettings {
        // Random suffix: pids repeat across hosts and containers, and two
        // nodes with one id would clear each other's placements.
        node_id: args.node_id.unwrap_or_else(|| format!("{}-{:08x}", role.name(), rand::random::<u32>())),
        listen: args.listen.unwrap_or_else(|| default_listen(role).to_owned()),
        advertise: args.advertise,
        internal_listen: args.internal_listen,
        http_listen: args.http_listen,
    };
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let node_id = settings.node_id.clone();
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(());
    };
    let server = tern::cluster::run_role(
        role,
        config,
        settings,
        |endpoints| {
            let mut line =
                format!("tern {} ready: node={} listen={}", role.name(), node_id, endpoints.listen);
            if let Some(internal) = endpoints.internal {
                line.push_str(&format!(" internal={internal}"));
            }
            if let Some(http) = endpoints.http {
                line.push_str(&format!(" http=http://{http}"));
            }
            if let Some(ca) = &endpoints.ca_cert {
                line.push_str(&format!(" ca={}", ca.display()));
            }
            println!("{line}");
        },
        shutdown,
    );
    exit_after_grace(server, signalled_rx, grace).await
}

/// Runs `server`; once a signal came, gives it `grace` to finish.
async fn exit_after_grace(
    server: impl std::future::Future<Output = anyhow::Result<()>>,
    signalled: tokio::sync::oneshot::Receiver<()>,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        _ = async { let _ = signalled.await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over; exiting with the drain unfinished");
            std::process::exit(1);
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// mimalloc rather than glibc's malloc. glibc keeps what a burst of large
/// allocations leaves behind: after 100 account registrations (argon2 uses
/// 19 MiB per hash, on whichever blocking thread, so in several arenas) a
/// standalone server held 850 MB RSS for good; with mimalloc, 112 MB. Its
/// small allocations are no slower either (server CPU per login in a connect
/// storm: 178–197 µs with glibc, 151–191 µs with mimalloc, alternating runs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone { config, data_dir, access_listen, http_listen, plaintext } => {
            init_logging("info");
            let mut cfg = match config {
                Some(path) => StandaloneConfig::from_file(&path)?,
                None => StandaloneConfig::default(),
            };
            if let Some(dir) = data_dir {
                cfg.data_dir = dir;
            }
            if let Some(addr) = access_listen {
                cfg.access_tcp.listen = addr;
            }
            if let Some(addr) = http_listen {
                cfg.router_auth.listen = addr;
            }
            cfg.access_tcp.plaintext |= plaintext;
            let grace = std::time::Duration::from_secs(cfg.shutdown_grace_secs);
            let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async move {
                shutdown_signal().await;
                let _ = signalled_tx.send(());
            };
            let server = tern::standalone::run(
                cfg,
                |endpoints| {
                    let ca = endpoints.ca_cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                    // One machine-readable line; tests and scripts parse it.
                    println!(
                        "tern standalone ready: access-tcp={} tls={} router-auth=http://{} ca={}",
                        endpoints.access_tcp, endpoints.tls, endpoints.router_auth, ca
                    );
                },
                shutdown,
            );
            exit_after_grace(server, signalled_rx, grace).await
        }
        Command::AccessTcp(args) => run_role(Role::AccessTcp, args).await,
        Command::RouterAuth(args) => run_role(Role::RouterAuth, args).await,
        Command::Dispatcher(args) => run_role(Role::Dispatcher, args).await,
        Command::OfflineSvc(args) => run_role(Role::OfflineSvc, args).await,
        Command::GroupSvc(args) => run_role(Role::GroupSvc, args).await,
        Command::Idgen(args) => run_role(Role::Idgen, args).await,
        Command::Chat { auth, user, password, device, ca, plaintext, access } => {
            init_logging("warn");
            tern::chat::run(ChatOptions {
                auth_url: auth,
                user,
                password,
                device,
                ca_cert: (!plaintext).then_some(ca),
                plaintext,
                access_addr: access,
            })
            .await
        }
        Command::Chaos(options) => {
            init_logging("warn");
            let report = tern_chaos::run(options, |line| eprintln!("chaos: {line}")).await?;
            print!("{}", report.render());
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Config { command: ConfigCommand::Defaults } => {
            print!("{}", StandaloneConfig::default().to_toml());
            Ok(())
        }
        Command::Config { command: ConfigCommand::ClusterDefaults } => {
            print!("{}", ClusterConfig::default().to_toml());
            Ok(())
        }
    }
}
