//! offline-svc over gRPC: the server adapter for [`OfflineApi`], the client
//! access nodes use, and [`RemotePushGateway`], which delivers pushes to the
//! access node holding each connection.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tern_proto::pb;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::access_push_client::AccessPushClient;
use tern_proto::rpc::internal::offline_client::OfflineClient;
use tern_proto::rpc::internal::offline_server::{self, OfflineServer};
use tern_proto::rpc::internal::{
    AckRequest, CountResponse, Empty, PullRequest, PushBatch, PushItem, UserRequest,
};
use tern_proto::{ServiceError, ServiceResult};
use tern_store::Placement;
use tern_store::discovery::{Dial, Peers};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::{OfflineApi, PushGateway};

/// Registry role name of offline-svc nodes.
pub const OFFLINE_ROLE: &str = "offline-svc";

struct Server(Arc<dyn OfflineApi>);

#[async_trait]
impl offline_server::Offline for Server {
    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<pb::PullOfflineResponse>, Status> {
        let r = request.into_inner();
        let (messages, more) = self.0.pull(&r.user_id, &r.device_id, r.after_msg_id, r.limit).await?;
        Ok(Response::new(pb::PullOfflineResponse { messages, more }))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.0.ack(&r.user_id, &r.device_id, &r.msg_ids).await?;
        Ok(Response::new(Empty {}))
    }

    async fn pending(&self, request: Request<UserRequest>) -> Result<Response<CountResponse>, Status> {
        let r = request.into_inner();
        let count = self.0.pending(&r.user_id, &r.device_id).await?;
        Ok(Response::new(CountResponse { count }))
    }
}

pub fn service(api: Arc<dyn OfflineApi>) -> OfflineServer<impl offline_server::Offline> {
    OfflineServer::new(Server(api))
        .max_decoding_message_size(MAX_RPC_MESSAGE)
        .max_encoding_message_size(MAX_RPC_MESSAGE)
}

/// [`OfflineApi`] on the live offline-svc nodes (round robin).
pub struct RemoteOffline {
    peers: Arc<Peers>,
}

impl RemoteOffline {
    pub fn new(peers: Arc<Peers>) -> Self {
        Self { peers }
    }

    fn client(&self) -> ServiceResult<OfflineClient<tonic::transport::Channel>> {
        let channel = self.peers.any(Dial::Addr).map_err(ServiceError::unavailable)?.1;
        Ok(OfflineClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE))
    }
}

#[async_trait]
impl OfflineApi for RemoteOffline {
    async fn pull(
        &self,
        user: &str,
        device: &str,
        after_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)> {
        let request =
            PullRequest { user_id: user.to_owned(), device_id: device.to_owned(), after_msg_id, limit };
        let r = self.client()?.pull(request).await?.into_inner();
        Ok((r.messages, r.more))
    }

    async fn ack(&self, user: &str, device: &str, msg_ids: &[u64]) -> ServiceResult<()> {
        let request =
            AckRequest { user_id: user.to_owned(), device_id: device.to_owned(), msg_ids: msg_ids.to_vec() };
        self.client()?.ack(request).await?;
        Ok(())
    }

    async fn pending(&self, user: &str, device: &str) -> ServiceResult<u64> {
        let request = UserRequest { user_id: user.to_owned(), device_id: device.to_owned() };
        Ok(self.client()?.pending(request).await?.into_inner().count)
    }
}

/// Pushes to access nodes over gRPC. `push` only queues (it is called from
/// the consumer loop and must not wait on the network); a background task
/// sends what is queued in batches, to every access node at once, so one
/// slow or dead node does not hold up the others. SYNC notices travel as
/// items of the same batches.
///
/// A push that cannot be delivered (queue full, node not keeping up, call
/// failed) is not retried: the message is in the offline store, or held
/// where a pull finds it. Instead its connection is remembered, and once a
/// pull finds everything of the batch of the dropped push and of every
/// batch before it ([`PushGateway::batch_pullable`]: written, or held), it
/// gets one NOTICE SYNC and pulls what it missed. Waiting for that matters:
/// pushes go out before the offline write, and a pull that ran ahead of the
/// write would find nothing and never be repeated.
pub struct RemotePushGateway {
    queue: mpsc::Sender<Queued>,
    owed: Arc<OwedNotices>,
}

/// The limits of a [`RemotePushGateway`].
#[derive(Debug, Clone, Copy)]
pub struct PushLimits {
    /// Most pushes and notices, and most bytes of their messages, waiting
    /// for one access node: a batch that would go past either is dropped
    /// and its connections are told to pull. Not counted: the call under
    /// way, and a batch offered to an empty queue (taken whatever its size).
    pub node_queue_items: usize,
    pub node_queue_bytes: usize,
}

impl Default for PushLimits {
    fn default() -> Self {
        Self { node_queue_items: NODE_QUEUE_ITEMS, node_queue_bytes: NODE_QUEUE_BYTES }
    }
}

/// Pushes waiting to be sent; a push finding the queue full is dropped.
const PUSH_QUEUE: usize = 65_536;
/// Most pushes and bytes the deliver loop puts in one batch to one access
/// node.
const MAX_BATCH: usize = 1_024;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most pushes and notices waiting for one access node, by default; a
/// batch that would go past it is dropped and its connections are told to
/// pull.
///
/// Counted in items, not batches: under load the deliver loop often takes
/// pushes one at a time as the consumer queues them, and a limit of 64
/// batches dropped single pushes by the hundred (a cluster fan-out to
/// groups of 100 at 1,100 deliveries/s) while the node was idle between
/// calls. Batches waiting behind a call go out together in the next one.
const NODE_QUEUE_ITEMS: usize = 65_536;
/// Most bytes of messages waiting for one access node, by default (the
/// bound the 64 batches of up to 4 MiB had).
const NODE_QUEUE_BYTES: usize = 256 * 1024 * 1024;
/// Most items and bytes of waiting batches merged into one call.
const MAX_CALL_ITEMS: usize = 8_192;
const MAX_CALL_BYTES: usize = 8 * 1024 * 1024;
/// A node's sender task ends after this long without anything to send (a
/// new one starts with the next batch).
const SENDER_IDLE: Duration = Duration::from_secs(60);
/// How often connections owed a SYNC notice are looked at.
const OWED_NOTICE_INTERVAL: Duration = Duration::from_millis(100);
/// Reason of the NOTICE SYNC that replaces dropped pushes.
const DROPPED_PUSHES_REASON: &str = "pushes were dropped while the access node was busy; pull";

/// One push or notice on its way, with the number of the consumer batch
/// being pushed when it was queued (its epoch).
struct Queued {
    node: String,
    item: PushItem,
    epoch: u64,
}

/// A batch for one access node; `epoch` is the newest epoch among its
/// items, `bytes` the size of their messages.
struct NodeBatch {
    items: Vec<PushItem>,
    epoch: u64,
    bytes: usize,
}

impl NodeBatch {
    fn new(epoch: u64) -> Self {
        Self { items: Vec::new(), epoch, bytes: 0 }
    }

    fn push(&mut self, item: PushItem, epoch: u64) {
        self.bytes += item.message.len();
        self.items.push(item);
        self.epoch = self.epoch.max(epoch);
    }

    /// Takes `other`'s items after its own.
    fn append(&mut self, other: NodeBatch) {
        self.bytes += other.bytes;
        self.items.extend(other.items);
        self.epoch = self.epoch.max(other.epoch);
    }
}

/// The batches waiting for one access node, taken in order by its sender
/// task ([`RemotePushGateway::send_to_node`]), several per call when they
/// queued up behind the one in flight.
struct NodeQueue {
    waiting: Mutex<NodeWaiting>,
    ready: tokio::sync::Notify,
    limits: PushLimits,
}

#[derive(Default)]
struct NodeWaiting {
    batches: VecDeque<NodeBatch>,
    items: usize,
    bytes: usize,
    /// The sender task has ended (idle, or it failed); the next batch
    /// starts a new one.
    closed: bool,
}

/// Why a node's queue did not take a batch.
enum Refused {
    /// Its sender task has ended: start a new queue.
    Closed(NodeBatch),
    /// Its limit of items or bytes is reached.
    Full(NodeBatch),
}

impl NodeQueue {
    fn new(limits: PushLimits) -> Self {
        Self { waiting: Mutex::default(), ready: tokio::sync::Notify::new(), limits }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeWaiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offer(&self, batch: NodeBatch) -> Result<(), Refused> {
        let mut waiting = self.lock();
        if waiting.closed {
            return Err(Refused::Closed(batch));
        }
        let over = waiting.items + batch.items.len() > self.limits.node_queue_items
            || waiting.bytes + batch.bytes > self.limits.node_queue_bytes;
        // An empty queue takes any batch, however large.
        if over && !waiting.batches.is_empty() {
            return Err(Refused::Full(batch));
        }
        waiting.items += batch.items.len();
        waiting.bytes += batch.bytes;
        waiting.batches.push_back(batch);
        drop(waiting);
        self.ready.notify_one();
        Ok(())
    }

    /// The next call's items: the oldest batch and those waiting behind
    /// it, up to [`MAX_CALL_ITEMS`] and [`MAX_CALL_BYTES`]. `None` once the
    /// queue has been empty for [`SENDER_IDLE`] (it is closed then).
    async fn next_call(&self) -> Option<NodeBatch> {
        loop {
            // A batch offered after the look below is not missed:
            // `notify_one` with nobody waiting keeps a wake-up for the next
            // wait.
            let offered = self.ready.notified();
            {
                let mut waiting = self.lock();
                if let Some(mut call) = waiting.batches.pop_front() {
                    while let Some(next) = waiting.batches.front() {
                        let fits = call.items.len() + next.items.len() <= MAX_CALL_ITEMS
                            && call.bytes + next.bytes <= MAX_CALL_BYTES;
                        if !fits {
                            break;
                        }
                        call.append(waiting.batches.pop_front().expect("looked at above"));
                    }
                    waiting.items -= call.items.len();
                    waiting.bytes -= call.bytes;
                    return Some(call);
                }
            }
            if tokio::time::timeout(SENDER_IDLE, offered).await.is_err() {
                let mut waiting = self.lock();
                if waiting.batches.is_empty() {
                    waiting.closed = true;
                    return None;
                }
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Closes the queue and takes what was waiting (its sender task
    /// ended without sending it).
    fn close(&self) -> Vec<NodeBatch> {
        let mut waiting = self.lock();
        waiting.closed = true;
        (waiting.items, waiting.bytes) = (0, 0);
        waiting.batches.drain(..).collect()
    }
}

/// Held by a node's sender task: however the task ends, even by a panic,
/// its queue is closed (the next batch starts a new task) and the
/// connections of batches left in it are owed a SYNC notice.
struct CloseOnExit {
    queue: Arc<NodeQueue>,
    owed: Arc<OwedNotices>,
    node: String,
}

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        for batch in self.queue.close() {
            self.owed.record(&self.node, &batch.items, batch.epoch);
        }
    }
}

/// A connection, as the access node holding it knows it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Target {
    user_id: String,
    device_id: String,
    connection_id: u64,
}

/// Connections whose pushes were dropped, per access node.
///
/// Epochs order drops against the consumer's offline writes: an item
/// carries the number of the newest consumer batch started when it was
/// queued (`started`), and a connection may be told to pull once that batch
/// and every one before it are pullable (`pullable_upto`).
#[derive(Default)]
struct OwedNotices {
    started: AtomicU64,
    /// A pull finds everything of every batch up to this number.
    pullable_upto: AtomicU64,
    /// Batches reported pullable above `pullable_upto` (they finished out of
    /// order).
    pullable_above: Mutex<BTreeSet<u64>>,
    by_node: Mutex<HashMap<String, HashMap<Target, u64>>>,
}

impl OwedNotices {
    /// The batch being pushed now.
    fn epoch(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn pullable(&self, number: u64) {
        let mut above = self.pullable_above.lock().unwrap_or_else(|e| e.into_inner());
        let mut upto = self.pullable_upto.load(Ordering::Acquire);
        if number <= upto {
            return;
        }
        above.insert(number);
        while above.remove(&(upto + 1)) {
            upto += 1;
        }
        self.pullable_upto.store(upto, Ordering::Release);
    }

    fn record<'a>(&self, node: &str, items: impl IntoIterator<Item = &'a PushItem>, epoch: u64) {
        let mut by_node = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
        let owed = by_node.entry(node.to_owned()).or_default();
        for item in items {
            let target = Target {
                user_id: item.user_id.clone(),
                device_id: item.device_id.clone(),
                connection_id: item.connection_id,
            };
            let newest = owed.entry(target).or_insert(epoch);
            *newest = (*newest).max(epoch);
        }
    }

    /// Takes, per node, the connections whose dropped messages a pull
    /// finds now.
    fn take_ready(&self) -> Vec<(String, Vec<Target>)> {
        let pullable = self.pullable_upto.load(Ordering::Acquire);
        let mut by_node = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
        let mut ready = Vec::new();
        for (node, owed) in by_node.iter_mut() {
            let mut targets = Vec::new();
            owed.retain(|target, epoch| {
                let keep = *epoch > pullable;
                if !keep {
                    targets.push(target.clone());
                }
                keep
            });
            if !targets.is_empty() {
                ready.push((node.clone(), targets));
            }
        }
        by_node.retain(|_, owed| !owed.is_empty());
        ready
    }

    /// The node is gone: its clients reconnect elsewhere and pull anyway.
    fn forget_node(&self, node: &str) {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner()).remove(node);
    }
}

impl RemotePushGateway {
    /// `access_nodes` follows the access-node role (pushes go to their
    /// internal address).
    pub fn start(access_nodes: Arc<Peers>) -> Arc<Self> {
        Self::start_with(access_nodes, PushLimits::default())
    }

    /// [`RemotePushGateway::start`] with other limits.
    pub fn start_with(access_nodes: Arc<Peers>, limits: PushLimits) -> Arc<Self> {
        let (queue, rx) = mpsc::channel(PUSH_QUEUE);
        let owed = Arc::new(OwedNotices::default());
        tokio::spawn(Self::deliver(access_nodes, rx, owed.clone(), limits));
        Arc::new(Self { queue, owed })
    }

    /// Sorts queued pushes into per-node batches and hands each batch to
    /// that node's sender task; between batches, turns owed notices that
    /// are ready into batches of their own.
    async fn deliver(
        access_nodes: Arc<Peers>,
        mut rx: mpsc::Receiver<Queued>,
        owed: Arc<OwedNotices>,
        limits: PushLimits,
    ) {
        let mut senders = NodeSenders { access_nodes, owed: owed.clone(), limits, queues: HashMap::new() };
        let mut owed_check = tokio::time::interval(OWED_NOTICE_INTERVAL);
        owed_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                first = rx.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
                _ = owed_check.tick() => {
                    for (node, targets) in owed.take_ready() {
                        let items = targets.into_iter().map(owed_notice).collect();
                        senders.hand_over(node, NodeBatch { items, epoch: owed.epoch(), bytes: 0 });
                    }
                    continue;
                }
            };
            let mut batches: HashMap<String, NodeBatch> = HashMap::new();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(Queued { node, item, epoch }) = next.take() {
                let batch = batches.entry(node.clone()).or_insert_with(|| NodeBatch::new(epoch));
                batch.push(item, epoch);
                taken += 1;
                if batch.bytes >= MAX_BATCH_BYTES
                    && let Some(batch) = batches.remove(&node)
                {
                    senders.hand_over(node, batch);
                }
                if taken < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            for (node, batch) in batches {
                senders.hand_over(node, batch);
            }
        }
    }

    /// Sends one node's batches in order, those that queued up behind a
    /// call together in the next; ends once nothing was queued for
    /// [`SENDER_IDLE`].
    async fn send_to_node(
        access_nodes: Arc<Peers>,
        owed: Arc<OwedNotices>,
        node: String,
        queue: Arc<NodeQueue>,
    ) {
        let _close_on_exit = CloseOnExit { queue: queue.clone(), owed: owed.clone(), node: node.clone() };
        while let Some(batch) = queue.next_call().await {
            let channel = match access_nodes.node(&node, Dial::Internal) {
                Ok(Some(channel)) => channel,
                // Gone: its clients reconnect elsewhere and pull.
                _ => {
                    owed.forget_node(&node);
                    continue;
                }
            };
            let mut client = AccessPushClient::new(channel)
                .max_decoding_message_size(MAX_RPC_MESSAGE)
                .max_encoding_message_size(MAX_RPC_MESSAGE);
            let NodeBatch { items, epoch, .. } = batch;
            // A clone shares the message buffers; it is kept so that a
            // failed call can record the batch's connections.
            let request = PushBatch { items };
            let failure = match tokio::time::timeout(PUSH_CALL_TIMEOUT, client.push(request.clone())).await {
                Ok(Ok(_)) => continue,
                Ok(Err(status)) => format!("push batch failed: {status}"),
                Err(_) => "push batch timed out".to_owned(),
            };
            tracing::warn!(%node, pushes = request.items.len(), "{failure}; its connections will be told to pull");
            owed.record(&node, &request.items, epoch);
        }
    }
}

/// The per-node queues of the deliver loop, each with its sender task.
struct NodeSenders {
    access_nodes: Arc<Peers>,
    owed: Arc<OwedNotices>,
    limits: PushLimits,
    queues: HashMap<String, Arc<NodeQueue>>,
}

impl NodeSenders {
    /// Queues `batch` for `node`, starting its sender task if it has none;
    /// drops it if the node's queue is full (its connections are owed a
    /// SYNC notice).
    fn hand_over(&mut self, node: String, batch: NodeBatch) {
        self.queues.retain(|_, queue| !queue.is_closed());
        let mut batch = batch;
        loop {
            let queue = self.queues.entry(node.clone()).or_insert_with(|| {
                let queue = Arc::new(NodeQueue::new(self.limits));
                let (access_nodes, owed) = (self.access_nodes.clone(), self.owed.clone());
                tokio::spawn(RemotePushGateway::send_to_node(
                    access_nodes,
                    owed,
                    node.clone(),
                    queue.clone(),
                ));
                queue
            });
            match queue.offer(batch) {
                Ok(()) => return,
                Err(Refused::Full(refused)) => {
                    batch = refused;
                    break;
                }
                Err(Refused::Closed(refused)) => {
                    // Its sender ended since the retain above: start another.
                    self.queues.remove(&node);
                    batch = refused;
                }
            }
        }
        tracing::warn!(%node, pushes = batch.items.len(), "access node is not keeping up; push batch dropped (its connections will be told to pull)");
        self.owed.record(&node, &batch.items, batch.epoch);
    }
}

/// How long one push call to an access node may take.
const PUSH_CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn owed_notice(target: Target) -> PushItem {
    PushItem {
        user_id: target.user_id,
        device_id: target.device_id,
        connection_id: target.connection_id,
        msg_id: 0,
        message: Bytes::new(),
        sync_notice: Some(DROPPED_PUSHES_REASON.to_owned()),
    }
}

impl RemotePushGateway {
    /// Queues `item` for the node of `placement`; a full queue drops it and
    /// owes its connection a SYNC notice.
    fn enqueue(&self, placement: &Placement, item: PushItem) {
        let epoch = self.owed.epoch();
        let queued = Queued { node: placement.node_id.clone(), item, epoch };
        if let Err(e) = self.queue.try_send(queued) {
            let Queued { node, item, epoch } = e.into_inner();
            tracing::warn!(%node, "push queue full; push dropped (the connection will be told to pull)");
            self.owed.record(&node, [&item], epoch);
        }
    }
}

impl PushGateway for RemotePushGateway {
    fn push(&self, placement: &Placement, msg_id: u64, message: Bytes) {
        let item = PushItem {
            user_id: placement.user_id.clone(),
            device_id: placement.device_id.clone(),
            connection_id: placement.connection_id,
            msg_id,
            message,
            sync_notice: None,
        };
        self.enqueue(placement, item);
    }

    /// Goes through the same queue and batches as the pushes, so the node
    /// writes it to the connection in order with them.
    fn sync_notice(&self, placement: &Placement, reason: &str) {
        let item = PushItem {
            user_id: placement.user_id.clone(),
            device_id: placement.device_id.clone(),
            connection_id: placement.connection_id,
            msg_id: 0,
            message: Bytes::new(),
            sync_notice: Some(reason.to_owned()),
        };
        self.enqueue(placement, item);
    }

    fn batch_started(&self) -> u64 {
        self.owed.started.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn batch_pullable(&self, number: u64) {
        self.owed.pullable(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(user: &str, message: &'static [u8]) -> PushItem {
        PushItem {
            user_id: user.to_owned(),
            device_id: "phone".to_owned(),
            connection_id: 1,
            msg_id: 1,
            message: Bytes::from_static(message),
            sync_notice: None,
        }
    }

    fn batch(users: &[&str], epoch: u64) -> NodeBatch {
        let mut batch = NodeBatch::new(epoch);
        for user in users {
            batch.push(item(user, b"hello"), epoch);
        }
        batch
    }

    fn users(batch: &NodeBatch) -> Vec<&str> {
        batch.items.iter().map(|i| i.user_id.as_str()).collect()
    }

    #[tokio::test]
    async fn batches_waiting_behind_a_call_go_out_together_in_order() {
        let queue = NodeQueue::new(PushLimits::default());
        assert!(queue.offer(batch(&["a"], 1)).is_ok());
        assert!(queue.offer(batch(&["b", "c"], 3)).is_ok());
        assert!(queue.offer(batch(&["d"], 2)).is_ok());
        let call = queue.next_call().await.unwrap();
        assert_eq!((users(&call), call.epoch), (vec!["a", "b", "c", "d"], 3));
        let counted = |queue: &NodeQueue| {
            let waiting = queue.lock();
            (waiting.items, waiting.bytes)
        };
        assert_eq!(counted(&queue), (0, 0));

        // A call stops at MAX_CALL_ITEMS; the rest waits for the next.
        let many = vec!["x"; MAX_CALL_ITEMS];
        assert!(queue.offer(batch(&many, 4)).is_ok());
        assert!(queue.offer(batch(&["y"], 5)).is_ok());
        assert_eq!(queue.next_call().await.unwrap().items.len(), MAX_CALL_ITEMS);
        assert_eq!(users(&queue.next_call().await.unwrap()), ["y"]);
    }

    #[test]
    fn a_full_queue_refuses_a_batch_and_an_empty_one_takes_any() {
        let queue = NodeQueue::new(PushLimits { node_queue_items: 3, node_queue_bytes: 12 });
        assert!(queue.offer(batch(&["a", "b", "c", "d"], 1)).is_ok(), "empty: taken whatever its size");
        assert!(matches!(queue.offer(batch(&["e"], 1)), Err(Refused::Full(_))), "items");
        queue.close();
        let queue = NodeQueue::new(PushLimits { node_queue_items: 100, node_queue_bytes: 12 });
        assert!(queue.offer(batch(&["a", "b"], 1)).is_ok());
        assert!(matches!(queue.offer(batch(&["c"], 1)), Err(Refused::Full(_))), "15 bytes > 12");
        assert!(
            queue.offer(NodeBatch { items: vec![item("n", b"")], epoch: 1, bytes: 0 }).is_ok(),
            "a notice has none"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_queue_closes_and_refuses_batches_then() {
        let queue = NodeQueue::new(PushLimits::default());
        let started = tokio::time::Instant::now();
        assert!(queue.next_call().await.is_none());
        assert!(started.elapsed() >= SENDER_IDLE);
        assert!(queue.is_closed());
        assert!(matches!(queue.offer(batch(&["a"], 1)), Err(Refused::Closed(_))));
    }

    #[tokio::test]
    async fn a_sender_that_ends_closes_its_queue_and_owes_what_it_left() {
        let queue = Arc::new(NodeQueue::new(PushLimits::default()));
        let owed = Arc::new(OwedNotices::default());
        assert!(queue.offer(batch(&["a", "b"], 1)).is_ok());
        drop(CloseOnExit { queue: queue.clone(), owed: owed.clone(), node: "access-1".to_owned() });
        assert!(queue.is_closed());
        owed.pullable(1);
        let ready = owed.take_ready();
        let mut owed_users: Vec<&str> = ready[0].1.iter().map(|t| t.user_id.as_str()).collect();
        owed_users.sort();
        assert_eq!((ready.len(), ready[0].0.as_str(), owed_users), (1, "access-1", vec!["a", "b"]));
    }

    #[test]
    fn batches_count_as_pullable_only_once_every_earlier_one_is() {
        let owed = OwedNotices::default();
        let upto = |owed: &OwedNotices| owed.pullable_upto.load(Ordering::Acquire);
        owed.pullable(2);
        owed.pullable(4);
        assert_eq!(upto(&owed), 0, "batch 1 is still under way");
        owed.pullable(1);
        assert_eq!(upto(&owed), 2);
        owed.pullable(3);
        assert_eq!(upto(&owed), 4);
        owed.pullable(3);
        assert_eq!(upto(&owed), 4, "a repeated report changes nothing");
    }
}
