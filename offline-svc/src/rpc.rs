//! offline-svc over gRPC: the server adapter for [`OfflineApi`], the client
//! access nodes use, and [`RemotePushGateway`], which delivers pushes to the
//! access node holding each connection.

use std::collections::{BTreeSet, HashMap};
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
/// failed) is not retried: the message is in the offline store. Instead its
/// connection is remembered, and once the consumer has stored the batch of
/// the dropped push and every batch before it ([`PushGateway::batch_stored`]), it gets
/// one NOTICE SYNC and pulls what it missed. Waiting for the store matters:
/// pushes go out before the offline write, and a pull that ran ahead of the
/// write would find nothing and never be repeated.
pub struct RemotePushGateway {
    queue: mpsc::Sender<Queued>,
    owed: Arc<OwedNotices>,
}

/// Pushes waiting to be sent; a push finding the queue full is dropped.
const PUSH_QUEUE: usize = 65_536;
/// Most pushes and bytes in one batch to one access node.
const MAX_BATCH: usize = 1_024;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches queued per access node; a batch finding the queue full is
/// dropped and its connections are told to pull.
const NODE_QUEUE: usize = 64;
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

/// A batch for one access node; `epoch` is the newest epoch among its items.
struct NodeBatch {
    items: Vec<PushItem>,
    epoch: u64,
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
/// and every one before it are stored (`stored_upto`).
#[derive(Default)]
struct OwedNotices {
    started: AtomicU64,
    /// Every batch up to this number is stored.
    stored_upto: AtomicU64,
    /// Batches reported stored above `stored_upto` (they finished out of
    /// order).
    stored_above: Mutex<BTreeSet<u64>>,
    by_node: Mutex<HashMap<String, HashMap<Target, u64>>>,
}

impl OwedNotices {
    /// The batch being pushed now.
    fn epoch(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn stored(&self, number: u64) {
        let mut above = self.stored_above.lock().unwrap_or_else(|e| e.into_inner());
        let mut upto = self.stored_upto.load(Ordering::Acquire);
        if number <= upto {
            return;
        }
        above.insert(number);
        while above.remove(&(upto + 1)) {
            upto += 1;
        }
        self.stored_upto.store(upto, Ordering::Release);
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

    /// Takes, per node, the connections whose dropped messages are all
    /// stored now.
    fn take_ready(&self) -> Vec<(String, Vec<Target>)> {
        let stored = self.stored_upto.load(Ordering::Acquire);
        let mut by_node = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
        let mut ready = Vec::new();
        for (node, owed) in by_node.iter_mut() {
            let mut targets = Vec::new();
            owed.retain(|target, epoch| {
                let keep = *epoch > stored;
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
        let (queue, rx) = mpsc::channel(PUSH_QUEUE);
        let owed = Arc::new(OwedNotices::default());
        tokio::spawn(Self::deliver(access_nodes, rx, owed.clone()));
        Arc::new(Self { queue, owed })
    }

    /// Sorts queued pushes into per-node batches and hands each batch to
    /// that node's sender task; between batches, turns owed notices that
    /// are ready into batches of their own.
    async fn deliver(access_nodes: Arc<Peers>, mut rx: mpsc::Receiver<Queued>, owed: Arc<OwedNotices>) {
        let mut senders: HashMap<String, mpsc::Sender<NodeBatch>> = HashMap::new();
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
                        let batch = NodeBatch { items, epoch: owed.epoch() };
                        Self::hand_over(&access_nodes, &owed, &mut senders, node, batch);
                    }
                    continue;
                }
            };
            let mut batches: HashMap<String, (NodeBatch, usize)> = HashMap::new();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(Queued { node, item, epoch }) = next.take() {
                let (batch, bytes) = batches
                    .entry(node.clone())
                    .or_insert_with(|| (NodeBatch { items: Vec::new(), epoch }, 0));
                *bytes += item.message.len();
                batch.items.push(item);
                batch.epoch = batch.epoch.max(epoch);
                taken += 1;
                if *bytes >= MAX_BATCH_BYTES
                    && let Some((batch, _)) = batches.remove(&node)
                {
                    Self::hand_over(&access_nodes, &owed, &mut senders, node, batch);
                }
                if taken < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            for (node, (batch, _)) in batches {
                Self::hand_over(&access_nodes, &owed, &mut senders, node, batch);
            }
        }
    }

    fn hand_over(
        access_nodes: &Arc<Peers>,
        owed: &Arc<OwedNotices>,
        senders: &mut HashMap<String, mpsc::Sender<NodeBatch>>,
        node: String,
        batch: NodeBatch,
    ) {
        senders.retain(|_, tx| !tx.is_closed());
        let tx = senders.entry(node.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(NODE_QUEUE);
            tokio::spawn(Self::send_to_node(access_nodes.clone(), owed.clone(), node.clone(), rx));
            tx
        });
        if let Err(e) = tx.try_send(batch) {
            let batch = e.into_inner();
            tracing::warn!(%node, pushes = batch.items.len(), "access node is not keeping up; push batch dropped (its connections will be told to pull)");
            owed.record(&node, &batch.items, batch.epoch);
        }
    }

    /// Sends one node's batches in order; ends when the node has been gone
    /// from the registry for a while and nothing is queued for it.
    async fn send_to_node(
        access_nodes: Arc<Peers>,
        owed: Arc<OwedNotices>,
        node: String,
        mut batches: mpsc::Receiver<NodeBatch>,
    ) {
        while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(60), batches.recv()).await {
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
            let NodeBatch { items, epoch } = batch;
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

    fn batch_stored(&self, number: u64) {
        self.owed.stored(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_count_as_stored_only_once_every_earlier_one_is() {
        let owed = OwedNotices::default();
        let upto = |owed: &OwedNotices| owed.stored_upto.load(Ordering::Acquire);
        owed.stored(2);
        owed.stored(4);
        assert_eq!(upto(&owed), 0, "batch 1 is still under way");
        owed.stored(1);
        assert_eq!(upto(&owed), 2);
        owed.stored(3);
        assert_eq!(upto(&owed), 4);
        owed.stored(3);
        assert_eq!(upto(&owed), 4, "a repeated report changes nothing");
    }
}
