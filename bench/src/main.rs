//! `tern-bench`: runs the benchmark suite (`all`) or one scenario.
//! See `bench/README.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tern_bench::report::Results;
use tern_bench::servers::{self, Server, Target};
use tern_bench::suite::{self, Profile, SuiteOptions};
use tern_bench::users::Users;

#[derive(Parser)]
#[command(name = "tern-bench", version, about = "tern load generator and benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario: standalone (plaintext and TLS), the local cluster if
    /// up, Mosquitto and NATS; writes results.json, BENCHMARKS.md and plots.
    All {
        #[arg(long, value_enum, default_value = "full")]
        profile: ProfileName,
        #[arg(long)]
        no_peers: bool,
        #[arg(long)]
        no_cluster: bool,
        #[command(flatten)]
        common: Common,
    },
    /// S1: access-node memory per idle connection.
    S1 {
        /// Connection counts, ascending (e.g. 5000,15000).
        #[arg(long, value_delimiter = ',', default_value = "300,500")]
        conns: Vec<u64>,
        /// Connections opened per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        common: Common,
    },
    /// S2: connect storm (TCP + TLS + LOGIN), logins per second.
    S2 {
        #[arg(long, default_value_t = 500)]
        conns: u64,
        /// Offered logins per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        common: Common,
    },
    /// S3: 1:1 messages at a fixed rate, or a search for the highest
    /// sustainable rate (then 50/70/90% of it).
    S3 {
        /// Messages per second over all pairs.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Search instead: START:CEILING msgs/s.
        #[arg(long)]
        search: Option<String>,
        #[arg(long, default_value_t = 4)]
        pairs: u32,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        common: Common,
    },
    /// S4: group fan-out, deliveries per second and latency to the last member.
    S4 {
        /// Members per group including the sender (e.g. 10,100,1000).
        #[arg(long, value_delimiter = ',', default_value = "100")]
        group_size: Vec<u32>,
        /// Deliveries per second (messages/s × receivers).
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Search instead: START:CEILING deliveries/s.
        #[arg(long)]
        search: Option<String>,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        common: Common,
    },
    /// S5: ids per second, in-process and over the network.
    S5 {
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        duration: Duration,
        /// Also ask this idgen (gRPC host:port), e.g. the cluster's 127.0.0.1:17840.
        #[arg(long)]
        idgen: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Re-draws BENCHMARKS.md and the plots from a result file.
    Report {
        #[arg(long, default_value = "bench-results/results.json")]
        results: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// (internal) one connection worker process; reads its job on stdin.
    #[command(hide = true)]
    Worker,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileName {
    Smoke,
    Full,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TargetName {
    /// `tern standalone --plaintext`, started by the benchmark.
    Plain,
    /// `tern standalone` with TLS, started by the benchmark.
    Tls,
    /// The local cluster of scripts/cluster.sh (must be up).
    Cluster,
}

#[derive(Args, Clone)]
struct Common {
    /// The tern binary (cargo build --release -p tern).
    #[arg(long, default_value = "target/release/tern")]
    tern_bin: PathBuf,
    #[arg(long, default_value = "bench-results")]
    out_dir: PathBuf,
    /// Where `all` and `report` write the markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:17880")]
    cluster_auth: String,
    #[arg(long, default_value = "target/cluster")]
    cluster_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:17840")]
    cluster_idgen: String,
}

#[derive(Args, Clone)]
struct ConnArgs {
    #[arg(long, value_enum, default_value = "tls")]
    target: TargetName,
    /// Connections per worker process (one process may hold 20,000 fds).
    #[arg(long, default_value_t = 8000)]
    per_worker: u64,
    /// 127.0.0.x source addresses to spread connections over.
    #[arg(long, default_value_t = 8)]
    sources: usize,
    /// Accounts to log in as (connections use many device ids each).
    #[arg(long, default_value_t = 100)]
    users: u64,
}

#[derive(Args, Clone)]
struct LoadArgs {
    #[arg(long, value_enum, default_value = "plain")]
    target: TargetName,
    /// Length of each run (and of each search step).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// p99 objective (ms) for "sustainable".
    #[arg(long, default_value_t = 100.0)]
    slo_ms: f64,
    /// Longest wait for outstanding ACKs and deliveries after the sends.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Also run the same against Mosquitto and NATS.
    #[arg(long)]
    peers: bool,
}

/// `10s`, `500ms`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_search(s: &str) -> anyhow::Result<(f64, f64)> {
    let (a, b) = s.split_once(':').context("--search takes START:CEILING")?;
    Ok((a.parse()?, b.parse()?))
}

fn options(common: &Common, peers: bool, cluster: bool) -> SuiteOptions {
    SuiteOptions {
        tern_bin: common.tern_bin.clone(),
        out_dir: common.out_dir.clone(),
        markdown: common.markdown.clone(),
        peers,
        cluster,
        cluster_auth: common.cluster_auth.clone(),
        cluster_dir: common.cluster_dir.clone(),
        cluster_idgen: common.cluster_idgen.clone(),
    }
}

async fn target(name: TargetName, common: &Common) -> anyhow::Result<(Option<Server>, Target)> {
    match name {
        TargetName::Cluster => match servers::cluster_target(&common.cluster_auth, &common.cluster_dir).await
        {
            Some(t) => Ok((None, t)),
            None => bail!("no cluster at {} (./scripts/cluster.sh up)", common.cluster_auth),
        },
        TargetName::Plain | TargetName::Tls => {
            let (server, t) =
                servers::start_tern(&common.tern_bin, name == TargetName::Tls, &common.out_dir.join("logs"))?;
            eprintln!("started {} (pid {}): {:?}", server.name, server.pid, t.access);
            Ok((Some(server), t))
        }
    }
}

fn save(results: &mut Results, common: &Common, name: &str) -> anyhow::Result<()> {
    results.finished_unix_s = tern_bench::report::unix_now();
    std::fs::create_dir_all(&common.out_dir)?;
    let path = common.out_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn single(profile: &Profile, server: &Option<Server>) -> Results {
    let mut r = Results::new("custom");
    r.machine = tern_bench::report::Machine::probe();
    r.command_lines.push(std::env::args().collect::<Vec<_>>().join(" "));
    if let Some(s) = server {
        r.command_lines.push(s.command_line.clone());
    }
    r.settings = profile.settings().into_iter().collect();
    r
}

fn stop(server: Option<Server>) {
    if let Some(s) = server {
        s.stop(Duration::from_secs(15));
    }
}

fn load_profile(load: &LoadArgs) -> Profile {
    let mut p = Profile::smoke();
    p.name = "custom".into();
    p.step = load.duration;
    p.point = load.duration;
    p.payload = load.payload;
    p.slo_ms = load.slo_ms;
    p.drain = load.drain;
    p.refine = 2;
    p
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Worker => tern_bench::storm::worker_main().await,
        Cmd::All { profile, no_peers, no_cluster, common } => {
            let p = match profile {
                ProfileName::Smoke => Profile::smoke(),
                ProfileName::Full => Profile::full(),
            };
            suite::all(&p, &options(&common, !no_peers, !no_cluster)).await?;
            Ok(())
        }
        Cmd::Report { results, common } => {
            let r: Results = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            suite::write_outputs(&r, &common.out_dir, &common.markdown)
        }
        Cmd::S1 { conns, rate, conn, common } => {
            anyhow::ensure!(
                conn.target != TargetName::Cluster,
                "S1 measures one access process: plain or tls"
            );
            let mut p = Profile::smoke();
            (p.s1_levels, p.s1_rate, p.per_worker, p.sources, p.pool_users) =
                (conns, rate, conn.per_worker, conn.sources, conn.users);
            let (server, t) = target(conn.target, &common).await?;
            let server = server.context("S1 starts its own server")?;
            let mut results = single(&p, &None);
            results.command_lines.push(server.command_line.clone());
            let log_dir = common.out_dir.join("logs");
            let users = Users::new(&t.auth_url);
            let (server, _, _) =
                suite::run_s1(server, &common.tern_bin, &log_dir, users, &p, &mut results).await?;
            stop(Some(server));
            save(&mut results, &common, "s1")
        }
        Cmd::S2 { conns, rate, conn, common } => {
            let mut p = Profile::smoke();
            (p.s2_conns, p.s2_rate, p.per_worker, p.sources, p.pool_users) =
                (conns, rate, conn.per_worker, conn.sources, conn.users);
            let (server, t) = target(conn.target, &common).await?;
            let mut results = single(&p, &server);
            let outcome = suite::run_s2(&t, &Users::new(&t.auth_url), &p, &mut results).await;
            stop(server);
            outcome?;
            save(&mut results, &common, "s2")
        }
        Cmd::S3 { rate, search, pairs, load, common } => {
            let mut p = load_profile(&load);
            p.s3_pairs = pairs;
            p.s3_search = search.as_deref().map(parse_search).transpose()?;
            p.s3_fixed = Some(rate);
            p.s4_sizes.clear();
            let (server, t) = target(load.target, &common).await?;
            let mut results = single(&p, &server);
            let outcome = suite::run_s3(&t, &Users::new(&t.auth_url), &p, &mut results).await;
            stop(server);
            outcome?;
            if load.peers {
                suite::peers_only(&p, &common.out_dir.join("logs"), &mut results).await;
            }
            save(&mut results, &common, "s3")
        }
        Cmd::S4 { group_size, rate, search, load, common } => {
            let mut p = load_profile(&load);
            p.s4_sizes = group_size;
            p.s4_search = search.as_deref().map(parse_search).transpose()?;
            p.s4_fixed = Some(rate);
            p.s3_search = None;
            p.s3_fixed = None;
            let (server, t) = target(load.target, &common).await?;
            let mut results = single(&p, &server);
            let outcome = suite::run_s4(&t, &Users::new(&t.auth_url), &p, &mut results).await;
            stop(server);
            outcome?;
            if load.peers {
                suite::peers_only(&p, &common.out_dir.join("logs"), &mut results).await;
            }
            save(&mut results, &common, "s4")
        }
        Cmd::S5 { duration, idgen, common } => {
            let p = Profile { s5: duration, ..Profile::smoke() };
            let mut results = single(&p, &None);
            results.s5 = tern_bench::ids::run(duration, idgen).await?;
            save(&mut results, &common, "s5")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_searches_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("3h").is_err());
        assert_eq!(parse_search("1000:8000").unwrap(), (1000.0, 8000.0));
        assert!(parse_search("1000").is_err());
    }
}
