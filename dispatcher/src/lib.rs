//! dispatcher: accepts messages from access nodes, gives each a message id
//! and a per-conversation sequence, makes it durable on the bus, and answers
//! with the ACK the sender waits for. It also owns group management.
//!
//! Delivery to receivers happens downstream: offline-svc consumes the bus,
//! writes each receiver's offline set and pushes to online receivers (see
//! ARCHITECTURE.md, "why pushes come from offline-svc").
//!
//! Architecture invariant: a message is acknowledged to its sender only after
//! `MessageLog::append` (or, for a retry, `Bus::publish`) returned, i.e.
//! after its bus record is durable.
//!
//! Architecture invariant: a message's ids (message id, sequence) are
//! reserved under its client message id before it is published, and every
//! retry publishes the message again with those ids; so a retry after any
//! failure never stores a second message, and never loses the first.

use std::collections::{BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

pub mod link;

use async_trait::async_trait;
use bytes::Bytes;
use tern_idgen::Snowflake;
use tern_proto::pb::{self, ConversationKind};
use tern_proto::{
    ErrorCode, ServiceError, ServiceResult, group_conversation_key, single_conversation_key, validate_id,
};
use tern_store::{Bus, DedupRecord, DedupStore, GroupRecord, MessageLog, MetaStore, NewMessage, StoreError};
use tokio::sync::Mutex;

/// Most groups one LIST_GROUPS response carries (the first by group id).
pub const MAX_LISTED_GROUPS: usize = 500;

/// Longest accepted client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;

/// What access nodes call. Implemented locally by [`Dispatcher`]; cluster mode
/// adds a network client with the same trait.
#[async_trait]
pub trait DispatchService: Send + Sync + 'static {
    /// `device` is the sending device: the sender's other devices get a copy.
    async fn send_single(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendSingleRequest,
    ) -> ServiceResult<pb::SendAck>;
    async fn send_group(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendGroupRequest,
    ) -> ServiceResult<pb::SendAck>;
    /// Sends consecutive messages of one connection, as `send_single` and
    /// `send_group` would one after another: the results come back in the
    /// same order, and within a conversation a later message gets a later
    /// sequence. One message's failure does not fail the others.
    ///
    /// The default sends them one at a time; [`Dispatcher`] stores the new
    /// ones together (one commit for the burst of a pipelining client).
    async fn send_batch(
        &self,
        sender: &str,
        device: &str,
        requests: Vec<SendRequest>,
    ) -> Vec<ServiceResult<pb::SendAck>> {
        let mut acks = Vec::with_capacity(requests.len());
        for request in requests {
            acks.push(match request {
                SendRequest::Single(req) => self.send_single(sender, device, req).await,
                SendRequest::Group(req) => self.send_group(sender, device, req).await,
            });
        }
        acks
    }
    async fn create_group(&self, creator: &str, req: pb::CreateGroupRequest) -> ServiceResult<pb::GroupInfo>;
    async fn join_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo>;
    async fn leave_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo>;
    async fn group_members(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo>;
    async fn list_groups(&self, user: &str) -> ServiceResult<Vec<pb::GroupInfo>>;
}

/// One send of a [`DispatchService::send_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum SendRequest {
    Single(pb::SendSingleRequest),
    Group(pb::SendGroupRequest),
}

impl SendRequest {
    pub fn client_msg_id(&self) -> &str {
        match self {
            Self::Single(req) => &req.client_msg_id,
            Self::Group(req) => &req.client_msg_id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// How long a client message id is remembered for deduplicating retries.
    pub dedup_ttl: Duration,
    /// Largest group, counting the owner.
    pub max_group_members: usize,
    /// Topic the messages are published to.
    pub bus: tern_proto::BusNames,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            dedup_ttl: Duration::from_secs(24 * 3600),
            max_group_members: 2_000,
            bus: tern_proto::BusNames::default(),
        }
    }
}

/// Backends the dispatcher works on.
#[derive(Clone)]
pub struct DispatcherBackends {
    pub meta: Arc<dyn MetaStore>,
    /// Stores each new message (sequence, reservation, bus record).
    pub log: Arc<dyn MessageLog>,
    /// Reservations, read to recognise retries.
    pub dedup: Arc<dyn DedupStore>,
    /// Where a retry publishes its message again.
    pub bus: Arc<dyn Bus>,
}

/// Number of lock stripes serialising conversations. Two conversations share
/// a stripe only by hash collision, which costs throughput, never order.
const LOCK_STRIPES: usize = 1024;

pub struct Dispatcher {
    backends: DispatcherBackends,
    ids: Arc<Snowflake>,
    config: DispatcherConfig,
    /// Held from dedup check to publish, so one conversation's messages get
    /// sequences and bus positions in the same order, and concurrent retries
    /// of one client message id are stored once.
    stripes: Vec<Mutex<()>>,
    /// Users found to exist, so a 1:1 send does not read the MetaStore for
    /// its receiver each time. Sound because accounts are never deleted (no
    /// request or API removes one); emptied when it reaches
    /// [`KNOWN_USERS_MAX`].
    known_users: std::sync::Mutex<HashSet<String>>,
}

/// Most receivers [`Dispatcher`] remembers as existing.
const KNOWN_USERS_MAX: usize = 100_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn group_info(group: GroupRecord) -> pb::GroupInfo {
    pb::GroupInfo { group_id: group.group_id, name: group.name, owner: group.owner, members: group.members }
}

/// Checks the fields every send shares.
fn check_send(sender: &str, claimed_sender: &str, client_msg_id: &str, content: &[u8]) -> ServiceResult<()> {
    if !claimed_sender.is_empty() && claimed_sender != sender {
        return Err(ServiceError::new(
            ErrorCode::SenderMismatch,
            format!("sender {claimed_sender:?} is not the logged-in user"),
        ));
    }
    if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID_LEN {
        return Err(ServiceError::invalid(format!(
            "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_LEN} bytes"
        )));
    }
    if content.is_empty() {
        return Err(ServiceError::invalid("content must not be empty"));
    }
    Ok(())
}

/// A message waiting for its id and sequence.
#[derive(Clone)]
struct Draft {
    kind: ConversationKind,
    conversation: String,
    sender: String,
    sender_device: String,
    receiver: String,
    group_id: String,
    client_msg_id: String,
    content: Vec<u8>,
    receivers: Receivers,
}

/// Whom a message's envelope lists as its receivers (write diffusion).
#[derive(Clone)]
enum Receivers {
    /// The receiver of a 1:1 message.
    Receiver,
    /// Every member of the group but the sender, read off the shared
    /// record as the envelope is encoded (copying the list for each
    /// message was a thousand strings per send to a large group).
    MembersBut(Arc<GroupRecord>),
}

/// The bus envelope of `message` to `receivers`.
fn encode_envelope(message: &pb::Message, receivers: &Receivers, sender_device: &str) -> Vec<u8> {
    match receivers {
        Receivers::Receiver => {
            tern_proto::encode_envelope(message, std::iter::once(message.receiver.as_str()), sender_device)
        }
        Receivers::MembersBut(group) => {
            let others = group.members.iter().map(String::as_str).filter(|m| *m != message.sender);
            tern_proto::encode_envelope(message, others, sender_device)
        }
    }
}

impl Draft {
    /// The message of this draft with the ids it was given, its receivers
    /// and the device it was sent from: what its bus envelope holds.
    fn into_parts(self, ids: DedupRecord) -> (pb::Message, Receivers, String) {
        let Draft {
            kind,
            conversation: _,
            sender,
            sender_device,
            receiver,
            group_id,
            client_msg_id,
            content,
            receivers,
        } = self;
        let message = pb::Message {
            msg_id: ids.msg_id,
            kind: kind as i32,
            sender,
            receiver,
            group_id,
            seq: ids.seq,
            content,
            sent_at_ms: ids.sent_at_ms,
            client_msg_id,
        };
        (message, receivers, sender_device)
    }

    /// What the message log stores for this draft, given its ids. The bus
    /// envelope is built once (a retry's [`Dispatcher::publish`] copies the
    /// draft instead); the payload function only sets the sequence and
    /// encodes it.
    fn into_new_message(mut self, msg_id: u64, sent_at_ms: u64, config: &DispatcherConfig) -> NewMessage {
        let conversation = std::mem::take(&mut self.conversation);
        let key = Bytes::from(conversation.clone().into_bytes());
        let (sender, client_msg_id) = (self.sender.clone(), self.client_msg_id.clone());
        let (mut message, receivers, sender_device) =
            self.into_parts(DedupRecord { msg_id, seq: 0, sent_at_ms });
        NewMessage {
            conversation,
            sender,
            client_msg_id,
            msg_id,
            sent_at_ms,
            dedup_ttl: config.dedup_ttl,
            topic: config.bus.messages_topic.clone(),
            key,
            payload: Box::new(move |seq| {
                message.seq = seq;
                Bytes::from(encode_envelope(&message, &receivers, &sender_device))
            }),
        }
    }
}

impl Dispatcher {
    pub fn new(backends: DispatcherBackends, ids: Arc<Snowflake>, config: DispatcherConfig) -> Self {
        Self {
            backends,
            ids,
            config,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            known_users: Default::default(),
        }
    }

    fn stripe_index(&self, conversation: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conversation.hash(&mut h);
        (h.finish() as usize) % LOCK_STRIPES
    }

    fn known_users(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known_users.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn require_user(&self, user_id: &str) -> ServiceResult<()> {
        if self.known_users().contains(user_id) {
            return Ok(());
        }
        match self.backends.meta.get_user(user_id).await.map_err(ServiceError::backend)? {
            Some(_) => {
                let mut known = self.known_users();
                if known.len() >= KNOWN_USERS_MAX {
                    known.clear();
                }
                known.insert(user_id.to_owned());
                Ok(())
            }
            None => Err(ServiceError::new(ErrorCode::NoSuchUser, format!("no user {user_id:?}"))),
        }
    }

    async fn require_group(&self, group_id: &str) -> ServiceResult<Arc<GroupRecord>> {
        validate_id("group_id", group_id)?;
        self.backends
            .meta
            .get_group(group_id)
            .await
            .map_err(ServiceError::backend)?
            .ok_or_else(|| ServiceError::new(ErrorCode::NoSuchGroup, format!("no group {group_id:?}")))
    }

    fn not_member(group_id: &str) -> ServiceError {
        ServiceError::new(ErrorCode::NotGroupMember, format!("you are not a member of group {group_id:?}"))
    }

    /// Publishes `draft` with the ids it was given.
    async fn publish(&self, draft: &Draft, ids: DedupRecord) -> ServiceResult<()> {
        let key = Bytes::from(draft.conversation.clone().into_bytes());
        let topic = &self.config.bus.messages_topic;
        let (message, receivers, sender_device) = draft.clone().into_parts(ids);
        let payload = Bytes::from(encode_envelope(&message, &receivers, &sender_device));
        self.backends.bus.publish(topic, key, payload).await.map_err(|e| {
            // The ids stay reserved: a retry publishes the same message.
            ServiceError::new(ErrorCode::Unavailable, format!("message not stored, retry: {e}"))
        })
    }

    /// If this client message id was accepted before, publishes the message
    /// again with the ids it was given and returns its ACK. The first
    /// publish may never have happened (the dispatcher died, or the bus
    /// failed, between reserving the ids and publishing); if it did, the
    /// copy is harmless: storage writes are idempotent per message id and
    /// clients drop a message id they have shown.
    async fn replay(&self, draft: &Draft) -> ServiceResult<Option<pb::SendAck>> {
        let seen = self
            .backends
            .dedup
            .get(&draft.sender, &draft.client_msg_id)
            .await
            .map_err(|e| dedup_lookup_failed(&draft.sender, &draft.client_msg_id, e))?;
        let Some(ids) = seen else { return Ok(None) };
        self.replay_reserved(draft, ids).await.map(Some)
    }

    /// [`Dispatcher::replay`] once the reservation `ids` was found.
    async fn replay_reserved(&self, draft: &Draft, ids: DedupRecord) -> ServiceResult<pb::SendAck> {
        self.publish(draft, ids).await?;
        Ok(pb::SendAck {
            client_msg_id: draft.client_msg_id.clone(),
            msg_id: ids.msg_id,
            seq: ids.seq,
            sent_at_ms: ids.sent_at_ms,
            duplicate: true,
        })
    }

    /// The reservation of each draft's client message id, if any: one
    /// [`DedupStore::get_many`] per sender (a burst has one), not a lookup
    /// per message. A record that cannot be read fails only its own send:
    /// the burst's ids are then looked up one by one.
    async fn reservations(&self, drafts: &[Draft]) -> Vec<ServiceResult<Option<DedupRecord>>> {
        let mut found = vec![Ok(None); drafts.len()];
        let mut senders: Vec<&str> = drafts.iter().map(|d| d.sender.as_str()).collect();
        senders.sort_unstable();
        senders.dedup();
        for sender in senders {
            let (indexes, ids): (Vec<usize>, Vec<&str>) = drafts
                .iter()
                .enumerate()
                .filter(|(_, d)| d.sender == sender)
                .map(|(i, d)| (i, d.client_msg_id.as_str()))
                .unzip();
            let failed = match self.backends.dedup.get_many(sender, &ids).await {
                Ok(records) if records.len() == ids.len() => {
                    for (index, record) in indexes.into_iter().zip(records) {
                        found[index] = Ok(record);
                    }
                    continue;
                }
                Ok(records) => ServiceError::internal(format!(
                    "dedup store answered {} of {} lookups",
                    records.len(),
                    ids.len()
                )),
                Err(StoreError::Corrupt(_)) => {
                    for (index, id) in indexes.into_iter().zip(ids) {
                        found[index] = self
                            .backends
                            .dedup
                            .get(sender, id)
                            .await
                            .map_err(|e| dedup_lookup_failed(sender, id, e));
                    }
                    continue;
                }
                Err(e) => ServiceError::backend(e),
            };
            for index in indexes {
                found[index] = Err(failed.clone());
            }
        }
        found
    }

    /// Dedup, id, then sequence + reservation + publish in the message log:
    /// the path every message takes, under its conversation's lock.
    async fn accept(&self, draft: Draft) -> ServiceResult<pb::SendAck> {
        self.accept_batch(vec![draft]).await.pop().expect("one result per draft")
    }

    /// [`Dispatcher::accept`] for several drafts, in order, under the locks
    /// of all their conversations, with the new messages stored by one
    /// [`MessageLog::append_batch`]. Returns one result per draft. The
    /// drafts have distinct client message ids (see `send_batch`).
    async fn accept_batch(&self, drafts: Vec<Draft>) -> Vec<ServiceResult<pb::SendAck>> {
        // Stripes are locked in index order, so two batches sharing
        // stripes cannot deadlock.
        let mut stripes: Vec<usize> = drafts.iter().map(|d| self.stripe_index(&d.conversation)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.stripes[stripe].lock().await);
        }

        // Looked up under the lock: two concurrent retries store once.
        let reserved = self.reservations(&drafts).await;
        let mut results: Vec<Option<ServiceResult<pb::SendAck>>> = vec![None; drafts.len()];
        let mut messages = Vec::with_capacity(drafts.len());
        let mut owners = Vec::with_capacity(drafts.len());
        for ((index, draft), reservation) in drafts.into_iter().enumerate().zip(reserved) {
            match reservation {
                Err(e) => results[index] = Some(Err(e)),
                Ok(Some(ids)) => results[index] = Some(self.replay_reserved(&draft, ids).await),
                Ok(None) => match self.ids.next_id() {
                    // Clock trouble or a lost worker id: temporary, retry later.
                    Err(e) => results[index] = Some(Err(ServiceError::unavailable(e))),
                    Ok(msg_id) => {
                        let sent_at_ms = now_ms();
                        owners.push((index, draft.client_msg_id.clone(), msg_id, sent_at_ms));
                        messages.push(draft.into_new_message(msg_id, sent_at_ms, &self.config));
                    }
                },
            }
        }
        let stored =
            if messages.is_empty() { Vec::new() } else { self.backends.log.append_batch(messages).await };
        for ((index, client_msg_id, msg_id, sent_at_ms), result) in owners.into_iter().zip(stored) {
            results[index] = Some(match result {
                Ok(ids) => {
                    Ok(pb::SendAck { client_msg_id, msg_id, seq: ids.seq, sent_at_ms, duplicate: false })
                }
                Err(StoreError::Unavailable(reason)) => Err(ServiceError::unavailable(reason)),
                Err(other) => Err(ServiceError::backend(other)),
            });
        }
        drop(guards);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ServiceError::internal("message was not stored".to_owned()))))
            .collect()
    }

    fn check_group_size(&self, members: usize) -> ServiceResult<()> {
        if members > self.config.max_group_members {
            return Err(ServiceError::invalid(format!(
                "a group may have at most {} members",
                self.config.max_group_members
            )));
        }
        Ok(())
    }
}

/// The error of a send whose client message id could not be looked up. If
/// its record is unreadable, whether the id was accepted before cannot be
/// told, and a retry with the same id would fail the same way: the client
/// is told to use a new one (and the log names the record).
fn dedup_lookup_failed(sender: &str, client_msg_id: &str, error: StoreError) -> ServiceError {
    match error {
        StoreError::Corrupt(detail) => {
            tracing::error!(sender, client_msg_id, %detail, "unreadable dedup record; the send is refused");
            ServiceError::internal(format!(
                "the record of client message id {client_msg_id:?} is unreadable ({detail}); send the \
                 message with a new client message id"
            ))
        }
        other => ServiceError::backend(other),
    }
}

/// A send after its checks: answered already (a retry), or to be stored.
enum Prepared {
    Answered(pb::SendAck),
    New(Draft),
}

impl Dispatcher {
    /// The checks of a 1:1 send, in the order PROTOCOL.md gives.
    async fn prepare_single(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendSingleRequest,
    ) -> ServiceResult<Prepared> {
        check_send(sender, &req.sender, &req.client_msg_id, &req.content)?;
        validate_id("receiver", &req.receiver)?;
        let draft = Draft {
            kind: ConversationKind::Single,
            conversation: single_conversation_key(sender, &req.receiver),
            sender: sender.to_owned(),
            sender_device: device.to_owned(),
            receiver: req.receiver,
            group_id: String::new(),
            client_msg_id: req.client_msg_id,
            content: req.content,
            receivers: Receivers::Receiver,
        };
        if let Err(e) = self.require_user(&draft.receiver).await {
            return self.retry_or(draft, e).await;
        }
        // Not looked up as a retry yet: `accept` does, under the lock.
        Ok(Prepared::New(draft))
    }

    /// The checks of a group send, in the order PROTOCOL.md gives.
    async fn prepare_group(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendGroupRequest,
    ) -> ServiceResult<Prepared> {
        check_send(sender, &req.sender, &req.client_msg_id, &req.content)?;
        let group = self.require_group(&req.group_id).await?;
        let is_member = group.members.binary_search_by(|m| m.as_str().cmp(sender)).is_ok();
        let draft = Draft {
            kind: ConversationKind::Group,
            conversation: group_conversation_key(&req.group_id),
            sender: sender.to_owned(),
            sender_device: device.to_owned(),
            receiver: String::new(),
            group_id: req.group_id,
            client_msg_id: req.client_msg_id,
            content: req.content,
            receivers: Receivers::MembersBut(group),
        };
        if !is_member {
            let e = Self::not_member(&draft.group_id);
            return self.retry_or(draft, e).await;
        }
        Ok(Prepared::New(draft))
    }

    /// A retry is answered even if the send would no longer pass the
    /// checks (the sender left the group since): its
    /// original ACK, or `error` if it is not a retry. PROTOCOL.md puts this
    /// duplicate check before those checks; looking only when one fails
    /// gives the same answers and saves a lookup per message.
    async fn retry_or(&self, draft: Draft, error: ServiceError) -> ServiceResult<Prepared> {
        match self.replay(&draft).await? {
            Some(ack) => Ok(Prepared::Answered(ack)),
            None => Err(error),
        }
    }

    /// [`DispatchService::send_batch`] for sends with distinct client
    /// message ids.
    async fn send_segment(
        &self,
        sender: &str,
        device: &str,
        requests: Vec<SendRequest>,
    ) -> Vec<ServiceResult<pb::SendAck>> {
        let mut results: Vec<Option<ServiceResult<pb::SendAck>>> = vec![None; requests.len()];
        let mut drafts = Vec::with_capacity(requests.len());
        let mut owners = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            let prepared = match request {
                SendRequest::Single(req) => self.prepare_single(sender, device, req).await,
                SendRequest::Group(req) => self.prepare_group(sender, device, req).await,
            };
            match prepared {
                Ok(Prepared::New(draft)) => {
                    drafts.push(draft);
                    owners.push(index);
                }
                Ok(Prepared::Answered(ack)) => results[index] = Some(Ok(ack)),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        if !drafts.is_empty() {
            for (index, result) in owners.into_iter().zip(self.accept_batch(drafts).await) {
                results[index] = Some(result);
            }
        }
        results.into_iter().map(|r| r.expect("every send answered")).collect()
    }

    async fn send(&self, prepared: ServiceResult<Prepared>) -> ServiceResult<pb::SendAck> {
        match prepared? {
            Prepared::Answered(ack) => Ok(ack),
            Prepared::New(draft) => self.accept(draft).await,
        }
    }
}

#[async_trait]
impl DispatchService for Dispatcher {
    async fn send_single(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendSingleRequest,
    ) -> ServiceResult<pb::SendAck> {
        self.send(self.prepare_single(sender, device, req).await).await
    }

    async fn send_group(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendGroupRequest,
    ) -> ServiceResult<pb::SendAck> {
        self.send(self.prepare_group(sender, device, req).await).await
    }

    /// Checks each send in turn, then stores the new ones with one
    /// [`MessageLog::append_batch`] (one commit in standalone). A client
    /// message id repeated within the burst ends a segment: the repeat and
    /// what follows are served after the messages before it are stored, so
    /// it is answered exactly as if sent on its own (a retry of a stored
    /// message, or a send of its own if the first copy failed).
    async fn send_batch(
        &self,
        sender: &str,
        device: &str,
        requests: Vec<SendRequest>,
    ) -> Vec<ServiceResult<pb::SendAck>> {
        let mut results = Vec::with_capacity(requests.len());
        let mut segment: Vec<SendRequest> = Vec::with_capacity(requests.len());
        for request in requests {
            // A scan, not a set of copied ids: this runs for every message,
            // and bursts are short (an access node sends at most 64).
            if segment.iter().any(|earlier| earlier.client_msg_id() == request.client_msg_id()) {
                results.extend(self.send_segment(sender, device, std::mem::take(&mut segment)).await);
            }
            segment.push(request);
        }
        results.extend(self.send_segment(sender, device, segment).await);
        results
    }

    async fn create_group(&self, creator: &str, req: pb::CreateGroupRequest) -> ServiceResult<pb::GroupInfo> {
        let group_id = if req.group_id.is_empty() {
            let id = self.ids.next_id().map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?;
            format!("grp-{id}")
        } else {
            req.group_id
        };
        validate_id("group_id", &group_id)?;
        if req.name.chars().count() > 128 {
            return Err(ServiceError::invalid("group name must be at most 128 characters"));
        }
        let mut members = BTreeSet::from([creator.to_owned()]);
        for member in req.members {
            validate_id("member", &member)?;
            members.insert(member);
        }
        self.check_group_size(members.len())?;
        for member in &members {
            self.require_user(member).await?;
        }
        let record = GroupRecord {
            name: if req.name.is_empty() { group_id.clone() } else { req.name },
            group_id,
            owner: creator.to_owned(),
            members: members.into_iter().collect(),
            created_at_ms: now_ms(),
        };
        if !self.backends.meta.create_group(&record).await.map_err(ServiceError::backend)? {
            return Err(ServiceError::new(
                ErrorCode::GroupExists,
                format!("group {:?} already exists", record.group_id),
            ));
        }
        Ok(group_info(record))
    }

    async fn join_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let group = self.require_group(group_id).await?;
        if group.members.iter().any(|m| m == user) {
            return Ok(group_info(Arc::unwrap_or_clone(group)));
        }
        self.check_group_size(group.members.len() + 1)?;
        let updated = self.backends.meta.add_member(group_id, user).await.map_err(ServiceError::backend)?;
        updated.map(group_info).ok_or_else(|| ServiceError::new(ErrorCode::NoSuchGroup, "group was deleted"))
    }

    async fn leave_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let group = self.require_group(group_id).await?;
        if !group.members.iter().any(|m| m == user) {
            return Err(Self::not_member(group_id));
        }
        let updated =
            self.backends.meta.remove_member(group_id, user).await.map_err(ServiceError::backend)?;
        updated.map(group_info).ok_or_else(|| ServiceError::new(ErrorCode::NoSuchGroup, "group was deleted"))
    }

    async fn group_members(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let group = self.require_group(group_id).await?;
        if !group.members.iter().any(|m| m == user) {
            return Err(Self::not_member(group_id));
        }
        Ok(group_info(Arc::unwrap_or_clone(group)))
    }

    async fn list_groups(&self, user: &str) -> ServiceResult<Vec<pb::GroupInfo>> {
        let mut ids = self.backends.meta.groups_of(user).await.map_err(ServiceError::backend)?;
        // Bounds the response (each group carries its member list).
        ids.truncate(MAX_LISTED_GROUPS);
        let mut groups = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(group) = self.backends.meta.get_group(&id).await.map_err(ServiceError::backend)? {
                groups.push(group_info(Arc::unwrap_or_clone(group)));
            }
        }
        Ok(groups)
    }
}
