//! Kafka implementation of [`crate::Bus`] (rdkafka): being written.
