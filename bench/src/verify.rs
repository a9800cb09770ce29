//! Delivery verification: every receiver keeps a bit per (stream, index)
//! it got, so a run ends with exact counts of what arrived, what arrived
//! twice and what never arrived.

use foldhash::HashMap;

use serde::{Deserialize, Serialize};

/// What one receiver got. (Looked up per delivery: foldhash, not SipHash.)
#[derive(Debug, Default, Clone)]
pub struct DeliveryLog {
    seen: HashMap<u32, Vec<u64>>,
    /// Distinct messages received.
    pub unique: u64,
    /// Messages received again.
    pub duplicates: u64,
}

impl DeliveryLog {
    /// Notes message `index` of `stream`; true the first time.
    pub fn record(&mut self, stream: u32, index: u64) -> bool {
        let words = self.seen.entry(stream).or_default();
        let (word, bit) = ((index / 64) as usize, index % 64);
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        if words[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        words[word] |= 1 << bit;
        self.unique += 1;
        true
    }

    pub fn contains(&self, stream: u32, index: u64) -> bool {
        self.seen
            .get(&stream)
            .and_then(|w| w.get((index / 64) as usize))
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// How many of `stream`'s messages `0..count` never arrived.
    pub fn missing(&self, stream: u32, count: u64) -> u64 {
        (0..count).filter(|&i| !self.contains(stream, i)).count() as u64
    }
}

/// The counts of one run, checked: `sent = acked = received / fan-out`,
/// no duplicates, no errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Messages the senders wrote.
    pub sent: u64,
    /// Server ACKs received (tern SendAck, MQTT PUBACK; NATS has none).
    pub acked: u64,
    /// Requests the server refused or that failed.
    pub errors: u64,
    /// Deliveries expected: accepted messages × receivers per message.
    pub expected: u64,
    /// Distinct deliveries.
    pub received: u64,
    pub duplicates: u64,
    pub missing: u64,
    /// Deliveries that belong to an earlier run (late), not counted above.
    pub stale: u64,
    /// All of the above as it should be.
    pub ok: bool,
}

impl Verdict {
    /// `acks` is `None` for a system without server ACKs. (Eight plain
    /// counts: a struct for them would be this struct.)
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        sent: u64,
        acks: Option<u64>,
        errors: u64,
        fanout: u64,
        received: u64,
        duplicates: u64,
        missing: u64,
        stale: u64,
    ) -> Verdict {
        let acked = acks.unwrap_or(sent);
        let expected = acked * fanout;
        let ok = errors == 0 && acked == sent && received == expected && duplicates == 0 && missing == 0;
        Verdict { sent, acked, errors, expected, received, duplicates, missing, stale, ok }
    }

    pub fn line(&self) -> String {
        format!(
            "sent={} acked={} errors={} expected={} received={} duplicates={} missing={} stale={} => {}",
            self.sent,
            self.acked,
            self.errors,
            self.expected,
            self.received,
            self.duplicates,
            self.missing,
            self.stale,
            if self.ok { "OK" } else { "FAILED" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_counts_unique_duplicates_and_missing() {
        let mut log = DeliveryLog::default();
        assert!(log.record(0, 0));
        assert!(log.record(0, 63));
        assert!(log.record(0, 64));
        assert!(log.record(1, 5));
        assert!(!log.record(0, 63));
        assert_eq!((log.unique, log.duplicates), (4, 1));
        assert!(log.contains(0, 64) && !log.contains(0, 1) && !log.contains(2, 0));
        assert_eq!(log.missing(0, 100), 97);
        assert_eq!(log.missing(1, 6), 5);
    }

    #[test]
    fn verdicts() {
        // 1:1, everything arrived once.
        assert!(Verdict::check(100, Some(100), 0, 1, 100, 0, 0, 0).ok);
        // Group of 10: 9 deliveries per message.
        let v = Verdict::check(10, Some(10), 0, 9, 90, 0, 0, 3);
        assert!(v.ok && v.expected == 90 && v.stale == 3);
        // One lost, one duplicated, an error, an unacked send: each fails.
        assert!(!Verdict::check(100, Some(100), 0, 1, 99, 0, 1, 0).ok);
        assert!(!Verdict::check(100, Some(100), 0, 1, 100, 1, 0, 0).ok);
        assert!(!Verdict::check(100, Some(99), 1, 1, 99, 0, 0, 0).ok);
        assert!(!Verdict::check(100, Some(99), 0, 1, 99, 0, 0, 0).ok);
        // No ACKs (NATS core): acked counts as sent.
        let nats = Verdict::check(50, None, 0, 2, 100, 0, 0, 0);
        assert!(nats.ok && nats.acked == 50);
        assert!(nats.line().ends_with("OK"));
    }
}
