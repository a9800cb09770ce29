//! Profiles (sizes and durations), the rate search, and the whole suite:
//! every scenario against tern standalone (plaintext and TLS), the local
//! cluster when it is up, and the peers, into one [`Results`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::flow::{Fanout, RateRun};
use crate::peers::{self, PeerRun};
use crate::report::{MaxRate, Results, StormRow};
use crate::servers::{self, Server, Target};
use crate::storm;
use crate::tern_load::TernBed;
use crate::users::Users;

/// Sizes and durations of a suite run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    /// S1 connection counts, ascending, and the ramp rate (conns/s).
    pub s1_levels: Vec<u64>,
    pub s1_rate: f64,
    /// S2 connections and offered logins/s.
    pub s2_conns: u64,
    pub s2_rate: f64,
    /// Connections per worker process (≤ 20,000 fds each) and 127.0.0.x
    /// source addresses.
    pub per_worker: u64,
    pub sources: usize,
    /// Accounts S1/S2 log in as (each with many device ids).
    pub pool_users: u64,
    pub s3_pairs: u32,
    /// Search from .0 doubling up to .1 msgs/s; or one fixed rate.
    pub s3_search: Option<(f64, f64)>,
    pub s3_fixed: Option<f64>,
    /// Group sizes (members including the sender).
    pub s4_sizes: Vec<u32>,
    /// In deliveries/s.
    pub s4_search: Option<(f64, f64)>,
    pub s4_fixed: Option<f64>,
    /// A group size whose throughput ceiling S4 also measures, and the
    /// rate in deliveries/s the ceiling runs start from (see
    /// [`ceiling_runs`]). The fan-out target sets a rate but no latency,
    /// and the search, which stops at the first rate over the latency
    /// objective, never tries the rates where the ceiling is.
    pub s4_ceiling: Option<(u32, f64)>,
    /// Length of a search step and of a measured point.
    pub step: Duration,
    pub point: Duration,
    pub s5: Duration,
    pub payload: usize,
    /// Latency objective (p99) for "sustainable".
    pub slo_ms: f64,
    pub drain: Duration,
    /// Bisection steps after the doubling search failed.
    pub refine: u32,
}

impl Profile {
    /// Seconds-long runs at small sizes: proves the machinery.
    pub fn smoke() -> Profile {
        Profile {
            name: "smoke".into(),
            s1_levels: vec![300, 500],
            s1_rate: 500.0,
            s2_conns: 500,
            s2_rate: 2000.0,
            per_worker: 300,
            sources: 4,
            pool_users: 50,
            s3_pairs: 4,
            s3_search: Some((1000.0, 2000.0)),
            s3_fixed: None,
            s4_sizes: vec![10, 100],
            s4_search: None,
            s4_fixed: Some(20_000.0),
            s4_ceiling: None,
            step: Duration::from_secs(2),
            point: Duration::from_secs(3),
            s5: Duration::from_secs(1),
            payload: 64,
            slo_ms: 100.0,
            drain: Duration::from_secs(5),
            refine: 0,
        }
    }

    /// The sizes of the targets.
    pub fn full() -> Profile {
        Profile {
            name: "full".into(),
            s1_levels: vec![5_000, 15_000],
            s1_rate: 2_000.0,
            s2_conns: 15_000,
            s2_rate: 20_000.0,
            per_worker: 8_000,
            sources: 8,
            pool_users: 500,
            s3_pairs: 50,
            s3_search: Some((10_000.0, 400_000.0)),
            s3_fixed: None,
            s4_sizes: vec![10, 100, 1000],
            s4_search: Some((100_000.0, 4_000_000.0)),
            s4_fixed: None,
            s4_ceiling: Some((1000, 1_000_000.0)),
            step: Duration::from_secs(5),
            point: Duration::from_secs(10),
            s5: Duration::from_secs(3),
            payload: 64,
            slo_ms: 100.0,
            drain: Duration::from_secs(10),
            refine: 2,
        }
    }

    pub fn settings(&self) -> Vec<(String, String)> {
        let f = |v: &Option<(f64, f64)>, fixed: &Option<f64>| match (v, fixed) {
            (Some((a, b)), _) => {
                format!("search {a:.0} → ≤ {b:.0}, doubling, {} bisection step(s)", self.refine)
            }
            (None, Some(x)) => format!("fixed {x:.0}"),
            _ => "–".into(),
        };
        vec![
            ("S1 connections / ramp rate".into(), format!("{:?} at {:.0}/s", self.s1_levels, self.s1_rate)),
            ("S2 connections / offered rate".into(), format!("{} at {:.0}/s", self.s2_conns, self.s2_rate)),
            (
                "connections per worker process / source addresses".into(),
                format!("{} / {}", self.per_worker, self.sources),
            ),
            ("S1/S2 accounts (device ids per account vary)".into(), self.pool_users.to_string()),
            ("S3 pairs".into(), self.s3_pairs.to_string()),
            ("S3 rates (msgs/s)".into(), f(&self.s3_search, &self.s3_fixed)),
            ("S4 group sizes".into(), format!("{:?}", self.s4_sizes)),
            ("S4 rates (deliveries/s)".into(), f(&self.s4_search, &self.s4_fixed)),
            (
                "S4 ceiling runs".into(),
                self.s4_ceiling.map_or_else(
                    || "–".into(),
                    |(size, rate)| {
                        format!(
                            "groups of {size}, from {rate:.0} deliveries/s (or the search's best if higher) \
                             up by {:.0}% a run while every delivery is made and the run keeps up (counts \
                             ≥ {:.0}% of the offered rate)",
                            (CEILING_STEP - 1.0) * 100.0,
                            CEILING_KEEPS_UP * 100.0
                        )
                    },
                ),
            ),
            ("search step / measured point".into(), format!("{:?} / {:?}", self.step, self.point)),
            ("payload".into(), format!("{} bytes", self.payload)),
            (
                "sustainable".into(),
                format!("verified, drained within {:?}, p99 ≤ {} ms", self.drain, self.slo_ms),
            ),
            ("S5 per test".into(), format!("{:?}", self.s5)),
            (
                "cluster S3/S4 searches".into(),
                format!("start at 1/{CLUSTER_SEARCH_DIVISOR} of the standalone start"),
            ),
        ]
    }

    /// The rate (deliveries/s) the ceiling runs for groups of `size` start
    /// from, if that size has them: the profile's start rate, or one step
    /// above the search's best (`max`) when that is higher.
    fn ceiling_start(&self, size: u32, max: Option<&MaxRate>) -> Option<f64> {
        let (ceiling_size, start) = self.s4_ceiling?;
        let best = max.map_or(0.0, |m| m.max_deliveries_per_s);
        (ceiling_size == size).then_some(start.max(best * CEILING_STEP))
    }

    /// The profile for the local cluster: its searches start lower. Started
    /// at the standalone rates, the first steps overload the cluster (about
    /// a tenth of standalone's throughput on 2 cores, every role and engine
    /// sharing them), and the broker backlog they leave spoils every later
    /// step of the search. For the same reason it gets no S4 ceiling runs.
    pub fn for_cluster(&self) -> Profile {
        let lower = |search: Option<(f64, f64)>| {
            search.map(|(start, ceiling)| (start / CLUSTER_SEARCH_DIVISOR, ceiling))
        };
        Profile {
            s3_search: lower(self.s3_search),
            s4_search: lower(self.s4_search),
            s4_ceiling: None,
            ..self.clone()
        }
    }
}

/// See [`Profile::for_cluster`].
const CLUSTER_SEARCH_DIVISOR: f64 = 10.0;

/// Groups per size in S4: small groups need several to load the server.
pub fn groups_for(size: u32) -> u32 {
    (100 / size).max(1)
}

/// Something that can run one open-loop step at a rate.
trait Runner {
    async fn run(&mut self, label: &str, rate: f64, duration: Duration) -> anyhow::Result<RateRun>;
}

struct TernRunner<'a> {
    bed: &'a mut TernBed,
    profile: &'a Profile,
    /// S4: rates are deliveries/s; the bed sends rate / receivers msgs/s.
    per_delivery: Option<u32>,
}

impl Runner for TernRunner<'_> {
    async fn run(&mut self, label: &str, rate: f64, duration: Duration) -> anyhow::Result<RateRun> {
        let msgs = self.per_delivery.map_or(rate, |r| rate / f64::from(r));
        let p = self.profile;
        Ok(self.bed.run(label, msgs, duration, p.payload, p.slo_ms, p.drain).await)
    }
}

#[derive(Clone, Copy)]
enum Peer {
    Mosquitto,
    Nats,
}

struct PeerRunner {
    peer: Peer,
    port: u16,
    pid: u32,
    spec: PeerRun,
}

impl Runner for PeerRunner {
    async fn run(&mut self, label: &str, rate: f64, duration: Duration) -> anyhow::Result<RateRun> {
        let mut spec = self.spec.clone();
        spec.label = label.into();
        spec.rate = if spec.fanout == Fanout::Groups { rate / f64::from(spec.receivers) } else { rate };
        spec.duration = duration;
        match self.peer {
            Peer::Mosquitto => peers::mqtt(self.port, self.pid, &spec).await,
            Peer::Nats => peers::nats(self.port, self.pid, &spec).await,
        }
    }
}

/// Doubling search then bisection; then runs at 50/70/90% of the best.
async fn search_and_points(
    runner: &mut impl Runner,
    profile: &Profile,
    search: Option<(f64, f64)>,
    fixed: Option<f64>,
    runs: &mut Vec<RateRun>,
) -> anyhow::Result<Option<MaxRate>> {
    if let Some(rate) = fixed.filter(|_| search.is_none()) {
        runs.push(runner.run("fixed", rate, profile.point).await?);
        return Ok(None);
    }
    let Some((start, ceiling)) = search else { return Ok(None) };
    let mut tried = Vec::new();
    let (mut best, mut best_run, mut failed): (f64, Option<RateRun>, Option<f64>) = (0.0, None, None);
    let mut rate = start;
    loop {
        tried.push(rate);
        let r = runner.run("search", rate, profile.step).await?;
        let ok = r.sustainable;
        runs.push(r.clone());
        if ok {
            best = rate;
            best_run = Some(r);
            if failed.is_some() || rate >= ceiling {
                break;
            }
            rate = (rate * 2.0).min(ceiling);
        } else {
            // Going up: the first failure ends the doubling. Starting too
            // high: halve until a rate holds (down to start / 64).
            failed = Some(rate);
            if best > 0.0 || rate / 2.0 < start / 64.0 {
                break;
            }
            rate /= 2.0;
        }
    }
    if let (Some(mut bad), true) = (failed, best > 0.0) {
        for _ in 0..profile.refine {
            let mid = ((best + bad) / 2.0).round();
            tried.push(mid);
            let r = runner.run("search", mid, profile.step).await?;
            runs.push(r.clone());
            if r.sustainable {
                best = mid;
                best_run = Some(r);
            } else {
                bad = mid;
            }
        }
    }
    let template = best_run.unwrap_or_else(|| runs.last().cloned().unwrap_or_default());
    let per_message = match template.group_size {
        0 => 1.0,
        _ => f64::from(template.receivers),
    };
    let max = MaxRate {
        scenario: template.scenario.clone(),
        system: template.system.clone(),
        target: template.target.clone(),
        group_size: template.group_size,
        // Search rates are deliveries/s for S4; report messages/s.
        max_rate: if template.group_size > 0 { best / per_message } else { best },
        max_deliveries_per_s: if template.group_size > 0 { best } else { best * per_message },
        slo_ms: profile.slo_ms,
        tried,
        capped: failed.is_none(),
    };
    if best > 0.0 {
        for pct in [50u32, 70, 90] {
            let r = runner.run(&format!("at {pct}%"), best * f64::from(pct) / 100.0, profile.point).await?;
            runs.push(r);
        }
    }
    Ok(Some(max))
}

/// How much each ceiling run offers over the one before.
const CEILING_STEP: f64 = 1.25;

/// A run keeps up when it counts at least this share of the offered
/// deliveries/s. Counted from the start to the last delivery, a server
/// that keeps up loses only its last messages' latency against the run's
/// length (about 1–3% in 10 s at the latencies of a saturated fan-out); one
/// that falls behind counts what it can deliver, its ceiling, so an offered
/// rate further above it only lengthens the backlog.
const CEILING_KEEPS_UP: f64 = 0.95;

/// Throughput ceiling runs (measured-point length, label `ceiling`): from
/// `start` deliveries/s, each run offers [`CEILING_STEP`] times the one
/// before, up to `limit`, until a run fails its verification (a message
/// lost, duplicated or not delivered within the drain timeout) or no longer
/// keeps up (see [`CEILING_KEEPS_UP`]). The ceiling is the highest
/// deliveries/s counted in a verified run; there is no latency objective,
/// and each run's latency is reported with it.
async fn ceiling_runs(
    runner: &mut impl Runner,
    profile: &Profile,
    start: f64,
    limit: f64,
    runs: &mut Vec<RateRun>,
) -> anyhow::Result<()> {
    let mut rate = start;
    while rate <= limit {
        let r = runner.run("ceiling", rate, profile.point).await?;
        let verified = r.verdict.ok && r.drained;
        let keeps_up = r.deliveries_per_s >= CEILING_KEEPS_UP * rate;
        runs.push(r);
        if !verified || !keeps_up {
            break;
        }
        rate *= CEILING_STEP;
    }
    Ok(())
}

/// S1 on a standalone server: prepares the accounts, restarts the server
/// for a clean memory baseline, then ramps. Returns the restarted server.
pub async fn run_s1(
    server: Server,
    bin: &Path,
    log_dir: &Path,
    users: Users,
    p: &Profile,
    results: &mut Results,
) -> anyhow::Result<(Server, Target, Users)> {
    let tokens = pool_tokens(&users, p).await?;
    let tls = server.command_line.split_whitespace().all(|a| a != "--plaintext");
    let (server, target) = server.restart_tern(bin, tls, log_dir)?;
    let users = users.moved_to(&target.auth_url);
    eprintln!("== S1 idle connections on {} (restarted, pid {}) ==", target.name, server.pid);
    match storm::idle(&target, &tokens, &p.s1_levels, p.s1_rate, p.per_worker, p.sources).await {
        Ok(points) => results.s1.extend(points),
        Err(e) => note(results, &format!("S1 {}", target.name), Err(e)),
    }
    Ok((server, target, users))
}

async fn pool_tokens(users: &Users, p: &Profile) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..p.pool_users.max(1)).map(|i| format!("tbi{i}")).collect();
    users.tokens(&ids).await
}

/// S2 on any target.
pub async fn run_s2(
    target: &Target,
    users: &Users,
    p: &Profile,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!("== S2 connect storm on {} ==", target.name);
    let tokens = pool_tokens(users, p).await?;
    let (name, ramp) = storm::storm(target, &tokens, p.s2_conns, p.s2_rate, p.per_worker, p.sources).await?;
    results.s2.push(StormRow { target: name, tls: target.tls(), ramp });
    Ok(())
}

/// S3 against tern.
pub async fn run_s3(
    target: &Target,
    users: &Users,
    p: &Profile,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!("== S3 1:1 on {} ({} pairs) ==", target.name, p.s3_pairs);
    let mut bed = TernBed::pairs(target, users, p.s3_pairs).await?;
    let mut runner = TernRunner { bed: &mut bed, profile: p, per_delivery: None };
    let max = search_and_points(&mut runner, p, p.s3_search, p.s3_fixed, &mut results.s3).await;
    bed.close().await;
    results.s3_max.extend(max?);
    Ok(())
}

/// S4 against tern, every group size.
pub async fn run_s4(
    target: &Target,
    users: &Users,
    p: &Profile,
    results: &mut Results,
) -> anyhow::Result<()> {
    for &size in &p.s4_sizes {
        let groups = groups_for(size);
        eprintln!("== S4 fan-out on {}: {groups} group(s) of {size} ==", target.name);
        let mut bed = TernBed::groups(target, users, size, groups).await?;
        let mut runner = TernRunner { bed: &mut bed, profile: p, per_delivery: Some(size - 1) };
        let max = search_and_points(&mut runner, p, p.s4_search, p.s4_fixed, &mut results.s4).await;
        if let Some(start) = max.as_ref().ok().and_then(|max| p.ceiling_start(size, max.as_ref())) {
            let limit = p.s4_search.map_or(start, |(_, limit)| limit);
            if let Err(e) = ceiling_runs(&mut runner, p, start, limit, &mut results.s4).await {
                results.skipped.push(format!("S4 {} ceiling: {e:#}", target.name));
            }
        }
        bed.close().await;
        results.s4_max.extend(max?);
    }
    Ok(())
}

/// S3 and S4 against one peer.
async fn run_peer(peer: Peer, log_dir: &Path, p: &Profile, results: &mut Results) -> anyhow::Result<()> {
    let (server, port) = match peer {
        Peer::Mosquitto => servers::start_mosquitto(log_dir)?,
        Peer::Nats => servers::start_nats(log_dir)?,
    };
    results.command_lines.push(server.command_line.clone());
    let pid = server.pid;
    let outcome = async {
        let base = PeerRun {
            label: String::new(),
            fanout: Fanout::Pairs,
            streams: p.s3_pairs,
            receivers: p.s3_pairs,
            group_size: 0,
            rate: 1.0,
            duration: p.point,
            payload: p.payload,
            slo_ms: p.slo_ms,
            drain: p.drain,
        };
        eprintln!("== S3 1:1 on {} ==", server.name);
        let mut runner = PeerRunner { peer, port, pid, spec: base.clone() };
        let max = search_and_points(&mut runner, p, p.s3_search, p.s3_fixed, &mut results.s3).await?;
        results.s3_max.extend(max);
        for &size in &p.s4_sizes {
            let groups = groups_for(size);
            eprintln!("== S4 fan-out on {}: {groups} group(s) of {size} ==", server.name);
            let spec = PeerRun {
                fanout: Fanout::Groups,
                streams: groups,
                receivers: size - 1,
                group_size: size,
                ..base.clone()
            };
            let mut runner = PeerRunner { peer, port, pid, spec };
            let max = search_and_points(&mut runner, p, p.s4_search, p.s4_fixed, &mut results.s4).await?;
            results.s4_max.extend(max);
        }
        anyhow::Ok(())
    }
    .await;
    server.stop(Duration::from_secs(5));
    outcome
}

/// What `all` needs besides the profile.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub tern_bin: PathBuf,
    pub out_dir: PathBuf,
    pub markdown: PathBuf,
    pub peers: bool,
    pub cluster: bool,
    pub cluster_auth: String,
    pub cluster_dir: PathBuf,
    pub cluster_idgen: String,
}

fn versions(o: &SuiteOptions) -> Vec<(String, String)> {
    vec![
        ("tern".into(), servers::version_of(&o.tern_bin.to_string_lossy(), &["--version"])),
        ("tern-bench".into(), format!("tern-bench {}", env!("CARGO_PKG_VERSION"))),
        ("mosquitto".into(), servers::version_of("mosquitto", &["-h"])),
        ("nats-server".into(), servers::version_of("nats-server", &["--version"])),
        ("rustc".into(), servers::version_of("rustc", &["--version"])),
        ("source".into(), source_commit()),
    ]
}

/// The commit of the working tree the suite runs in, marked if it has
/// uncommitted changes, so a report names the code it measured.
fn source_commit() -> String {
    let commit = servers::version_of("git", &["log", "-1", "--format=%h %s"]);
    let changed = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|out| !out.stdout.is_empty());
    if changed { format!("{commit} (with uncommitted changes)") } else { commit }
}

/// Records a scenario's failure instead of ending the suite.
fn note(results: &mut Results, what: &str, r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("!! {what} failed: {e:#}");
        results.skipped.push(format!("{what}: failed: {e:#}"));
    }
}

/// Every scenario; writes the result file, BENCHMARKS.md and the plots.
pub async fn all(p: &Profile, o: &SuiteOptions) -> anyhow::Result<Results> {
    let mut results = Results::new(&p.name);
    results.machine = crate::report::Machine::probe();
    results.versions = versions(o).into_iter().collect();
    results.command_lines.push(std::env::args().collect::<Vec<_>>().join(" "));
    results.settings = p.settings().into_iter().collect();
    let log_dir = o.out_dir.join("logs");

    for tls in [false, true] {
        let (server, target) = servers::start_tern(&o.tern_bin, tls, &log_dir)?;
        results.command_lines.push(server.command_line.clone());
        eprintln!("started {} (pid {}) for {}", server.name, server.pid, target.name);
        let users = Users::new(&target.auth_url);
        let (server, target, users) = run_s1(server, &o.tern_bin, &log_dir, users, p, &mut results).await?;
        let r = run_s2(&target, &users, p, &mut results).await;
        note(&mut results, &format!("S2 {}", target.name), r);
        let r = run_s3(&target, &users, p, &mut results).await;
        note(&mut results, &format!("S3 {}", target.name), r);
        let r = run_s4(&target, &users, p, &mut results).await;
        note(&mut results, &format!("S4 {}", target.name), r);
        server.stop(Duration::from_secs(15));
    }

    let mut cluster_up = false;
    if o.cluster {
        match servers::cluster_target(&o.cluster_auth, &o.cluster_dir).await {
            Some(target) => {
                cluster_up = true;
                let users = Users::new(&target.auth_url);
                results
                    .command_lines
                    .push(format!("local cluster: {} (access {:?})", o.cluster_auth, target.access));
                let r = run_s2(&target, &users, p, &mut results).await;
                note(&mut results, "S2 cluster", r);
                let cluster = p.for_cluster();
                let r = run_s3(&target, &users, &cluster, &mut results).await;
                note(&mut results, "S3 cluster", r);
                let r = run_s4(&target, &users, &cluster, &mut results).await;
                note(&mut results, "S4 cluster", r);
            }
            None => results.skipped.push(format!(
                "cluster (S2–S4): no cluster answers at {} — start one with ./scripts/cluster.sh up",
                o.cluster_auth
            )),
        }
    } else {
        results.skipped.push("cluster (S2–S4): disabled with --no-cluster".into());
    }

    if o.peers {
        let r = run_peer(Peer::Mosquitto, &log_dir, p, &mut results).await;
        note(&mut results, "mosquitto", r);
        let r = run_peer(Peer::Nats, &log_dir, p, &mut results).await;
        note(&mut results, "nats-server", r);
    } else {
        results.skipped.push("peers: disabled with --no-peers".into());
    }

    eprintln!("== S5 ids ==");
    match crate::ids::run(p.s5, cluster_up.then(|| o.cluster_idgen.clone())).await {
        Ok(r) => results.s5 = r,
        Err(e) => note(&mut results, "S5", Err(e)),
    }
    results.finished_unix_s = crate::report::unix_now();
    write_outputs(&results, &o.out_dir, &o.markdown)?;
    Ok(results)
}

/// Writes `results.json`, the plots and the markdown file.
pub fn write_outputs(results: &Results, out_dir: &Path, markdown: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let json = out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)?;
    eprintln!("wrote {}", json.display());
    let plots = match crate::plot::draw_all(results, out_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("!! plots not drawn: {e:#}");
            Vec::new()
        }
    };
    for p in &plots {
        eprintln!("wrote {}", out_dir.join(p).display());
    }
    let prefix = relative_dir(out_dir, markdown);
    let md = crate::report::markdown(results, &plots).replace("](bench-results/", &format!("]({prefix}/"));
    std::fs::write(markdown, md)?;
    eprintln!("wrote {}", markdown.display());
    Ok(())
}

/// `out_dir` as seen from the markdown file's directory (for image links).
fn relative_dir(out_dir: &Path, markdown: &Path) -> String {
    let base = markdown.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (Ok(out), Ok(base)) = (std::path::absolute(out_dir), std::path::absolute(base)) else {
        return out_dir.display().to_string();
    };
    out.strip_prefix(&base).map(|p| p.display().to_string()).unwrap_or_else(|_| out.display().to_string())
}

/// S3/S4 (as the profile says) against Mosquitto and NATS; failures are
/// noted in the results.
pub async fn peers_only(p: &Profile, log_dir: &Path, results: &mut Results) {
    results.versions = Default::default();
    for (peer, name) in [(Peer::Mosquitto, "mosquitto"), (Peer::Nats, "nats-server")] {
        let r = run_peer(peer, log_dir, p, results).await;
        note(results, name, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_ceiling_runs_start_at_the_target_or_above_the_search() {
        let full = Profile::full();
        let found = |deliveries: f64| MaxRate { max_deliveries_per_s: deliveries, ..MaxRate::default() };
        assert_eq!(full.ceiling_start(1000, Some(&found(600_000.0))), Some(1_000_000.0));
        assert_eq!(full.ceiling_start(1000, None), Some(1_000_000.0));
        assert_eq!(full.ceiling_start(1000, Some(&found(1_000_000.0))), Some(1_250_000.0));
        assert_eq!(full.ceiling_start(100, Some(&found(600_000.0))), None);
        assert_eq!(full.for_cluster().ceiling_start(1000, Some(&found(20_000.0))), None);
        assert_eq!(Profile::smoke().ceiling_start(100, None), None);
    }

    /// A server that delivers up to `capacity` deliveries/s: below it a run
    /// counts 98% of the offered rate (the last messages' latency), above
    /// it the capacity; past `breaks` a run loses messages.
    struct ModelServer {
        capacity: f64,
        breaks: f64,
        offered: Vec<f64>,
    }

    impl Runner for ModelServer {
        async fn run(&mut self, label: &str, rate: f64, _: Duration) -> anyhow::Result<RateRun> {
            self.offered.push(rate);
            let mut r = RateRun { label: label.into(), drained: true, ..RateRun::default() };
            r.deliveries_per_s = (rate * 0.98).min(self.capacity);
            r.verdict.ok = rate <= self.breaks;
            Ok(r)
        }
    }

    async fn ceiling_of(capacity: f64, breaks: f64, limit: f64) -> (Vec<f64>, Vec<RateRun>) {
        let mut server = ModelServer { capacity, breaks, offered: Vec::new() };
        let mut runs = Vec::new();
        ceiling_runs(&mut server, &Profile::smoke(), 1_000_000.0, limit, &mut runs).await.unwrap();
        (server.offered, runs)
    }

    #[tokio::test]
    async fn ceiling_runs_go_up_until_the_server_falls_behind() {
        // Keeps up at 1 M and 1.25 M; at 1.5625 M it counts 1.4 M (90%).
        let (offered, runs) = ceiling_of(1_400_000.0, f64::MAX, 4_000_000.0).await;
        assert_eq!(offered, [1_000_000.0, 1_250_000.0, 1_562_500.0]);
        assert!(runs.iter().all(|r| r.label == "ceiling"));
        assert_eq!(runs.last().unwrap().deliveries_per_s, 1_400_000.0);
    }

    #[tokio::test]
    async fn ceiling_runs_stop_at_a_failed_verification_or_the_limit() {
        let (offered, _) = ceiling_of(f64::MAX, 1_300_000.0, 4_000_000.0).await;
        assert_eq!(offered, [1_000_000.0, 1_250_000.0, 1_562_500.0]);
        let (offered, _) = ceiling_of(f64::MAX, f64::MAX, 1_300_000.0).await;
        assert_eq!(offered, [1_000_000.0, 1_250_000.0]);
        // The first run already behind: one run.
        let (offered, _) = ceiling_of(500_000.0, f64::MAX, 4_000_000.0).await;
        assert_eq!(offered, [1_000_000.0]);
    }
}
