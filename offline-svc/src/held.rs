//! Offline writes held back while a pushed device may still ACK.
//!
//! A device that is online when the consumer reads a message gets it pushed
//! and usually ACKs it within milliseconds. Writing its offline copy only to
//! delete it again on that ACK costs two writes per delivery for nothing, so
//! the consumer holds the copy back: the ACK, if it comes within
//! `OfflineConfig::ack_wait`, settles it in memory; otherwise the copy is
//! written then, as if there had been no push. The message is durable in the
//! bus all along: the consumer commits a batch's offset only once each of
//! its held copies is ACKed or written, so a crash replays it.
//!
//! An ACK that reaches another offline-svc node (or comes after the wait)
//! goes to the store as usual: it finds no entry and leaves a tombstone,
//! which drops the late write. A pull serves the device's held copies with
//! its stored ones, so a device that reconnects while its copies are held
//! (its old connection was cut) pulls them with everything else, in order;
//! the ACK of the pull settles them as the ACK of a push would. A copy
//! whose wait is over stays held until its write is done, so there is no
//! moment when a pull finds it neither held nor stored; that is what lets
//! a connection whose push was dropped be told to pull at once rather than
//! after the wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use foldhash::HashMap;
use tern_store::OfflineEntry;
use tokio::sync::Notify;

/// A held copy: a device's offline set and the message.
pub(crate) type HeldKey = (String, u64);

/// Copies in one device's offline set: the set and the message ids (or
/// entries), in message order. A batch holds its copies set by set, so the
/// set's key is built, copied and looked up once per device and batch, not
/// once per copy (a batch of a hundred messages to a group of a thousand is
/// a hundred copies per device).
pub(crate) type HeldRun<T> = (String, Vec<T>);

/// The held copies of one consumer batch.
#[derive(Default)]
pub(crate) struct BatchHold {
    unacked: AtomicUsize,
    all_acked: Notify,
}

impl BatchHold {
    /// Resolves once every copy held for this batch has been ACKed.
    pub(crate) async fn all_acked(&self) {
        loop {
            let notified = self.all_acked.notified();
            if self.unacked.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn acked_one(&self) {
        if self.unacked.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_acked.notify_waiters();
        }
    }
}

/// A copy held back, with the batch that holds it.
struct HeldCopy {
    batch: Arc<BatchHold>,
    entry: OfflineEntry,
    /// The wait is over and the copy is being written. It stays held
    /// until the write is done, so a pull in between still finds it; an
    /// ACK meanwhile settles it and also goes to the store (the write may
    /// have landed already).
    writing: bool,
}

/// The copies held for one device offline set, in message id order.
///
/// A sorted queue rather than a `BTreeMap`: copies come in about in id
/// order and their ACKs too, so a copy is nearly always added at the back
/// and settled at the front, without the tree's node splits and merges
/// (its inserts and removals were about 7% of the server's time in a
/// fan-out to a thousand members).
#[derive(Default)]
struct HeldSet {
    copies: VecDeque<(u64, HeldCopy)>,
}

impl HeldSet {
    fn position(&self, msg_id: u64) -> Result<usize, usize> {
        // The usual cases first: a new id at the back, an ACK at the front.
        match (self.copies.front(), self.copies.back()) {
            (None, _) => Err(0),
            (_, Some((last, _))) if msg_id > *last => Err(self.copies.len()),
            (Some((first, _)), _) if msg_id == *first => Ok(0),
            _ => self.copies.binary_search_by_key(&msg_id, |(id, _)| *id),
        }
    }

    /// Holds `copy` of `msg_id`; false if one is held already.
    fn insert(&mut self, msg_id: u64, copy: impl FnOnce() -> HeldCopy) -> bool {
        match self.position(msg_id) {
            Ok(_) => false,
            Err(at) => {
                self.copies.insert(at, (msg_id, copy()));
                true
            }
        }
    }

    fn get(&self, msg_id: u64) -> Option<&HeldCopy> {
        self.position(msg_id).ok().map(|at| &self.copies[at].1)
    }

    fn get_mut(&mut self, msg_id: u64) -> Option<&mut HeldCopy> {
        self.position(msg_id).ok().map(|at| &mut self.copies[at].1)
    }

    fn remove(&mut self, msg_id: u64) -> Option<HeldCopy> {
        let at = self.position(msg_id).ok()?;
        self.copies.remove(at).map(|(_, copy)| copy)
    }

    fn len(&self) -> usize {
        self.copies.len()
    }

    fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Called when the set was emptied: it stays in the map for the
    /// device's next batch, with room for a batch's copies but no more.
    fn emptied(&mut self) {
        if self.copies.capacity() > KEPT_ROOM {
            self.copies = VecDeque::new();
        }
    }
}

/// Copies an emptied [`HeldSet`] keeps room for.
const KEPT_ROOM: usize = 128;

/// Every copy held back in this process, by device offline set and
/// message id; shared by the consumer (which holds and releases) and
/// [`crate::OfflineService`] (whose ACKs settle copies and whose pulls
/// serve them).
///
/// The map is looked up at least twice per delivery (hold, ACK), so it
/// hashes with foldhash rather than SipHash; foldhash is seeded per
/// process, which is enough for keys made of user and device ids.
///
/// A device's set stays in the map once emptied: in a fan-out its next
/// batch comes within milliseconds, and removing the set on the ACK only
/// to add it again (a key copied and freed, the map's probes and growth)
/// was about 6% of the server's time at 1 M deliveries/s to a thousand
/// members. Emptied sets are dropped when the map would otherwise grow.
#[derive(Default)]
pub struct HeldWrites {
    copies: Mutex<HashMap<String, HeldSet>>,
}

impl HeldWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldSet>> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `copies` (runs of entries by offline set) for `batch`;
    /// returns the copies it now holds, and those another batch already
    /// held (the same message again within the wait): such a copy stays
    /// with its first holder, which writes it if it is not ACKed.
    pub(crate) fn hold(
        &self,
        batch: &Arc<BatchHold>,
        copies: Vec<HeldRun<OfflineEntry>>,
    ) -> (Vec<HeldRun<u64>>, Vec<HeldRun<u64>>) {
        let (mut held, mut elsewhere) = (Vec::with_capacity(copies.len()), Vec::new());
        let mut count = 0;
        let mut all = self.lock();
        for (inbox, entries) in copies {
            // The key is copied only for a new set. (`entry` would take a
            // copy of it for every set; `get_mut` then `insert` in one
            // match is refused by the borrow checker.)
            if !all.contains_key(inbox.as_str()) {
                if all.len() == all.capacity() {
                    // Full: the emptied sets go before the map grows.
                    all.retain(|_, set| !set.is_empty());
                }
                all.insert(inbox.clone(), HeldSet::default());
            }
            let set = all.get_mut(inbox.as_str()).expect("inserted above");
            let (mut fresh, mut repeated) = (Vec::with_capacity(entries.len()), Vec::new());
            for entry in entries {
                let msg_id = entry.msg_id;
                if set.insert(msg_id, || HeldCopy { batch: batch.clone(), entry, writing: false }) {
                    fresh.push(msg_id);
                } else {
                    repeated.push(msg_id);
                }
            }
            count += fresh.len();
            if !repeated.is_empty() {
                elsewhere.push((inbox.clone(), repeated));
            }
            if !fresh.is_empty() {
                held.push((inbox, fresh));
            }
        }
        batch.unacked.fetch_add(count, Ordering::AcqRel);
        (held, elsewhere)
    }

    /// `msg_ids` of `inbox` are ACKed: settles the held copies among them
    /// and returns the ids the store must be told of: those that were not
    /// held, and those being written ([`HeldWrites::start_writing`]).
    pub(crate) fn settle(&self, inbox: &str, msg_ids: &[u64]) -> Vec<u64> {
        let mut all = self.lock();
        let Some(set) = all.get_mut(inbox) else {
            return msg_ids.to_vec();
        };
        let mut for_the_store = Vec::new();
        for &msg_id in msg_ids {
            match set.remove(msg_id) {
                Some(copy) => {
                    copy.batch.acked_one();
                    if copy.writing {
                        for_the_store.push(msg_id);
                    }
                }
                None => for_the_store.push(msg_id),
            }
        }
        if set.is_empty() {
            set.emptied();
        }
        for_the_store
    }

    /// The wait is over: marks the copies of `batch` still held as being
    /// written and returns them. They stay held (a pull keeps finding them
    /// while the write is under way) until [`HeldWrites::release`].
    pub(crate) fn start_writing(&self, batch: &Arc<BatchHold>, keys: &[HeldRun<u64>]) -> Vec<HeldKey> {
        if batch.unacked.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut all = self.lock();
        let mut writing = Vec::new();
        for (inbox, msg_ids) in keys {
            let Some(set) = all.get_mut(inbox.as_str()) else { continue };
            for &msg_id in msg_ids {
                if let Some(copy) = set.get_mut(msg_id).filter(|copy| Arc::ptr_eq(&copy.batch, batch)) {
                    copy.writing = true;
                    writing.push((inbox.clone(), msg_id));
                }
            }
        }
        writing
    }

    /// Takes back the copies of `batch` still held (written by now, or
    /// dropped with a batch that failed and is retried); returns them.
    pub(crate) fn release(&self, batch: &Arc<BatchHold>, keys: Vec<HeldRun<u64>>) -> Vec<HeldKey> {
        // Every copy of the batch was ACKed (the usual case): none is left
        // to look up. Copies leave the map only through `settle`, which
        // counts them, or here.
        if batch.unacked.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut all = self.lock();
        let mut unacked = Vec::new();
        for (inbox, msg_ids) in keys {
            let Some(set) = all.get_mut(&inbox) else { continue };
            for msg_id in msg_ids {
                if set.get(msg_id).is_some_and(|copy| Arc::ptr_eq(&copy.batch, batch)) {
                    set.remove(msg_id);
                    unacked.push((inbox.clone(), msg_id));
                }
            }
            if set.is_empty() {
                set.emptied();
            }
        }
        unacked
    }

    /// The copies held for `inbox` after message `after_msg_id`, oldest
    /// first (a pull serves them with the stored ones, so it never misses a
    /// message that is only held).
    pub(crate) fn held_after(&self, inbox: &str, after_msg_id: u64) -> Vec<OfflineEntry> {
        let all = self.lock();
        let Some(set) = all.get(inbox) else { return Vec::new() };
        let first = set.copies.partition_point(|(msg_id, _)| *msg_id <= after_msg_id);
        set.copies.range(first..).map(|(_, copy)| copy.entry.clone()).collect()
    }

    /// How many copies are held for `inbox`.
    pub(crate) fn count_for(&self, inbox: &str) -> usize {
        self.lock().get(inbox).map_or(0, HeldSet::len)
    }

    /// How many copies are held now.
    pub fn len(&self) -> usize {
        self.lock().values().map(HeldSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().values().all(HeldSet::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(inbox: &str, id: u64) -> HeldKey {
        (inbox.to_owned(), id)
    }

    fn copies(inbox: &str, ids: &[u64]) -> HeldRun<OfflineEntry> {
        let entry = |id: u64| OfflineEntry { msg_id: id, payload: bytes::Bytes::from(format!("m{id}")) };
        (inbox.to_owned(), ids.iter().map(|&id| entry(id)).collect())
    }

    fn run(inbox: &str, ids: &[u64]) -> HeldRun<u64> {
        (inbox.to_owned(), ids.to_vec())
    }

    #[test]
    fn a_held_set_keeps_id_order_whatever_the_order_of_holds_and_acks() {
        let batch = Arc::new(BatchHold::default());
        let copy = |id: u64| HeldCopy {
            batch: batch.clone(),
            entry: OfflineEntry { msg_id: id, payload: bytes::Bytes::new() },
            writing: false,
        };
        let mut set = HeldSet::default();
        for id in [5, 9, 7, 1, 9, 12] {
            set.insert(id, || copy(id));
        }
        let ids = |set: &HeldSet| set.copies.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(ids(&set), [1, 5, 7, 9, 12], "9 is held once");
        assert!(!set.insert(7, || copy(7)));
        assert!(set.remove(1).is_some() && set.remove(9).is_some() && set.remove(12).is_some());
        assert!(set.remove(9).is_none() && set.remove(3).is_none() && set.get(12).is_none());
        assert_eq!(ids(&set), [5, 7]);
        assert!(set.get(7).is_some_and(|c| c.entry.msg_id == 7));
        assert!(set.remove(5).is_some() && set.remove(7).is_some() && set.is_empty());
    }

    #[tokio::test]
    async fn acks_settle_held_copies_and_the_rest_is_released() {
        let held = HeldWrites::default();
        let batch = Arc::new(BatchHold::default());
        let (holding, _) = held.hold(&batch, vec![copies("bob/phone", &[1, 2]), copies("eve/tab", &[1])]);
        assert_eq!(holding, vec![run("bob/phone", &[1, 2]), run("eve/tab", &[1])]);
        let held_ids = |inbox| held.held_after(inbox, 0).iter().map(|e| e.msg_id).collect::<Vec<_>>();
        assert_eq!(held_ids("bob/phone"), [1, 2]);
        let after = |inbox, id| held.held_after(inbox, id).iter().map(|e| e.msg_id).collect::<Vec<_>>();
        assert_eq!(
            (after("bob/phone", 1), after("bob/phone", 2), after("nobody/x", 0)),
            (vec![2], vec![], vec![])
        );
        assert_eq!(held.settle("bob/phone", &[1, 2, 9]), vec![9], "9 was never held: the store gets it");
        assert!(held_ids("bob/phone").is_empty());
        assert_eq!(held.len(), 1);
        assert_eq!(
            held.release(&batch, holding),
            vec![key("eve/tab", 1)],
            "only the unACKed copy is written"
        );
        assert!(held.is_empty());
        assert_eq!(held.settle("eve/tab", &[1]), vec![1], "after the release an ACK goes to the store");
    }

    #[test]
    fn copies_being_written_stay_held_and_their_acks_also_go_to_the_store() {
        let held = HeldWrites::default();
        let batch = Arc::new(BatchHold::default());
        let (holding, _) = held.hold(&batch, vec![copies("bob/phone", &[1, 2, 3])]);
        assert_eq!(held.settle("bob/phone", &[1]), Vec::<u64>::new(), "ACKed within the wait");

        let writing = held.start_writing(&batch, &holding);
        assert_eq!(writing, vec![key("bob/phone", 2), key("bob/phone", 3)]);
        let ids =
            |held: &HeldWrites| held.held_after("bob/phone", 0).iter().map(|e| e.msg_id).collect::<Vec<_>>();
        assert_eq!(ids(&held), [2, 3], "a pull still finds them");
        assert_eq!(held.count_for("bob/phone"), 2);
        assert_eq!(held.settle("bob/phone", &[2, 7]), vec![2, 7], "the write of 2 may have landed");
        assert_eq!(ids(&held), [3]);

        assert_eq!(held.release(&batch, holding), vec![key("bob/phone", 3)], "written: no longer held");
        assert!(held.is_empty());
        let other = Arc::new(BatchHold::default());
        assert!(held.start_writing(&other, &[run("bob/phone", &[3])]).is_empty(), "nothing of that batch");
    }

    #[test]
    fn emptied_sets_stay_for_the_next_batch_and_go_before_the_map_grows() {
        let held = HeldWrites::default();
        let batch = Arc::new(BatchHold::default());
        held.hold(&batch, vec![copies("bob/phone", &[1, 2])]);
        assert!(held.settle("bob/phone", &[1, 2]).is_empty());
        assert!(held.is_empty() && held.count_for("bob/phone") == 0);
        assert_eq!(held.len(), 0);
        assert_eq!(held.lock().len(), 1, "the emptied set is kept");
        assert_eq!(held.settle("bob/phone", &[3]), vec![3], "an emptied set holds nothing");
        held.hold(&batch, vec![copies("bob/phone", &[4])]);
        assert_eq!(held.count_for("bob/phone"), 1);

        // Ten thousand devices, each held a copy once: the map keeps
        // about as many sets as were held at once, not one per device.
        for device in 0..10_000 {
            let inbox = format!("u{device}/phone");
            held.hold(&batch, vec![copies(&inbox, &[1])]);
            held.settle(&inbox, &[1]);
        }
        assert!(held.lock().len() < 64, "{} sets kept", held.lock().len());
        assert_eq!(held.len(), 1, "bob's copy 4 is still held");
        assert_eq!(held.held_after("bob/phone", 0).iter().map(|e| e.msg_id).collect::<Vec<_>>(), [4]);
    }

    #[tokio::test]
    async fn all_acked_resolves_on_the_last_ack_and_a_copy_stays_with_its_first_holder() {
        let held = Arc::new(HeldWrites::default());
        let first = Arc::new(BatchHold::default());
        let second = Arc::new(BatchHold::default());
        let (first_keys, _) = held.hold(&first, vec![copies("bob/phone", &[1, 2])]);
        let (second_keys, elsewhere) = held.hold(&second, vec![copies("bob/phone", &[2, 3])]);
        assert_eq!(second_keys, vec![run("bob/phone", &[3])]);
        assert_eq!(elsewhere, vec![run("bob/phone", &[2])], "message 2 is already held by the first batch");

        let waiter = tokio::spawn({
            let first = first.clone();
            async move { first.all_acked().await }
        });
        held.settle("bob/phone", &[1]);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one copy of the first batch is still unACKed");
        held.settle("bob/phone", &[2]);
        waiter.await.unwrap();
        assert!(held.release(&first, first_keys).is_empty());
        assert_eq!(held.release(&second, second_keys), vec![key("bob/phone", 3)]);
    }
}
