//! The `tern` command: parses arguments, sets up logging, waits for signals.
//! Everything else lives in the library crates.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tern::chat::ChatOptions;
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
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default standalone configuration as TOML.
    Defaults,
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
            tokio::pin!(server);
            tokio::select! {
                result = &mut server => result,
                _ = async { let _ = signalled_rx.await; tokio::time::sleep(grace).await } => {
                    tracing::warn!("grace period over; exiting with the drain unfinished");
                    std::process::exit(1);
                }
            }
        }
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
        Command::Config { command: ConfigCommand::Defaults } => {
            print!("{}", StandaloneConfig::default().to_toml());
            Ok(())
        }
    }
}
