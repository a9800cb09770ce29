//! Kafka implementation of [`Bus`] (rdkafka over librdkafka), used in
//! cluster mode against Apache Kafka, Redpanda or the tansu broker.
//!
//! Mapping onto the trait:
//! - a topic has [`KafkaOptions::partitions`] partitions; a record's key
//!   picks its partition with Kafka's own hash (murmur2, as the Java client),
//!   so one conversation's records share a partition and stay ordered, and
//!   other Kafka clients agree on where a key lives;
//! - [`BusRecord::partition`] and [`BusRecord::offset`] are the Kafka
//!   partition and offset; order holds within a partition only;
//! - [`Bus::publish`] goes through an idempotent producer (`acks=all`) and
//!   returns once the broker acknowledged the record;
//! - [`Bus::subscribe`] joins a consumer group (partitions are shared among
//!   the group's live consumers) and starts from the group's committed
//!   offsets, or from the earliest record for a new group;
//!   [`BusConsumer::commit`] commits, per partition, the batch's highest
//!   offset + 1 (Kafka's "next to read") synchronously, so after a crash
//!   exactly the uncommitted records are delivered again.
//!
//! Topics are created through the admin API (tansu has no auto-create):
//! [`KafkaBus::ensure_topics`] at start, and `publish`/`subscribe` create a
//! topic they have not seen yet.
//!
//! Rebalances: a consumer that is dropped leaves its group at once, but a
//! consumer whose process died without leaving holds its partitions, and
//! holds up the next rebalance of the group, until its session times out
//! ([`KafkaOptions::session_timeout`]); keep that short in tests. Records a
//! consumer received but had not committed when its partition moved are
//! delivered again to the partition's new owner (at least once).
//!
//! Against tansu 0.6 (the broker `scripts/engines.sh` runs) three things
//! differ from Kafka: a fetch held by the broker is not woken by new data,
//! so a record reaches a waiting consumer after up to
//! [`KafkaOptions::fetch_wait`]; a fetch from an offset inside a record
//! batch skips the rest of that batch, which
//! [`KafkaOptions::single_record_batches`] (on by default) avoids; and a
//! partition's high watermark rises before the record batch it counts is
//! stored, so with two producers on one partition (two dispatchers) a fetch
//! can find the later record but not the earlier one. librdkafka then skips
//! the missing offset and hands the later record out twice: one message
//! lost for its consumer, another repeated. [`KafkaConsumer`] therefore
//! checks that each partition's offsets follow each other: the last record
//! handed out again is dropped, and a gap is read again (a seek back to the
//! offset expected) until it fills, or for [`GAP_PATIENCE`] before it is
//! taken as real (offsets of a Kafka topic tern writes have no gaps: no
//! transactions, no compaction). The first record of a partition after a
//! (re)assignment is checked against where reading resumes: the group's
//! committed offset, or the partition's first offset in a group that has
//! committed nothing yet. A partition read again from further back
//! (librdkafka resets to the earliest offset when the log was truncated or
//! recreated) is followed from there, with a warning.
//!
//! librdkafka's log lines and errors go to `tracing` under the target
//! `librdkafka` (informational lines at `debug`, so it is quiet by default;
//! partition assignments and revocations at `info`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::{Bus, BusConsumer, BusRecord, StoreError, StoreResult};

/// Settings of a [`KafkaBus`]. `KafkaOptions::default()` suits a single
/// local broker; production clusters raise the replication factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaOptions {
    /// Partitions of the topics this bus creates (existing topics keep
    /// theirs). Bounds how many consumers of one group share the work.
    pub partitions: u32,
    /// Replication factor of the topics this bus creates.
    pub replication_factor: u32,
    /// How long the group coordinator waits for a silent consumer before it
    /// gives its partitions to others (`session.timeout.ms`; heartbeats go
    /// every third of it). A consumer that died without leaving holds its
    /// partitions, and delays the group's next rebalance, by up to this
    /// much. Kafka brokers refuse values below their
    /// `group.min.session.timeout.ms` (6 s by default).
    pub session_timeout: Duration,
    /// `client.id` reported to the broker (shows in its logs and metrics);
    /// consumers append `-consumer`, so producer and consumers are told apart.
    pub client_id: String,
    /// How long a publish may wait for the broker's acknowledgement before
    /// it fails with [`StoreError::Unavailable`] (`message.timeout.ms`).
    pub publish_timeout: Duration,
    /// Bound on admin and metadata calls (connect, topic creation) and on a
    /// commit.
    pub request_timeout: Duration,
    /// How long the broker may hold a fetch that has no data yet
    /// (`fetch.wait.max.ms`). Kafka answers a held fetch as soon as data
    /// arrives; tansu 0.6 does not, so there a record waits up to this long
    /// (half on average) before a consumer sees it. Lower means more idle
    /// fetch requests.
    pub fetch_wait: Duration,
    /// How long the producer waits for more records to batch with one
    /// (`linger.ms`). Each publish waits for its acknowledgement, so this
    /// adds straight to its latency; concurrent publishes still share
    /// requests while earlier ones are in flight, so 0 (the default) loses
    /// little throughput (on tansu: 0.25 ms per sequential publish at 0,
    /// 6 ms at librdkafka's default of 5 ms).
    pub linger: Duration,
    /// Sends every record in a record batch of its own
    /// (`batch.num.messages=1`). tansu 0.6 serves a fetch from the first
    /// batch that *starts* at or after the requested offset, so a consumer
    /// resuming from a commit inside a batch would silently skip the rest of
    /// that batch; one record per batch makes every offset a batch start.
    /// Costs throughput (a produce request carries one batch per partition),
    /// so turn it off on Apache Kafka or Redpanda, which serve the batch
    /// containing the offset. On by default: losing records is worse.
    pub single_record_batches: bool,
    /// A consumer that has held no partition for this long (never less
    /// than two session timeouts) leaves its group and joins again; `None`
    /// never does. tansu 0.6 can strand a
    /// consumer that joined while a crashed member's session was still
    /// open: the new generation gives it nothing, and no rebalance follows
    /// when the dead member is finally dropped, so records wait until some
    /// consumer joins again (seen in `tern chaos` after a SIGKILL of
    /// offline-svc). Rejoining after the dead session has expired forms a
    /// group without it. With more consumers than partitions some of them
    /// rightly hold nothing and would rejoin, and rebalance the group, at
    /// this interval: on Apache Kafka or Redpanda set `None`.
    pub rejoin_when_unassigned: Option<Duration>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            partitions: 4,
            replication_factor: 1,
            session_timeout: Duration::from_secs(10),
            client_id: "tern".to_owned(),
            publish_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(100),
            linger: Duration::ZERO,
            single_record_batches: true,
            rejoin_when_unassigned: Some(Duration::from_secs(12)),
        }
    }
}

/// [`Bus`] over a Kafka cluster. Cheap to share behind an `Arc`; one
/// producer serves every publish.
pub struct KafkaBus {
    brokers: String,
    options: KafkaOptions,
    /// Replaced when librdkafka reports a fatal error (an idempotent producer
    /// cannot be used after one); clones are cheap handles.
    producer: RwLock<FutureProducer<TracingContext>>,
    admin: AdminClient<TracingContext>,
    /// Topics known to exist, so publish does not ask the broker each time.
    known_topics: Mutex<HashSet<String>>,
}

impl KafkaBus {
    /// Connects to the cluster at `brokers` (comma-separated `host:port`
    /// list) and checks that it answers within
    /// [`KafkaOptions::request_timeout`]; [`StoreError::Unavailable`] if not.
    pub async fn connect(brokers: &str, options: KafkaOptions) -> StoreResult<Self> {
        if options.partitions == 0 || options.replication_factor == 0 {
            return Err(StoreError::Backend(
                "kafka: partitions and replication factor must be at least 1".to_owned(),
            ));
        }
        let producer = producer(brokers, &options)?;
        let admin: AdminClient<TracingContext> = base_config(brokers)
            .set("client.id", format!("{}-admin", options.client_id))
            .create_with_context(TracingContext::default())
            .map_err(|e| kafka_err("create admin client", e))?;
        let probe = producer.clone();
        let timeout = options.request_timeout;
        // Metadata calls block the calling thread until the broker answers.
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, timeout))
            .await
            .map_err(join_err)?
            .map_err(|e| kafka_err(&format!("connect to {brokers}"), e))?;
        Ok(Self {
            brokers: brokers.to_owned(),
            options,
            producer: RwLock::new(producer),
            admin,
            known_topics: Mutex::new(HashSet::new()),
        })
    }

    /// The options this bus was connected with.
    pub fn options(&self) -> &KafkaOptions {
        &self.options
    }

    /// [`Bus::subscribe`], returning the consumer itself.
    pub async fn consumer(&self, topic: &str, group: &str) -> StoreResult<KafkaConsumer> {
        self.ensure_topics(&[topic]).await?;
        let session_ms = self.options.session_timeout.as_millis().max(1);
        let consumer: StreamConsumer<TracingContext> = base_config(&self.brokers)
            .set("client.id", format!("{}-consumer", self.options.client_id))
            .set("group.id", group)
            // Offsets move only through `commit`, with what was processed.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A new group reads the topic from its first record, as the
            // embedded bus does.
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", (session_ms / 3).max(1).to_string())
            .set("fetch.wait.max.ms", self.options.fetch_wait.as_millis().to_string())
            .set("allow.auto.create.topics", "false")
            .create_with_context(TracingContext::default())
            .map_err(|e| kafka_err("create consumer", e))?;
        consumer.subscribe(&[topic]).map_err(|e| kafka_err(&format!("subscribe to {topic}"), e))?;
        Ok(KafkaConsumer {
            consumer: Some(Arc::new(consumer)),
            topic: topic.to_owned(),
            buffer: VecDeque::new(),
            commit_timeout: self.options.request_timeout,
            // Never less than two sessions: a first join, or a takeover
            // from a crashed member, legitimately takes about one.
            rejoin_when_unassigned: self
                .options
                .rejoin_when_unassigned
                .map(|after| after.max(self.options.session_timeout * 2)),
            unassigned_since: None,
            next_assignment_check: tokio::time::Instant::now(),
            continuity: Continuity::default(),
            rebalances_seen: 0,
            gaps_read_again: 0,
        })
    }

    /// Creates the topics that do not exist yet (with
    /// [`KafkaOptions::partitions`] and
    /// [`KafkaOptions::replication_factor`]) and waits until the cluster
    /// serves every partition of each. Topics that already exist are left as
    /// they are.
    pub async fn ensure_topics(&self, topics: &[&str]) -> StoreResult<()> {
        let missing: Vec<&str> = {
            let known = self.known_topics.lock().unwrap_or_else(PoisonError::into_inner);
            let mut missing: Vec<&str> = topics.iter().copied().filter(|t| !known.contains(*t)).collect();
            missing.sort_unstable();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        let partitions = i32::try_from(self.options.partitions)
            .map_err(|_| StoreError::Backend("kafka: too many partitions".to_owned()))?;
        let replication = i32::try_from(self.options.replication_factor)
            .map_err(|_| StoreError::Backend("kafka: replication factor too large".to_owned()))?;
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
            .collect();
        let admin_options = AdminOptions::new()
            .request_timeout(Some(self.options.request_timeout))
            .operation_timeout(Some(self.options.request_timeout));
        let results = self
            .admin
            .create_topics(&new_topics, &admin_options)
            .await
            .map_err(|e| kafka_err("create topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(code_err(&format!("create topic {topic}"), code));
                }
            }
        }
        // Creation is acknowledged before every broker serves the topic;
        // a consumer that subscribes earlier would see "unknown topic".
        for topic in &missing {
            self.await_topic(topic).await?;
        }
        let mut known = self.known_topics.lock().unwrap_or_else(PoisonError::into_inner);
        known.extend(missing.iter().map(|t| (*t).to_owned()));
        Ok(())
    }

    /// Waits until the metadata of `topic` lists partitions, each with a
    /// leader.
    async fn await_topic(&self, topic: &str) -> StoreResult<()> {
        let deadline = tokio::time::Instant::now() + self.options.request_timeout;
        loop {
            let probe = self.producer();
            let (name, timeout) = (topic.to_owned(), self.options.request_timeout);
            let metadata =
                tokio::task::spawn_blocking(move || probe.client().fetch_metadata(Some(&name), timeout))
                    .await
                    .map_err(join_err)?
                    .map_err(|e| kafka_err(&format!("metadata of topic {topic}"), e))?;
            let ready = metadata.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "kafka: topic {topic} was created but is not served after {:?}",
                    self.options.request_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn producer(&self) -> FutureProducer<TracingContext> {
        self.producer.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces `failed` by a fresh producer when it cannot recover by
    /// itself: after a fatal error (an idempotent producer is unusable after
    /// one), or when a record timed out, which is also how a producer whose
    /// id the broker forgot looks (tansu with in-memory storage, restarted,
    /// answers `UNKNOWN_PRODUCER_ID` forever). A new producer costs one
    /// round trip; a timed-out publish already waited far longer.
    fn recover_producer(&self, failed: &FutureProducer<TracingContext>, error: &KafkaError) {
        let fatal = failed.client().fatal_error();
        if fatal.is_none() && error.rdkafka_error_code() != Some(RDKafkaErrorCode::MessageTimedOut) {
            return;
        }
        let is_current =
            |p: &FutureProducer<TracingContext>| p.client().native_ptr() == failed.client().native_ptr();
        // Concurrent publishes fail together: one replacement is enough.
        if !is_current(&self.producer.read().unwrap_or_else(PoisonError::into_inner)) {
            return;
        }
        let fresh = match producer(&self.brokers, &self.options) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, "kafka producer could not be rebuilt");
                return;
            }
        };
        let old = {
            let mut current = self.producer.write().unwrap_or_else(PoisonError::into_inner);
            if !is_current(&current) {
                return;
            }
            std::mem::replace(&mut *current, fresh)
        };
        match fatal {
            Some((code, reason)) => {
                tracing::error!(?code, %reason, "kafka producer failed fatally; replaced it")
            }
            None => tracing::warn!("kafka publish timed out; replaced the producer"),
        }
        // The last clone of a producer flushes and joins its thread when
        // dropped: keep that off the async workers.
        let _detached = tokio::task::spawn_blocking(move || drop(old));
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, topic: &str, key: Bytes, payload: Bytes) -> StoreResult<()> {
        self.ensure_topics(&[topic]).await?;
        let producer = self.producer();
        let record = FutureRecord::to(topic).key(key.as_ref()).payload(payload.as_ref());
        // The queue timeout only covers a full local queue; the delivery
        // itself is bounded by `message.timeout.ms`. Dropping this future
        // does not withdraw the record: it may still be delivered.
        match producer.send(record, Timeout::After(self.options.publish_timeout)).await {
            Ok(_delivery) => Ok(()),
            Err((e, _record)) => {
                // The topic may be gone (deleted, or a broker with in-memory
                // storage restarted): a record for a missing topic just
                // times out, so check it again on the next publish.
                self.known_topics.lock().unwrap_or_else(PoisonError::into_inner).remove(topic);
                self.recover_producer(&producer, &e);
                Err(kafka_err(&format!("publish to {topic}"), e))
            }
        }
    }

    async fn subscribe(&self, topic: &str, group: &str) -> StoreResult<Box<dyn BusConsumer>> {
        Ok(Box::new(self.consumer(topic, group).await?))
    }
}

/// A consumer of one topic in one group, from [`KafkaBus::subscribe`].
/// Dropping it leaves the group (blocking for the round trip), so the
/// group's other consumers take its partitions over at once.
pub struct KafkaConsumer {
    /// `None` only while dropping; shared with in-flight commits.
    consumer: Option<Arc<StreamConsumer<TracingContext>>>,
    topic: String,
    /// Records taken from librdkafka but not yet returned: a `poll` that is
    /// cancelled (e.g. in a `select!`) loses nothing.
    buffer: VecDeque<BusRecord>,
    commit_timeout: Duration,
    /// See [`KafkaOptions::rejoin_when_unassigned`].
    rejoin_when_unassigned: Option<Duration>,
    unassigned_since: Option<tokio::time::Instant>,
    next_assignment_check: tokio::time::Instant,
    /// Whether each partition's offsets follow each other.
    continuity: Continuity,
    /// The consumer's rebalance count when `continuity` was last valid.
    rebalances_seen: u64,
    /// See [`KafkaConsumer::gaps_read_again`].
    gaps_read_again: u64,
}

impl KafkaConsumer {
    /// Takes `record` into the buffer if it is the next of its partition
    /// (see [`Continuity`]). A repeat is dropped; a gap makes the consumer
    /// seek back to the offset expected, which discards what librdkafka
    /// fetched of that partition meanwhile.
    fn admit(&mut self, consumer: &StreamConsumer<TracingContext>, record: BusRecord) {
        let rebalances = consumer.context().rebalances.load(Ordering::Acquire);
        if rebalances != self.rebalances_seen {
            // The partitions may have been read elsewhere meanwhile: what
            // comes next is wherever the group's committed offsets say.
            self.rebalances_seen = rebalances;
            self.continuity.forget();
        }
        if !self.continuity.expects(record.partition)
            && let Some(start) = self.start_offset(consumer, record.partition)
        {
            self.continuity.start_at(record.partition, start);
        }
        let (topic, partition, offset) = (&self.topic, record.partition, record.offset);
        match self.continuity.check(partition, offset, &record.payload, Instant::now()) {
            Continuation::Next => {}
            Continuation::Repeat => {
                tracing::debug!(%topic, partition, offset, "kafka record handed out again; dropped");
                return;
            }
            Continuation::Rewound { expected } => tracing::warn!(
                %topic,
                partition,
                expected,
                offset,
                "kafka partition read again from an earlier offset (reset after its log was truncated or recreated?)"
            ),
            Continuation::GapAccepted { missing } => tracing::warn!(
                %topic,
                partition,
                ?missing,
                "kafka offsets missing from a partition for {GAP_PATIENCE:?}; going on without them"
            ),
            Continuation::Gap { expected } => {
                tracing::debug!(%topic, partition, expected, offset, "kafka fetch skipped an offset; reading the partition again from it");
                self.gaps_read_again += 1;
                // Timeout zero: the seek is started, not awaited; records
                // fetched before it are dropped by librdkafka, and any that
                // still arrive are checked here again.
                let seek = match (i32::try_from(partition), i64::try_from(expected)) {
                    (Ok(p), Ok(o)) => consumer
                        .seek(topic, p, Offset::Offset(o), Timeout::After(Duration::ZERO))
                        .map_err(|e| e.to_string()),
                    _ => Err("partition or offset out of range".to_owned()),
                };
                match seek {
                    Ok(()) => return,
                    // Nothing would be read again: go on without the gap.
                    Err(error) => {
                        tracing::warn!(%topic, partition, expected, offset, %error, "kafka seek back to a skipped offset failed; going on without it");
                        self.continuity.take(partition, offset, &record.payload);
                    }
                }
            }
        }
        self.buffer.push_back(record);
    }

    /// Where reading of `partition` resumed after an assignment: the
    /// group's committed offset, or, for a group that has committed none,
    /// the partition's first offset (`auto.offset.reset` is `earliest`).
    /// `None` if it cannot be read. One or two round trips to the broker,
    /// made once per partition and assignment.
    fn start_offset(&self, consumer: &StreamConsumer<TracingContext>, partition: u32) -> Option<u64> {
        let number = i32::try_from(partition).ok()?;
        let timeout = Timeout::After(self.commit_timeout);
        let lookup = || -> Result<i64, KafkaError> {
            let mut list = TopicPartitionList::new();
            list.add_partition(&self.topic, number);
            let committed = consumer.committed_offsets(list, timeout)?;
            match committed.find_partition(&self.topic, number).map(|element| element.offset()) {
                Some(Offset::Offset(offset)) => Ok(offset),
                _ => consumer.fetch_watermarks(&self.topic, number, timeout).map(|(low, _high)| low),
            }
        };
        match blocking(lookup) {
            Ok(offset) => u64::try_from(offset).ok(),
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition, error = %e, "kafka start offset not read; the partition's first record is taken unchecked");
                None
            }
        }
    }

    /// Offsets a fetch skipped that this consumer read again (a seek back
    /// each time): how often the broker's race was met.
    pub fn gaps_read_again(&self) -> u64 {
        self.gaps_read_again
    }

    fn consumer(&self) -> StoreResult<&Arc<StreamConsumer<TracingContext>>> {
        self.consumer.as_ref().ok_or_else(|| StoreError::Backend("kafka consumer closed".to_owned()))
    }

    /// Leaves and rejoins the group when this consumer has been without a
    /// partition for too long (checked at most once a second).
    fn rejoin_if_stranded(&mut self, consumer: &StreamConsumer<TracingContext>) -> StoreResult<()> {
        let Some(after) = self.rejoin_when_unassigned else { return Ok(()) };
        let now = tokio::time::Instant::now();
        if now < self.next_assignment_check {
            return Ok(());
        }
        self.next_assignment_check = now + Duration::from_secs(1);
        // An error asking librdkafka is no evidence of being stranded.
        let assigned = consumer.assignment().map(|list| list.count() > 0).unwrap_or(true);
        if assigned {
            self.unassigned_since = None;
            return Ok(());
        }
        let since = *self.unassigned_since.get_or_insert(now);
        if now.duration_since(since) < after {
            return Ok(());
        }
        tracing::warn!(
            topic = %self.topic,
            "kafka consumer has held no partition for {after:?}; leaving and joining its group again"
        );
        self.unassigned_since = None;
        consumer.unsubscribe();
        consumer.subscribe(&[&self.topic]).map_err(|e| kafka_err(&format!("subscribe to {}", self.topic), e))
    }
}

/// How long a gap in a partition's offsets is read again before the
/// consumer goes on without the missing records (see the module docs).
pub const GAP_PATIENCE: Duration = Duration::from_secs(2);

/// The offset each partition is expected to continue at, from the records
/// a consumer took; catches a broker answer that skipped or repeated an
/// offset (see the module docs).
#[derive(Debug, Default)]
struct Continuity {
    /// Per partition, the last record taken: its offset and payload.
    last: HashMap<u32, (u64, Bytes)>,
    /// Per partition with no record taken yet, the offset reading starts at.
    start: HashMap<u32, u64>,
    /// Per partition, a gap being read again: the offset expected and when
    /// the gap was first seen.
    gaps: HashMap<u32, (u64, Instant)>,
}

/// What [`Continuity::check`] makes of a record.
#[derive(Debug, PartialEq, Eq)]
enum Continuation {
    /// The partition's next record (or its first one, with no start
    /// known): taken.
    Next,
    /// The last record taken, handed out again: drop it.
    Repeat,
    /// From before the offset `expected`, and not a repeat: the partition
    /// is read again from further back; taken, and followed from there.
    Rewound { expected: u64 },
    /// Records before it are missing: read the partition again from
    /// `expected`. Not taken.
    Gap { expected: u64 },
    /// A gap that stayed open for [`GAP_PATIENCE`]: taken, going on without
    /// the `missing` offsets.
    GapAccepted { missing: Range<u64> },
}

impl Continuity {
    /// Whether the offset `partition` should continue at is known.
    fn expects(&self, partition: u32) -> bool {
        self.last.contains_key(&partition) || self.start.contains_key(&partition)
    }

    /// Reading of `partition` starts at `offset` (its committed offset).
    fn start_at(&mut self, partition: u32, offset: u64) {
        self.start.insert(partition, offset);
    }

    /// Checks the record at `offset` of `partition`; takes it unless the
    /// verdict says otherwise.
    fn check(&mut self, partition: u32, offset: u64, payload: &Bytes, now: Instant) -> Continuation {
        let expected = match self.last.get(&partition) {
            Some((last, last_payload)) if *last == offset && last_payload == payload => {
                return Continuation::Repeat;
            }
            Some((last, _)) => Some(last + 1),
            None => self.start.get(&partition).copied(),
        };
        let verdict = match expected {
            None => Continuation::Next,
            Some(expected) if offset == expected => Continuation::Next,
            Some(expected) if offset < expected => Continuation::Rewound { expected },
            Some(expected) => {
                let (gap_at, since) = self.gaps.entry(partition).or_insert((expected, now));
                if *gap_at != expected {
                    (*gap_at, *since) = (expected, now);
                }
                if now.duration_since(*since) < GAP_PATIENCE {
                    return Continuation::Gap { expected };
                }
                Continuation::GapAccepted { missing: expected..offset }
            }
        };
        self.take(partition, offset, payload);
        verdict
    }

    /// Notes the record at `offset` of `partition` as taken.
    fn take(&mut self, partition: u32, offset: u64, payload: &Bytes) {
        self.last.insert(partition, (offset, payload.clone()));
        // Called for every record: the two maps are nearly always empty.
        if !self.start.is_empty() {
            self.start.remove(&partition);
        }
        if !self.gaps.is_empty() {
            self.gaps.remove(&partition);
        }
    }

    fn forget(&mut self) {
        self.last.clear();
        self.start.clear();
        self.gaps.clear();
    }
}

/// What one librdkafka event means for a poll.
enum Event {
    Record(BusRecord),
    /// Nothing for the caller (e.g. a partition end).
    Nothing,
    Failed(StoreError),
}

fn event(result: Result<BorrowedMessage<'_>, KafkaError>) -> Event {
    match result {
        Ok(message) => match to_record(&message) {
            Ok(record) => Event::Record(record),
            Err(e) => Event::Failed(e),
        },
        Err(KafkaError::PartitionEOF(_)) => Event::Nothing,
        Err(e) => Event::Failed(kafka_err("consume", e)),
    }
}

fn to_record(message: &BorrowedMessage<'_>) -> StoreResult<BusRecord> {
    let partition = u32::try_from(message.partition())
        .map_err(|_| StoreError::Corrupt(format!("kafka: record in partition {}", message.partition())))?;
    let offset = u64::try_from(message.offset())
        .map_err(|_| StoreError::Corrupt(format!("kafka: record at offset {}", message.offset())))?;
    Ok(BusRecord {
        partition,
        offset,
        key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
        payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
    })
}

#[async_trait]
impl BusConsumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> StoreResult<Vec<BusRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        // A handle of our own, so records can go into `self.buffer` while it
        // is borrowed.
        let consumer = Arc::clone(self.consumer()?);
        self.rejoin_if_stranded(&consumer)?;
        loop {
            // Take what librdkafka already holds, without waiting.
            while self.buffer.len() < max {
                let Some(result) = consumer.recv().now_or_never() else { break };
                match event(result) {
                    Event::Record(record) => self.admit(&consumer, record),
                    Event::Nothing => {}
                    // librdkafka retries by itself; the records already taken
                    // are still good, so the error only matters when there
                    // is nothing to return.
                    Event::Failed(e) if self.buffer.is_empty() => return Err(e),
                    Event::Failed(e) => {
                        tracing::warn!(error = %e, topic = %self.topic, "kafka consumer error");
                        break;
                    }
                }
            }
            if !self.buffer.is_empty() {
                let n = max.min(self.buffer.len());
                return Ok(self.buffer.drain(..n).collect());
            }
            // Nothing ready: wait for the first record, then drain again.
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(result) => match event(result) {
                    Event::Record(record) => self.admit(&consumer, record),
                    Event::Nothing => {}
                    Event::Failed(e) => return Err(e),
                },
            }
        }
    }

    async fn commit(&mut self, records: &[BusRecord]) -> StoreResult<()> {
        // Kafka stores the next offset to read, per partition.
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for record in records {
            let n = next.entry(record.partition).or_insert(0);
            *n = (*n).max(record.offset.saturating_add(1));
        }
        if next.is_empty() {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::with_capacity(next.len());
        for (partition, offset) in next {
            let partition = i32::try_from(partition)
                .map_err(|_| StoreError::Backend(format!("kafka: no partition {partition}")))?;
            let offset = i64::try_from(offset)
                .map_err(|_| StoreError::Backend(format!("kafka: no offset {offset}")))?;
            offsets
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|e| kafka_err("commit", e))?;
        }
        let consumer = self.consumer()?.clone();
        // A synchronous commit blocks its thread until the coordinator
        // answers; it completes even if this future is dropped.
        let commit = tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync));
        match tokio::time::timeout(self.commit_timeout, commit).await {
            Err(_elapsed) => Err(StoreError::Unavailable(format!(
                "kafka: commit not answered within {:?}",
                self.commit_timeout
            ))),
            Ok(joined) => joined.map_err(join_err)?.map_err(|e| kafka_err("commit", e)),
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else { return };
        // Closing leaves the group and waits for the broker. Closing
        // synchronously, rather than in a detached task, means a consumer
        // subscribed right after this drop joins a group this one has
        // already left.
        blocking(move || drop(consumer));
    }
}

/// Runs `work`, which waits for the broker, on the current thread; on a
/// multi-threaded runtime the worker's other tasks move to another worker
/// meanwhile. (A current-thread runtime cannot; the waits are short.)
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Settings shared by the producer, the admin client and consumers.
fn base_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // librdkafka backs off up to 10 s between reconnects by default, and
        // a record queued for a broker that is down times out only when that
        // broker's thread wakes: cap the backoff so a publish fails close to
        // `publish_timeout` and a restarted broker is found again quickly.
        .set("reconnect.backoff.max.ms", "1000")
        // Every line goes to `TracingContext::log`, which picks the level.
        .set_log_level(RDKafkaLogLevel::Info);
    config
}

fn producer(brokers: &str, options: &KafkaOptions) -> StoreResult<FutureProducer<TracingContext>> {
    base_config(brokers)
        .set("client.id", &options.client_id)
        // No duplicates or reordering from internal retries, and a record
        // counts as published only once every in-sync replica has it.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The Java client's partitioner: every Kafka client maps a key to
        // the same partition.
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", options.publish_timeout.as_millis().max(1).to_string())
        .set("linger.ms", options.linger.as_millis().to_string())
        .set("batch.num.messages", if options.single_record_batches { "1" } else { "10000" })
        // Topics are created with the configured partition count, never by
        // a metadata request.
        .set("allow.auto.create.topics", "false")
        .create_with_context(TracingContext::default())
        .map_err(|e| kafka_err("create producer", e))
}

/// Routes librdkafka's logs and errors to `tracing`, and counts a
/// consumer's rebalances (see [`Continuity`]).
#[derive(Debug, Clone, Default)]
struct TracingContext {
    rebalances: Arc<AtomicU64>,
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::debug!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::trace!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reconnects by itself and callers see failures through
        // the calls that fail; a failed connection is already logged (as a
        // `FAIL` line) by `log`.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure) {
            tracing::debug!(target: "librdkafka", %error, "{reason}");
        } else {
            tracing::warn!(target: "librdkafka", %error, "{reason}");
        }
    }
}

// Rebalances are logged at `info`: they are rare, and a revoked partition's
// records that were received but not committed are delivered again (to this
// consumer or another), so a receiver can be pushed them a second time;
// the log is where such a repeat can be traced back to.
impl ConsumerContext for TracingContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::Release);
        match rebalance {
            Rebalance::Assign(partitions) => {
                tracing::info!(target: "librdkafka", assigned = %partition_names(partitions), "kafka partitions assigned");
            }
            Rebalance::Revoke(partitions) => {
                tracing::info!(
                    target: "librdkafka",
                    revoked = %partition_names(partitions),
                    "kafka partitions revoked; records not yet committed will be delivered again"
                );
            }
            Rebalance::Error(e) => tracing::warn!(target: "librdkafka", error = %e, "kafka rebalance failed"),
        }
    }
}

/// `topic[0,1,2]` per topic of `partitions`, partitions in order (a
/// rebalance's list carries no offsets worth printing).
fn partition_names(partitions: &TopicPartitionList) -> String {
    let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for element in partitions.elements() {
        by_topic.entry(element.topic().to_owned()).or_default().push(element.partition());
    }
    by_topic
        .into_iter()
        .map(|(topic, mut numbers)| {
            numbers.sort_unstable();
            let numbers: Vec<String> = numbers.iter().map(i32::to_string).collect();
            format!("{topic}[{}]", numbers.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Codes that mean "the cluster cannot be reached or is not ready yet":
/// retrying later may succeed.
fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::Resolve
            | C::MessageTimedOut
            | C::AllBrokersDown
            | C::OperationTimedOut
            | C::TimedOutQueue
            | C::WaitingForCoordinator
            | C::RequestTimedOut
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::BrokerNotAvailable
            | C::CoordinatorLoadInProgress
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::RebalanceInProgress
    )
}

fn kafka_err(what: &str, error: KafkaError) -> StoreError {
    let message = format!("kafka: {what}: {error}");
    let code = match error {
        // Admin calls carry their code outside `rdkafka_error_code`.
        KafkaError::AdminOp(code) => Some(code),
        ref other => other.rdkafka_error_code(),
    };
    match code {
        Some(code) if is_unavailable(code) => StoreError::Unavailable(message),
        _ => StoreError::Backend(message),
    }
}

fn code_err(what: &str, code: RDKafkaErrorCode) -> StoreError {
    let message = format!("kafka: {what}: {code}");
    if is_unavailable(code) { StoreError::Unavailable(message) } else { StoreError::Backend(message) }
}

fn join_err(error: tokio::task::JoinError) -> StoreError {
    StoreError::Backend(format!("kafka: blocking call failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(offset: u64) -> Bytes {
        Bytes::from(format!("record {offset}"))
    }

    #[test]
    fn continuity_takes_each_offset_once_and_reads_a_gap_again() {
        let start = Instant::now();
        let mut seen = Continuity::default();
        let mut check = |partition, offset| seen.check(partition, offset, &payload(offset), start);
        assert_eq!(check(0, 40), Continuation::Next, "a partition's first record, no start known");
        assert_eq!(check(0, 41), Continuation::Next);
        assert_eq!(check(1, 7), Continuation::Next, "partitions are apart");
        // tansu's race: 42 not stored yet, 43 is, and librdkafka hands 43
        // out twice.
        assert_eq!(check(0, 43), Continuation::Gap { expected: 42 });
        assert_eq!(check(0, 43), Continuation::Gap { expected: 42 });
        // Read again from 42 after the seek.
        assert_eq!(check(0, 42), Continuation::Next);
        assert_eq!(check(0, 43), Continuation::Next);
        assert_eq!(check(0, 43), Continuation::Repeat, "the last record again");
        assert_eq!(check(1, 8), Continuation::Next);
    }

    #[test]
    fn continuity_follows_a_partition_read_again_from_further_back() {
        let now = Instant::now();
        let mut seen = Continuity::default();
        for offset in 10..13 {
            assert_eq!(seen.check(0, offset, &payload(offset), now), Continuation::Next);
        }
        // Offset 12 again, with other content: a log recreated since.
        let other = Bytes::from_static(b"another record");
        assert_eq!(seen.check(0, 12, &other, now), Continuation::Rewound { expected: 13 });
        assert_eq!(seen.check(0, 12, &other, now), Continuation::Repeat);
        // Reset to the earliest offset: followed from there.
        assert_eq!(seen.check(0, 0, &payload(0), now), Continuation::Rewound { expected: 13 });
        assert_eq!(seen.check(0, 1, &payload(1), now), Continuation::Next);
    }

    #[test]
    fn continuity_checks_a_first_record_against_the_start_offset() {
        let now = Instant::now();
        let mut seen = Continuity::default();
        assert!(!seen.expects(3));
        seen.start_at(3, 100);
        assert!(seen.expects(3));
        assert_eq!(seen.check(3, 101, &payload(101), now), Continuation::Gap { expected: 100 });
        assert_eq!(seen.check(3, 100, &payload(100), now), Continuation::Next);
        assert_eq!(seen.check(3, 101, &payload(101), now), Continuation::Next);
    }

    #[test]
    fn continuity_goes_on_past_a_gap_that_stays_open() {
        let start = Instant::now();
        let mut seen = Continuity::default();
        let mut check = |offset, at| seen.check(2, offset, &payload(offset), at);
        assert_eq!(check(10, start), Continuation::Next);
        assert_eq!(check(13, start), Continuation::Gap { expected: 11 });
        let almost = start + GAP_PATIENCE - Duration::from_millis(1);
        assert_eq!(
            check(13, almost),
            Continuation::Gap { expected: 11 },
            "patience counts from the first sight"
        );
        assert_eq!(check(13, start + GAP_PATIENCE), Continuation::GapAccepted { missing: 11..13 });
        assert_eq!(check(14, start + GAP_PATIENCE), Continuation::Next);
        // A new gap gets its own patience.
        let later = start + GAP_PATIENCE * 3;
        assert_eq!(check(16, later), Continuation::Gap { expected: 15 });
        assert_eq!(check(15, later), Continuation::Next);
        // After a rebalance anything goes first.
        seen.forget();
        assert!(!seen.expects(2));
        assert_eq!(seen.check(2, 3, &payload(3), later), Continuation::Next);
    }

    #[test]
    fn partition_names_group_by_topic_in_order() {
        let mut list = TopicPartitionList::new();
        list.add_partition("tern.messages", 3);
        list.add_partition("other", 1);
        list.add_partition("tern.messages", 0);
        list.add_partition("tern.messages", 2);
        assert_eq!(partition_names(&list), "other[1] tern.messages[0,2,3]");
        assert_eq!(partition_names(&TopicPartitionList::new()), "");
    }
}
