//! Latency histograms (HdrHistogram, microsecond resolution, 3 significant
//! digits, up to one hour) and the summary every report uses.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest value recorded, in µs; larger ones are clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// A new, empty latency histogram.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records `ns` nanoseconds (clamped to 1 µs .. 1 h).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    let us = (ns / 1_000).clamp(1, MAX_US);
    h.record(us).expect("value within bounds");
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1_000.0;
        Summary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1_000.0,
        }
    }

    /// `p50 / p90 / p99 / p99.9 / max` for tables.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "–".into();
        }
        format!(
            "{} / {} / {} / {} / {}",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.p999_ms),
            fmt_ms(self.max_ms)
        )
    }
}

/// Milliseconds with precision that suits the size.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.3}")
    } else if ms < 100.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

/// A histogram shared by many connection tasks, split in shards so two
/// threads rarely wait on the same lock.
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    pub fn new(shards: usize) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| Mutex::new(new_histogram())).collect() }
    }

    /// Records `ns` into the shard of `key` (e.g. the connection index).
    pub fn record(&self, key: usize, ns: u64) {
        let mut h = self.shards[key % self.shards.len()].lock().unwrap_or_else(|e| e.into_inner());
        record_ns(&mut h, ns);
    }

    /// Everything recorded so far, merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.shards {
            all.add(&*shard.lock().unwrap_or_else(|e| e.into_inner())).expect("same bounds");
        }
        all
    }
}

/// A histogram as (value µs, count) pairs, for worker processes to send
/// theirs to the parent as JSON.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

/// Adds pairs from [`to_pairs`] into `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(us, n) in pairs {
        h.record_n(us.clamp(1, MAX_US), n).expect("value within bounds");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        let mut h = new_histogram();
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            record_ns(&mut h, ms * 1_000_000);
        }
        let s = Summary::of(&h);
        assert_eq!(s.count, 1000);
        // 3 significant digits: within 0.1 %.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 0.001;
        assert!(close(s.p50_ms, 500.0), "{s:?}");
        assert!(close(s.p90_ms, 900.0), "{s:?}");
        assert!(close(s.p99_ms, 990.0), "{s:?}");
        assert!(close(s.p999_ms, 999.0), "{s:?}");
        assert!(close(s.max_ms, 1000.0), "{s:?}");
        assert!(close(s.mean_ms, 500.5), "{s:?}");
        assert_eq!(Summary::of(&new_histogram()), Summary::default());
        assert_eq!(Summary::default().line(), "–");
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let mut h = new_histogram();
        record_ns(&mut h, 0);
        record_ns(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= MAX_US);
    }

    #[test]
    fn shards_and_pairs_round_trip() {
        let r = Recorder::new(4);
        for i in 0..100u64 {
            r.record(i as usize, (i + 1) * 10_000);
        }
        let merged = r.merged();
        assert_eq!(merged.len(), 100);
        let mut copy = new_histogram();
        add_pairs(&mut copy, &to_pairs(&merged));
        assert_eq!(Summary::of(&copy), Summary::of(&merged));
    }
}
