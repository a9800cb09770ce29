//! `tern chaos`: proves the delivery contract (docs/DELIVERY.md) under
//! process deaths.
//!
//! It starts a deployment of its own (`tern standalone`, or every cluster
//! role as a separate process on the real engines), connects simulated
//! users with the SDK (some on two devices), and has them send 1:1 and
//! group messages at a constant rate while it stops a process at random
//! moments (mostly SIGKILL; some SIGTERM, which makes it drain) and starts
//! it again, going through every process in a shuffled round so each role
//! dies at least once per round. Then it stops the
//! traffic and the kills, lets the clients catch up, and checks every
//! message a sender got a SendAck for: shown on each device it is owed to,
//! exactly once, and in sequence order within its conversation.
//!
//! - `deploy`: the processes and how they are killed and restarted;
//! - `workload`: users, devices, conversations and the constant-rate sender;
//! - `ledger`: what was acknowledged and shown, and the verdict.

mod deploy;
mod ledger;
mod workload;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

pub use deploy::Engines;
pub use ledger::Verdict;

use deploy::Deployment;
use ledger::Ledger;
use workload::{Fleet, Topology};

/// What to run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `tern standalone`: the one process is killed and restarted.
    Standalone,
    /// Every role its own process on Redis, ZooKeeper and Kafka.
    Cluster,
}

/// Options of `tern chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosOptions {
    /// standalone or cluster.
    #[arg(value_enum)]
    pub target: Target,
    /// Simulated users (every third has a second device).
    #[arg(long, default_value_t = 24)]
    pub users: usize,
    /// Members per group; each user is in one group and two 1:1 chats.
    #[arg(long, default_value_t = 5)]
    pub group_size: usize,
    /// Messages offered per second, all users together.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// How long traffic runs, in seconds.
    #[arg(long, default_value_t = 120)]
    pub duration_secs: u64,
    /// Mean time between kills, in seconds (each wait is 0.5–1.5× this).
    #[arg(long, default_value_t = 6.0)]
    pub kill_every_secs: f64,
    /// Longest time a killed process stays down before its restart, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub max_down_secs: f64,
    /// Share of the stops after the first round (which is all SIGKILLs)
    /// that are a SIGTERM (graceful drain: an access node sends its clients
    /// to reconnect elsewhere) instead of a SIGKILL.
    #[arg(long, default_value_t = 0.25)]
    pub sigterm_share: f64,
    /// Time allowed after the traffic for clients to receive what is owed to them.
    #[arg(long, default_value_t = 120)]
    pub settle_secs: u64,
    /// Fail unless at least this many messages were acknowledged.
    #[arg(long, default_value_t = 0)]
    pub min_acked: u64,
    /// Random seed (kill times, victims, traffic); printed so a run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where data and process logs go; default: a temporary directory,
    /// kept only when the run fails.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The tern binary to start; default: this executable.
    #[arg(long)]
    pub tern_bin: Option<PathBuf>,
    /// Redis URL (cluster).
    #[arg(long, env = "TERN_REDIS_URL")]
    pub redis_url: Option<String>,
    /// ZooKeeper connect string (cluster).
    #[arg(long, env = "TERN_ZK_ADDR")]
    pub zookeeper: Option<String>,
    /// Kafka bootstrap brokers (cluster).
    #[arg(long, env = "TERN_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
}

/// One stop (SIGKILL, or SIGTERM and a drain) and its restart.
#[derive(Debug, Clone)]
pub struct Kill {
    pub at: Duration,
    pub process: String,
    /// `SIGKILL` or `SIGTERM`.
    pub signal: &'static str,
    /// For a SIGTERM: whether the process drained and exited within its
    /// grace period (else it was SIGKILLed).
    pub drained: bool,
    pub down_for: Duration,
    pub restart_took: Duration,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: Target,
    pub seed: u64,
    pub options: ChaosOptions,
    pub kills: Vec<Kill>,
    /// Processes that died without being killed.
    pub unexpected_exits: Vec<String>,
    pub offered: u64,
    pub dropped_offers: u64,
    pub gave_up: u64,
    pub reconnects: u64,
    pub kicked: u64,
    pub skipped_seqs: u64,
    pub settle_took: Duration,
    pub verdict: Verdict,
    pub work_dir: Option<PathBuf>,
}

impl Report {
    /// 0 lost, 0 duplicated, 0 out of order, nothing corrupted, no process
    /// died on its own, every SIGTERM drained within the grace period,
    /// nobody kicked, and enough messages acknowledged.
    pub fn passed(&self) -> bool {
        self.verdict.passed()
            && self.unexpected_exits.is_empty()
            && self.kills.iter().all(|k| k.signal == "SIGKILL" || k.drained)
            && self.kicked == 0
            && self.verdict.acknowledged >= self.options.min_acked.max(1)
    }

    /// The human-readable summary printed at the end of a run.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let o = &self.options;
        let _ = writeln!(
            out,
            "tern chaos: {:?}, {} users, {} s of traffic at {} msgs/s, seed {}",
            self.target, o.users, o.duration_secs, o.rate, self.seed
        );
        let sigterms = self.kills.iter().filter(|k| k.signal == "SIGTERM").count();
        let _ = writeln!(
            out,
            "kills: {} ({} SIGKILL, {sigterms} SIGTERM)",
            self.kills.len(),
            self.kills.len() - sigterms
        );
        let mut per_process: Vec<(String, usize)> = Vec::new();
        for kill in &self.kills {
            match per_process.iter_mut().find(|(name, _)| *name == kill.process) {
                Some((_, n)) => *n += 1,
                None => per_process.push((kill.process.clone(), 1)),
            }
        }
        per_process.sort();
        let summary: Vec<String> = per_process.iter().map(|(name, n)| format!("{name} ×{n}")).collect();
        let _ = writeln!(out, "  per process: {}", summary.join(", "));
        for kill in &self.kills {
            let _ = writeln!(
                out,
                "  t={:>6.1}s {} {:<13}{} down {:.1} s, ready again after {:.1} s",
                kill.at.as_secs_f64(),
                kill.signal,
                kill.process,
                if kill.signal == "SIGTERM" && !kill.drained { " (drain overran; SIGKILLed)" } else { "" },
                kill.down_for.as_secs_f64(),
                kill.restart_took.as_secs_f64()
            );
        }
        if !self.unexpected_exits.is_empty() {
            let _ = writeln!(out, "processes that died on their own: {}", self.unexpected_exits.join(", "));
        }
        let v = &self.verdict;
        let _ = writeln!(
            out,
            "messages: offered {}, not handed out (sender busy) {}, acknowledged {}, given up {}",
            self.offered, self.dropped_offers, v.acknowledged, self.gave_up
        );
        let _ = writeln!(
            out,
            "deliveries owed {}, delivered {}: lost {}, duplicated {}, out of order {}, corrupted {}",
            v.owed_deliveries, v.delivered, v.lost, v.duplicated, v.out_of_order, v.corrupted
        );
        let _ = writeln!(
            out,
            "also: {} shown without an ACK to the sender, {} sequence numbers skipped by clients, {} reconnects, {} kicked; settled in {:.1} s",
            v.shown_unacknowledged,
            self.skipped_seqs,
            self.reconnects,
            self.kicked,
            self.settle_took.as_secs_f64()
        );
        for example in &v.examples {
            let _ = writeln!(out, "  {example}");
        }
        if let Some(dir) = &self.work_dir {
            let _ = writeln!(out, "data and logs: {}", dir.display());
        }
        let _ = writeln!(out, "result: {}", if self.passed() { "PASS" } else { "FAIL" });
        out
    }
}

fn engines(options: &ChaosOptions) -> anyhow::Result<Engines> {
    let need = |value: &Option<String>, name: &str| {
        value.clone().with_context(|| {
            format!(
                "a cluster run needs {name}: start the engines with `./scripts/engines.sh start` and \
                 `eval \"$(./scripts/engines.sh env)\"`, or pass the address"
            )
        })
    };
    Ok(Engines {
        redis_url: need(&options.redis_url, "TERN_REDIS_URL")?,
        zookeeper: need(&options.zookeeper, "TERN_ZK_ADDR")?,
        kafka_brokers: need(&options.kafka_brokers, "TERN_KAFKA_BROKERS")?,
    })
}

/// Runs the chaos scenario and returns its report; `progress` gets a line
/// every few seconds and at each kill.
pub async fn run(options: ChaosOptions, progress: impl Fn(&str)) -> anyhow::Result<Report> {
    if options.users < 3 {
        bail!("--users must be at least 3");
    }
    if options.rate == 0 || options.duration_secs == 0 {
        bail!("--rate and --duration-secs must be positive");
    }
    if !(options.kill_every_secs > 0.0 && options.max_down_secs >= 0.0) {
        bail!("--kill-every-secs must be positive and --max-down-secs not negative");
    }
    if !(0.0..=1.0).contains(&options.sigterm_share) {
        bail!("--sigterm-share must be between 0 and 1");
    }
    let seed = options.seed.unwrap_or_else(rand::random);
    let bin = match &options.tern_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("locating the tern binary")?,
    };
    let (work_dir, temp) = match &options.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let mut temp = tempfile::Builder::new().prefix("tern-chaos-").tempdir()?;
            // Removed only once the run has passed: a deployment that fails
            // to start, or a run that fails, leaves its process logs to read
            // (the errors name them).
            temp.disable_cleanup(true);
            (temp.path().to_owned(), Some(temp))
        }
    };
    let mut deployment = match options.target {
        Target::Standalone => Deployment::standalone(&bin, &work_dir).await?,
        Target::Cluster => Deployment::cluster(&bin, &work_dir, &engines(&options)?).await?,
    };
    progress(&format!("deployment up: {} (logs in {})", deployment.names().join(", "), work_dir.display()));

    let run_id = format!("c{:06x}", seed & 0xff_ffff);
    let topology = Topology::new(&run_id, options.users, options.group_size);
    let devices = topology.devices.len();
    let ledger = Arc::new(Ledger::new(devices));
    let fleet = Fleet::connect(topology, &deployment.auth_url, &deployment.ca, ledger.clone()).await?;
    progress(&format!("{} users on {devices} devices connected; traffic starts", options.users));

    let stop_traffic = CancellationToken::new();
    let fleet = Arc::new(fleet);
    let traffic = {
        let fleet = fleet.clone();
        let ledger = ledger.clone();
        let stop = stop_traffic.clone();
        let rate = options.rate;
        tokio::spawn(async move { fleet.send_until(rate, seed, ledger, stop).await })
    };

    let started = Instant::now();
    let traffic_ends = started + Duration::from_secs(options.duration_secs);
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(17));
    let mut round: Vec<String> = Vec::new();
    let mut rounds = 0u32;
    let mut kills = Vec::new();
    let mut unexpected_exits = Vec::new();
    let mut next_kill = started + jitter(&mut rng, options.kill_every_secs);
    let mut next_progress = started + Duration::from_secs(5);
    while Instant::now() < traffic_ends {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for exited in deployment.restart_exited().await? {
            progress(&format!("{exited} died without being killed; restarted it"));
            unexpected_exits.push(exited);
        }
        let now = Instant::now();
        if now >= next_progress {
            next_progress = now + Duration::from_secs(5);
            progress(&format!(
                "t={:>5.1}s offered {} acknowledged {} shown {} kills {}",
                started.elapsed().as_secs_f64(),
                ledger.offered.load(Ordering::Relaxed),
                ledger.acknowledged(),
                ledger.shown_total.load(Ordering::Relaxed),
                kills.len()
            ));
        }
        if now < next_kill {
            continue;
        }
        if round.is_empty() {
            round = deployment.names();
            round.shuffle(&mut rng);
            rounds += 1;
        }
        let victim = round.pop().expect("a round has every process");
        let at = started.elapsed();
        // The first round is all SIGKILLs, so every process dies hard at
        // least once whatever the share.
        let graceful = rounds > 1 && rng.random_bool(options.sigterm_share);
        let (signal, drained) = if graceful {
            // The roles' grace period is 5 s (standalone: 10 s).
            ("SIGTERM", deployment.terminate(&victim, Duration::from_secs(15)).await?)
        } else {
            deployment.kill(&victim).await?;
            ("SIGKILL", false)
        };
        let down_for = Duration::from_secs_f64(rng.random_range(0.2..=options.max_down_secs.max(0.2)));
        tokio::time::sleep(down_for).await;
        let restarting = Instant::now();
        deployment.restart(&victim).await?;
        let restart_took = restarting.elapsed();
        progress(&format!(
            "t={:>5.1}s {signal} {victim}; restarted after {:.1} s down, ready in {:.1} s",
            at.as_secs_f64(),
            down_for.as_secs_f64(),
            restart_took.as_secs_f64()
        ));
        kills.push(Kill { at, process: victim, signal, drained, down_for, restart_took });
        next_kill = Instant::now() + jitter(&mut rng, options.kill_every_secs);
    }

    progress("traffic stops; waiting for the sends in flight and for every device to catch up");
    stop_traffic.cancel();
    traffic.await.context("traffic task")?;
    let settling = Instant::now();
    let settle_deadline = settling + Duration::from_secs(options.settle_secs);
    loop {
        unexpected_exits.extend(deployment.restart_exited().await?);
        let missing = ledger.missing();
        if missing == 0 || Instant::now() >= settle_deadline {
            break;
        }
        progress(&format!("{missing} deliveries still owed"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let settle_took = settling.elapsed();
    let fleet = Arc::try_unwrap(fleet).map_err(|_| anyhow::anyhow!("traffic still holds the fleet"))?;
    fleet.close().await;
    deployment.stop().await;

    let verdict = ledger.verdict();
    let mut report = Report {
        target: options.target,
        seed,
        kills,
        unexpected_exits,
        offered: ledger.offered.load(Ordering::Relaxed),
        dropped_offers: ledger.dropped_offers.load(Ordering::Relaxed),
        gave_up: ledger.gave_up.load(Ordering::Relaxed),
        reconnects: ledger.reconnects.load(Ordering::Relaxed),
        kicked: ledger.kicked.load(Ordering::Relaxed),
        skipped_seqs: ledger.skipped_seqs.load(Ordering::Relaxed),
        settle_took,
        verdict,
        work_dir: None,
        options,
    };
    // Keep the logs of a failed run.
    report.work_dir = match temp {
        Some(mut temp) if report.passed() => {
            temp.disable_cleanup(false);
            None
        }
        Some(temp) => Some(temp.keep()),
        None => Some(work_dir),
    };
    Ok(report)
}

/// A wait of 0.5–1.5× `mean_secs`.
fn jitter(rng: &mut StdRng, mean_secs: f64) -> Duration {
    Duration::from_secs_f64(mean_secs * rng.random_range(0.5..1.5))
}
