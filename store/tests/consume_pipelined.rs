//! `consume::consume_pipelined` on the embedded bus: a batch whose
//! finishing task is still running keeps every later batch uncommitted,
//! even one that finished, so a crash replays from the oldest unfinished
//! batch; once it finishes, everything up to the newest finished batch is
//! committed; shutdown finishes what is under way first. On a scripted
//! bus: batches finished together share one commit.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, consume};
use tokio::sync::Notify;
use tokio::time::Instant;

const TOPIC: &str = "t";
const GROUP: &str = "g";

async fn publish(bus: &Arc<tern_store::embedded::EmbeddedBus>, payload: &'static str) {
    bus.publish(TOPIC, Bytes::from_static(b"k"), Bytes::from_static(payload.as_bytes())).await.unwrap();
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a new consumer of the group reads first: where the group's
/// committed offset stands.
async fn first_uncommitted(bus: &Arc<tern_store::embedded::EmbeddedBus>) -> Option<Bytes> {
    let mut consumer = bus.subscribe(TOPIC, GROUP).await.unwrap();
    let batch = consumer.poll(10, Duration::from_millis(200)).await.unwrap();
    batch.first().map(|r| r.payload.clone())
}

/// Runs the consumer: the batch holding "slow" finishes only when
/// `release` is notified; the others finish at once. Returns the payloads
/// seen, in order.
fn start(
    bus: Arc<tern_store::embedded::EmbeddedBus>,
    release: Arc<Notify>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (tokio::task::JoinHandle<tern_store::StoreResult<()>>, Arc<Mutex<Vec<Bytes>>>) {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let process = |batch: Vec<tern_store::BusRecord>| {
            let (log, release) = (log.clone(), release.clone());
            async move {
                let slow = batch.iter().any(|r| r.payload.as_ref() == b"slow");
                log.lock().unwrap().extend(batch.into_iter().map(|r| r.payload));
                Ok(tokio::spawn(async move {
                    if slow {
                        release.notified().await;
                    }
                }))
            }
        };
        let shutdown = async move {
            let _ = stop.await;
        };
        consume::consume_pipelined(&*bus, TOPIC, GROUP, shutdown, 8, process).await
    });
    (task, seen)
}

#[tokio::test]
async fn an_unfinished_batch_holds_back_the_commits_of_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EmbeddedBackends::open(dir.path()).unwrap().bus;
    publish(&bus, "slow").await;
    let release = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (task, seen) = start(bus.clone(), release.clone(), stop_rx);
    eventually("the slow batch", || seen.lock().unwrap().len() == 1).await;
    publish(&bus, "fast").await;
    eventually("the fast batch", || seen.lock().unwrap().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The fast batch finished, the slow one did not: nothing is committed.
    assert_eq!(first_uncommitted(&bus).await.as_deref(), Some(&b"slow"[..]));

    // Once the slow batch finishes, both are committed.
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(10);
    while first_uncommitted(&bus).await.is_some() {
        assert!(Instant::now() < deadline, "the finished batches were never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_crash_replays_from_the_oldest_unfinished_batch_and_shutdown_finishes_first() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EmbeddedBackends::open(dir.path()).unwrap().bus;
    publish(&bus, "first").await;
    let release = Arc::new(Notify::new());
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (task, seen) = start(bus.clone(), release.clone(), stop_rx);
    eventually("the first batch", || seen.lock().unwrap().len() == 1).await;
    publish(&bus, "slow").await;
    eventually("the slow batch", || seen.lock().unwrap().len() == 2).await;
    publish(&bus, "after").await;
    eventually("the batch after it", || seen.lock().unwrap().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;

    // "first" was committed; "slow" and "after" come again. (The aborted
    // consumer's finishing task still waits on the old `release`.)
    let release = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (task, seen) = start(bus.clone(), release.clone(), stop_rx);
    eventually("the replay", || seen.lock().unwrap().len() >= 2).await;
    assert_eq!(seen.lock().unwrap()[..2], [Bytes::from_static(b"slow"), Bytes::from_static(b"after")]);

    // Shutdown waits for the slow batch, then commits it and the rest.
    let _ = stop_tx.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished(), "shutdown did not wait for the unfinished batch");
    release.notify_one();
    task.await.unwrap().unwrap();
    assert!(first_uncommitted(&bus).await.is_none(), "everything finished is committed at shutdown");
}

/// Each commit's (partition, offset) pairs, in commit order.
type CommitLog = Arc<Mutex<Vec<Vec<(u32, u64)>>>>;

/// A bus whose one subscription gets `consumer` (the loop subscribes once).
struct OneConsumer<C>(Mutex<Option<C>>);

impl<C> OneConsumer<C> {
    fn new(consumer: C) -> Self {
        Self(Mutex::new(Some(consumer)))
    }
}

#[async_trait::async_trait]
impl<C: tern_store::BusConsumer + 'static> Bus for OneConsumer<C> {
    async fn publish(&self, _topic: &str, _key: Bytes, _payload: Bytes) -> tern_store::StoreResult<()> {
        unreachable!("the test does not publish")
    }

    async fn subscribe(
        &self,
        _topic: &str,
        _group: &str,
    ) -> tern_store::StoreResult<Box<dyn tern_store::BusConsumer>> {
        let consumer = self.0.lock().unwrap().take().expect("the loop subscribes once");
        Ok(Box::new(consumer))
    }
}

/// A consumer that hands out `records` (two partitions, one record per
/// poll) and logs every commit.
struct ScriptedConsumer {
    records: Vec<tern_store::BusRecord>,
    commits: CommitLog,
}

#[async_trait::async_trait]
impl tern_store::BusConsumer for ScriptedConsumer {
    async fn poll(
        &mut self,
        _max: usize,
        wait: Duration,
    ) -> tern_store::StoreResult<Vec<tern_store::BusRecord>> {
        if self.records.is_empty() {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        // Records trickle in, as they do from a bus under load, and the
        // finishing tasks get to run in between.
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(vec![self.records.remove(0)])
    }

    async fn commit(&mut self, records: &[tern_store::BusRecord]) -> tern_store::StoreResult<()> {
        let mut committed: Vec<(u32, u64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
        committed.sort_unstable();
        self.commits.lock().unwrap().push(committed);
        Ok(())
    }
}

/// Batches that finish in quick succession are committed together, at most
/// one commit per 50 ms (each is a durable write the loop waits for), and
/// the commits carry the newest finished offset of every partition, the
/// last one at shutdown.
#[tokio::test]
async fn batches_finished_together_are_committed_together() {
    let records: Vec<tern_store::BusRecord> = (0..40u64)
        .map(|i| tern_store::BusRecord {
            partition: u32::try_from(i % 2).unwrap(),
            offset: i / 2,
            key: Bytes::new(),
            payload: Bytes::new(),
        })
        .collect();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let bus = OneConsumer::new(ScriptedConsumer { records, commits: commits.clone() });
    let processed = Arc::new(Mutex::new(0usize));
    let counter = processed.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let process = |batch: Vec<tern_store::BusRecord>| {
            let counter = counter.clone();
            async move {
                *counter.lock().unwrap() += batch.len();
                Ok(tokio::spawn(async {}))
            }
        };
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        consume::consume_pipelined(&bus, TOPIC, GROUP, shutdown, 8, process).await
    });
    eventually("every batch", || *processed.lock().unwrap() == 40).await;
    // At most one commit per 50 ms, plus the first and the one at shutdown
    // (a slow machine stretches the run, not the rule).
    let allowed = usize::try_from(started.elapsed().as_millis() / 50).unwrap() + 2;
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();

    let commits = commits.lock().unwrap();
    assert!(
        commits.len() <= allowed.min(39),
        "40 batches took {} commits; at most {} expected",
        commits.len(),
        allowed.min(39)
    );
    assert_eq!(commits.last().unwrap(), &vec![(0, 19), (1, 19)], "the last commit covers every partition");
    let mut newest = [0u64; 2];
    for commit in commits.iter() {
        for &(partition, offset) in commit {
            let partition = usize::try_from(partition).unwrap();
            assert!(offset >= newest[partition], "commits never go back: {commits:?}");
            newest[partition] = offset;
        }
    }
}

/// One poll of a [`FlakyConsumer`]: a failure, or a record at this offset.
enum Step {
    Fail,
    Record(u64),
}

/// A consumer whose polls follow a script, noting when each poll came.
struct FlakyConsumer {
    script: std::collections::VecDeque<Step>,
    polls: Arc<Mutex<Vec<Instant>>>,
}

impl FlakyConsumer {
    fn bus(script: Vec<Step>, polls: Arc<Mutex<Vec<Instant>>>) -> OneConsumer<FlakyConsumer> {
        OneConsumer::new(FlakyConsumer { script: script.into(), polls })
    }
}

#[async_trait::async_trait]
impl tern_store::BusConsumer for FlakyConsumer {
    async fn poll(
        &mut self,
        _max: usize,
        wait: Duration,
    ) -> tern_store::StoreResult<Vec<tern_store::BusRecord>> {
        match self.script.pop_front() {
            Some(step) => {
                self.polls.lock().unwrap().push(Instant::now());
                match step {
                    Step::Fail => Err(tern_store::StoreError::Unavailable("broker down".into())),
                    Step::Record(offset) => Ok(vec![tern_store::BusRecord {
                        partition: 0,
                        offset,
                        key: Bytes::new(),
                        payload: Bytes::new(),
                    }]),
                }
            }
            None => {
                tokio::time::sleep(wait).await;
                Ok(Vec::new())
            }
        }
    }

    async fn commit(&mut self, _records: &[tern_store::BusRecord]) -> tern_store::StoreResult<()> {
        Ok(())
    }
}

/// The gaps between consecutive instants, in milliseconds.
fn gaps_ms(instants: &[Instant]) -> Vec<u128> {
    instants.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect()
}

/// Starts `consume_pipelined` over `bus`; a send on the returned channel
/// stops it.
fn spawn_consumer<F, Fut>(
    bus: OneConsumer<FlakyConsumer>,
    process: F,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<tern_store::StoreResult<()>>)
where
    F: FnMut(Vec<tern_store::BusRecord>) -> Fut + Send + 'static,
    Fut: Future<Output = tern_store::StoreResult<tokio::task::JoinHandle<()>>> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        consume::consume_pipelined(&bus, TOPIC, GROUP, shutdown, 8, process).await
    });
    (stop_tx, consumer)
}

/// Runs `consume_pipelined` over `bus` until `records` records went
/// through `process` (which counts them in `processed`), then stops it.
async fn consume_until<F, Fut>(
    bus: OneConsumer<FlakyConsumer>,
    records: usize,
    process: F,
    processed: Arc<Mutex<usize>>,
) where
    F: FnMut(Vec<tern_store::BusRecord>) -> Fut + Send + 'static,
    Fut: Future<Output = tern_store::StoreResult<tokio::task::JoinHandle<()>>> + Send + 'static,
{
    let (stop_tx, consumer) = spawn_consumer(bus, process);
    // The clock is paused and jumps to each pause's end: the deadline of
    // `eventually` is virtual time here, and the pauses add up to over 10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while *processed.lock().unwrap() < records {
        assert!(Instant::now() < deadline, "timed out waiting for {records} record(s)");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();
}

/// A poll that keeps failing is tried again after 0.2 s, then after twice
/// as long each time, up to 5 s; a poll that succeeds starts over at 0.2 s.
#[tokio::test(start_paused = true)]
async fn failed_polls_back_off_and_a_success_starts_over() {
    let mut script: Vec<Step> = (0..7).map(|_| Step::Fail).collect();
    script.extend([Step::Record(0), Step::Fail, Step::Record(1)]);
    let polls = Arc::new(Mutex::new(Vec::new()));
    let bus = FlakyConsumer::bus(script, polls.clone());
    let processed = Arc::new(Mutex::new(0usize));
    let counter = processed.clone();
    let process = move |batch: Vec<tern_store::BusRecord>| {
        *counter.lock().unwrap() += batch.len();
        async { Ok(tokio::spawn(async {})) }
    };
    consume_until(bus, 2, process, processed).await;
    let gaps = gaps_ms(&polls.lock().unwrap());
    assert_eq!(gaps, vec![200, 400, 800, 1600, 3200, 5000, 5000, 0, 200], "pauses between polls");
}

/// A batch that keeps failing is tried again after pauses that double from
/// 0.2 s; it is processed once it succeeds.
#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_retried_after_growing_pauses() {
    let bus = FlakyConsumer::bus(vec![Step::Record(0)], Arc::default());
    let tries: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let processed = Arc::new(Mutex::new(0usize));
    let (log, counter) = (tries.clone(), processed.clone());
    let process = move |batch: Vec<tern_store::BusRecord>| {
        let mut tries = log.lock().unwrap();
        tries.push(Instant::now());
        let result = if tries.len() <= 4 {
            Err(tern_store::StoreError::Unavailable("store down".into()))
        } else {
            *counter.lock().unwrap() += batch.len();
            Ok(tokio::spawn(async {}))
        };
        async move { result }
    };
    consume_until(bus, 1, process, processed).await;
    assert_eq!(gaps_ms(&tries.lock().unwrap()), vec![200, 400, 800, 1600], "pauses between tries");
}

/// Shutdown does not wait for the pause after a failed poll to end.
#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_pause_after_a_failed_poll_short() {
    let polls = Arc::new(Mutex::new(Vec::new()));
    let bus = FlakyConsumer::bus((0..100).map(|_| Step::Fail).collect(), polls.clone());
    let process = |_batch: Vec<tern_store::BusRecord>| async { Ok(tokio::spawn(async {})) };
    let (stop_tx, consumer) = spawn_consumer(bus, process);
    while polls.lock().unwrap().len() < 7 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now in a 5 s pause.
    let asked = Instant::now();
    let _ = stop_tx.send(());
    consumer.await.unwrap().unwrap();
    assert!(asked.elapsed() < Duration::from_millis(100), "stopped after {:?}", asked.elapsed());
}
