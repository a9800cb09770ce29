//! Redis implementations of the session, sequence, dedup, offline, meta and history stores: being written.
