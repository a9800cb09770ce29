//! One monotonic clock for the whole process: nanoseconds since the first
//! use. Senders put the intended send time on this clock into each message;
//! receivers in the same process subtract it from their own reading.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process's clock base.
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// The [`Instant`] of a reading of [`now_ns`].
pub fn instant_of(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

/// Sleeps until the clock reads `ns` (tokio timers have 1 ms granularity;
/// the pacer sends everything that is due when it wakes).
pub async fn sleep_until_ns(ns: u64) {
    tokio::time::sleep_until(instant_of(ns).into()).await;
}
