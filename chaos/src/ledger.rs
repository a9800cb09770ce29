//! What was sent and acknowledged, what each device showed, and the check
//! of the delivery contract: every acknowledged message shown on every
//! device it is owed to, once, in conversation order.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One message a sender got a SendAck for.
#[derive(Debug, Clone)]
pub struct Acked {
    pub msg_id: u64,
    pub seq: u64,
    pub conversation: String,
    pub content: Vec<u8>,
    /// Indices of the devices that must show it.
    pub owed_to: Vec<usize>,
}

/// One message as a device showed it.
#[derive(Debug, Clone)]
pub struct Shown {
    pub msg_id: u64,
    pub seq: u64,
    pub conversation: String,
    pub content: Vec<u8>,
}

/// Shared by every simulated device and sender.
pub struct Ledger {
    acked: Mutex<Vec<Acked>>,
    /// Per device, in the order the app saw them.
    shown: Vec<Mutex<Vec<Shown>>>,
    pub offered: AtomicU64,
    pub dropped_offers: AtomicU64,
    pub gave_up: AtomicU64,
    pub shown_total: AtomicU64,
    pub skipped_seqs: AtomicU64,
    pub reconnects: AtomicU64,
    pub kicked: AtomicU64,
}

/// The verdict over a whole run.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub acknowledged: u64,
    pub owed_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub corrupted: u64,
    /// Shown but never acknowledged to the sender (the sender gave up or
    /// the ACK was lost with a connection): allowed, reported.
    pub shown_unacknowledged: u64,
    /// A few examples of each failure, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.corrupted == 0
    }
}

impl Ledger {
    pub fn new(devices: usize) -> Self {
        Self {
            acked: Mutex::new(Vec::new()),
            shown: (0..devices).map(|_| Mutex::new(Vec::new())).collect(),
            offered: AtomicU64::new(0),
            dropped_offers: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            shown_total: AtomicU64::new(0),
            skipped_seqs: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            kicked: AtomicU64::new(0),
        }
    }

    pub fn record_acked(&self, acked: Acked) {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).push(acked);
    }

    pub fn record_shown(&self, device: usize, shown: Shown) {
        self.shown[device].lock().unwrap_or_else(|e| e.into_inner()).push(shown);
        self.shown_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn acknowledged(&self) -> u64 {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    /// Deliveries still owed: (acknowledged message, device) pairs not shown yet.
    pub fn missing(&self) -> u64 {
        self.verdict().lost
    }

    pub fn verdict(&self) -> Verdict {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut verdict = Verdict { acknowledged: acked.len() as u64, ..Verdict::default() };
        let example = |verdict: &mut Verdict, text: String| {
            if verdict.examples.len() < 20 {
                verdict.examples.push(text);
            }
        };
        let acked_by_id: HashMap<u64, &Acked> = acked.iter().map(|a| (a.msg_id, a)).collect();
        // Per device: how often each message id was shown, and order checks.
        let mut shown_counts: Vec<HashMap<u64, u32>> = Vec::with_capacity(self.shown.len());
        for (device, log) in self.shown.iter().enumerate() {
            let log = log.lock().unwrap_or_else(|e| e.into_inner());
            let mut counts: HashMap<u64, u32> = HashMap::new();
            let mut last_seq: HashMap<&str, u64> = HashMap::new();
            for shown in log.iter() {
                let count = counts.entry(shown.msg_id).or_default();
                *count += 1;
                if *count > 1 {
                    // A repeat: counted as a duplicate below, not as disorder.
                    continue;
                }
                let last = last_seq.entry(shown.conversation.as_str()).or_default();
                if shown.seq <= *last {
                    verdict.out_of_order += 1;
                    example(
                        &mut verdict,
                        format!(
                            "device {device}: {} seq {} shown after seq {}",
                            shown.conversation, shown.seq, *last
                        ),
                    );
                }
                *last = (*last).max(shown.seq);
                match acked_by_id.get(&shown.msg_id) {
                    Some(a) if a.content != shown.content || a.seq != shown.seq => {
                        verdict.corrupted += 1;
                        example(
                            &mut verdict,
                            format!("device {device}: msg {} differs from what was sent", shown.msg_id),
                        );
                    }
                    Some(_) => {}
                    None => verdict.shown_unacknowledged += 1,
                }
            }
            shown_counts.push(counts);
        }
        for a in &acked {
            let owed: HashSet<usize> = a.owed_to.iter().copied().collect();
            for device in owed {
                verdict.owed_deliveries += 1;
                match shown_counts[device].get(&a.msg_id).copied().unwrap_or(0) {
                    0 => {
                        verdict.lost += 1;
                        example(
                            &mut verdict,
                            format!(
                                "device {device}: msg {} ({} seq {}) never shown",
                                a.msg_id, a.conversation, a.seq
                            ),
                        );
                    }
                    1 => verdict.delivered += 1,
                    n => {
                        verdict.delivered += 1;
                        verdict.duplicated += u64::from(n - 1);
                        example(&mut verdict, format!("device {device}: msg {} shown {n} times", a.msg_id));
                    }
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(msg_id: u64, seq: u64) -> Shown {
        Shown { msg_id, seq, conversation: "g:x".into(), content: vec![msg_id as u8] }
    }

    fn acked(msg_id: u64, seq: u64, owed_to: Vec<usize>) -> Acked {
        Acked { msg_id, seq, conversation: "g:x".into(), content: vec![msg_id as u8], owed_to }
    }

    #[test]
    fn a_clean_run_passes() {
        let ledger = Ledger::new(2);
        ledger.record_acked(acked(1, 1, vec![0, 1]));
        ledger.record_acked(acked(2, 2, vec![0, 1]));
        for device in 0..2 {
            ledger.record_shown(device, shown(1, 1));
            ledger.record_shown(device, shown(2, 2));
        }
        let verdict = ledger.verdict();
        assert!(verdict.passed(), "{verdict:?}");
        assert_eq!((verdict.acknowledged, verdict.owed_deliveries, verdict.delivered), (2, 4, 4));
    }

    #[test]
    fn loss_duplication_order_and_corruption_are_each_counted() {
        let ledger = Ledger::new(2);
        ledger.record_acked(acked(1, 1, vec![0, 1]));
        ledger.record_acked(acked(2, 2, vec![0, 1]));
        // Device 0: out of order and a duplicate.
        ledger.record_shown(0, shown(2, 2));
        ledger.record_shown(0, shown(1, 1));
        ledger.record_shown(0, shown(2, 2));
        // Device 1: message 2 lost, message 1 altered.
        ledger.record_shown(1, Shown { content: b"other".to_vec(), ..shown(1, 1) });
        let verdict = ledger.verdict();
        assert!(!verdict.passed());
        assert_eq!(verdict.lost, 1);
        assert_eq!(verdict.duplicated, 1);
        assert_eq!(verdict.out_of_order, 1, "seq 1 after 2");
        assert_eq!(verdict.corrupted, 1);
        assert_eq!(ledger.missing(), 1);
    }

    #[test]
    fn unacknowledged_messages_may_arrive() {
        let ledger = Ledger::new(1);
        ledger.record_shown(0, shown(9, 1));
        let verdict = ledger.verdict();
        assert!(verdict.passed());
        assert_eq!(verdict.shown_unacknowledged, 1);
    }
}
