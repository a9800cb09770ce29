//! The consumer loop the storage services share.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::{Bus, BusRecord, StoreResult};

/// Most records handed to `process` at once.
const BATCH: usize = 512;
/// Pause before a failed poll or batch is tried again the first time; it
/// doubles with each failure in a row, up to [`RETRY_PAUSE_MAX`], so a
/// backend that stays down is neither hammered nor flooding the log (an
/// error per try), while a short hiccup costs only 200 ms.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause between two tries (see [`RETRY_PAUSE`]).
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);
/// Least time between two offset commits while batches keep finishing; the
/// batches finished meanwhile are committed together. A commit is a durable
/// write (an `fsync` on the embedded bus, a broker round trip on Kafka) that
/// the loop waits for before it polls again, so committing each batch on its
/// own delayed the delivery of the next ones by a commit per batch. A crash
/// replays up to this much more, which processing tolerates (idempotent).
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);

/// Consumes `topic` in `group` until `shutdown` resolves: polls a batch,
/// hands it to `process` — again, after a pause, until it succeeds, since
/// committing past a failed batch would lose it — then commits the batch.
/// Delivery is at least once (a crash before the commit replays the batch),
/// so `process` must be idempotent.
pub async fn consume<F, Fut>(
    bus: &dyn Bus,
    topic: &str,
    group: &str,
    shutdown: impl Future<Output = ()>,
    mut process: F,
) -> StoreResult<()>
where
    F: FnMut(Vec<BusRecord>) -> Fut,
    Fut: Future<Output = StoreResult<()>>,
{
    // The pipelined loop with one batch at a time: each batch is done when
    // `process` returns, so its finishing task has nothing left to do.
    let process = |batch| {
        let processed = process(batch);
        async move { processed.await.map(|()| tokio::spawn(async {})) }
    };
    consume_pipelined(bus, topic, group, shutdown, 1, process).await
}

/// Like [`consume`], for a consumer whose batches finish later than they
/// start: `process` does the part that must happen in order and returns
/// the task that finishes the batch. Up to `depth` batches are finishing at
/// once; their offsets are committed in order, each once its task and every
/// task before it are done, so a crash replays every batch not finished.
/// A finishing task must not fail (it retries what it writes); one that
/// panics stops the consumer with an error, since committing past it would
/// lose its batch. On shutdown the batches under way are finished and
/// committed first.
pub async fn consume_pipelined<F, Fut>(
    bus: &dyn Bus,
    topic: &str,
    group: &str,
    shutdown: impl Future<Output = ()>,
    depth: usize,
    mut process: F,
) -> StoreResult<()>
where
    F: FnMut(Vec<BusRecord>) -> Fut,
    Fut: Future<Output = StoreResult<tokio::task::JoinHandle<()>>>,
{
    let depth = depth.max(1);
    let mut consumer = bus.subscribe(topic, group).await?;
    let mut finishing: VecDeque<(Vec<BusRecord>, tokio::task::JoinHandle<()>)> = VecDeque::new();
    // The newest finished record of each partition, not committed yet.
    let mut finished = Vec::new();
    let mut last_commit: Option<Instant> = None;
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut poll_failures = 0;
    loop {
        // Take what finished, oldest first; wait for the oldest when the
        // pipeline is full or the consumer is stopping.
        loop {
            let full = finishing.len() >= depth;
            let Some((_, task)) = finishing.front_mut() else { break };
            if !(task.is_finished() || full || stopping) {
                break;
            }
            task.await
                .map_err(|e| crate::StoreError::Backend(format!("{group}: finishing a batch failed: {e}")))?;
            let (batch, _) = finishing.pop_front().expect("front exists");
            newest_per_partition(&mut finished, batch);
        }
        let commit_due = last_commit.is_none_or(|at| at.elapsed() >= COMMIT_INTERVAL);
        if !finished.is_empty() && (commit_due || stopping) {
            if let Err(e) = consumer.commit(&finished).await {
                // A later commit of the same partitions covers these;
                // otherwise a restart replays them.
                tracing::warn!(%group, error = %e, "offset commit failed");
            }
            finished.clear();
            last_commit = Some(Instant::now());
        }
        if stopping {
            return Ok(());
        }
        // While batches are finishing, or finished ones wait for their
        // commit, poll briefly so those do not wait for new records.
        let wait = if !finishing.is_empty() || !finished.is_empty() {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(500)
        };
        let polled = tokio::select! {
            _ = &mut shutdown => {
                stopping = true;
                continue;
            }
            polled = consumer.poll(BATCH, wait) => polled,
        };
        let batch = match polled {
            Ok(batch) => {
                poll_failures = 0;
                if batch.is_empty() {
                    continue;
                }
                batch
            }
            Err(e) => {
                poll_failures += 1;
                let pause = retry_pause(poll_failures);
                tracing::error!(%group, error = %e, failures = poll_failures, ?pause, "poll failed; retrying");
                tokio::select! {
                    _ = &mut shutdown => stopping = true,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        let mut failures = 0;
        let task = loop {
            match process(batch.clone()).await {
                Ok(task) => break Some(task),
                Err(e) => {
                    failures += 1;
                    tracing::error!(%group, error = %e, failures, "batch not processed; retrying");
                }
            }
            tokio::select! {
                // The batch did not go through: not committed, replayed
                // after the restart.
                _ = &mut shutdown => break None,
                _ = tokio::time::sleep(retry_pause(failures)) => {}
            }
        };
        match task {
            Some(task) => finishing.push_back((batch, task)),
            None => stopping = true,
        }
    }
}

/// The pause after `failures` (at least 1) failures in a row.
fn retry_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_PAUSE.saturating_mul(1 << doublings).min(RETRY_PAUSE_MAX)
}

/// Folds `batch` into `newest`, which keeps one record per partition: the
/// highest offset seen. Committing those commits everything before them.
fn newest_per_partition(newest: &mut Vec<BusRecord>, batch: Vec<BusRecord>) {
    for record in batch {
        match newest.iter_mut().find(|r| r.partition == record.partition) {
            Some(kept) if kept.offset >= record.offset => {}
            Some(kept) => *kept = record,
            None => newest.push(record),
        }
    }
}
