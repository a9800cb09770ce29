//! Snowflake ids: 41 bits of milliseconds since [`EPOCH_MS`], 10 bits of
//! worker id, 12 bits of sequence within the millisecond.
//!
//! Ids from one generator are strictly increasing. When the clock goes
//! backwards the generator refuses to issue (an id reusing an old timestamp
//! could collide with one already handed out) until the clock catches up;
//! a backwards step of at most [`MAX_WAIT_BACKWARDS_MS`] is waited out
//! instead of failing, since NTP slews of a few milliseconds are routine.
//!
//! [`rpc`] holds the idgen role and the Leaf-style
//! [`SegmentAllocator`](rpc::SegmentAllocator), which is not bound by the
//! 4096 ids per millisecond of one worker id: it hands out ranges counted
//! in a store, lock-free in-process, one id or a run of ids per call.

pub mod rpc;

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Custom epoch: 2024-01-01T00:00:00Z. 41 bits of ms last until 2093.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
pub const WORKER_BITS: u32 = 10;
pub const SEQUENCE_BITS: u32 = 12;
pub const MAX_WORKER_ID: u16 = (1 << WORKER_BITS) - 1;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;
const TIMESTAMP_BITS: u32 = 41;
/// A clock that went back by at most this much is waited for.
pub const MAX_WAIT_BACKWARDS_MS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("worker id {0} is above the maximum of 1023")]
    WorkerOutOfRange(u16),
    #[error("clock moved backwards by {behind_ms} ms; refusing to issue ids")]
    ClockBackwards { behind_ms: u64 },
    #[error("clock is before the snowflake epoch or past its 41-bit range")]
    ClockOutOfRange,
    #[error("no worker id: the lease was lost and not yet renewed")]
    NoWorker,
}

/// Source of wall-clock milliseconds since the Unix epoch (swappable in tests).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdParts {
    pub unix_ms: u64,
    pub worker: u16,
    pub sequence: u16,
}

/// Splits an id into its fields.
pub fn decompose(id: u64) -> IdParts {
    IdParts {
        unix_ms: (id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        worker: ((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER_ID)) as u16,
        sequence: (id & MAX_SEQUENCE) as u16,
    }
}

#[derive(Debug)]
struct State {
    /// `None` while suspended (the worker-id lease was lost).
    worker: Option<u64>,
    last_ms: u64,
    sequence: u64,
}

/// A snowflake generator for one worker id. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Snowflake<C: Clock = SystemClock> {
    clock: C,
    state: Mutex<State>,
}

impl Snowflake<SystemClock> {
    pub fn new(worker: u16) -> Result<Self, IdError> {
        Self::with_clock(worker, SystemClock)
    }
}

impl<C: Clock> Snowflake<C> {
    pub fn with_clock(worker: u16, clock: C) -> Result<Self, IdError> {
        if worker > MAX_WORKER_ID {
            return Err(IdError::WorkerOutOfRange(worker));
        }
        let state = State { worker: Some(u64::from(worker)), last_ms: 0, sequence: 0 };
        Ok(Self { clock, state: Mutex::new(state) })
    }

    /// The current worker id, `None` while suspended.
    pub fn worker(&self) -> Option<u16> {
        self.lock().worker.map(|w| w as u16)
    }

    /// Stops issuing ids: the worker id may now belong to another process.
    pub fn suspend(&self) {
        self.lock().worker = None;
    }

    /// Issues ids again, under a newly leased worker id. Ids stay unique
    /// because they are unique per worker id.
    pub fn resume(&self, worker: u16) -> Result<(), IdError> {
        if worker > MAX_WORKER_ID {
            return Err(IdError::WorkerOutOfRange(worker));
        }
        self.lock().worker = Some(u64::from(worker));
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues one id.
    pub fn next_id(&self) -> Result<u64, IdError> {
        let mut out = 0;
        self.fill(std::slice::from_mut(&mut out))?;
        Ok(out)
    }

    /// Fills `out` with consecutive ids under one lock acquisition.
    pub fn fill(&self, out: &mut [u64]) -> Result<(), IdError> {
        let mut state = self.lock();
        let worker = state.worker.ok_or(IdError::NoWorker)?;
        for slot in out {
            let mut now = self.current_ms()?;
            if now < state.last_ms {
                let behind_ms = state.last_ms - now;
                if behind_ms > MAX_WAIT_BACKWARDS_MS {
                    return Err(IdError::ClockBackwards { behind_ms });
                }
                now = self.wait_until(state.last_ms)?;
            }
            if now == state.last_ms {
                state.sequence += 1;
                if state.sequence > MAX_SEQUENCE {
                    // 4096 ids this millisecond: wait for the next one.
                    now = self.wait_until(state.last_ms + 1)?;
                    state.sequence = 0;
                }
            } else {
                state.sequence = 0;
            }
            state.last_ms = now;
            *slot = ((now - EPOCH_MS) << (WORKER_BITS + SEQUENCE_BITS))
                | (worker << SEQUENCE_BITS)
                | state.sequence;
        }
        Ok(())
    }

    fn current_ms(&self) -> Result<u64, IdError> {
        let now = self.clock.now_ms();
        if now < EPOCH_MS || now - EPOCH_MS >= (1 << TIMESTAMP_BITS) {
            return Err(IdError::ClockOutOfRange);
        }
        Ok(now)
    }

    fn wait_until(&self, target_ms: u64) -> Result<u64, IdError> {
        let started = self.clock.now_ms();
        loop {
            let now = self.current_ms()?;
            if now >= target_ms {
                return Ok(now);
            }
            // Bounded: a clock that does not advance is reported, not spun on forever.
            if self.clock.now_ms().saturating_sub(started) > 1_000 {
                return Err(IdError::ClockBackwards { behind_ms: target_ms - now });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone)]
    struct ManualClock(Arc<AtomicU64>);

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn layout_round_trips() {
        let clock = ManualClock(Arc::new(AtomicU64::new(EPOCH_MS + 12_345)));
        let ids_gen = Snowflake::with_clock(1023, clock).unwrap();
        let id = ids_gen.next_id().unwrap();
        assert_eq!(decompose(id), IdParts { unix_ms: EPOCH_MS + 12_345, worker: 1023, sequence: 0 });
        let id2 = ids_gen.next_id().unwrap();
        assert_eq!(decompose(id2).sequence, 1);
    }

    #[test]
    fn strictly_increasing_across_threads() {
        let ids_gen = Arc::new(Snowflake::new(7).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids_gen = ids_gen.clone();
                std::thread::spawn(move || {
                    let mut ids = vec![0u64; 20_000];
                    ids_gen.fill(&mut ids).unwrap();
                    ids
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let ids = h.join().unwrap();
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            all.extend(ids);
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate ids");
        assert!(all.iter().all(|id| decompose(*id).worker == 7));
    }

    #[test]
    fn refuses_when_clock_goes_backwards() {
        let now = Arc::new(AtomicU64::new(EPOCH_MS + 1_000_000));
        let ids_gen = Snowflake::with_clock(1, ManualClock(now.clone())).unwrap();
        let before = ids_gen.next_id().unwrap();
        now.fetch_sub(1_000, Ordering::SeqCst);
        assert_eq!(ids_gen.next_id(), Err(IdError::ClockBackwards { behind_ms: 1_000 }));
        now.fetch_add(1_001, Ordering::SeqCst);
        assert!(ids_gen.next_id().unwrap() > before);
    }

    #[test]
    fn sequence_overflow_waits_for_next_millisecond() {
        let now = Arc::new(AtomicU64::new(EPOCH_MS + 50));
        let ids_gen = Arc::new(Snowflake::with_clock(3, ManualClock(now.clone())).unwrap());
        let mut ids = vec![0u64; 4096];
        ids_gen.fill(&mut ids).unwrap();
        let ticker = {
            let now = now.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                now.fetch_add(1, Ordering::SeqCst);
            })
        };
        let next = ids_gen.next_id().unwrap();
        ticker.join().unwrap();
        assert_eq!(decompose(next).unix_ms, EPOCH_MS + 51);
        assert_eq!(decompose(next).sequence, 0);
        assert!(next > ids[4095]);
    }

    #[test]
    fn suspended_generator_refuses_until_resumed() {
        let ids_gen = Snowflake::new(5).unwrap();
        ids_gen.next_id().unwrap();
        ids_gen.suspend();
        assert_eq!(ids_gen.next_id(), Err(IdError::NoWorker));
        assert_eq!(ids_gen.worker(), None);
        ids_gen.resume(9).unwrap();
        assert_eq!(decompose(ids_gen.next_id().unwrap()).worker, 9);
        assert_eq!(ids_gen.resume(2000), Err(IdError::WorkerOutOfRange(2000)));
    }

    #[test]
    fn rejects_worker_out_of_range() {
        assert_eq!(Snowflake::new(1024).unwrap_err(), IdError::WorkerOutOfRange(1024));
    }
}
