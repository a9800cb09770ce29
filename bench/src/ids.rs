//! S5: id generation, in-process and over the network.
//!
//! - snowflake `next_id` and `fill` (one worker id: at most 4096 ids per
//!   millisecond by construction, 4.1 M/s);
//! - Leaf-style segments handed out by [`SegmentAllocator`] (lock-free: one
//!   compare-and-swap per call on the segment's cursor; double-buffered),
//!   one id per call (`next_id`) and runs of ids per call (`next_range`),
//!   from 1 and 2 threads; with the default step (1000 ids per segment, so
//!   bounded by the counter store: one durable increment, an fsync, per
//!   segment) and with a step sized for tens of millions of ids per second
//!   (runs of ids can still outpace the store at that step);
//! - over the network: the idgen gRPC service (served by this process on
//!   loopback, as `tern idgen` serves it in a cluster) asked for batches,
//!   and segments fetched over it; and the cluster's idgen when it is up.
//!
//! Every test checks that the ids it got are unique. Checks run after the
//! timed part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tern_idgen::Snowflake;
use tern_idgen::rpc::{IdGenService, MAX_BATCH, RemoteIdGen, SegmentAllocator, SegmentSource};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdsResult {
    pub name: String,
    /// `in-process`, `network (loopback)` or `cluster`.
    pub place: String,
    pub ids: u64,
    pub seconds: f64,
    pub ids_per_s: f64,
    /// Ids unique: strictly increasing per consumer for snowflake ids;
    /// increasing per thread and no id in two runs for segment ids.
    pub verified: bool,
    /// Ids asked for per call (1: one id per call); 0 in older results.
    #[serde(default)]
    pub ids_per_call: u64,
}

fn result(name: &str, place: &str, per_call: u64, ids: u64, verified: bool, seconds: f64) -> IdsResult {
    let r = IdsResult {
        name: name.into(),
        place: place.into(),
        ids,
        seconds,
        ids_per_s: ids as f64 / seconds.max(1e-6),
        verified,
        ids_per_call: per_call,
    };
    eprintln!(
        "  S5 {:<52} {:<18} {:>13.0} ids/s ({} ids, {})",
        r.name,
        r.place,
        r.ids_per_s,
        r.ids,
        if verified { "unique: OK" } else { "DUPLICATES" }
    );
    r
}

fn snowflake_loop(duration: Duration, batch: usize) -> (u64, bool) {
    let sf = Snowflake::new(1).expect("worker 1");
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u64; batch];
    let (mut n, mut last, mut ok) = (0u64, 0u64, true);
    while Instant::now() < deadline {
        for _ in 0..64 {
            if batch == 1 {
                buf[0] = sf.next_id().expect("id");
            } else {
                sf.fill(&mut buf).expect("ids");
            }
            for &id in &buf {
                ok &= id > last;
                last = id;
            }
            n += batch as u64;
        }
    }
    (n, ok)
}

/// The ids one thread got, as maximal runs of consecutive ids, and whether
/// they increased.
#[derive(Default)]
struct Runs {
    runs: Vec<(u64, u64)>,
    ids: u64,
    increasing: bool,
}

impl Runs {
    fn push(&mut self, run: std::ops::Range<u64>) {
        self.ids += run.end - run.start;
        match self.runs.last_mut() {
            Some(last) => {
                self.increasing &= run.start >= last.1;
                if run.start == last.1 {
                    last.1 = run.end;
                } else {
                    self.runs.push((run.start, run.end));
                }
            }
            None => {
                self.increasing = true;
                self.runs.push((run.start, run.end));
            }
        }
    }
}

/// True when no id is in two runs, whichever threads they came from.
fn disjoint(mut runs: Vec<(u64, u64)>) -> bool {
    runs.sort_unstable();
    runs.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// `threads` threads take ids from `alloc` until `duration` has passed:
/// one `next_id` per call when `batch` is 1, else one `next_range(batch)`.
/// Returns ids taken, whether they were unique and increasing per thread,
/// and the seconds taken (before the check).
async fn allocator_test(
    alloc: Arc<SegmentAllocator>,
    threads: usize,
    batch: u64,
    duration: Duration,
) -> anyhow::Result<(u64, bool, f64)> {
    let runtime = tokio::runtime::Handle::current();
    let start = Arc::new(std::sync::Barrier::new(threads));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (alloc, runtime, start) = (alloc.clone(), runtime.clone(), start.clone());
            // Each caller on a thread of its own, not a runtime worker: the
            // runtime stays free for the prefetches.
            tokio::task::spawn_blocking(move || {
                start.wait();
                let deadline = Instant::now() + duration;
                runtime.block_on(async {
                    let mut runs = Runs::default();
                    while Instant::now() < deadline {
                        for _ in 0..1024 {
                            if batch == 1 {
                                let id = alloc.next_id().await?;
                                runs.push(id..id + 1);
                            } else {
                                runs.push(alloc.next_range(batch).await?);
                            }
                        }
                    }
                    anyhow::Ok(runs)
                })
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.push(w.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let ids = all.iter().map(|r| r.ids).sum();
    let increasing = all.iter().all(|r| r.increasing);
    let unique = disjoint(all.into_iter().flat_map(|r| r.runs).collect());
    Ok((ids, unique && increasing, seconds))
}

async fn batches_loop(
    remote: Arc<RemoteIdGen>,
    consumers: usize,
    duration: Duration,
) -> anyhow::Result<(u64, bool)> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let remote = remote.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut last, mut ok) = (0u64, 0u64, true);
            while Instant::now() < deadline {
                let ids = remote.next_ids(MAX_BATCH).await?;
                for id in ids {
                    ok &= id > last;
                    last = id;
                    n += 1;
                }
            }
            anyhow::Ok((n, ok))
        }));
    }
    let (mut n, mut ok) = (0, true);
    for t in tasks {
        let (a, b) = t.await??;
        n += a;
        ok &= b;
    }
    Ok((n, ok))
}

/// Segment size of the fast-path tests: at 10 M ids/s, 10 fetches a second.
/// (Leaf grows its step with the rate for the same reason.)
pub const FAST_STEP: u32 = 1_000_000;
/// Ids asked for per `next_range` call in the batch tests.
pub const RANGE: u64 = 100;

/// Runs every S5 test for `duration` each; `cluster_idgen` is the cluster's
/// idgen gRPC address when the cluster is up.
pub async fn run(duration: Duration, cluster_idgen: Option<String>) -> anyhow::Result<Vec<IdsResult>> {
    let mut out = Vec::new();

    let started = Instant::now();
    let (n, ok) = tokio::task::spawn_blocking(move || snowflake_loop(duration, 1)).await?;
    let seconds = started.elapsed().as_secs_f64();
    out.push(result("snowflake next_id (1 thread)", "in-process", 1, n, ok, seconds));

    let started = Instant::now();
    let (n, ok) = tokio::task::spawn_blocking(move || snowflake_loop(duration, 4096)).await?;
    let seconds = started.elapsed().as_secs_f64();
    out.push(result("snowflake fill, batches of 4096", "in-process", 4096, n, ok, seconds));

    // The idgen service over the embedded counter store, as in-process
    // segment source and, below, behind gRPC. Each test has an allocator
    // of its own.
    let dir = tempfile::tempdir()?;
    let counters = Arc::new(tern_store::embedded::EmbeddedSequenceStore::open(&dir.path().join("seq.redb"))?);
    let step = tern_idgen::rpc::DEFAULT_STEP;
    let sf = Arc::new(Snowflake::new(2)?);
    for (step, threads, batch) in [
        (step, 1, 1),
        (step, 1, RANGE),
        (FAST_STEP, 1, 1),
        (FAST_STEP, 2, 1),
        (FAST_STEP, 1, RANGE),
        (FAST_STEP, 2, RANGE),
    ] {
        let service = Arc::new(IdGenService::new(sf.clone(), counters.clone(), step));
        let alloc = Arc::new(SegmentAllocator::new(service as Arc<dyn SegmentSource>, "bench").await?);
        let (n, ok, seconds) = allocator_test(alloc, threads, batch, duration).await?;
        let call = if batch == 1 { "next_id".to_owned() } else { format!("next_range({batch})") };
        let threads = if threads == 1 { "1 thread".to_owned() } else { format!("{threads} threads") };
        out.push(result(
            &format!("segment {call}, step {step}, {threads}"),
            "in-process",
            batch,
            n,
            ok,
            seconds,
        ));
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = IdGenService::new(Arc::new(Snowflake::new(3)?), counters, step);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(served.into_service()).serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        ),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    out.extend(remote_tests(channel, "network (loopback)", duration, step).await?);
    stop.cancel();
    let _ = server.await;

    if let Some(addr) = cluster_idgen {
        match tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await {
            Ok(channel) => out.extend(remote_tests(channel, "cluster", duration, step).await?),
            Err(e) => eprintln!("  S5 cluster idgen at {addr} unreachable: {e}"),
        }
    }
    Ok(out)
}

async fn remote_tests(
    channel: tonic::transport::Channel,
    place: &str,
    duration: Duration,
    step: u32,
) -> anyhow::Result<Vec<IdsResult>> {
    let mut out = Vec::new();
    let remote = Arc::new(RemoteIdGen::new(channel.clone()));
    for callers in [1, 4] {
        let started = Instant::now();
        let (n, ok) = batches_loop(remote.clone(), callers, duration).await.context("NextIds")?;
        let seconds = started.elapsed().as_secs_f64();
        let name = format!(
            "snowflake NextIds({MAX_BATCH}), {callers} caller{}",
            if callers == 1 { "" } else { "s" }
        );
        out.push(result(&name, place, u64::from(MAX_BATCH), n, ok, seconds));
    }
    let alloc = Arc::new(SegmentAllocator::new(remote as Arc<dyn SegmentSource>, "bench").await?);
    let (n, ok, seconds) = allocator_test(alloc, 1, 1, duration).await?;
    out.push(result(&format!("segment next_id, step {step}, via NextSegment"), place, 1, n, ok, seconds));
    Ok(out)
}
