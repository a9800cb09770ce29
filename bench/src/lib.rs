//! tern-bench: the load generator and benchmark suite of tern.
//!
//! Open-loop, constant-rate senders ([`sched`]) stamp each message with
//! its due time ([`payload`]); receivers in the same process measure
//! latency from it into HdrHistograms ([`stats`]) and log every delivery
//! ([`verify`]), so each run ends with verified counts. The scenarios:
//! S1 idle connections and S2 connect storms ([`storm`], across worker
//! processes and 127.0.0.x source addresses), S3 1:1 and S4 group fan-out
//! against tern ([`tern_load`]) and the same against Mosquitto and NATS
//! ([`peers`]), S5 id generation ([`ids`]). [`suite`] runs them against
//! servers it starts itself ([`servers`]) and writes `results.json`,
//! `BENCHMARKS.md` ([`report`]) and PNG plots ([`plot`]).

pub mod clock;
pub mod flow;
pub mod ids;
pub mod payload;
pub mod peers;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod sched;
pub mod servers;
pub mod stats;
pub mod storm;
pub mod suite;
pub mod tern_load;
pub mod users;
pub mod verify;
pub mod wire;
