//! offline-svc: the per-receiver offline store.
//!
//! Its bus consumer writes every accepted message into the offline set of
//! each receiver device (write diffusion) and pushes it to the devices that
//! are online: to the connections it finds at once, and after the write to
//! those that appeared meanwhile. Entries leave the set only when the client
//! ACKs them, so a push that is lost, unacknowledged or sent to a device
//! that just went away is still pulled at the next login.
//!
//! The copy of a device that was pushed the message is held back for up to
//! [`OfflineConfig::ack_wait`] ([`held`]): an ACK within that time settles
//! it without touching the store, and only a copy still unACKed then is
//! written. So an online device costs no offline write, as in the design's
//! "written once per offline member", and nothing is lost: the batch's bus
//! offset is committed only once each held copy is ACKed or written.
//!
//! Architecture invariant: every connection is pushed a message, or logged
//! in after its offline write. The placements are looked up again after the
//! writes (and after the late writes of held copies): a client that logged
//! in before that lookup is pushed, one that logs in after it pulls the
//! entry. No message falls between the two.
//!
//! Large groups: a device that would get more than
//! [`OfflineConfig::pull_notice_threshold`] messages of large groups
//! ([`OfflineConfig::large_group_members`]) in one consumer batch gets one
//! NOTICE SYNC instead of those pushes, and pulls them (their copies are
//! held for it, as a pushed device's, and its pull serves them).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub mod held;
pub mod rpc;

use held::{BatchHold, HeldRun, HeldWrites};

use async_trait::async_trait;
use bytes::Bytes;
// The consumer looks users, devices and held copies up a few times per
// delivery (a message to 1000 members is 1000 deliveries); foldhash, seeded
// per process, instead of SipHash (the costliest part of a large fan-out).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use prost::Message as _;
use tern_proto::{BusNames, pb};
use tern_proto::{ServiceError, ServiceResult};
use tern_store::{
    Bus, BusRecord, MetaStore, OfflineEntry, OfflineStore, Placement, SessionStore, StoreResult,
};

/// Delivers a pushed message to the connection a placement names. Pushes are
/// best effort: the offline set keeps the message until it is ACKed.
///
/// Pushes and notices to one connection arrive in the order they were
/// handed over.
pub trait PushGateway: Send + Sync + 'static {
    /// `message` is an encoded `tern.v1.Message`.
    fn push(&self, placement: &Placement, msg_id: u64, message: Bytes);
    /// Pushes `messages` (id, encoded message), in order, to one
    /// connection: the consumer hands over a batch connection by
    /// connection, and a gateway can find the connection once for all of
    /// them instead of once per message.
    fn push_run(&self, placement: &Placement, messages: &[(u64, Bytes)]) {
        for (msg_id, message) in messages {
            self.push(placement, *msg_id, message.clone());
        }
    }
    /// Tells the connection to pull its offline set: NOTICE SYNC with
    /// `reason`. Best effort, like a push.
    fn sync_notice(&self, placement: &Placement, reason: &str);
    /// The consumer starts pushing a batch (or another attempt at one);
    /// returns its number. Numbers count up from 1.
    fn batch_started(&self) -> u64 {
        0
    }
    /// A pull finds every message batch `number` pushed: its copies are
    /// stored in the offline sets, or held where the pull serves them from
    /// memory until they are ACKed or written (or the attempt failed and
    /// its messages will be pushed again under a new number). Once this
    /// holds for a batch and every batch before it, a gateway that dropped
    /// pushes of those batches may tell their connections to pull: before,
    /// the pull could run ahead of the write and miss them. In-process
    /// delivery drops nothing, so the default does nothing.
    fn batch_pullable(&self, _number: u64) {}
}

/// What access nodes call for pulls and ACKs.
#[async_trait]
pub trait OfflineApi: Send + Sync + 'static {
    /// Up to `limit` messages waiting for this device of `user` after
    /// `after_msg_id`, oldest first, and whether more are waiting.
    async fn pull(
        &self,
        user: &str,
        device: &str,
        after_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)>;
    /// The device has the messages: delete its copies (other devices keep
    /// theirs).
    async fn ack(&self, user: &str, device: &str, msg_ids: &[u64]) -> ServiceResult<()>;
    /// How many messages are waiting for the device.
    async fn pending(&self, user: &str, device: &str) -> ServiceResult<u64>;
}

#[derive(Debug, Clone)]
pub struct OfflineConfig {
    /// Largest page a pull returns.
    pub max_pull: u32,
    /// How long an ACK for a message not yet written is remembered.
    pub tombstone_ttl: Duration,
    /// Most ids one ACK may carry.
    pub max_ack_ids: usize,
    /// A group with at least this many members (the message's receivers
    /// plus its sender) is large: its messages count towards
    /// `pull_notice_threshold`.
    pub large_group_members: usize,
    /// A device that would be pushed more than this many large-group
    /// messages from one consumer batch gets one NOTICE SYNC instead of
    /// those pushes.
    ///
    /// Pulling costs the server more than pushing. It used to cost an
    /// offline write per member and message (each copy was written to the
    /// device's set, read by the pull and deleted by the ACK); now the
    /// copies are held as a pushed device's and the pull serves them, which
    /// leaves a request per page and a decode and encode per message. And a
    /// consumer that falls behind reads bigger batches. With a threshold
    /// of the size of an ordinary batch (tens of messages under steady load)
    /// one late batch turned a busy group's traffic into writes that put
    /// the consumer further behind, until nothing was pushed any more (a
    /// steady 400 messages/s to 1,000 members collapsed within a second at
    /// 20). The default leaves that to bursts far beyond steady traffic.
    /// Steady traffic makes bigger batches than it seems: a consumer that
    /// pushes a batch connection by connection takes a while over a large
    /// group, and the next batch holds what arrived meanwhile (about 220
    /// messages at 1,000 messages/s to 1,000 members, which 200 turned into
    /// the same collapse); the consumer reads at most 512 at once, so an
    /// overloaded consumer (full batches) still crosses 500. With the
    /// writes, that collapsed it: at 1.95 M deliveries/s offered to 1,000
    /// members the writer applied batches for 3 to 4 s at a time and sends
    /// waited behind them (210 k deliveries/s, 12 M not delivered within
    /// 30 s). Served from held copies, the same run delivered everything at
    /// 1.94 M/s; at 2.44 M/s, with 46 notices, everything at 674 k/s.
    pub pull_notice_threshold: usize,
    /// How long the offline copy of a device that was pushed a message is
    /// held back waiting for its ACK (then it is not written at all); zero
    /// writes every copy at once.
    ///
    /// An ACK later than this is a cliff, not a slope: every copy still
    /// held is written, and under a large group's traffic those writes
    /// slow the server further, so the next ACKs come later still. A
    /// server behind on its sends makes ACKs late through no fault of the
    /// clients (at 1 M deliveries/s to 1,000 members over TLS the last
    /// member's p99 was 440-970 ms, maxima up to a second). At 1 s, 2 of 5
    /// such runs collapsed (about 200 k deliveries/s, millions never
    /// delivered); at 4 s none of 5 did. Holding longer costs no delivery
    /// (a device that reconnects pulls, and a pull serves its held copies)
    /// and no durability (the bus keeps the batch until its copies
    /// are settled), only memory while ACKs are late.
    pub ack_wait: Duration,
    /// Most consumer batches waiting for ACKs at once; the consumer stops
    /// reading while that many are. A pushed device that never ACKs (a
    /// connection gone silent, until the idle timeout) keeps each batch it
    /// is in waiting the whole `ack_wait`, so this bounds the consumer to
    /// `batches_waiting` batches of up to 512 messages per `ack_wait`:
    /// 256 per second of the wait.
    pub batches_waiting: usize,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        Self {
            max_pull: 200,
            tombstone_ttl: Duration::from_secs(3600),
            max_ack_ids: 1_000,
            large_group_members: 200,
            pull_notice_threshold: 500,
            ack_wait: Duration::from_secs(4),
            batches_waiting: 1024,
        }
    }
}

pub struct OfflineService {
    store: Arc<dyn OfflineStore>,
    config: OfflineConfig,
    held: Arc<HeldWrites>,
}

impl OfflineService {
    pub fn new(store: Arc<dyn OfflineStore>, config: OfflineConfig) -> Self {
        Self { store, config, held: Arc::default() }
    }

    /// The copies this process's consumer holds back; pass them to
    /// [`run_consumer`] in [`ConsumerBackends::held`] so ACKs reaching this
    /// service settle them.
    pub fn held_writes(&self) -> Arc<HeldWrites> {
        self.held.clone()
    }
}

#[async_trait]
impl OfflineApi for OfflineService {
    async fn pull(
        &self,
        user: &str,
        device: &str,
        after_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)> {
        let limit = if limit == 0 { self.config.max_pull } else { limit.min(self.config.max_pull) } as usize;
        // One extra row of each set tells whether another page exists.
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        // Copies held back for this device (pushed or announced by a SYNC
        // notice, not ACKed yet) are served from memory with the stored
        // ones: a device pulling now may never have received the push (its
        // connection was cut), and must find them in order. They stay held
        // until the ACK of this pull settles them, as the ACK of a push
        // would, so a pulled copy costs no write either (writing them first
        // made a large group's SYNC notices an offline write per member and
        // message, which under overload stalled every commit for seconds).
        let mut held = self.held.held_after(&own_key, after_msg_id);
        let own = self.store.pull(&own_key, after_msg_id, limit + 1);
        let shared = self.store.pull(&shared_key, after_msg_id, limit + 1);
        let (own, shared) = futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        // A copy the consumer writes meanwhile (its wait ended) can be in
        // both; the dedup below keeps one.
        held.truncate(limit + 1);
        let mut entries: Vec<OfflineEntry> = held.into_iter().chain(own).chain(shared).collect();
        entries.sort_by_key(|e| e.msg_id);
        entries.dedup_by_key(|e| e.msg_id);
        let more = tern_proto::cut_page(&mut entries, limit, |e| e.payload.len());
        let mut messages = Vec::with_capacity(entries.len());
        for entry in entries {
            match pb::Message::decode(entry.payload) {
                Ok(m) => messages.push(m),
                Err(e) => tracing::error!(msg_id = entry.msg_id, error = %e, "corrupt offline entry skipped"),
            }
        }
        Ok((messages, more))
    }

    async fn ack(&self, user: &str, device: &str, msg_ids: &[u64]) -> ServiceResult<()> {
        if msg_ids.len() > self.config.max_ack_ids {
            return Err(ServiceError::invalid(format!("at most {} ids per ACK", self.config.max_ack_ids)));
        }
        let ttl = self.config.tombstone_ttl;
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        // Copies held back for this device are settled here; the rest are
        // in the store, or not written yet (the ACK leaves a tombstone).
        let stored = self.held.settle(&own_key, msg_ids);
        if stored.is_empty() {
            // Every id was a held copy (the usual ACK of a push): nothing
            // of them is in the device's set. Nor, as a rule, in the shared
            // set: a copy is held only for a device recorded when its batch
            // was read, and then the user's copies went to device sets. The
            // exception is a message first handled before the user's first
            // device was recorded and replayed after it (a crash or retry
            // before the batch's commit): its shared-set entry stays until a
            // pull brings it back once, the client drops it by id, and the
            // ACK of that pull removes it.
            return Ok(());
        }
        let own = self.store.ack(&own_key, &stored, ttl);
        // The shared set only has entries from before the user's first
        // device was recorded; most users have none, and an ACK there
        // leaves no tombstone (a late write to it, possible only around a
        // first login, comes back once and is dropped as a duplicate).
        let shared = async {
            if self.store.count(&shared_key).await? > 0 {
                self.store.ack(&shared_key, &stored, Duration::ZERO).await?;
            }
            Ok::<_, tern_store::StoreError>(())
        };
        futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        Ok(())
    }

    async fn pending(&self, user: &str, device: &str) -> ServiceResult<u64> {
        let (own_key, shared_key) = (device_inbox(user, device), user_inbox(user));
        let own = self.store.count(&own_key);
        let shared = self.store.count(&shared_key);
        let (own, shared) = futures::future::try_join(own, shared).await.map_err(ServiceError::backend)?;
        // A held copy is not in the store yet, except while its write after
        // the wait is under way: then, for a moment, it counts twice (a
        // count too high is the safe side: the device pulls, finds one).
        let held = self.held.count_for(&own_key) as u64;
        Ok(own + shared + held)
    }
}

/// One message and who gets a copy.
struct Delivery {
    /// Shared by the messages of a batch that list the same receivers.
    receivers: Arc<[String]>,
    sender: String,
    /// The device the message was sent from; empty if unknown.
    sender_device: String,
    /// The group of a group message; empty for 1:1.
    group_id: String,
    entry: OfflineEntry,
}

impl Delivery {
    /// The group, if the message went to a group of at least
    /// `large_group_members` members (`OfflineConfig::large_group_members`).
    /// The envelope lists every member but the sender as a receiver, so the
    /// size costs no lookup.
    fn large_group(&self, large_group_members: usize) -> Option<&str> {
        let members = self.receivers.len() + 1;
        (!self.group_id.is_empty() && members >= large_group_members).then_some(self.group_id.as_str())
    }

    /// The users whose connections get the message pushed: the receivers,
    /// and the sender (for its other devices).
    fn push_targets(&self) -> impl Iterator<Item = &String> {
        let sender_copy = !self.sender_device.is_empty() && !self.receivers.contains(&self.sender);
        self.receivers.iter().chain(sender_copy.then_some(&self.sender))
    }

    /// Whether `placement` of `user` gets this message pushed: not the
    /// device it was sent from (unless sent to oneself).
    fn pushed_to(&self, user: &str, placement: &Placement) -> bool {
        let sending_device = user == self.sender && placement.device_id == self.sender_device;
        !sending_device || self.receivers.contains(&self.sender)
    }

    /// The offline sets this message is written to: each receiver's
    /// recorded devices (or the shared set of a receiver with none yet),
    /// and the sender's devices other than the one it was sent from; but
    /// not the sets of devices whose copy is `held(user, device)`. (Checked
    /// before the key is built: in a fan-out to online members nearly every
    /// copy is held, and a key per member per message was built for
    /// nothing.)
    ///
    /// With `unheld` (see [`unheld_inboxes`]) a receiver other than the
    /// sender is looked up there instead.
    fn inboxes(
        &self,
        devices: &HashMap<String, Vec<String>>,
        held: impl Fn(&str, &str) -> bool,
        unheld: Option<&HashMap<&str, Vec<String>>>,
    ) -> Vec<String> {
        let mut keys = Vec::new();
        for receiver in self.receivers.iter() {
            if let Some(unheld) = unheld.filter(|_| *receiver != self.sender) {
                // An empty map answers without hashing: the usual case of
                // a batch whose receivers are all online.
                keys.extend(unheld.get(receiver.as_str()).into_iter().flatten().cloned());
                continue;
            }
            receiver_inboxes(receiver, devices, |device| held(receiver, device), &mut keys);
        }
        if !self.sender_device.is_empty() && !self.receivers.contains(&self.sender) {
            let own = devices.get(&self.sender).into_iter().flatten();
            keys.extend(
                own.filter(|d| **d != self.sender_device && !held(&self.sender, d))
                    .map(|d| device_inbox(&self.sender, d)),
            );
        }
        keys
    }
}

/// Adds to `keys` the offline sets a receiver's copy goes to: those of its
/// recorded devices whose copy is not `held`, or the shared set of a
/// receiver with no recorded device yet.
fn receiver_inboxes(
    receiver: &str,
    devices: &HashMap<String, Vec<String>>,
    held: impl Fn(&str) -> bool,
    keys: &mut Vec<String>,
) {
    match devices.get(receiver).filter(|d| !d.is_empty()) {
        Some(list) => keys.extend(list.iter().filter(|d| !held(d)).map(|d| device_inbox(receiver, d))),
        None => keys.push(user_inbox(receiver)),
    }
}

/// The offline set of one device of a user. Ids never contain `/`, so the
/// key is unambiguous.
pub fn device_inbox(user: &str, device: &str) -> String {
    [user, "/", device].concat()
}

/// The offline set of a user who has no recorded device yet (registered,
/// never logged in). Every device pulls it too; the first device to ACK an
/// entry takes it.
pub fn user_inbox(user: &str) -> String {
    format!("{user}/")
}

/// The offline sets each receiver's copies of a batch go to, where that
/// does not depend on the message: while copies are held, every connection
/// of a receiver is pushed every message it receives or told to pull it
/// (and the copies of both are held), so the receiver's copy for a device
/// is held exactly when the device has a connection in `placements` (the
/// plan's). Only
/// the sender's own devices depend on the message, and are left to
/// [`Delivery::inboxes`]. Users whose every copy is held are left out: in a
/// batch whose receivers are all online the map is empty, and writing
/// nothing costs no lookup per message and receiver (there were two, 7% of
/// the server's time in a fan-out to 1000 members at 1 M deliveries/s).
fn unheld_inboxes<'a>(
    users: &[&'a str],
    devices: &HashMap<String, Vec<String>>,
    placements: &HashMap<String, Vec<Placement>>,
) -> HashMap<&'a str, Vec<String>> {
    users
        .iter()
        .filter_map(|&user| {
            let placed = placements.get(user).map_or(&[][..], Vec::as_slice);
            let mut keys = Vec::new();
            receiver_inboxes(user, devices, |device| placed.iter().any(|p| p.device_id == device), &mut keys);
            (!keys.is_empty()).then_some((user, keys))
        })
        .collect()
}

/// What one consumer batch sends to the connections.
struct Plan<'a> {
    /// (message, connection): by connection, and in message order within
    /// each connection.
    pushes: Vec<(&'a Delivery, &'a Placement)>,
    /// Connections that pull their large-group messages of the batch
    /// instead, each with the reason of its NOTICE SYNC.
    notices: Vec<(&'a Placement, String)>,
    /// The (message, connection) pairs those notices stand for: by
    /// connection, in message order within each.
    pulled: Vec<(&'a Delivery, &'a Placement)>,
    /// The placements planned for.
    placements: &'a HashMap<String, Vec<Placement>>,
    /// The connections of `notices`, by (node, connection id).
    notified: HashSet<(&'a str, u64)>,
    large_group_members: usize,
}

impl Plan<'_> {
    /// Whether `d` is pushed to `placement` of `user`: as the sender's
    /// device and the SYNC notices allow.
    fn pushes_to(&self, d: &Delivery, user: &str, placement: &Placement) -> bool {
        // Asked per push: the set is looked up only when there are notices
        // (rare) and the message is a large group's.
        let notified = || self.notified.contains(&(placement.node_id.as_str(), placement.connection_id));
        let pulled_instead =
            !self.notified.is_empty() && d.large_group(self.large_group_members).is_some() && notified();
        d.pushed_to(user, placement) && !pulled_instead
    }

    /// Whether `d` reaches a connection of `device` of `user` now: pushed,
    /// or pulled after a SYNC notice (the copies of both are held). Asked
    /// for every receiver device of every message, so it looks at the
    /// user's few placements: a set of every push of a batch of a hundred
    /// messages to a thousand members did not fit in the cache, and probing
    /// it was a tenth of the server's time.
    fn reaches_device(&self, d: &Delivery, user: &str, device: &str) -> bool {
        let placements = self.placements.get(user).into_iter().flatten();
        placements.filter(|p| p.device_id == device).any(|p| d.pushed_to(user, p))
    }
}

/// The large-group messages of one batch for one connection.
struct Owed<'a> {
    placement: &'a Placement,
    /// How many, by group.
    by_group: BTreeMap<&'a str, usize>,
}

/// Decides, per connection, whether the batch's large-group messages are
/// pushed one by one or replaced by one NOTICE SYNC (more than
/// `pull_notice_threshold` of them). 1:1 and small-group messages are always
/// pushed.
fn plan<'a>(
    decoded: &'a [Delivery],
    placements: &'a HashMap<String, Vec<Placement>>,
    config: &OfflineConfig,
) -> Plan<'a> {
    let large_group_members = config.large_group_members;
    // A connection is pushed a message at most once, so no connection can
    // pass the threshold unless the batch itself holds more large-group
    // messages than that: then nothing needs counting (the usual case;
    // counting was a map update per delivery).
    let large_messages = decoded.iter().filter(|d| d.large_group(large_group_members).is_some()).count();
    let mut notices = Vec::new();
    let mut notified = HashSet::new();
    if large_messages > config.pull_notice_threshold {
        // Per connection, keyed by (node, connection id): its large-group
        // messages by group.
        let mut large: BTreeMap<(&str, u64), Owed> = BTreeMap::new();
        for (d, user, placement) in connections_of(decoded, placements) {
            let Some(group) = d.large_group(large_group_members) else { continue };
            if d.pushed_to(user, placement) {
                let key = (placement.node_id.as_str(), placement.connection_id);
                let owed = large.entry(key).or_insert_with(|| Owed { placement, by_group: BTreeMap::new() });
                *owed.by_group.entry(group).or_default() += 1;
            }
        }
        for (key, owed) in large {
            if owed.by_group.values().sum::<usize>() > config.pull_notice_threshold {
                notified.insert(key);
                notices.push((owed.placement, sync_reason(&owed.by_group)));
            }
        }
    }
    let mut plan =
        Plan { pushes: Vec::new(), notices, pulled: Vec::new(), placements, notified, large_group_members };
    let mut pushes: Vec<(&Delivery, &Placement)> = Vec::new();
    let mut pulled: Vec<(&Delivery, &Placement)> = Vec::new();
    for (d, user, placement) in connections_of(decoded, placements) {
        if plan.pushes_to(d, user, placement) {
            pushes.push((d, placement));
        } else if d.pushed_to(user, placement) {
            // Not the sending device: replaced by the connection's notice.
            pulled.push((d, placement));
        }
    }
    pulled.sort_by(|(_, a), (_, b)| by_connection(a, b));
    if decoded.len() > 1 {
        // A connection's messages of the batch are queued one after the
        // other, so its task finds them all at once and sends them in one
        // write, and the client ACKs them with one. In message order they
        // were interleaved with every other connection's: in a fan-out to
        // a large group a connection's task ran between two of its
        // messages, and each message cost a wake-up, a write and an ACK of
        // its own however many the batch held. (Stable: the order within a
        // connection stays the message order.)
        pushes.sort_by(|(_, a), (_, b)| by_connection(a, b));
    }
    plan.pushes = pushes;
    plan.pulled = pulled;
    plan
}

/// Orders placements by connection. A connection's pushes share its
/// placement, so they compare equal without a comparison of node ids.
fn by_connection(a: &Placement, b: &Placement) -> std::cmp::Ordering {
    if std::ptr::eq(a, b) {
        return std::cmp::Ordering::Equal;
    }
    a.connection_id.cmp(&b.connection_id).then_with(|| a.node_id.cmp(&b.node_id))
}

/// Each message of the batch with each connection in `placements` of each
/// user it is pushed to (`Delivery::push_targets`).
fn connections_of<'a>(
    decoded: &'a [Delivery],
    placements: &'a HashMap<String, Vec<Placement>>,
) -> impl Iterator<Item = (&'a Delivery, &'a str, &'a Placement)> {
    decoded.iter().flat_map(move |d| {
        d.push_targets().flat_map(move |user| {
            placements.get(user).into_iter().flatten().map(move |p| (d, user.as_str(), p))
        })
    })
}

/// Most groups a SYNC reason names.
const REASON_GROUPS: usize = 5;

/// "37 new messages in group g1; pull", or for several groups
/// "40 new messages in groups g1 (37), g2 (3); pull", largest first.
fn sync_reason(groups: &BTreeMap<&str, usize>) -> String {
    let total: usize = groups.values().sum();
    if let [(group, _)] = groups.iter().collect::<Vec<_>>()[..] {
        return format!("{total} new messages in group {group}; pull");
    }
    let mut by_count: Vec<(&str, usize)> = groups.iter().map(|(g, n)| (*g, *n)).collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut named: Vec<String> =
        by_count.iter().take(REASON_GROUPS).map(|(g, n)| format!("{g} ({n})")).collect();
    if by_count.len() > REASON_GROUPS {
        named.push(format!("{} more", by_count.len() - REASON_GROUPS));
    }
    format!("{total} new messages in groups {}; pull", named.join(", "))
}

/// The placements of everyone the batch is pushed to after its writes: a
/// connection missed here may have pulled before those writes, and nothing
/// else would tell it. A user whose lookup fails is looked up again, the
/// others are kept: while the store is unavailable, until it answers
/// (nothing else in the batch can go on without it anyway); after a
/// corrupt stored value at once, and after any other error after
/// [`AFTER_WRITE_LOOKUP_TRIES`] tries, that user is given up on with an
/// error in the log, so one bad value cannot stall the consumer. A device
/// of that user that connected during the write then finds the entries at
/// its next pull instead of being pushed them.
///
/// `None`, with no lookup, when the session store's placements epoch is
/// still `seen` (the epoch read before the placements compared with were
/// looked up): no login has placed a connection since, so nobody can have
/// appeared. Also returns the epoch read before looking, for the next
/// comparison.
async fn placements_after_writes(
    sessions: &Arc<dyn SessionStore>,
    decoded: &[Delivery],
    seen: Option<u64>,
) -> (Option<HashMap<String, Vec<Placement>>>, Option<u64>) {
    let epoch = sessions.placements_epoch();
    if epoch.is_some() && epoch == seen {
        return (None, epoch);
    }
    let mut pending = batch_push_targets(decoded);
    let mut found = HashMap::with_capacity(pending.len());
    for tries in 1.. {
        let mut failed = Vec::new();
        let results = look_up(sessions, &pending).await;
        for (user, result) in pending.into_iter().zip(results) {
            match result {
                Ok(placements) => {
                    found.insert(user.to_owned(), placements);
                }
                Err(e) if worth_another_try(&e, tries) => {
                    tracing::warn!(error = %e, user, tries, "placement lookup after the offline write failed; retrying");
                    failed.push(user);
                }
                Err(e) => tracing::error!(
                    error = %e,
                    user,
                    tries,
                    "placement lookup after the offline write failed; given up: a device of this user that \
                     connected during the write gets this batch at its next pull, not pushed"
                ),
            }
        }
        if failed.is_empty() {
            break;
        }
        pending = failed;
        tokio::time::sleep(HELD_WRITE_RETRY).await;
    }
    (Some(found), epoch)
}

/// Tries of a placement lookup after the offline write that fails with
/// neither an unavailable store nor a corrupt value (see
/// [`placements_after_writes`]).
const AFTER_WRITE_LOOKUP_TRIES: u32 = 5;

/// Whether a lookup that failed with `error` on its `tries`-th try is tried
/// again.
fn worth_another_try(error: &tern_store::StoreError, tries: u32) -> bool {
    match error {
        tern_store::StoreError::Unavailable(_) => true,
        tern_store::StoreError::Corrupt(_) => false,
        tern_store::StoreError::Backend(_) => tries < AFTER_WRITE_LOOKUP_TRIES,
    }
}

/// Everyone a batch is pushed to, once each: its receivers, and the
/// senders who sent from a known device (for their other devices). These
/// are also everyone whose devices get a copy.
fn batch_push_targets(decoded: &[Delivery]) -> Vec<&str> {
    let users: HashSet<&str> = decoded.iter().flat_map(Delivery::push_targets).map(String::as_str).collect();
    users.into_iter().collect()
}

/// Each user's placements, in order: one [`SessionStore::get_many`], or if
/// that fails, one lookup per user, so that one user's trouble (a timeout,
/// a bad stored value) is that user's alone.
async fn look_up(sessions: &Arc<dyn SessionStore>, users: &[&str]) -> Vec<StoreResult<Vec<Placement>>> {
    match sessions.get_many(users).await {
        Ok(found) => found.into_iter().map(Ok).collect(),
        Err(e) => {
            tracing::warn!(error = %e, users = users.len(), "placement lookup of a batch failed; looking users up one by one");
            futures::future::join_all(users.iter().map(|&user| sessions.get(user))).await
        }
    }
}

/// The placements of everyone the batch is pushed to ([`look_up`]). A
/// failed lookup counts as offline: the entries are stored and the devices
/// pull them at their next sync.
async fn placements_of(sessions: &Arc<dyn SessionStore>, users: &[&str]) -> HashMap<String, Vec<Placement>> {
    let found = look_up(sessions, users).await;
    users
        .iter()
        .zip(found)
        .map(|(&user, placements)| {
            let placements = placements.unwrap_or_else(|e| {
                tracing::warn!(error = %e, user, "placement lookup failed; push skipped");
                Vec::new()
            });
            (user.to_owned(), placements)
        })
        .collect()
}

/// The connections of `now` that `before` did not have (a connection is
/// its access node and connection id).
fn connections_not_in(
    now: &HashMap<String, Vec<Placement>>,
    before: &HashMap<String, Vec<Placement>>,
) -> HashMap<String, Vec<Placement>> {
    let known =
        |user: &str, p: &Placement| before.get(user).into_iter().flatten().any(|b| same_connection(b, p));
    now.iter()
        .filter_map(|(user, placements)| {
            let fresh: Vec<Placement> = placements.iter().filter(|p| !known(user, p)).cloned().collect();
            (!fresh.is_empty()).then(|| (user.clone(), fresh))
        })
        .collect()
}

/// Whether two placements name the same connection (its access node and
/// connection id).
fn same_connection(a: &Placement, b: &Placement) -> bool {
    a.node_id == b.node_id && a.connection_id == b.connection_id
}

/// The stores the consumer reads and writes.
#[derive(Clone)]
pub struct ConsumerBackends {
    /// Recorded devices of each user.
    pub meta: Arc<dyn MetaStore>,
    /// The offline sets.
    pub store: Arc<dyn OfflineStore>,
    /// Placements of online devices.
    pub sessions: Arc<dyn SessionStore>,
    /// Copies held back waiting for ACKs; the [`OfflineService`] answering
    /// this process's ACKs must share it ([`OfflineService::held_writes`]).
    pub held: Arc<HeldWrites>,
    /// When copies may be held back at all.
    pub holding: Holding,
}

/// When the consumer holds the copies of pushed devices back.
#[derive(Clone)]
pub enum Holding {
    /// Always: every ACK reaches this process (standalone).
    Always,
    /// Only while this is the only live node of the offline-svc role. Access
    /// nodes send an ACK to any offline-svc node; one that does not hold the
    /// copy sends the ACK to the store, which leaves a tombstone for the
    /// unwritten entry, so holding with several nodes would cost a tombstone
    /// per delivery instead of saving writes. Routing each ACK to the node
    /// that pushed the message would lift this.
    WhileSoleNode(Arc<SoleNode>),
}

impl Holding {
    fn allowed(&self) -> bool {
        match self {
            Holding::Always => true,
            Holding::WhileSoleNode(sole) => sole.peers.nodes().len() <= 1,
        }
    }

    /// How many times the role's membership has changed so far (0 for
    /// [`Holding::Always`]); compare with a later reading to learn whether
    /// another node may have served pulls in between.
    fn membership_changes(&self) -> u64 {
        match self {
            Holding::Always => 0,
            Holding::WhileSoleNode(sole) => sole.changes.load(std::sync::atomic::Ordering::Acquire),
        }
    }
}

/// The offline-svc role followed for [`Holding::WhileSoleNode`]: its live
/// nodes, and a count of the changes to their ids. A pull reaches any
/// node, so one made while another node was live (even one that has left
/// again) may have missed the copies this node held; the count tells.
pub struct SoleNode {
    peers: Arc<tern_store::discovery::Peers>,
    changes: Arc<std::sync::atomic::AtomicU64>,
}

impl SoleNode {
    /// Follows `peers` (the offline-svc role) for as long as the registry
    /// watches it.
    pub fn follow(peers: Arc<tern_store::discovery::Peers>) -> Arc<Self> {
        let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut membership = peers.subscribe();
        let counted = changes.clone();
        let ids =
            |nodes: &[tern_store::NodeInfo]| nodes.iter().map(|n| n.node_id.clone()).collect::<Vec<_>>();
        let mut known = ids(&membership.borrow_and_update());
        // Ends when the registry's watch of the role ends.
        tokio::spawn(async move {
            while membership.changed().await.is_ok() {
                let now = ids(&membership.borrow_and_update());
                // Load reports change a node's entry, not the membership.
                if now != known {
                    counted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    known = now;
                }
            }
        });
        Arc::new(Self { peers, changes })
    }
}

/// Pause before a failed write of held copies is tried again.
const HELD_WRITE_RETRY: Duration = Duration::from_millis(200);

/// Consumes the messages topic until `shutdown` resolves. Per batch, in
/// order: pushes to the connections online now (or one SYNC notice per
/// device for a burst of large-group messages, see [`OfflineConfig`]), the
/// offline write of every copy not held back for a pushed device, the
/// notices, pushes to connections that appeared meanwhile. Then, while
/// later batches go on, each held copy waits for its ACK up to
/// `ack_wait` and is written if none came, and the batch's offset is
/// committed once all that is done, in batch order. A crash before the
/// commit replays the batch; the writes are idempotent and clients drop
/// duplicate pushes by message id.
pub async fn run_consumer(
    bus: Arc<dyn Bus>,
    names: BusNames,
    backends: ConsumerBackends,
    pushes: Arc<dyn PushGateway>,
    config: OfflineConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tern_store::StoreError> {
    let depth = config.batches_waiting;
    let config = Arc::new(config);
    let process = |batch: Vec<BusRecord>| {
        let backends = backends.clone();
        let (pushes, config) = (pushes.clone(), config.clone());
        async move {
            let decoded = Arc::new(decode(&batch));
            // Everyone the batch concerns, once each: whose devices it is
            // written for and whose connections it is pushed to.
            let users = batch_push_targets(&decoded);
            let devices = devices_of(&backends.meta, &users).await?;
            let number = pushes.batch_started();
            // Read before the lookups, so any login it does not count
            // placed its connection after it (see placements_after_writes).
            let epoch = backends.sessions.placements_epoch();
            let before = placements_of(&backends.sessions, &users).await;
            let early = plan(&decoded, &before, &config);
            // The copies of the devices pushed now are held back before the
            // pushes go out, so that no ACK can come first.
            let hold = Arc::new(BatchHold::default());
            let deadline = tokio::time::Instant::now() + config.ack_wait;
            // Read before `allowed`, so a node that appears in between counts
            // as a change during the hold.
            let membership = backends.holding.membership_changes();
            let holds = !config.ack_wait.is_zero() && backends.holding.allowed();
            // A device told to pull has its large-group copies held too: its
            // pull serves them from memory and its ACK settles them, where
            // writing them was an offline write per member and message.
            let copies = if holds {
                let mut copies = held_copies(&early.pushes, &devices);
                copies.extend(held_copies(&early.pulled, &devices));
                copies
            } else {
                Vec::new()
            };
            // Every copy in `copies` is held, by this batch or by one that
            // holds the same message already (within the wait).
            let (holding, _held_elsewhere) = backends.held.hold(&hold, copies);
            // Pushes go out before the offline write, so a receiver online
            // now does not wait for that commit. A push that overtakes a
            // write is harmless: the device's ACK leaves a tombstone that
            // drops the late write, and a crash before the write replays
            // the batch (clients drop duplicates by message id).
            push_runs(&*pushes, &early.pushes);
            // Write diffusion per device: every recorded device of every
            // receiver, and the sender's other devices, get their own copy,
            // ACKed and deleted independently; held copies wait (and those
            // another batch holds, the same message again within the wait,
            // are that batch's to write).
            let unheld = holds.then(|| unheld_inboxes(&users, &devices, &before));
            let writes = decoded.iter().map(|d| {
                let held = |user: &str, device: &str| holds && early.reaches_device(d, user, device);
                let keys = d.inboxes(&devices, held, unheld.as_ref());
                let store = backends.store.clone();
                async move { insert_skipping_corrupt(&store, &keys, &d.entry).await }
            });
            if let Err(e) = futures::future::try_join_all(writes).await {
                // The batch is retried from the start: it holds and
                // pushes again, under a new number.
                backends.held.release(&hold, holding);
                pushes.batch_pullable(number);
                return Err(e);
            }
            // Every copy is written or held now, and a held copy stays
            // findable until it is ACKed or written: a connection whose
            // push was dropped may be told to pull at once, not after
            // `ack_wait`.
            pushes.batch_pullable(number);
            // After the write: the SYNC notices (a device told to pull must
            // find the entries), and everything for the connections that
            // appeared since the first lookup. Such a device logged in
            // meanwhile, and its login-time pull may have run before the
            // write; a login after this lookup finds the entries itself.
            if !early.notices.is_empty() {
                // Each such connection pulls instead of being pushed (a
                // request per page): worth knowing when a busy group slows
                // the server.
                tracing::info!(
                    connections = early.notices.len(),
                    messages = decoded.len(),
                    "large-group burst: connections told to pull instead of being pushed"
                );
            }
            for (placement, reason) in &early.notices {
                tracing::debug!(user = %placement.user_id, %reason, "large-group burst: SYNC notice instead of pushes");
                pushes.sync_notice(placement, reason);
            }
            let (after, epoch) = placements_after_writes(&backends.sessions, &decoded, epoch).await;
            let placements = match after {
                Some(after) => {
                    push_to_newcomers(&*pushes, &decoded, &after, &before, &config);
                    merged(before, after)
                }
                None => before,
            };
            let held = Held { hold, holding, deadline, membership };
            let finish = finish_held(backends, pushes, config, decoded, Seen { placements, epoch }, held);
            Ok(tokio::spawn(finish))
        }
    };
    tern_store::consume::consume_pipelined(
        &*bus,
        &names.messages_topic,
        &names.offline_group,
        shutdown,
        depth,
        process,
    )
    .await
}

/// The connections a batch was pushed to, and the session store's
/// placements epoch read before they were looked up.
struct Seen {
    placements: HashMap<String, Vec<Placement>>,
    epoch: Option<u64>,
}

/// The rest of a batch, while later batches go on: waits until every held
/// copy is ACKed or `ack_wait` has passed, writes the copies still unACKed
/// (retrying until the store takes them: the batch's offset is not
/// committed before), and pushes to the connections that appeared since
/// `seen`, whose login-time pull may have missed those late writes.
///
/// The copies stay held while they are written ([`HeldWrites::start_writing`]),
/// so a pull meanwhile serves them from memory: connections whose pushes
/// were dropped were told to pull before the wait was over.
async fn finish_held(
    backends: ConsumerBackends,
    pushes: Arc<dyn PushGateway>,
    config: Arc<OfflineConfig>,
    decoded: Arc<Vec<Delivery>>,
    seen: Seen,
    held: Held,
) {
    let Held { hold, holding, deadline, membership } = held;
    if holding.is_empty() {
        return;
    }
    let _ = tokio::time::timeout_at(deadline, hold.all_acked()).await;
    let unacked = backends.held.start_writing(&hold, &holding);
    if !unacked.is_empty() {
        tracing::debug!(copies = unacked.len(), "copies not ACKed within ack_wait: writing them");
        let mut by_message: HashMap<u64, Vec<String>> = HashMap::new();
        for (inbox, msg_id) in unacked {
            by_message.entry(msg_id).or_default().push(inbox);
        }
        let entries: HashMap<u64, &OfflineEntry> =
            decoded.iter().map(|d| (d.entry.msg_id, &d.entry)).collect();
        loop {
            let writes = by_message.iter().filter_map(|(msg_id, inboxes)| {
                let entry = entries.get(msg_id)?;
                Some(insert_skipping_corrupt(&backends.store, inboxes, entry))
            });
            match futures::future::try_join_all(writes).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "writing unacknowledged copies failed; retrying");
                    tokio::time::sleep(HELD_WRITE_RETRY).await;
                }
            }
        }
        if backends.holding.membership_changes() != membership || !backends.holding.allowed() {
            // Another offline-svc node was live at some point while the
            // copies were held: a pull that reached it found none of them.
            // Their devices' connections are told to pull again, now that
            // they are stored.
            notice_written_copies(&*pushes, &by_message, &seen.placements);
        }
        let (now, _) = placements_after_writes(&backends.sessions, &decoded, seen.epoch).await;
        if let Some(now) = now {
            push_to_newcomers(&*pushes, &decoded, &now, &seen.placements, &config);
        }
    }
    backends.held.release(&hold, holding);
}

/// Reason of the NOTICE SYNC sent after held copies were written because
/// another offline-svc node was live while they were held.
const WRITTEN_AFTER_HOLD_REASON: &str = "messages held for this device are stored now; pull";

/// Tells every connection in `placements` of a device with a copy in
/// `written` (message id → device offline sets) to pull.
fn notice_written_copies(
    pushes: &dyn PushGateway,
    written: &HashMap<u64, Vec<String>>,
    placements: &HashMap<String, Vec<Placement>>,
) {
    let inboxes: HashSet<&str> = written.values().flatten().map(String::as_str).collect();
    for placement in placements.values().flatten() {
        if inboxes.contains(device_inbox(&placement.user_id, &placement.device_id).as_str()) {
            pushes.sync_notice(placement, WRITTEN_AFTER_HOLD_REASON);
        }
    }
}

/// What a batch holds back: its hold and the keys of its held copies.
struct Held {
    hold: Arc<BatchHold>,
    holding: Vec<HeldRun<u64>>,
    /// `ack_wait` after the copies were held (before the pushes went out).
    deadline: tokio::time::Instant,
    /// [`Holding::membership_changes`] when the copies were held.
    membership: u64,
}

/// The copies held back for `delivered` (pushes, or pulls announced by a
/// notice; by connection): those of recorded devices (never a user's
/// shared set: a user online has a recorded device), as runs by device
/// offline set.
fn held_copies(
    delivered: &[(&Delivery, &Placement)],
    devices: &tern_store::DevicesByUser,
) -> Vec<HeldRun<OfflineEntry>> {
    let mut runs: Vec<HeldRun<OfflineEntry>> = Vec::new();
    let mut current: Option<&Placement> = None;
    for &(d, p) in delivered {
        let same_device = current.is_some_and(|c| c.user_id == p.user_id && c.device_id == p.device_id);
        if !same_device {
            if !devices.get(&p.user_id).is_some_and(|list| list.contains(&p.device_id)) {
                current = None;
                continue;
            }
            current = Some(p);
            runs.push((device_inbox(&p.user_id, &p.device_id), Vec::new()));
        }
        runs.last_mut().expect("a run is open").1.push(d.entry.clone());
    }
    runs
}

/// Pushes the batch (and notices) to the connections of `now` that `seen`
/// did not have.
fn push_to_newcomers(
    pushes: &dyn PushGateway,
    decoded: &[Delivery],
    now: &HashMap<String, Vec<Placement>>,
    seen: &HashMap<String, Vec<Placement>>,
    config: &OfflineConfig,
) {
    let newcomers = connections_not_in(now, seen);
    if newcomers.is_empty() {
        return;
    }
    let late = plan(decoded, &newcomers, config);
    push_runs(pushes, &late.pushes);
    for (placement, reason) in late.notices {
        pushes.sync_notice(placement, &reason);
    }
}

/// Hands `planned` (by connection) to the gateway, a connection's run of
/// messages at a time.
fn push_runs(gateway: &dyn PushGateway, planned: &[(&Delivery, &Placement)]) {
    let mut run: Vec<(u64, Bytes)> = Vec::new();
    for (i, &(d, placement)) in planned.iter().enumerate() {
        run.push((d.entry.msg_id, d.entry.payload.clone()));
        let run_ends = planned.get(i + 1).is_none_or(|(_, next)| !same_connection(next, placement));
        if run_ends {
            gateway.push_run(placement, &run);
            run.clear();
        }
    }
}

/// Every connection of `a` and `b`.
fn merged(
    mut a: HashMap<String, Vec<Placement>>,
    b: HashMap<String, Vec<Placement>>,
) -> HashMap<String, Vec<Placement>> {
    for (user, placements) in b {
        let known = a.entry(user).or_default();
        for p in placements {
            if !known.iter().any(|k| same_connection(k, &p)) {
                known.push(p);
            }
        }
    }
    a
}

/// The batch's records as deliveries; an undecodable record is logged and
/// skipped. The message stays as the dispatcher encoded it, a slice of the
/// record: only its routing fields are decoded, never its content (copying
/// and re-encoding every message was 4.5% of the server's CPU in S3). Each
/// distinct list of receivers is decoded once and shared by the messages
/// that carry it (the messages of a group, see [`tern_proto::EnvelopeParts`]).
fn decode(batch: &[BusRecord]) -> Vec<Delivery> {
    let mut decoded = Vec::with_capacity(batch.len());
    // The lists decoded so far, most recent last: a batch's group messages
    // come group by group, so the match is nearly always the last one.
    let mut lists: Vec<(Bytes, Arc<[String]>)> = Vec::new();
    for record in batch {
        let parts = match tern_proto::EnvelopeParts::split(&record.payload) {
            Ok(parts) if !parts.message.is_empty() => parts,
            Ok(_) | Err(_) => {
                tracing::error!(offset = record.offset, "undecodable bus record skipped");
                continue;
            }
        };
        let Ok(routing) = pb::MessageRouting::decode(&parts.message[..]) else {
            tracing::error!(offset = record.offset, "undecodable message in bus record skipped");
            continue;
        };
        let known = lists.iter().rev().take(SHARED_LISTS).find(|(encoded, _)| *encoded == parts.receivers);
        let receivers = match known {
            Some((_, list)) => list.clone(),
            None => match tern_proto::decode_receivers(&parts.receivers) {
                Ok(list) => {
                    let list: Arc<[String]> = list.into();
                    lists.push((parts.receivers, list.clone()));
                    list
                }
                Err(_) => {
                    tracing::error!(offset = record.offset, "undecodable receivers in bus record skipped");
                    continue;
                }
            },
        };
        let group_id =
            if routing.kind == pb::ConversationKind::Group as i32 { routing.group_id } else { String::new() };
        decoded.push(Delivery {
            receivers,
            sender: routing.sender,
            sender_device: parts.sender_device,
            group_id,
            entry: OfflineEntry { msg_id: routing.msg_id, payload: parts.message },
        });
    }
    decoded
}

/// How many of the latest distinct receiver lists [`decode`] compares a
/// message's with (a batch of 1:1 messages has about as many lists as
/// messages, so looking further back would mostly cost comparisons).
const SHARED_LISTS: usize = 4;

/// The recorded devices of every user involved, in one call (one read
/// transaction in standalone; one pipeline on Redis). If that call finds a
/// corrupt stored list, each user is looked up alone: a user whose list is
/// corrupt is left out, with an error in the log, and so counts as having
/// no recorded device (their messages go to the shared `user/` set, which
/// every device of theirs pulls). Retrying cannot mend such a value, and
/// failing the batch on it would stall the consumer for everyone.
async fn devices_of(
    meta: &Arc<dyn MetaStore>,
    users: &[&str],
) -> Result<tern_store::DevicesByUser, tern_store::StoreError> {
    match meta.devices_of_users(users).await {
        Err(tern_store::StoreError::Corrupt(e)) => {
            tracing::warn!(error = %e, users = users.len(), "a device list is corrupt; looking users up one by one");
            let lookups = users.iter().map(|&user| async move { (user, meta.devices(user).await) });
            let mut found = HashMap::with_capacity(users.len());
            for (user, devices) in futures::future::join_all(lookups).await {
                match devices {
                    Ok(devices) => {
                        found.insert(user.to_owned(), devices);
                    }
                    Err(tern_store::StoreError::Corrupt(e)) => tracing::error!(
                        error = %e,
                        user,
                        "device list corrupt: the user's messages go to their shared offline set"
                    ),
                    Err(e) => return Err(e),
                }
            }
            Ok(found)
        }
        other => other,
    }
}

/// Writes `entry` into each of `inboxes`. A set whose stored value is
/// corrupt (the wrong type under its key) can neither take the entry nor
/// be pulled from, and retrying cannot mend it: it is skipped with an error
/// in the log (an operator must repair it), so one bad key cannot stall the
/// consumer. Any other failure is returned for the caller to retry (inserts
/// are idempotent).
async fn insert_skipping_corrupt(
    store: &Arc<dyn OfflineStore>,
    inboxes: &[String],
    entry: &OfflineEntry,
) -> Result<(), tern_store::StoreError> {
    if inboxes.is_empty() {
        return Ok(());
    }
    match store.insert(inboxes, entry).await {
        Err(tern_store::StoreError::Corrupt(_)) => {}
        other => return other,
    }
    // Find the corrupt set(s): one insert each.
    let each = inboxes
        .iter()
        .map(|inbox| async move { (inbox, store.insert(std::slice::from_ref(inbox), entry).await) });
    for (inbox, result) in futures::future::join_all(each).await {
        match result {
            Ok(()) => {}
            Err(tern_store::StoreError::Corrupt(e)) => tracing::error!(
                error = %e,
                inbox = %inbox,
                msg_id = entry.msg_id,
                "offline set corrupt: entry not stored there (repair or delete the set)"
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, payload: Vec<u8>) -> BusRecord {
        BusRecord { partition: 0, offset, key: Bytes::from_static(b"k"), payload: Bytes::from(payload) }
    }

    fn message(kind: pb::ConversationKind, msg_id: u64) -> pb::Message {
        pb::Message {
            msg_id,
            kind: kind as i32,
            sender: "alice".into(),
            receiver: "bob".into(),
            group_id: "team".into(),
            seq: 7,
            content: b"hello".to_vec(),
            sent_at_ms: 1_700_000_000_000,
            client_msg_id: "c-1".into(),
        }
    }

    fn envelope(message: Option<pb::Message>) -> Vec<u8> {
        pb::BusEnvelope {
            message,
            receivers: vec!["bob".into(), "carol".into()],
            sender_device: "phone".into(),
        }
        .encode_to_vec()
    }

    /// Message `msg_id` of group `group_id` (empty for 1:1) from `sender`
    /// on `sender_device` (empty if unknown) to `receivers`.
    fn delivery(
        msg_id: u64,
        sender: &str,
        sender_device: &str,
        group_id: &str,
        receivers: &[&str],
    ) -> Delivery {
        Delivery {
            receivers: receivers.iter().map(|&r| r.to_owned()).collect(),
            sender: sender.into(),
            sender_device: sender_device.into(),
            group_id: group_id.into(),
            entry: OfflineEntry { msg_id, payload: Bytes::new() },
        }
    }

    fn placement(user: &str, device: &str, node: &str, connection_id: u64) -> Placement {
        Placement { user_id: user.into(), device_id: device.into(), node_id: node.into(), connection_id }
    }

    /// Batches of large-group messages to bob (on one connection) and a
    /// 1:1 message to carol, planned with a threshold of two.
    fn planned(large_messages: u64) -> (usize, Vec<String>) {
        let config =
            OfflineConfig { large_group_members: 3, pull_notice_threshold: 2, ..OfflineConfig::default() };
        let delivery =
            |msg_id, receivers: &[&str], group_id: &str| delivery(msg_id, "alice", "", group_id, receivers);
        let mut batch: Vec<Delivery> =
            (1..=large_messages).map(|id| delivery(id, &["bob", "dave"], "g")).collect();
        batch.push(delivery(100, &["carol"], ""));
        let placement = |user: &str, connection_id| placement(user, "phone", "n1", connection_id);
        let placements: HashMap<String, Vec<Placement>> = [
            ("bob".to_owned(), vec![placement("bob", 1)]),
            ("carol".to_owned(), vec![placement("carol", 2)]),
        ]
        .into_iter()
        .collect();
        let plan = plan(&batch, &placements, &config);
        let notified = plan.notices.iter().map(|(p, reason)| format!("{}: {reason}", p.user_id)).collect();
        (plan.pushes.len(), notified)
    }

    #[test]
    fn a_batch_is_pushed_connection_by_connection_in_message_order() {
        let delivery = |msg_id, receivers: &[&str]| delivery(msg_id, "alice", "", "g", receivers);
        let batch =
            vec![delivery(1, &["bob", "carol"]), delivery(2, &["carol"]), delivery(3, &["bob", "carol"])];
        let placement = |user: &str, node: &str, connection_id| placement(user, "phone", node, connection_id);
        // carol on two nodes, one with the same connection id as bob's.
        let placements: HashMap<String, Vec<Placement>> = [
            ("bob".to_owned(), vec![placement("bob", "n2", 7)]),
            ("carol".to_owned(), vec![placement("carol", "n1", 7), placement("carol", "n1", 3)]),
        ]
        .into_iter()
        .collect();
        let plan = plan(&batch, &placements, &OfflineConfig::default());
        let order: Vec<(u64, &str, u64)> =
            plan.pushes.iter().map(|(d, p)| (p.connection_id, p.node_id.as_str(), d.entry.msg_id)).collect();
        assert_eq!(
            order,
            [
                (3, "n1", 1),
                (3, "n1", 2),
                (3, "n1", 3),
                (7, "n1", 1),
                (7, "n1", 2),
                (7, "n1", 3),
                (7, "n2", 1),
                (7, "n2", 3)
            ]
        );
    }

    #[test]
    fn held_copies_run_by_recorded_device_and_the_plan_knows_each_pushed_device() {
        let batch = vec![
            delivery(1, "alice", "", "g", &["bob", "carol"]),
            delivery(2, "alice", "", "g", &["bob", "carol"]),
        ];
        let placement =
            |user: &str, device: &str, connection_id| placement(user, device, "n1", connection_id);
        let placements: HashMap<String, Vec<Placement>> = [
            ("bob".to_owned(), vec![placement("bob", "phone", 1), placement("bob", "web", 2)]),
            ("carol".to_owned(), vec![placement("carol", "phone", 3)]),
        ]
        .into_iter()
        .collect();
        // bob's web device is not recorded (yet): its copies go to the store.
        let devices: tern_store::DevicesByUser =
            [("bob".to_owned(), vec!["phone".to_owned()]), ("carol".to_owned(), vec!["phone".to_owned()])]
                .into_iter()
                .collect();
        let plan = plan(&batch, &placements, &OfflineConfig::default());
        let runs: Vec<(String, Vec<u64>)> = held_copies(&plan.pushes, &devices)
            .into_iter()
            .map(|(inbox, entries)| (inbox, entries.iter().map(|e| e.msg_id).collect()))
            .collect();
        assert_eq!(runs, [("bob/phone".to_owned(), vec![1, 2]), ("carol/phone".to_owned(), vec![1, 2])]);
        assert!(plan.reaches_device(&batch[0], "bob", "web"));
        assert!(!plan.reaches_device(&batch[0], "bob", "tablet"), "no connection");
        assert!(!plan.reaches_device(&batch[0], "dave", "phone"), "not online");
    }

    #[test]
    fn unheld_inboxes_write_what_the_per_message_check_writes() {
        let delivery = |msg_id, sender: &str, sender_device: &str, receivers: &[&str]| {
            delivery(msg_id, sender, sender_device, "g", receivers)
        };
        let batch = vec![
            delivery(1, "alice", "phone", &["bob", "carol", "dave", "erin"]),
            delivery(2, "bob", "phone", &["alice", "carol", "dave", "erin"]),
            // To oneself: every device of alice's but the sending one.
            delivery(3, "alice", "web", &["alice"]),
            delivery(4, "carol", "", &["bob"]),
        ];
        let placement =
            |user: &str, device: &str, connection_id| placement(user, device, "n1", connection_id);
        // alice online on both devices, bob on one of two, carol on an
        // unrecorded device, dave offline, erin never logged in.
        let placements: HashMap<String, Vec<Placement>> = [
            ("alice".to_owned(), vec![placement("alice", "phone", 1), placement("alice", "web", 2)]),
            ("bob".to_owned(), vec![placement("bob", "phone", 3)]),
            ("carol".to_owned(), vec![placement("carol", "tablet", 4)]),
        ]
        .into_iter()
        .collect();
        let recorded = |list: &[&str]| list.iter().map(|&d| d.to_owned()).collect::<Vec<_>>();
        let devices: tern_store::DevicesByUser = [
            ("alice".to_owned(), recorded(&["phone", "web"])),
            ("bob".to_owned(), recorded(&["laptop", "phone"])),
            ("carol".to_owned(), recorded(&["phone"])),
            ("dave".to_owned(), recorded(&["phone"])),
        ]
        .into_iter()
        .collect();
        let plan = plan(&batch, &placements, &OfflineConfig::default());
        assert!(plan.notices.is_empty());
        let users = batch_push_targets(&batch);
        let unheld = unheld_inboxes(&users, &devices, &placements);
        assert!(!unheld.contains_key("alice"), "every device of alice's has a connection");
        // The same with SYNC notices: a notified device's copies are held
        // too, so the map stands for them as well.
        let bursts =
            OfflineConfig { large_group_members: 2, pull_notice_threshold: 1, ..OfflineConfig::default() };
        let notifying = super::plan(&batch, &placements, &bursts);
        assert!(!notifying.notices.is_empty());
        for plan in [&plan, &notifying] {
            for d in &batch {
                let held = |user: &str, device: &str| plan.reaches_device(d, user, device);
                let mut per_message = d.inboxes(&devices, held, None);
                let mut from_map = d.inboxes(&devices, held, Some(&unheld));
                per_message.sort();
                from_map.sort();
                assert_eq!(from_map, per_message, "message {}", d.entry.msg_id);
            }
        }
        let mut first =
            batch[0].inboxes(&devices, |u, dev| plan.reaches_device(&batch[0], u, dev), Some(&unheld));
        first.sort();
        assert_eq!(first, ["bob/laptop", "carol/phone", "dave/phone", "erin/"]);
        assert!(
            batch[2]
                .inboxes(&devices, |u, dev| plan.reaches_device(&batch[2], u, dev), Some(&unheld))
                .is_empty()
        );
        // With every receiver online on its recorded devices, nothing.
        let all_online = unheld_inboxes(&["alice"], &devices, &placements);
        assert!(all_online.is_empty());
    }

    #[test]
    fn a_connection_is_told_to_pull_only_past_the_threshold() {
        assert_eq!(planned(2), (3, vec![]), "two large-group messages and carol's: all pushed");
        assert_eq!(
            planned(3),
            (1, vec!["bob: 3 new messages in group g; pull".to_owned()]),
            "three: bob pulls them, carol's 1:1 message is still pushed"
        );
    }

    #[test]
    fn decode_keeps_the_message_as_encoded_and_reads_its_routing() {
        let single = message(pb::ConversationKind::Single, 41);
        let group = message(pb::ConversationKind::Group, 42);
        let batch = vec![record(0, envelope(Some(single.clone()))), record(1, envelope(Some(group.clone())))];
        let decoded = decode(&batch);
        assert_eq!(decoded.len(), 2);
        for (delivery, original) in decoded.iter().zip([&single, &group]) {
            assert_eq!(delivery.entry.msg_id, original.msg_id);
            assert_eq!(pb::Message::decode(delivery.entry.payload.clone()).unwrap(), *original);
            assert_eq!(delivery.receivers[..], ["bob", "carol"]);
            assert_eq!(delivery.sender, "alice");
            assert_eq!(delivery.sender_device, "phone");
        }
        assert_eq!(decoded[0].group_id, "", "a 1:1 message has no group");
        assert_eq!(decoded[1].group_id, "team");
    }

    #[test]
    fn messages_listing_the_same_receivers_share_one_decoded_list() {
        let to = |msg_id, receivers: &[&str]| {
            let envelope = pb::BusEnvelope {
                message: Some(message(pb::ConversationKind::Group, msg_id)),
                receivers: receivers.iter().map(|&r| r.to_owned()).collect(),
                sender_device: String::new(),
            };
            record(msg_id, envelope.encode_to_vec())
        };
        let batch =
            vec![to(1, &["bob", "carol"]), to(2, &["dave"]), to(3, &["bob", "carol"]), to(4, &["bob"])];
        let decoded = decode(&batch);
        let lists: Vec<&[String]> = decoded.iter().map(|d| &d.receivers[..]).collect();
        assert_eq!(lists, [&["bob", "carol"][..], &["dave"], &["bob", "carol"], &["bob"]]);
        assert!(Arc::ptr_eq(&decoded[0].receivers, &decoded[2].receivers));
        assert!(!Arc::ptr_eq(&decoded[0].receivers, &decoded[3].receivers));
    }

    #[test]
    fn decode_skips_undecodable_records_and_keeps_the_others() {
        let good = message(pb::ConversationKind::Single, 43);
        let batch = vec![
            record(0, vec![0xff, 0xff, 0xff]),
            record(1, envelope(None)),
            // An envelope whose message field holds bytes that are no Message.
            record(2, vec![0x0a, 0x02, 0x0a, 0x05]),
            // Receivers that are not UTF-8.
            record(3, {
                let mut payload = envelope(Some(good.clone()));
                payload.extend_from_slice(&[0x12, 0x01, 0xff]);
                payload
            }),
            record(4, envelope(Some(good.clone()))),
        ];
        let decoded = decode(&batch);
        assert_eq!(decoded.len(), 1);
        assert_eq!(pb::Message::decode(decoded[0].entry.payload.clone()).unwrap(), good);
    }
}
