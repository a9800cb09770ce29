//! The bookkeeping of one open-loop run, shared by every system under test:
//! counters, latency histograms (server ACK, end to end, last group member),
//! per-receiver delivery logs, the progress line and the final verdict.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::payload::Stamp;
use crate::procfs::{MachineCpu, ProcCpu};
use crate::sched::Schedule;
use crate::stats::{Recorder, Summary};
use crate::verify::{DeliveryLog, Verdict};

/// A process-wide run number, so a late delivery from an earlier run is
/// recognised as such.
pub fn next_run_id() -> u32 {
    static RUN: AtomicU32 = AtomicU32::new(1);
    RUN.fetch_add(1, Relaxed)
}

/// Who gets which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// Stream `s` goes to receiver `s` only (1:1 pairs).
    Pairs,
    /// Every stream goes to every receiver (groups whose members are the
    /// receivers).
    Groups,
}

pub struct Flow {
    pub run: u32,
    pub sched: Schedule,
    pub start_ns: u64,
    pub fanout: Fanout,
    pub receivers: usize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale: AtomicU64,
    last_rx_ns: AtomicU64,
    pub ack_latency: Recorder,
    pub latency: Recorder,
    last_member: Recorder,
    logs: Vec<Mutex<DeliveryLog>>,
    /// Groups: per message, deliveries so far and the largest latency.
    arrivals: Vec<AtomicU32>,
    slowest: Vec<AtomicU64>,
    error_notes: Mutex<Vec<String>>,
}

impl Flow {
    /// A flow for run `run` (from [`next_run_id`]).
    pub fn new(run: u32, sched: Schedule, start_ns: u64, fanout: Fanout, receivers: usize) -> Arc<Flow> {
        let per_message = if fanout == Fanout::Groups { sched.total() as usize } else { 0 };
        Arc::new(Flow {
            run,
            sched,
            start_ns,
            fanout,
            receivers,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            last_rx_ns: AtomicU64::new(0),
            ack_latency: Recorder::new(8),
            latency: Recorder::new(16),
            last_member: Recorder::new(8),
            logs: (0..receivers).map(|_| Mutex::default()).collect(),
            arrivals: (0..per_message).map(|_| AtomicU32::new(0)).collect(),
            slowest: (0..per_message).map(|_| AtomicU64::new(0)).collect(),
            error_notes: Mutex::default(),
        })
    }

    /// Receivers of each message.
    pub fn per_message(&self) -> u64 {
        match self.fanout {
            Fanout::Pairs => 1,
            Fanout::Groups => self.receivers as u64,
        }
    }

    /// When message `index` of `stream` was due (on [`clock`]).
    pub fn due(&self, stream: u32, index: u64) -> u64 {
        self.start_ns + self.sched.due_ns(self.sched.global(stream, index))
    }

    /// The stamp message `global` carries.
    pub fn stamp(&self, global: u64) -> Stamp {
        let (stream, index) = self.sched.split(global);
        Stamp { run: self.run, stream, index, due_ns: self.start_ns + self.sched.due_ns(global) }
    }

    /// A server ACK for message `index` of `stream` arrived now.
    pub fn on_ack(&self, stream: u32, index: u64) {
        let now = clock::now_ns();
        self.ack_latency.record(stream as usize, now.saturating_sub(self.due(stream, index)));
        self.acked.fetch_add(1, Relaxed);
    }

    /// A request failed; the first few reasons are kept for the report.
    pub fn on_error(&self, what: impl FnOnce() -> String) {
        if self.errors.fetch_add(1, Relaxed) < 5 {
            let note = what();
            eprintln!("  error: {note}");
            self.error_notes.lock().unwrap_or_else(|e| e.into_inner()).push(note);
        }
    }

    pub fn error_notes(&self) -> Vec<String> {
        self.error_notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Receiver `receiver` got a message carrying `stamp` now.
    pub fn on_delivery(&self, receiver: usize, stamp: &Stamp) {
        self.on_delivery_at(receiver, stamp, clock::now_ns());
    }

    /// Receiver `receiver` got a message carrying `stamp` at `now` (a
    /// [`clock::now_ns`] reading: one per read burst serves all its frames).
    pub fn on_delivery_at(&self, receiver: usize, stamp: &Stamp, now: u64) {
        if stamp.run != self.run || receiver >= self.receivers {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let latency = now.saturating_sub(stamp.due_ns);
        let fresh =
            self.logs[receiver].lock().unwrap_or_else(|e| e.into_inner()).record(stamp.stream, stamp.index);
        if !fresh {
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        self.latency.record(receiver, latency);
        self.received.fetch_add(1, Relaxed);
        self.last_rx_ns.fetch_max(now, Relaxed);
        if self.fanout == Fanout::Groups {
            let g = self.sched.global(stamp.stream, stamp.index) as usize;
            if let (Some(n), Some(slow)) = (self.arrivals.get(g), self.slowest.get(g)) {
                let worst = slow.fetch_max(latency, Relaxed).max(latency);
                if u64::from(n.fetch_add(1, Relaxed)) + 1 == self.receivers as u64 {
                    self.last_member.record(g, worst);
                }
            }
        }
    }

    /// Everything sent was answered and delivered (or failed).
    pub fn drained(&self, has_acks: bool) -> bool {
        let sent = self.sent.load(Relaxed);
        let settled = if has_acks { self.acked.load(Relaxed) + self.errors.load(Relaxed) } else { sent };
        let delivered_goal = if has_acks { self.acked.load(Relaxed) } else { sent } * self.per_message();
        sent == self.sched.total() && settled >= sent && self.received.load(Relaxed) >= delivered_goal
    }

    pub fn progress(&self) -> String {
        format!(
            "sent={} acked={} recv={} err={} dup={}",
            self.sent.load(Relaxed),
            self.acked.load(Relaxed),
            self.received.load(Relaxed),
            self.errors.load(Relaxed),
            self.duplicates.load(Relaxed)
        )
    }

    /// The verdict: counts checked against the delivery logs.
    pub fn verdict(&self, has_acks: bool) -> Verdict {
        let mut missing = 0;
        for (r, log) in self.logs.iter().enumerate() {
            let log = log.lock().unwrap_or_else(|e| e.into_inner());
            match self.fanout {
                Fanout::Pairs => {
                    if (r as u32) < self.sched.streams() {
                        missing += log.missing(r as u32, self.sched.total_of(r as u32));
                    }
                }
                Fanout::Groups => {
                    for s in 0..self.sched.streams() {
                        missing += log.missing(s, self.sched.total_of(s));
                    }
                }
            }
        }
        Verdict::check(
            self.sent.load(Relaxed),
            has_acks.then(|| self.acked.load(Relaxed)),
            self.errors.load(Relaxed),
            self.per_message(),
            self.received.load(Relaxed),
            self.duplicates.load(Relaxed),
            missing,
            self.stale.load(Relaxed),
        )
    }

    /// Seconds from the start to the last delivery.
    pub fn delivery_window_s(&self) -> f64 {
        let last = self.last_rx_ns.load(Relaxed);
        (last.saturating_sub(self.start_ns) as f64 / 1e9).max(1e-3)
    }
}

/// Prints `label` and the flow's counters once a second until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
}

impl Progress {
    pub fn start(label: String, flow: Arc<Flow>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if flag.load(Relaxed) {
                    break;
                }
                let t = clock::now_ns().saturating_sub(flow.start_ns) as f64 / 1e9;
                eprintln!("  [{label}] t={t:.0}s {}", flow.progress());
            }
        });
        Progress { stop }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// One open-loop run at one rate (S3 1:1, S4 fan-out, tern or a peer).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateRun {
    /// `s3` or `s4`.
    pub scenario: String,
    /// `tern`, `mosquitto` or `nats`.
    pub system: String,
    /// `standalone-plain`, `standalone-tls`, `cluster`, or the peer's name.
    pub target: String,
    /// What the run was for: `search`, `at 70%`, `fixed`, …
    pub label: String,
    /// Members per group counting the sender (S4); 0 for 1:1.
    pub group_size: u32,
    /// Senders: 1:1 pairs or groups.
    pub streams: u32,
    pub receivers: u32,
    pub offered_rate: f64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    /// Messages per second sent over the run.
    pub send_rate: f64,
    /// Deliveries per second, from the start to the last delivery.
    pub deliveries_per_s: f64,
    pub verdict: Verdict,
    /// Everything answered and delivered before the drain timeout.
    pub drained: bool,
    /// Verdict OK, drained, and p99 within the latency objective.
    pub sustainable: bool,
    pub ack_latency: Option<Summary>,
    pub latency: Summary,
    pub last_member_latency: Option<Summary>,
    pub cpu: Vec<ProcCpu>,
    /// The whole machine over the same window (absent in results of
    /// earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_cpu: Option<MachineCpu>,
    pub errors: Vec<String>,
}

impl RateRun {
    /// Fills the measured part from a finished flow.
    pub fn measured(&mut self, flow: &Flow, has_acks: bool, drained: bool, slo_ms: f64, duration: Duration) {
        self.verdict = flow.verdict(has_acks);
        self.drained = drained;
        self.duration_s = duration.as_secs_f64();
        self.send_rate = flow.sent.load(Relaxed) as f64 / self.duration_s.max(1e-3);
        self.deliveries_per_s = flow.received.load(Relaxed) as f64 / flow.delivery_window_s();
        self.ack_latency = has_acks.then(|| Summary::of(&flow.ack_latency.merged()));
        self.latency = Summary::of(&flow.latency.merged());
        if flow.fanout == Fanout::Groups {
            self.last_member_latency = Some(Summary::of(&flow.last_member.merged()));
        }
        self.sustainable = self.verdict.ok && drained && self.latency.p99_ms <= slo_ms;
        self.errors = flow.error_notes();
    }

    pub fn print(&self) {
        eprintln!("  {}", self.verdict.line());
        let last = self
            .last_member_latency
            .as_ref()
            .map(|l| format!(" last-member {}", l.line()))
            .unwrap_or_default();
        let ack = self.ack_latency.as_ref().map(|l| format!(" ack {}", l.line())).unwrap_or_default();
        eprintln!(
            "  offered {:.0}/s sent {:.0}/s deliveries {:.0}/s | latency ms p50/p90/p99/p99.9/max: e2e {}{ack}{last} | {}",
            self.offered_rate,
            self.send_rate,
            self.deliveries_per_s,
            self.latency.line(),
            if self.sustainable { "sustainable" } else { "NOT sustainable" }
        );
        eprintln!("  cpu: {}", crate::report::cpu_cell(&self.cpu, self.machine_cpu.as_ref()));
    }
}

/// Waits until the flow has drained or `timeout` passed; true if drained.
pub async fn wait_drained(flow: &Flow, has_acks: bool, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if flow.drained(has_acks) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_flow_tracks_the_last_member() {
        let sched = Schedule::new(10.0, 2, Duration::from_secs(1));
        let start = clock::now_ns();
        let flow = Flow::new(next_run_id(), sched, start, Fanout::Groups, 3);
        for g in 0..sched.total() {
            flow.sent.fetch_add(1, Relaxed);
            let (s, i) = sched.split(g);
            flow.on_ack(s, i);
            for r in 0..3 {
                flow.on_delivery(r, &flow.stamp(g));
            }
        }
        // A duplicate and a late one from another run.
        flow.on_delivery(0, &flow.stamp(0));
        let mut old = flow.stamp(1);
        old.run = flow.run.wrapping_sub(1);
        flow.on_delivery(1, &old);
        assert!(flow.drained(true));
        let v = flow.verdict(true);
        assert_eq!((v.sent, v.expected, v.received, v.duplicates, v.stale, v.missing), (10, 30, 30, 1, 1, 0));
        assert!(!v.ok, "a duplicate fails the run");
        assert_eq!(flow.last_member.merged().len(), 10);
    }

    #[test]
    fn pairs_flow_reports_missing() {
        let sched = Schedule::new(10.0, 2, Duration::from_secs(1));
        let flow = Flow::new(next_run_id(), sched, clock::now_ns(), Fanout::Pairs, 2);
        for g in 0..sched.total() {
            flow.sent.fetch_add(1, Relaxed);
            let (s, i) = sched.split(g);
            flow.on_ack(s, i);
            if g != 3 {
                flow.on_delivery(s as usize, &flow.stamp(g));
            }
        }
        assert!(!flow.drained(true));
        let v = flow.verdict(true);
        assert_eq!((v.received, v.missing, v.ok), (9, 1, false));
        let mut run = RateRun::default();
        run.measured(&flow, true, false, 100.0, Duration::from_secs(1));
        assert!(!run.sustainable);
        assert_eq!(run.latency.count, 9);
    }
}
