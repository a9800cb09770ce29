//! ScyllaDB implementation of [`crate::HistoryStore`]: being written.
