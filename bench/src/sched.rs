//! Open-loop, constant-rate scheduling.
//!
//! Message `g` (a global index over every sender) is due `g / rate` seconds
//! after the start, whatever happened to the messages before it: a sender
//! that falls behind sends the late messages at once and their latency
//! still counts from the time they were due, so a stall shows up in the
//! percentiles instead of being hidden (no coordinated omission).
//! Messages are dealt to the streams (senders) round robin, so every
//! stream runs at `rate / streams` and the sends are evenly interleaved.

use std::ops::Range;
use std::time::Duration;

/// When each message is due, relative to the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Messages per second over all streams.
    rate: f64,
    streams: u32,
    total: u64,
}

impl Schedule {
    /// `rate` messages per second in total for `duration`, dealt over
    /// `streams` senders.
    pub fn new(rate: f64, streams: u32, duration: Duration) -> Self {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        let streams = streams.max(1);
        let total = (rate * duration.as_secs_f64()).floor() as u64;
        Self { rate, streams, total }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// Messages in the whole run.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Messages stream `stream` sends in the whole run.
    pub fn total_of(&self, stream: u32) -> u64 {
        let s = u64::from(self.streams);
        self.total / s + u64::from(u64::from(stream) < self.total % s)
    }

    /// Nanoseconds after the start at which message `global` is due.
    pub fn due_ns(&self, global: u64) -> u64 {
        // f64 holds every index below 2^53 exactly; the product is rounded
        // down so the due time never lies after the true one.
        (global as f64 * 1e9 / self.rate) as u64
    }

    /// The stream and the stream-local index of message `global`.
    pub fn split(&self, global: u64) -> (u32, u64) {
        let s = u64::from(self.streams);
        ((global % s) as u32, global / s)
    }

    /// Inverse of [`Schedule::split`].
    pub fn global(&self, stream: u32, local: u64) -> u64 {
        local * u64::from(self.streams) + u64::from(stream)
    }

    /// The messages from `next` on that are due `elapsed_ns` after the
    /// start, at most `max_batch` of them (so one late sender cannot hog
    /// its task for long).
    pub fn due_range(&self, next: u64, elapsed_ns: u64, max_batch: u64) -> Range<u64> {
        let mut end = next;
        let limit = self.total.min(next.saturating_add(max_batch));
        while end < limit && self.due_ns(end) <= elapsed_ns {
            end += 1;
        }
        next..end
    }
}

/// Drives a [`Schedule`] in real time: each call sleeps until at least one
/// message is due and returns the range of messages due now.
pub struct Pacer {
    schedule: Schedule,
    /// Start of the run on the [`crate::clock`] (ns).
    start_ns: u64,
    next: u64,
}

impl Pacer {
    pub fn new(schedule: Schedule, start_ns: u64) -> Self {
        Self { schedule, start_ns, next: 0 }
    }

    /// Messages due now (sleeping first if none is), or `None` at the end.
    pub async fn next_due(&mut self) -> Option<Range<u64>> {
        loop {
            if self.next >= self.schedule.total() {
                return None;
            }
            let elapsed = crate::clock::now_ns().saturating_sub(self.start_ns);
            let range = self.schedule.due_range(self.next, elapsed, 4096);
            if !range.is_empty() {
                self.next = range.end;
                return Some(range);
            }
            let due = self.start_ns + self.schedule.due_ns(self.next);
            crate::clock::sleep_until_ns(due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced_and_never_late() {
        let s = Schedule::new(1000.0, 4, Duration::from_secs(2));
        assert_eq!(s.total(), 2000);
        assert_eq!(s.due_ns(0), 0);
        assert_eq!(s.due_ns(1), 1_000_000);
        assert_eq!(s.due_ns(1999), 1_999_000_000);
        // Fractional rates: 3 msgs/s, message 1 at 333.33 ms, rounded down.
        let third = Schedule::new(3.0, 1, Duration::from_secs(1));
        assert_eq!(third.due_ns(1), 333_333_333);
        for g in 1..2000 {
            assert!(s.due_ns(g) > s.due_ns(g - 1));
        }
    }

    #[test]
    fn streams_take_turns() {
        let s = Schedule::new(100.0, 3, Duration::from_secs(1));
        assert_eq!(s.split(0), (0, 0));
        assert_eq!(s.split(4), (1, 1));
        assert_eq!(s.global(1, 1), 4);
        for g in 0..100 {
            let (stream, local) = s.split(g);
            assert_eq!(s.global(stream, local), g);
        }
        // 100 messages over 3 streams: 34 + 33 + 33.
        assert_eq!((0..3).map(|k| s.total_of(k)).collect::<Vec<_>>(), vec![34, 33, 33]);
        // Each stream runs at a third of the rate: stream 0's messages are 30 ms apart.
        assert_eq!(s.due_ns(s.global(0, 1)) - s.due_ns(s.global(0, 0)), 30_000_000);
    }

    #[test]
    fn due_range_catches_up_without_skipping() {
        let s = Schedule::new(1000.0, 1, Duration::from_secs(1));
        // Nothing sent yet, 10.5 ms in: messages 0..=10 are due.
        assert_eq!(s.due_range(0, 10_500_000, 1000), 0..11);
        // A sender that stalled for 500 ms sends everything it owes, in order,
        // in bounded batches.
        assert_eq!(s.due_range(11, 510_000_000, 100), 11..111);
        assert_eq!(s.due_range(111, 510_000_000, 1000), 111..511);
        // Never past the end of the run.
        assert_eq!(s.due_range(990, 5_000_000_000, 1000), 990..1000);
        assert!(s.due_range(1000, 5_000_000_000, 1000).is_empty());
        // Exactly on the due time counts as due.
        assert_eq!(s.due_range(5, 5_000_000, 10), 5..6);
    }

    #[tokio::test]
    async fn pacer_sends_everything_on_time() {
        let s = Schedule::new(2000.0, 2, Duration::from_millis(100));
        let start = crate::clock::now_ns();
        let mut pacer = Pacer::new(s, start);
        let mut seen = Vec::new();
        while let Some(range) = pacer.next_due().await {
            let now = crate::clock::now_ns() - start;
            for g in range {
                // Never early.
                assert!(s.due_ns(g) <= now, "message {g} sent early");
                seen.push(g);
            }
        }
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
    }
}
