//! Runs [`tern_store::conformance::message_log`] against [`SeparateStores`]
//! on the cluster's engines: sequences and reservations in Redis, the bus in
//! Kafka (needs `TERN_REDIS_URL` and `TERN_KAFKA_BROKERS`; skips without
//! them unless `TERN_REQUIRE_ENGINES` demands them).

use std::sync::Arc;
use std::time::Duration;

use tern_store::kafka::{KafkaBus, KafkaOptions};
use tern_store::redis::RedisBackends;
use tern_store::{SeparateStores, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_stores_on_redis_and_kafka_conform() {
    let Some(url) = conformance::engine_from_env("TERN_REDIS_URL") else { return };
    let Some(brokers) = conformance::engine_from_env("TERN_KAFKA_BROKERS") else { return };
    let redis = RedisBackends::connect(&url, &conformance::unique_id("ml")).await.expect("connect to Redis");
    let options = KafkaOptions {
        session_timeout: Duration::from_secs(6),
        client_id: "tern-test".to_owned(),
        ..KafkaOptions::default()
    };
    let bus = Arc::new(KafkaBus::connect(&brokers, options).await.expect("connect to Kafka"));
    let log =
        SeparateStores { sequences: redis.sequences.clone(), dedup: redis.dedup.clone(), bus: bus.clone() };
    conformance::message_log(&log, &*redis.dedup, &*redis.sequences, &*bus).await;
}
