//! S1 (idle connections) and S2 (connect storm).
//!
//! Both open connections at a set rate and log each one in (TCP connect,
//! TLS handshake, LOGIN with a token: token check and session placement on
//! the server). One process may hold at most 20,000 file descriptors here,
//! so the connections are opened by worker processes — this same binary
//! started as `tern-bench worker` — each holding a share, bound to several
//! 127.0.0.x source addresses, all held by a few tasks (no task per idle
//! connection). The parent hands each worker a job as one JSON line on its
//! stdin and reads JSON lines back.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tern_proto::{RequestType, pb};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, Semaphore};

use crate::clock;
use crate::procfs::{self, CpuWindow, ProcCpu};
use crate::servers::Target;
use crate::stats::{self, Summary};
use crate::wire::{self, Dial};

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectJob {
    pub access: Vec<String>,
    pub ca: Option<PathBuf>,
    /// Tokens to log in with; connection `i` uses `tokens[i % len]` with
    /// device id `d<i>`.
    pub tokens: Vec<String>,
    /// Index of this worker's first connection (device ids stay unique).
    pub first: u64,
    pub count: u64,
    /// Connections per second this worker opens.
    pub rate: f64,
    /// How many 127.0.0.x source addresses to spread over (0: none bound).
    pub sources: usize,
    /// Logins in flight at most.
    pub concurrency: usize,
    /// Keep the connections open (heartbeating) until told to close.
    pub hold: bool,
}

/// What a worker reports, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Progress { ok: u64, errors: u64 },
    Done { ok: u64, errors: u64, elapsed_s: f64, latency: Vec<(u64, u64)>, notes: Vec<String> },
    Closed,
}

/// `tern-bench worker`: runs one [`ConnectJob`] read from stdin.
pub async fn worker_main() -> anyhow::Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let line = stdin.next_line().await?.context("no job on stdin")?;
    let job: ConnectJob = serde_json::from_str(&line)?;
    let emit = |m: &WorkerMsg| println!("{}", serde_json::to_string(m).expect("serializable"));
    let dials: Vec<Dial> =
        job.access.iter().map(|a| Dial::new(a, job.ca.as_deref())).collect::<anyhow::Result<_>>()?;
    let dials = Arc::new(dials);
    let tokens = Arc::new(job.tokens.clone());
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let notes = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let latency = Arc::new(std::sync::Mutex::new(stats::new_histogram()));
    let gate = Arc::new(Semaphore::new(job.concurrency.max(1)));
    let start = clock::now_ns();

    let reporter = {
        let (ok, errors) = (ok.clone(), errors.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                println!(
                    "{}",
                    serde_json::to_string(&WorkerMsg::Progress {
                        ok: ok.load(Relaxed),
                        errors: errors.load(Relaxed)
                    })
                    .expect("serializable")
                );
            }
        })
    };

    let mut tasks = Vec::with_capacity(job.count as usize);
    for i in 0..job.count {
        // Open loop: connection i is due at start + i / rate; the login
        // latency counts from then, even if the worker is late.
        let due = start + (i as f64 * 1e9 / job.rate) as u64;
        clock::sleep_until_ns(due).await;
        let permit = gate.clone().acquire_owned().await.expect("semaphore open");
        let idx = job.first + i;
        let (dials, tokens) = (dials.clone(), tokens.clone());
        let (ok, errors, notes, held, latency) =
            (ok.clone(), errors.clone(), notes.clone(), held.clone(), latency.clone());
        let sources = job.sources;
        let hold = job.hold;
        tasks.push(tokio::spawn(async move {
            let dial = &dials[idx as usize % dials.len()];
            let token = &tokens[idx as usize % tokens.len()];
            let outcome = async {
                let (read, mut write) = dial.open(wire::source_ip(idx as usize, sources)).await?;
                let mut frames = wire::frames(read);
                wire::login(&mut frames, &mut write, token, &format!("d{idx}")).await?;
                anyhow::Ok((frames, write))
            }
            .await;
            drop(permit);
            match outcome {
                Ok(conn) => {
                    stats::record_ns(
                        &mut latency.lock().unwrap_or_else(|e| e.into_inner()),
                        clock::now_ns() - due,
                    );
                    ok.fetch_add(1, Relaxed);
                    if hold {
                        held.lock().await.push(conn);
                    }
                }
                Err(e) => {
                    if errors.fetch_add(1, Relaxed) < 5 {
                        notes.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{e:#}"));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed_s = (clock::now_ns() - start) as f64 / 1e9;
    reporter.abort();
    let done = WorkerMsg::Done {
        ok: ok.load(Relaxed),
        errors: errors.load(Relaxed),
        elapsed_s,
        latency: stats::to_pairs(&latency.lock().unwrap_or_else(|e| e.into_inner())),
        notes: notes.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    };
    emit(&done);
    if job.hold {
        // Idle: one HEARTBEAT per connection every 20 s (the server's idle
        // timeout is 90 s), from this one task, until told to close.
        let heartbeat = wire::encode(RequestType::Heartbeat, 2, &pb::Heartbeat {});
        let held = held.clone();
        let beats = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(20));
            tick.tick().await;
            loop {
                tick.tick().await;
                for (_, write) in held.lock().await.iter_mut() {
                    let _ = write.write_all(&heartbeat).await;
                    let _ = write.flush().await;
                }
            }
        });
        let _ = stdin.next_line().await;
        beats.abort();
    }
    held.lock().await.clear();
    emit(&WorkerMsg::Closed);
    Ok(())
}

/// A running worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    done: tokio::sync::mpsc::Receiver<WorkerMsg>,
}

/// Connections opened by worker processes, kept open until [`Fleet::close`].
pub struct Fleet {
    workers: Vec<Worker>,
}

/// Outcome of one ramp.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ramp {
    pub connections: u64,
    pub offered_rate: f64,
    pub ok: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    /// Successful logins per second over the ramp.
    pub logins_per_s: f64,
    /// From the connection's due time to its LoginResponse.
    pub latency: Summary,
    pub workers: usize,
    pub sources: usize,
    pub cpu: Vec<ProcCpu>,
    /// The whole machine over the same window (absent in results of
    /// earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_cpu: Option<procfs::MachineCpu>,
    pub errors_seen: Vec<String>,
}

impl Fleet {
    pub fn new() -> Fleet {
        Fleet { workers: Vec::new() }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.child.id()).collect()
    }

    /// Opens `count` more connections at `rate` per second, split over
    /// workers of at most `per_worker` connections each; device ids start
    /// at `first`.
    #[allow(clippy::too_many_arguments)]
    pub async fn ramp(
        &mut self,
        target: &Target,
        tokens: &[String],
        first: u64,
        count: u64,
        rate: f64,
        per_worker: u64,
        sources: usize,
        hold: bool,
        label: &str,
    ) -> anyhow::Result<Ramp> {
        let n = count.div_ceil(per_worker.max(1)).max(1);
        let exe = std::env::current_exe()?;
        let mut fresh = Vec::new();
        for _ in 0..n {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker process")?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let (tx, done) = tokio::sync::mpsc::channel(4);
            let (o, e) = (ok.clone(), errors.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<WorkerMsg>(&line) {
                        Ok(WorkerMsg::Progress { ok, errors }) => {
                            o.store(ok, Relaxed);
                            e.store(errors, Relaxed);
                        }
                        Ok(m) => {
                            if let WorkerMsg::Done { ok, errors, .. } = &m {
                                o.store(*ok, Relaxed);
                                e.store(*errors, Relaxed);
                            }
                            let _ = tx.send(m).await;
                        }
                        Err(_) => eprintln!("  worker: {line}"),
                    }
                }
            });
            fresh.push(Worker { child, stdin, ok, errors, done });
        }
        let mut procs = target.procs.clone();
        procs.extend(fresh.iter().filter_map(|w| w.child.id()).map(|p| ("tern-bench worker".to_owned(), p)));
        let cpu = CpuWindow::start(&procs);
        let share = count / n;
        for (w, worker) in fresh.iter_mut().enumerate() {
            let w = w as u64;
            let job = ConnectJob {
                access: target.access.clone(),
                ca: target.ca.clone(),
                tokens: tokens.to_vec(),
                first: first + w * share,
                count: if w == n - 1 { count - share * (n - 1) } else { share },
                rate: rate / n as f64,
                sources,
                concurrency: 256,
                hold,
            };
            let line = serde_json::to_string(&job)? + "\n";
            worker.stdin.write_all(line.as_bytes()).await?;
            worker.stdin.flush().await?;
        }
        // Progress once a second until every worker is done.
        let started = std::time::Instant::now();
        let counters: Vec<(Arc<AtomicU64>, Arc<AtomicU64>)> =
            fresh.iter().map(|w| (w.ok.clone(), w.errors.clone())).collect();
        let mut results = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        for worker in fresh.iter_mut() {
            loop {
                tokio::select! {
                    m = worker.done.recv() => {
                        match m {
                            Some(done @ WorkerMsg::Done { .. }) => { results.push(done); break; }
                            Some(_) => {}
                            None => anyhow::bail!("a worker died during the ramp"),
                        }
                    }
                    _ = tick.tick() => {
                        let ok: u64 = counters.iter().map(|c| c.0.load(Relaxed)).sum();
                        let errors: u64 = counters.iter().map(|c| c.1.load(Relaxed)).sum();
                        eprintln!(
                            "  [{label}] t={:.0}s logins ok={ok}/{count} errors={errors}",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            }
        }
        let mut latency = stats::new_histogram();
        let mut r =
            Ramp { connections: count, offered_rate: rate, workers: n as usize, sources, ..Ramp::default() };
        for m in results {
            if let WorkerMsg::Done { ok, errors, elapsed_s, latency: pairs, notes } = m {
                r.ok += ok;
                r.errors += errors;
                r.elapsed_s = r.elapsed_s.max(elapsed_s);
                stats::add_pairs(&mut latency, &pairs);
                r.errors_seen.extend(notes);
            }
        }
        r.cpu = cpu.finish();
        r.machine_cpu = cpu.machine();
        r.logins_per_s = r.ok as f64 / r.elapsed_s.max(1e-3);
        r.latency = Summary::of(&latency);
        self.workers.extend(fresh);
        Ok(r)
    }

    /// Tells every worker to close its connections and waits for them.
    pub async fn close(self) {
        for mut w in self.workers {
            let _ = w.stdin.write_all(b"close\n").await;
            let _ = w.stdin.flush().await;
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(m) = w.done.recv().await {
                    if matches!(m, WorkerMsg::Closed) {
                        break;
                    }
                }
            })
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
        }
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

/// Memory of the access node with `connections` idle connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdlePoint {
    pub target: String,
    pub tls: bool,
    pub connections: u64,
    pub ok: u64,
    pub errors: u64,
    pub base_rss_kib: u64,
    pub rss_kib: u64,
    pub base_anon_kib: u64,
    pub anon_kib: u64,
    /// (RSS − RSS before any connection) / connections.
    pub rss_per_conn_bytes: f64,
    pub anon_per_conn_bytes: f64,
    /// RSS growth per connection since the previous level (robust against
    /// a drifting baseline).
    pub marginal_per_conn_bytes: Option<f64>,
    pub ramp_rate: f64,
    pub login_latency: Summary,
    /// RSS after every connection was closed again.
    pub rss_after_close_kib: u64,
}

/// S1: ramps to each of `levels` connections (ascending) at `rate`/s and
/// measures the access node's memory at each level.
pub async fn idle(
    target: &Target,
    tokens: &[String],
    levels: &[u64],
    rate: f64,
    per_worker: u64,
    sources: usize,
) -> anyhow::Result<Vec<IdlePoint>> {
    let pid = target.access_pid.context("S1 needs the access node's process")?;
    let base = settled_memory(pid).await;
    let mut fleet = Fleet::new();
    let mut points = Vec::new();
    let mut open = 0;
    let (mut ok, mut errors) = (0, 0);
    for &level in levels {
        if level <= open {
            continue;
        }
        let label = format!("s1 {} {level}", target.name);
        let r =
            fleet.ramp(target, tokens, open, level - open, rate, per_worker, sources, true, &label).await?;
        open = level;
        ok += r.ok;
        errors += r.errors;
        // Let the server settle (buffers shrink after the handshake).
        let m = settled_memory(pid).await;
        let marginal = points.last().map(|prev: &IdlePoint| {
            (m.rss_kib as f64 - prev.rss_kib as f64) * 1024.0 / (level - prev.connections) as f64
        });
        let p = IdlePoint {
            target: target.name.clone(),
            tls: target.tls(),
            connections: level,
            ok,
            errors,
            base_rss_kib: base.rss_kib,
            rss_kib: m.rss_kib,
            base_anon_kib: base.anon_kib,
            anon_kib: m.anon_kib,
            rss_per_conn_bytes: (m.rss_kib.saturating_sub(base.rss_kib) * 1024) as f64 / level as f64,
            anon_per_conn_bytes: (m.anon_kib.saturating_sub(base.anon_kib) * 1024) as f64 / level as f64,
            marginal_per_conn_bytes: marginal,
            ramp_rate: rate,
            login_latency: r.latency.clone(),
            rss_after_close_kib: 0,
        };
        eprintln!(
            "  S1 {} {} connections ({} ok, {} errors): RSS {} → {} KiB, {:.0} B/conn (anon {:.0} B/conn)",
            target.name,
            level,
            p.ok,
            p.errors,
            base.rss_kib,
            m.rss_kib,
            p.rss_per_conn_bytes,
            p.anon_per_conn_bytes
        );
        points.push(p);
    }
    fleet.close().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = procfs::memory(pid).rss_kib;
    for p in &mut points {
        p.rss_after_close_kib = after;
    }
    Ok(points)
}

/// The process's memory once it stops moving (less than 64 KiB in half a
/// second; at most 10 s), after a short pause for buffers to be released.
async fn settled_memory(pid: u32) -> procfs::Memory {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = procfs::memory(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = procfs::memory(pid);
        if now.rss_kib.abs_diff(last.rss_kib) < 64 {
            return now;
        }
        last = now;
    }
    last
}

/// S2: a connect storm of `count` logins offered at `rate`/s.
pub async fn storm(
    target: &Target,
    tokens: &[String],
    count: u64,
    rate: f64,
    per_worker: u64,
    sources: usize,
) -> anyhow::Result<(String, Ramp)> {
    let mut fleet = Fleet::new();
    let label = format!("s2 {}", target.name);
    // Device ids from 1,000,000 so they never replace S1's.
    let r = fleet.ramp(target, tokens, 1_000_000, count, rate, per_worker, sources, true, &label).await?;
    fleet.close().await;
    eprintln!(
        "  S2 {}: {} logins ok, {} errors in {:.2} s = {:.0} logins/s (offered {:.0}/s); login latency ms {}",
        target.name,
        r.ok,
        r.errors,
        r.elapsed_s,
        r.logins_per_s,
        rate,
        r.latency.line()
    );
    Ok((target.name.clone(), r))
}
