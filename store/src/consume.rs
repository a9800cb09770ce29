//! The consumer loop the storage services share.

use std::future::Future;
use std::time::Duration;

use crate::{Bus, BusRecord, StoreResult};

/// Most records handed to `process` at once.
const BATCH: usize = 512;
/// Pause before a failed poll or batch is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
    let mut consumer = bus.subscribe(topic, group).await?;
    tokio::pin!(shutdown);
    loop {
        let polled = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            polled = consumer.poll(BATCH, Duration::from_millis(500)) => polled,
        };
        let batch = match polled {
            Ok(batch) if batch.is_empty() => continue,
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(%group, error = %e, "poll failed; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        loop {
            match process(batch.clone()).await {
                Ok(()) => break,
                Err(e) => tracing::error!(%group, error = %e, "batch not processed; retrying"),
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
        }
        if let Err(e) = consumer.commit(&batch).await {
            tracing::warn!(%group, error = %e, "offset commit failed; the batch will be replayed");
        }
    }
}
