//! S5: id generation, in-process and over the network.
//!
//! - snowflake `next_id` and `fill` (one worker id: at most 4096 ids per
//!   millisecond by construction, 4.1 M/s);
//! - Leaf-style segments handed out by [`SegmentAllocator`] (one lock per
//!   id, a range fetch per segment, double-buffered);
//! - over the network: the idgen gRPC service (served by this process on
//!   loopback, as `tern idgen` serves it in a cluster) asked for batches,
//!   and segments fetched over it; and the cluster's idgen when it is up.
//!
//! Every test checks that the ids it got are unique.

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
    /// Ids unique: strictly increasing per consumer for snowflake ids,
    /// no repeat after sorting for segment ids.
    pub verified: bool,
}

fn result(name: &str, place: &str, ids: u64, verified: bool, started: Instant) -> IdsResult {
    let seconds = started.elapsed().as_secs_f64();
    let r = IdsResult {
        name: name.into(),
        place: place.into(),
        ids,
        seconds,
        ids_per_s: ids as f64 / seconds.max(1e-6),
        verified,
    };
    eprintln!(
        "  S5 {:<40} {:<18} {:>12.0} ids/s ({} ids, {})",
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

/// Segment ids are unique but not always increasing (a prefetched segment
/// can land after one fetched inline), so they are checked by sorting
/// after the timed loop.
async fn allocator_loop(alloc: &SegmentAllocator, duration: Duration) -> anyhow::Result<(u64, bool)> {
    let deadline = Instant::now() + duration;
    let mut ids = Vec::with_capacity(1 << 20);
    while Instant::now() < deadline {
        for _ in 0..1024 {
            ids.push(alloc.next_id().await?);
        }
    }
    let n = ids.len() as u64;
    ids.sort_unstable();
    ids.dedup();
    Ok((n, ids.len() as u64 == n))
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

/// Runs every S5 test for `duration` each; `cluster_idgen` is the cluster's
/// idgen gRPC address when the cluster is up.
pub async fn run(duration: Duration, cluster_idgen: Option<String>) -> anyhow::Result<Vec<IdsResult>> {
    let mut out = Vec::new();

    let started = Instant::now();
    let (n, ok) = tokio::task::spawn_blocking(move || snowflake_loop(duration, 1)).await?;
    out.push(result("snowflake next_id (1 thread)", "in-process", n, ok, started));

    let started = Instant::now();
    let (n, ok) = tokio::task::spawn_blocking(move || snowflake_loop(duration, 4096)).await?;
    out.push(result("snowflake fill, batches of 4096", "in-process", n, ok, started));

    // The idgen service over the embedded counter store, as in-process
    // segment source and, below, behind gRPC.
    let dir = tempfile::tempdir()?;
    let counters = Arc::new(tern_store::embedded::EmbeddedSequenceStore::open(&dir.path().join("seq.redb"))?);
    let step = tern_idgen::rpc::DEFAULT_STEP;
    let service = Arc::new(IdGenService::new(Arc::new(Snowflake::new(2)?), counters.clone(), step));
    let alloc = SegmentAllocator::new(service.clone() as Arc<dyn SegmentSource>, "bench").await?;
    let started = Instant::now();
    let (n, ok) = allocator_loop(&alloc, duration).await?;
    out.push(result(&format!("segment allocator (step {step})"), "in-process", n, ok, started));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = IdGenService::new(Arc::new(Snowflake::new(3)?), counters, step);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(served.into_service()).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
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
    let started = Instant::now();
    let (n, ok) = batches_loop(remote.clone(), 1, duration).await.context("NextIds")?;
    out.push(result(&format!("snowflake NextIds({MAX_BATCH}), 1 caller"), place, n, ok, started));
    let started = Instant::now();
    let (n, ok) = batches_loop(remote.clone(), 4, duration).await.context("NextIds")?;
    out.push(result(&format!("snowflake NextIds({MAX_BATCH}), 4 callers"), place, n, ok, started));
    let alloc = SegmentAllocator::new(remote as Arc<dyn SegmentSource>, "bench").await?;
    let started = Instant::now();
    let (n, ok) = allocator_loop(&alloc, duration).await?;
    out.push(result(&format!("segment allocator (step {step}) via NextSegment"), place, n, ok, started));
    Ok(out)
}
