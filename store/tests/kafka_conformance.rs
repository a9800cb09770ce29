//! Runs the bus conformance suite against a Kafka-protocol broker (tansu in
//! CI, see `scripts/engines.sh`) named by `TERN_KAFKA_BROKERS`, and checks
//! what only a partitioned bus does: keys spread over partitions with
//! Kafka's hash, order per key, commits of batches spanning partitions,
//! independent groups, and redelivery after a consumer dropped or crashed
//! without committing.
//!
//! Without `TERN_KAFKA_BROKERS` these tests skip (see
//! [`conformance::engine_from_env`]), except the one that needs no broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_store::kafka::{KafkaBus, KafkaOptions};
use tern_store::{Bus, BusConsumer, BusRecord, StoreError, conformance};

/// Partitions of the topics these tests create.
const PARTITIONS: u32 = 4;
/// How long a test waits for records that should arrive (group joins take
/// seconds on a real broker).
const PATIENCE: Duration = Duration::from_secs(30);

/// Environment of the child process of [`crashed_consumer_is_replaced_after_its_session`].
const CRASH_BROKERS: &str = "TERN_KAFKA_CRASH_CHILD_BROKERS";
const CRASH_TOPIC: &str = "TERN_KAFKA_CRASH_CHILD_TOPIC";
const CRASH_GROUP: &str = "TERN_KAFKA_CRASH_CHILD_GROUP";

fn options() -> KafkaOptions {
    KafkaOptions {
        partitions: PARTITIONS,
        // Short, so a crashed consumer's partitions move on quickly.
        session_timeout: Duration::from_secs(6),
        client_id: "tern-test".to_owned(),
        ..KafkaOptions::default()
    }
}

async fn bus() -> Option<KafkaBus> {
    let brokers = conformance::engine_from_env("TERN_KAFKA_BROKERS")?;
    Some(KafkaBus::connect(&brokers, options()).await.expect("connect to TERN_KAFKA_BROKERS"))
}

/// Polls until `n` records arrived or [`PATIENCE`] ran out.
async fn poll_n(consumer: &mut dyn BusConsumer, n: usize) -> Vec<BusRecord> {
    let deadline = Instant::now() + PATIENCE;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        out.extend(consumer.poll(n - out.len(), Duration::from_secs(1)).await.expect("poll"));
    }
    out
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), to check that keys
/// land where every other Kafka client would put them.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = u32::try_from(data.len()).expect("short key");
    let mut h = SEED ^ len;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

fn java_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

fn key(k: usize) -> Bytes {
    Bytes::from(format!("conversation-{k}"))
}

/// Publishes `per_key` records for each of `keys` keys, keys concurrently,
/// each key's records in order. Payload: `k/i`.
async fn publish_keys(bus: &KafkaBus, topic: &str, keys: usize, per_key: usize) {
    let publishers = (0..keys).map(|k| async move {
        for i in 0..per_key {
            bus.publish(topic, key(k), Bytes::from(format!("{k}/{i}"))).await.expect("publish");
        }
    });
    futures::future::join_all(publishers).await;
}

/// Publishes records `k/0` … `k/{count - 1}` under key `k`, 32 at a time.
async fn publish_concurrently(bus: &KafkaBus, topic: &str, k: usize, count: usize) {
    let indexes: Vec<usize> = (0..count).collect();
    for chunk in indexes.chunks(32) {
        let sends = chunk.iter().map(|i| bus.publish(topic, key(k), Bytes::from(format!("{k}/{i}"))));
        for result in futures::future::join_all(sends).await {
            result.expect("publish");
        }
    }
}

/// (key index, record index) of a payload written by [`publish_keys`] or
/// [`publish_concurrently`].
fn parse(record: &BusRecord) -> (usize, usize) {
    let text = std::str::from_utf8(&record.payload).expect("utf-8 payload");
    let (k, i) = text.split_once('/').expect("k/i payload");
    (k.parse().expect("key index"), i.parse().expect("record index"))
}

fn positions(records: &[BusRecord]) -> BTreeSet<(u32, u64)> {
    records.iter().map(|r| (r.partition, r.offset)).collect()
}

/// Checks that each partition's offsets increase in delivery order.
fn assert_ordered_per_partition(records: &[BusRecord], what: &str) {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for r in records {
        if let Some(&prev) = last.get(&r.partition) {
            assert!(r.offset > prev, "{what}: offsets increase within partition {}", r.partition);
        }
        last.insert(r.partition, r.offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_conforms() {
    let Some(bus) = bus().await else { return };
    let started = Instant::now();
    conformance::bus(&bus).await;
    eprintln!("bus conformance suite took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_partitions_and_keep_their_order() {
    let Some(bus) = bus().await else { return };
    let topic = conformance::unique_id("kt");
    let (keys, per_key) = (16, 5);
    publish_keys(&bus, &topic, keys, per_key).await;

    let mut consumer = bus.subscribe(&topic, &conformance::unique_id("kg")).await.expect("subscribe");
    let got = poll_n(&mut *consumer, keys * per_key).await;
    assert_eq!(got.len(), keys * per_key, "every record arrives");
    assert_ordered_per_partition(&got, "delivery");

    let mut partition_of: BTreeMap<usize, u32> = BTreeMap::new();
    let mut next_index: BTreeMap<usize, usize> = BTreeMap::new();
    for record in &got {
        let (k, i) = parse(record);
        assert_eq!(record.key, key(k), "a record keeps its key");
        assert!(record.partition < PARTITIONS, "partition within the topic");
        assert_eq!(
            *partition_of.entry(k).or_insert(record.partition),
            record.partition,
            "all records of one key share a partition"
        );
        let expected = next_index.entry(k).or_insert(0);
        assert_eq!(i, *expected, "records of key {k} arrive in publish order");
        *expected += 1;
    }
    for (k, partition) in &partition_of {
        assert_eq!(
            *partition,
            java_partition(&key(*k), PARTITIONS),
            "key {k} is placed by Kafka's murmur2 hash, as the Java client places it"
        );
    }
    let used: BTreeSet<u32> = partition_of.values().copied().collect();
    assert!(used.len() > 1, "16 keys spread over more than one partition (used {used:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_batch_spanning_partitions_resumes_each_partition() {
    let Some(bus) = bus().await else { return };
    let topic = conformance::unique_id("kt");
    let group = conformance::unique_id("kg");
    publish_keys(&bus, &topic, 8, 5).await;

    let mut first = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = poll_n(&mut *first, 40).await;
    assert_eq!(got.len(), 40, "every record arrives");
    // The first half as delivered: within each partition a prefix, since
    // delivery keeps each partition's order.
    let (done, rest) = got.split_at(20);
    let spanned: BTreeSet<u32> = done.iter().map(|r| r.partition).collect();
    assert!(spanned.len() > 1, "the committed batch spans partitions ({spanned:?})");
    first.commit(done).await.expect("commit");
    drop(first);

    let mut second = bus.subscribe(&topic, &group).await.expect("subscribe");
    let again = poll_n(&mut *second, rest.len()).await;
    assert_eq!(
        positions(&again),
        positions(rest),
        "a new consumer of the group gets exactly the uncommitted records of every partition"
    );
    assert_ordered_per_partition(&again, "redelivery");
    let extra = second.poll(100, Duration::from_millis(500)).await.expect("poll");
    assert!(extra.is_empty(), "committed records are not redelivered ({} were)", extra.len());

    // Committing the rest: nothing is left for the next consumer.
    second.commit(&again).await.expect("commit");
    drop(second);
    let mut third = bus.subscribe(&topic, &group).await.expect("subscribe");
    bus.publish(&topic, key(0), Bytes::from_static(b"0/5")).await.expect("publish");
    let tail = poll_n(&mut *third, 1).await;
    assert_eq!(tail.len(), 1, "the new record arrives");
    assert_eq!(tail[0].payload, Bytes::from_static(b"0/5"), "only the record published after the commit");
}

/// Concurrent publishes that linger together would share a record batch;
/// a commit inside it must still resume right after the committed record
/// (tansu 0.6 skips the rest of such a batch, hence
/// [`KafkaOptions::single_record_batches`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_commit_between_concurrent_publishes() {
    let Some(brokers) = conformance::engine_from_env("TERN_KAFKA_BROKERS") else { return };
    let options = KafkaOptions { partitions: 1, linger: Duration::from_millis(20), ..options() };
    let bus = KafkaBus::connect(&brokers, options).await.expect("connect");
    let topic = conformance::unique_id("kt");
    let group = conformance::unique_id("kg");
    let publishes =
        (0..10).map(|i| bus.publish(&topic, Bytes::from_static(b"k"), Bytes::from(format!("0/{i}"))));
    for result in futures::future::join_all(publishes).await {
        result.expect("publish");
    }

    let mut first = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = poll_n(&mut *first, 10).await;
    assert_eq!(got.len(), 10, "every record arrives");
    first.commit(&got[..3]).await.expect("commit");
    drop(first);
    let mut second = bus.subscribe(&topic, &group).await.expect("subscribe");
    let again = poll_n(&mut *second, 7).await;
    assert_eq!(again, got[3..].to_vec(), "a new consumer resumes right after the committed record");
}

/// Two producers (two dispatchers) writing one partition at once, read by
/// a consumer meanwhile: every record arrives once, in offset order, none
/// skipped. tansu 0.6 raises a partition's high watermark before it stores
/// the record batch, so a fetch in between finds the later producer's
/// record but not the earlier one's; librdkafka then skips the missing
/// offset and hands the later record out twice. Found as a group message
/// missing for every member and another one pushed twice, under load in
/// the cluster benchmark; `KafkaConsumer` reads such a gap again.
///
/// The race cannot be forced: before the fix, one round in four or five
/// met it. Rounds go on until one has (each checked), up to `ROUNDS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_on_one_partition_lose_and_repeat_nothing() {
    const ROUNDS: usize = 6;
    const PER_PRODUCER: usize = 6_000;
    let Some(brokers) = conformance::engine_from_env("TERN_KAFKA_BROKERS") else { return };
    let options = KafkaOptions { partitions: 1, ..options() };
    let (first, second) = (
        KafkaBus::connect(&brokers, options.clone()).await.expect("connect"),
        KafkaBus::connect(&brokers, options).await.expect("connect"),
    );
    let topic = conformance::unique_id("kt");
    first.ensure_topics(&[&topic]).await.expect("topic");
    let mut consumer = first.consumer(&topic, &conformance::unique_id("kg")).await.expect("subscribe");
    // The group is joined and caught up before the producers start.
    first.publish(&topic, key(0), Bytes::from_static(b"0/0")).await.expect("publish");
    let joined = poll_n(&mut consumer, 1).await;
    assert_eq!(joined.len(), 1, "the first record arrives");
    consumer.commit(&joined).await.expect("commit");

    let mut last_offset = joined[0].offset;
    for round in 0..ROUNDS {
        let (first_key, second_key) = (1 + 2 * round, 2 + 2 * round);
        // Reads (and commits, so that a rebalance would not replay) until
        // every record is in, or none came for a while.
        let read = async {
            let mut got = Vec::new();
            let mut last_arrival = Instant::now();
            while got.len() < 2 * PER_PRODUCER && last_arrival.elapsed() < PATIENCE {
                let batch = consumer.poll(1000, Duration::from_millis(200)).await.expect("poll");
                if !batch.is_empty() {
                    consumer.commit(&batch).await.expect("commit");
                    last_arrival = Instant::now();
                }
                got.extend(batch);
            }
            // Anything handed out again after the last one would show here.
            got.extend(consumer.poll(1000, Duration::from_millis(500)).await.expect("poll"));
            got
        };
        let ((), (), got) = tokio::join!(
            publish_concurrently(&first, &topic, first_key, PER_PRODUCER),
            publish_concurrently(&second, &topic, second_key, PER_PRODUCER),
            read
        );

        let offsets: Vec<u64> = std::iter::once(last_offset).chain(got.iter().map(|r| r.offset)).collect();
        let out_of_line: Vec<(u64, u64)> =
            offsets.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
        assert!(
            out_of_line.is_empty(),
            "round {round}: offsets follow each other (pairs that do not: {out_of_line:?})"
        );
        let mut payloads: Vec<(usize, usize)> = got.iter().map(parse).collect();
        payloads.sort_unstable();
        let expected: Vec<(usize, usize)> = [first_key, second_key]
            .into_iter()
            .flat_map(|k| (0..PER_PRODUCER).map(move |i| (k, i)))
            .collect();
        assert_eq!(payloads.len(), expected.len(), "round {round}: every record arrives once");
        assert_eq!(payloads, expected, "round {round}: every record arrives once");
        last_offset = got.last().map_or(last_offset, |r| r.offset);
        if consumer.gaps_read_again() > 0 {
            eprintln!("round {round}: {} skipped offset(s) read again", consumer.gaps_read_again());
            return;
        }
    }
    eprintln!("no fetch skipped an offset in {ROUNDS} rounds: the race was not met this time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_see_every_record() {
    let Some(bus) = bus().await else { return };
    let topic = conformance::unique_id("kt");
    publish_keys(&bus, &topic, 8, 3).await;
    let mut a = bus.subscribe(&topic, &conformance::unique_id("kga")).await.expect("subscribe");
    let mut b = bus.subscribe(&topic, &conformance::unique_id("kgb")).await.expect("subscribe");
    let (got_a, got_b) = tokio::join!(poll_n(&mut *a, 24), poll_n(&mut *b, 24));
    assert_eq!(got_a.len(), 24, "group a sees every record");
    assert_eq!(positions(&got_a), positions(&got_b), "both groups see the same records");
    // Group a's commit does not affect group b.
    a.commit(&got_a).await.expect("commit");
    drop(b);
    let mut b2 = bus.subscribe(&topic, &conformance::unique_id("kgb")).await.expect("subscribe");
    assert_eq!(poll_n(&mut *b2, 24).await.len(), 24, "another group still reads everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_consumer_without_commit_redelivers() {
    let Some(bus) = bus().await else { return };
    let topic = conformance::unique_id("kt");
    let group = conformance::unique_id("kg");
    publish_keys(&bus, &topic, 4, 3).await;
    let mut first = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = poll_n(&mut *first, 12).await;
    assert_eq!(got.len(), 12, "every record arrives");
    drop(first);
    let mut second = bus.subscribe(&topic, &group).await.expect("subscribe");
    let again = poll_n(&mut *second, 12).await;
    assert_eq!(positions(&again), positions(&got), "without a commit everything is delivered again");
}

/// The child side of [`crashed_consumer_is_replaced_after_its_session`]:
/// does nothing unless the parent set [`CRASH_BROKERS`]. Reads every record,
/// commits the first half, then dies without leaving the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let (Ok(brokers), Ok(topic), Ok(group)) =
        (std::env::var(CRASH_BROKERS), std::env::var(CRASH_TOPIC), std::env::var(CRASH_GROUP))
    else {
        return;
    };
    let bus = KafkaBus::connect(&brokers, options()).await.expect("connect");
    let mut consumer = bus.subscribe(&topic, &group).await.expect("subscribe");
    let got = poll_n(&mut *consumer, 12).await;
    assert_eq!(got.len(), 12, "child: every record arrives");
    consumer.commit(&got[..6]).await.expect("commit");
    println!("committed {:?}", positions(&got[..6]));
    // A crash: no destructor runs, so the consumer never leaves its group.
    std::process::abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_consumer_is_replaced_after_its_session() {
    let Some(brokers) = conformance::engine_from_env("TERN_KAFKA_BROKERS") else { return };
    let bus = KafkaBus::connect(&brokers, options()).await.expect("connect");
    let topic = conformance::unique_id("kt");
    let group = conformance::unique_id("kg");
    publish_keys(&bus, &topic, 4, 3).await;

    let exe = std::env::current_exe().expect("test binary");
    let output = tokio::process::Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_BROKERS, &brokers)
        .env(CRASH_TOPIC, &topic)
        .env(CRASH_GROUP, &group)
        .output()
        .await
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() && stdout.contains("committed"),
        "the child committed, then crashed: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    // The dead member holds its partitions until its session times out;
    // then the new consumer gets exactly what was not committed.
    let started = Instant::now();
    let mut consumer = bus.subscribe(&topic, &group).await.expect("subscribe");
    let again = poll_n(&mut *consumer, 6).await;
    assert_eq!(again.len(), 6, "the uncommitted half is delivered again after the crash");
    let extra = consumer.poll(100, Duration::from_millis(500)).await.expect("poll");
    assert!(extra.is_empty(), "committed records are not redelivered after a crash");
    eprintln!("takeover after a crash took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_unavailable() {
    // Port 1 on loopback: nothing listens there.
    let options = KafkaOptions { request_timeout: Duration::from_secs(2), ..options() };
    let started = Instant::now();
    match KafkaBus::connect("127.0.0.1:1", options).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(other) => panic!("connect to a dead broker: expected Unavailable, got {other}"),
        Ok(_) => panic!("connect to a dead broker succeeded"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "connect gives up after its request timeout");
}
