//! ZooKeeper implementation of [`crate::Registry`] and worker-id leases: being written.
