//! What the client shows, and when: deduplication by message id, and
//! per-conversation order by `seq` with gap detection.
//!
//! Why a buffer: the server numbers each conversation from 1, but a device
//! can still receive seq 7 before seq 6 (a dispatcher crash followed by a
//! retry that re-publishes a reserved older seq, failover between
//! dispatchers), and a seq can be skipped for good (the dispatcher died after
//! assigning it, or its sender gave up). So [`Inbox`] keeps a cursor per
//! conversation (the highest seq this device has accounted for), holds a
//! message that leaves a hole below it, asks for an offline pull shortly
//! after a hole appears, and gives up on a hole after the gap timeout,
//! reporting the seqs that never came.
//!
//! The logic here is pure: it is told the time, and what it decides to show
//! waits in a queue ([`Inbox::take_ready`]) for the one task that ACKs and
//! shows messages, so every release comes out in the order it was decided.

use std::collections::btree_map::Entry as SeqEntry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::RangeInclusive;
use std::time::Duration;

use tern_proto::pb;
use tokio::time::Instant;

/// How long after a hole appears the offline store is pulled: long enough
/// for a push that is merely behind to arrive first.
pub(crate) const GAP_PULL_DELAY: Duration = Duration::from_millis(300);

/// The most seqs held (messages waiting below a hole, and own sends above
/// one) per client; beyond it the oldest gap is given up early.
pub(crate) const MAX_HELD: usize = 10_000;

/// The conversation a message belongs to, in the server's key format
/// ([`tern_proto::single_conversation_key`],
/// [`tern_proto::group_conversation_key`]): `g:<group id>` for a group,
/// `p:<a>:<b>` with the two user ids sorted for a 1:1 chat (both directions
/// share one sequence). `None` for a message without a conversation kind.
/// These are the keys of [`crate::Client::cursors`].
pub fn conversation_key(message: &pb::Message) -> Option<String> {
    match pb::ConversationKind::try_from(message.kind) {
        Ok(pb::ConversationKind::Single) if !message.sender.is_empty() && !message.receiver.is_empty() => {
            Some(tern_proto::single_conversation_key(&message.sender, &message.receiver))
        }
        Ok(pb::ConversationKind::Group) if !message.group_id.is_empty() => {
            Some(tern_proto::group_conversation_key(&message.group_id))
        }
        _ => None,
    }
}

/// Message ids already taken in (shown or held), bounded so memory stays
/// flat.
struct SeenIds {
    set: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl SeenIds {
    fn new(capacity: usize) -> Self {
        Self { set: HashSet::new(), order: VecDeque::new(), capacity }
    }

    /// True the first time an id is seen.
    fn insert(&mut self, id: u64) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Something to tell the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// Show (and ACK) this message.
    Show(pb::Message),
    /// These seqs of the conversation were given up on; the messages
    /// released with them follow.
    Skipped { conversation: String, missing: Vec<RangeInclusive<u64>> },
}

/// What [`Inbox::admit`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Taken in: shown now, or held until its predecessors are accounted
    /// for (and ACKed only when shown).
    Fresh,
    /// Shown before: drop it, but ACK it again.
    Duplicate,
    /// A copy is being held: drop it without an ACK (the held copy is ACKed
    /// when it is shown).
    Held,
}

/// A seq above the cursor that is accounted for while a hole below it is
/// open.
struct Slot {
    /// When it arrived: every seq between the cursor and this one is known
    /// to be missing since then.
    arrived: Instant,
    /// `None` for this device's own send, which it never receives.
    message: Option<pb::Message>,
}

#[derive(Default)]
struct Conversation {
    /// The highest seq accounted for with nothing missing below it.
    cursor: u64,
    /// Seqs above `cursor + 1`, waiting for the hole below them to close.
    held: BTreeMap<u64, Slot>,
}

impl Conversation {
    /// Moves the cursor over every held seq that is now next, showing the
    /// messages among them.
    fn release_successors(&mut self, ready: &mut VecDeque<Output>, held_ids: &mut HashSet<u64>) {
        while let Some(entry) = self.held.first_entry()
            && *entry.key() == self.cursor.saturating_add(1)
        {
            let (seq, slot) = entry.remove_entry();
            self.cursor = seq;
            if let Some(message) = slot.message {
                held_ids.remove(&message.msg_id);
                ready.push_back(Output::Show(message));
            }
        }
    }

    /// When the oldest hole of this conversation times out (`None` also
    /// for a timeout too large to represent, or when only this device's own
    /// sends wait above holes: never).
    fn deadline(&self, gap_timeout: Duration) -> Option<Instant> {
        self.held.values().filter(|s| s.message.is_some()).map(|s| s.arrived).min()?.checked_add(gap_timeout)
    }

    /// The highest held message whose hole below has been open for the gap
    /// timeout. A hole is timed from the arrival of the first message
    /// above it, so holes lower down are at least as old: the expired holes
    /// are the ones below the returned seq. Own sends above a hole start no
    /// clock: they hold nothing back from the application, and the missing
    /// messages may just be late (a storage service restarting), so a hole
    /// is given up only when it delays a message someone else sent.
    fn expired_up_to(&self, now: Instant, gap_timeout: Duration) -> Option<u64> {
        let mut oldest: Option<Instant> = None;
        for (&seq, slot) in self.held.iter().rev().filter(|(_, slot)| slot.message.is_some()) {
            let since = oldest.map_or(slot.arrived, |o| o.min(slot.arrived));
            oldest = Some(since);
            if since.checked_add(gap_timeout).is_some_and(|deadline| deadline <= now) {
                return Some(seq);
            }
        }
        None
    }
}

/// Deduplication and per-conversation order for one client (see the module
/// documentation). Survives reconnects.
pub(crate) struct Inbox {
    seen: SeenIds,
    conversations: HashMap<String, Conversation>,
    /// Conversations with something held.
    gapped: HashSet<String>,
    /// Message ids of the held messages.
    held_ids: HashSet<u64>,
    /// Held slots in all conversations.
    held: usize,
    max_held: usize,
    gap_timeout: Duration,
    /// When a hole appeared that no pull has looked for yet.
    pull_requested: Option<Instant>,
    ready: VecDeque<Output>,
}

impl Inbox {
    /// `cursors` seeds the conversations' cursors (e.g. from a previous run).
    pub(crate) fn new(
        gap_timeout: Duration,
        max_held: usize,
        seen_capacity: usize,
        cursors: &HashMap<String, u64>,
    ) -> Self {
        let conversations = cursors
            .iter()
            .map(|(key, &cursor)| (key.clone(), Conversation { cursor, held: BTreeMap::new() }))
            .collect();
        Self {
            seen: SeenIds::new(seen_capacity),
            conversations,
            gapped: HashSet::new(),
            held_ids: HashSet::new(),
            held: 0,
            max_held: max_held.max(1),
            gap_timeout,
            pull_requested: None,
            ready: VecDeque::new(),
        }
    }

    /// Takes in a pushed or pulled message.
    pub(crate) fn admit(&mut self, message: pb::Message, now: Instant) -> Admission {
        if self.held_ids.contains(&message.msg_id) {
            return Admission::Held;
        }
        if !self.seen.insert(message.msg_id) {
            return Admission::Duplicate;
        }
        match conversation_key(&message) {
            Some(key) if message.seq > 0 => self.account(key, message.seq, Some(message), now),
            // Nothing to order it by.
            _ => self.ready.push_back(Output::Show(message)),
        }
        Admission::Fresh
    }

    /// Records a seq this device sent (from its SendAck): the device never
    /// receives its own message, so the seq counts as accounted for.
    pub(crate) fn own_send(&mut self, conversation: String, seq: u64, now: Instant) {
        if seq > 0 {
            self.account(conversation, seq, None, now);
        }
    }

    fn account(&mut self, key: String, seq: u64, message: Option<pb::Message>, now: Instant) {
        let Some(conversation) = self.conversations.get_mut(&key) else {
            // The first of this conversation this client sees: nothing to
            // compare it with.
            self.conversations.insert(key, Conversation { cursor: seq, held: BTreeMap::new() });
            if let Some(message) = message {
                self.ready.push_back(Output::Show(message));
            }
            return;
        };
        if seq <= conversation.cursor {
            // Late: its gap was given up on (or it was shown before a
            // restart). Late is better than lost.
            if let Some(message) = message {
                tracing::debug!(conversation = %key, seq, cursor = conversation.cursor, "late message shown");
                self.ready.push_back(Output::Show(message));
            }
            return;
        }
        if seq == conversation.cursor + 1 {
            conversation.cursor = seq;
            if let Some(message) = message {
                self.ready.push_back(Output::Show(message));
            }
            let before = conversation.held.len();
            conversation.release_successors(&mut self.ready, &mut self.held_ids);
            self.held -= before - conversation.held.len();
            if conversation.held.is_empty() {
                self.gap_closed(&key);
            }
            return;
        }
        // A hole below `seq`: hold it.
        let highest = conversation.held.last_key_value().map_or(conversation.cursor, |(&s, _)| s);
        let reveals_a_hole = seq > highest.saturating_add(1);
        // The first received message held in this conversation: the holes
        // below it so far held back nothing and were never pulled for.
        let first_message_held = !conversation.held.values().any(|slot| slot.message.is_some());
        match conversation.held.entry(seq) {
            SeqEntry::Occupied(mut slot) => {
                let Some(message) = message else { return };
                if slot.get().message.is_none() {
                    // Sent by this device and received too (a message to
                    // oneself): hold the message in the own send's place.
                    self.held_ids.insert(message.msg_id);
                    slot.get_mut().message = Some(message);
                } else {
                    tracing::debug!(conversation = %key, seq, "two messages with one seq; showing the second now");
                    self.ready.push_back(Output::Show(message));
                }
                return;
            }
            SeqEntry::Vacant(slot) => {
                if let Some(message) = &message {
                    self.held_ids.insert(message.msg_id);
                }
                slot.insert(Slot { arrived: now, message });
            }
        }
        let message_held = conversation.held.get(&seq).is_some_and(|slot| slot.message.is_some());
        self.held += 1;
        self.gapped.insert(key);
        // Only a received message is worth a pull: one of this device's own
        // sends above a hole holds nothing back.
        if message_held && (reveals_a_hole || first_message_held) && self.pull_requested.is_none() {
            // New missing seqs: look for them in the offline store.
            self.pull_requested = Some(now);
        }
        while self.held > self.max_held {
            self.give_up_oldest_gap();
        }
    }

    /// A conversation has nothing held any more.
    fn gap_closed(&mut self, key: &str) {
        self.gapped.remove(key);
        if self.gapped.is_empty() {
            // Nothing left to pull for.
            self.pull_requested = None;
        }
    }

    /// Gives up on every hole that has been open for the gap timeout.
    pub(crate) fn expire(&mut self, now: Instant) {
        if self.gapped.is_empty() {
            return;
        }
        let expired: Vec<(String, u64)> = self
            .gapped
            .iter()
            .filter_map(|key| {
                let upto = self.conversations.get(key)?.expired_up_to(now, self.gap_timeout)?;
                Some((key.clone(), upto))
            })
            .collect();
        for (key, upto) in expired {
            self.give_up(&key, upto);
        }
    }

    /// Over the memory bound: gives up on the whole of the conversation
    /// whose gap is the oldest.
    fn give_up_oldest_gap(&mut self) {
        let oldest = self
            .gapped
            .iter()
            .filter_map(|key| {
                let conversation = self.conversations.get(key)?;
                let arrived = conversation.held.values().map(|s| s.arrived).min()?;
                let last = *conversation.held.last_key_value()?.0;
                Some((arrived, key.clone(), last))
            })
            .min();
        match oldest {
            Some((_, key, last)) => {
                tracing::debug!(conversation = %key, held = self.held, "too many messages held; gap given up early");
                self.give_up(&key, last);
            }
            // Unreachable while `held` counts the slots of `gapped`.
            None => self.held = 0,
        }
    }

    /// Releases the held seqs up to `upto` of one conversation, reporting
    /// the seqs missing between them, and whatever follows consecutively.
    fn give_up(&mut self, key: &str, upto: u64) {
        let Some(conversation) = self.conversations.get_mut(key) else { return };
        let mut released = std::mem::take(&mut conversation.held);
        if let Some(after) = upto.checked_add(1) {
            conversation.held = released.split_off(&after);
        }
        let mut missing = Vec::new();
        let mut shown = Vec::new();
        let mut next = conversation.cursor.saturating_add(1);
        for (seq, slot) in released {
            if seq > next {
                missing.push(next..=seq - 1);
            }
            next = seq.saturating_add(1);
            if let Some(message) = slot.message {
                self.held_ids.remove(&message.msg_id);
                shown.push(message);
            }
            self.held -= 1;
        }
        conversation.cursor = upto;
        tracing::debug!(conversation = %key, ?missing, "gap given up");
        if !missing.is_empty() {
            self.ready.push_back(Output::Skipped { conversation: key.to_owned(), missing });
        }
        self.ready.extend(shown.into_iter().map(Output::Show));
        let before = conversation.held.len();
        conversation.release_successors(&mut self.ready, &mut self.held_ids);
        self.held -= before - conversation.held.len();
        if conversation.held.is_empty() {
            self.gap_closed(key);
        }
    }

    /// When [`Inbox::expire`] or [`Inbox::take_pull`] next has work: the
    /// earlier of the oldest hole's timeout and a requested pull.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let gap = self
            .gapped
            .iter()
            .filter_map(|key| self.conversations.get(key)?.deadline(self.gap_timeout))
            .min();
        let pull = self.pull_requested.map(|requested| requested + GAP_PULL_DELAY);
        match (gap, pull) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an offline pull is due now (a hole appeared at least
    /// [`GAP_PULL_DELAY`] ago and is still open). Clears the request.
    pub(crate) fn take_pull(&mut self, now: Instant) -> bool {
        match self.pull_requested {
            Some(requested) if requested + GAP_PULL_DELAY <= now => {
                self.pull_requested = None;
                !self.gapped.is_empty()
            }
            _ => false,
        }
    }

    /// What to tell the application, in order.
    pub(crate) fn take_ready(&mut self) -> Vec<Output> {
        self.ready.drain(..).collect()
    }

    /// Each conversation's cursor.
    pub(crate) fn cursors(&self) -> HashMap<String, u64> {
        self.conversations.iter().map(|(key, c)| (key.clone(), c.cursor)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn single(msg_id: u64, seq: u64, sender: &str, receiver: &str) -> pb::Message {
        pb::Message {
            msg_id,
            kind: pb::ConversationKind::Single as i32,
            sender: sender.into(),
            receiver: receiver.into(),
            seq,
            ..Default::default()
        }
    }

    /// alice → bob, msg_id = seq.
    fn m(seq: u64) -> pb::Message {
        single(seq, seq, "alice", "bob")
    }

    fn group(msg_id: u64, seq: u64) -> pb::Message {
        pb::Message {
            msg_id,
            kind: pb::ConversationKind::Group as i32,
            sender: "alice".into(),
            group_id: "g".into(),
            seq,
            ..Default::default()
        }
    }

    fn inbox() -> Inbox {
        Inbox::new(TIMEOUT, MAX_HELD, 1000, &HashMap::new())
    }

    /// The ready queue as compact strings: shown message ids, and skipped
    /// ranges.
    fn drain(inbox: &mut Inbox) -> Vec<String> {
        inbox
            .take_ready()
            .into_iter()
            .map(|o| match o {
                Output::Show(m) => format!("{}", m.msg_id),
                Output::Skipped { conversation, missing } => format!("skip {conversation} {missing:?}"),
            })
            .collect()
    }

    #[test]
    fn keys_follow_the_server_format() {
        assert_eq!(conversation_key(&single(1, 1, "bob", "alice")).as_deref(), Some("p:alice:bob"));
        assert_eq!(conversation_key(&single(1, 1, "alice", "bob")).as_deref(), Some("p:alice:bob"));
        assert_eq!(conversation_key(&group(1, 1)).as_deref(), Some("g:g"));
        assert_eq!(conversation_key(&pb::Message::default()), None);
    }

    #[test]
    fn out_of_order_is_shown_in_order_and_duplicates_are_told_apart() {
        let mut inbox = inbox();
        let now = Instant::now();
        assert_eq!(inbox.admit(m(1), now), Admission::Fresh);
        assert_eq!(inbox.admit(m(3), now), Admission::Fresh);
        assert_eq!(drain(&mut inbox), ["1"]);
        // A second copy of a held message is not ACKed; of a shown one it is.
        assert_eq!(inbox.admit(m(3), now), Admission::Held);
        assert_eq!(inbox.admit(m(1), now), Admission::Duplicate);
        assert!(inbox.take_pull(now + GAP_PULL_DELAY), "a hole asks for a pull");
        assert_eq!(inbox.admit(m(2), now), Admission::Fresh);
        assert_eq!(drain(&mut inbox), ["2", "3"]);
        assert_eq!(inbox.admit(m(3), now), Admission::Duplicate);
        assert_eq!(inbox.next_wake(), None);
        assert_eq!(inbox.cursors(), HashMap::from([("p:alice:bob".to_owned(), 3)]));
    }

    #[test]
    fn both_directions_share_a_conversation_and_groups_are_separate() {
        let mut inbox = inbox();
        let now = Instant::now();
        inbox.admit(single(1, 1, "alice", "bob"), now);
        inbox.admit(group(2, 1), now);
        inbox.admit(single(3, 3, "alice", "bob"), now);
        inbox.admit(group(4, 2), now);
        inbox.admit(single(5, 2, "bob", "alice"), now);
        assert_eq!(drain(&mut inbox), ["1", "2", "4", "5", "3"]);
    }

    #[test]
    fn an_unfilled_gap_is_given_up_after_the_timeout() {
        let mut inbox = inbox();
        let t0 = Instant::now();
        inbox.admit(m(1), t0);
        inbox.admit(m(3), t0);
        inbox.admit(m(4), t0);
        inbox.admit(m(7), t0);
        assert_eq!(inbox.next_wake(), Some(t0 + GAP_PULL_DELAY));
        assert!(inbox.take_pull(t0 + GAP_PULL_DELAY));
        assert_eq!(inbox.next_wake(), Some(t0 + TIMEOUT));
        inbox.expire(t0 + TIMEOUT - Duration::from_millis(1));
        assert_eq!(drain(&mut inbox), ["1"]);
        inbox.expire(t0 + TIMEOUT);
        assert_eq!(drain(&mut inbox), ["skip p:alice:bob [2..=2, 5..=6]", "3", "4", "7"]);
        assert_eq!(inbox.next_wake(), None);
        // Late: shown anyway, the cursor stays.
        inbox.admit(m(5), t0 + TIMEOUT);
        inbox.admit(m(8), t0 + TIMEOUT);
        assert_eq!(drain(&mut inbox), ["5", "8"]);
        assert_eq!(inbox.cursors()["p:alice:bob"], 8);
    }

    #[test]
    fn a_later_hole_gets_its_own_timeout() {
        let mut inbox = inbox();
        let t0 = Instant::now();
        inbox.admit(m(1), t0);
        inbox.admit(m(3), t0);
        assert!(inbox.take_pull(t0 + GAP_PULL_DELAY));
        let t1 = t0 + Duration::from_secs(4);
        inbox.admit(m(5), t1);
        inbox.expire(t0 + TIMEOUT);
        // 2 is given up; 4 has been missing for one second only.
        assert_eq!(drain(&mut inbox), ["1", "skip p:alice:bob [2..=2]", "3"]);
        assert_eq!(inbox.next_wake(), Some(t1 + GAP_PULL_DELAY), "the new hole asks for a pull");
        assert!(inbox.take_pull(t1 + GAP_PULL_DELAY));
        assert_eq!(inbox.next_wake(), Some(t1 + TIMEOUT));
        inbox.admit(m(4), t1);
        assert_eq!(drain(&mut inbox), ["4", "5"]);
    }

    #[test]
    fn own_sends_close_gaps() {
        let mut inbox = inbox();
        let now = Instant::now();
        inbox.admit(m(1), now);
        inbox.admit(m(3), now);
        inbox.own_send("p:alice:bob".into(), 2, now);
        assert_eq!(drain(&mut inbox), ["1", "3"]);
        // Ahead of the cursor: remembered until the hole below closes.
        inbox.own_send("p:alice:bob".into(), 5, now);
        inbox.admit(m(6), now);
        assert!(drain(&mut inbox).is_empty());
        inbox.admit(m(4), now);
        assert_eq!(drain(&mut inbox), ["4", "6"]);
        // A conversation first met by a send starts at that seq.
        inbox.own_send("g:g".into(), 10, now);
        inbox.admit(group(20, 11), now);
        assert_eq!(drain(&mut inbox), ["20"]);
        assert_eq!(inbox.next_wake(), None);
    }

    #[test]
    fn own_sends_above_a_hole_start_no_clock() {
        let mut inbox = inbox();
        let start = Instant::now();
        inbox.admit(m(1), start);
        assert_eq!(drain(&mut inbox), ["1"]);
        // seq 2 (from the peer) is late; this device sends 3 and 4.
        inbox.own_send("p:alice:bob".into(), 3, start);
        inbox.own_send("p:alice:bob".into(), 4, start);
        assert_eq!(inbox.next_wake(), None, "nothing is held back, so nothing times out or is pulled");
        inbox.expire(start + TIMEOUT * 10);
        assert!(drain(&mut inbox).is_empty(), "no gap given up");
        // The late message arrives long after: shown in its place.
        inbox.admit(m(2), start + TIMEOUT * 10);
        assert_eq!(drain(&mut inbox), ["2"]);
        assert_eq!(inbox.cursors()["p:alice:bob"], 4);
        // A received message above a hole does start the clock.
        let later = start + TIMEOUT * 11;
        inbox.own_send("p:alice:bob".into(), 6, later);
        inbox.admit(m(7), later + Duration::from_secs(1));
        assert_eq!(inbox.next_wake(), Some(later + Duration::from_secs(1) + GAP_PULL_DELAY));
        inbox.expire(later + Duration::from_secs(1) + TIMEOUT);
        assert_eq!(drain(&mut inbox), ["skip p:alice:bob [5..=5]", "7"]);
    }

    #[test]
    fn extreme_seqs_and_timeouts_do_not_overflow() {
        let mut inbox = Inbox::new(Duration::MAX, MAX_HELD, 1000, &HashMap::new());
        let now = Instant::now();
        inbox.admit(m(1), now);
        inbox.admit(single(2, u64::MAX, "alice", "bob"), now);
        inbox.admit(single(3, u64::MAX - 1, "alice", "bob"), now);
        inbox.expire(now + Duration::from_secs(86_400));
        assert_eq!(drain(&mut inbox), ["1"], "a timeout too large to add never expires");
        inbox.give_up_oldest_gap();
        assert_eq!(
            drain(&mut inbox),
            [format!("skip p:alice:bob [2..={}]", u64::MAX - 2), "3".into(), "2".into()]
        );
        inbox.admit(single(4, 5, "alice", "bob"), now);
        assert_eq!(drain(&mut inbox), ["4"], "late");
        assert_eq!(inbox.next_wake(), None);
    }

    #[test]
    fn seeded_cursors_are_resumed() {
        let cursors = HashMap::from([("p:alice:bob".to_owned(), 4)]);
        let mut inbox = Inbox::new(TIMEOUT, MAX_HELD, 1000, &cursors);
        let now = Instant::now();
        inbox.admit(m(6), now);
        assert!(drain(&mut inbox).is_empty());
        inbox.admit(m(5), now);
        assert_eq!(drain(&mut inbox), ["5", "6"]);
    }

    #[test]
    fn the_oldest_gap_is_given_up_beyond_the_bound() {
        let mut inbox = Inbox::new(TIMEOUT, 3, 1000, &HashMap::new());
        let t0 = Instant::now();
        inbox.admit(group(101, 1), t0);
        inbox.admit(group(103, 3), t0);
        inbox.admit(m(1), t0);
        let t1 = t0 + Duration::from_millis(1);
        inbox.admit(m(3), t1);
        inbox.admit(m(4), t1);
        assert_eq!(drain(&mut inbox), ["101", "1"]);
        // A fourth held seq: the group's gap is the oldest.
        inbox.admit(m(6), t1);
        assert_eq!(drain(&mut inbox), ["skip g:g [2..=2]", "103"]);
        assert_eq!(inbox.held, 3);
    }
}
