//! MongoDB implementation of [`crate::MetaStore`]: being written.
