//! offline-svc over gRPC: the server adapter for [`OfflineApi`], the client
//! access nodes use, and [`RemotePushGateway`], which delivers pushes to the
//! access node holding each connection.

use std::collections::HashMap;
use std::sync::Arc;
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
/// slow or dead node does not hold up the others. A push that cannot be
/// delivered is dropped: the message stays in the offline store and the
/// client gets it at its next pull (SYNC notice or reconnect). SYNC notices
/// travel as items of the same batches.
pub struct RemotePushGateway {
    queue: mpsc::Sender<(String, PushItem)>,
}

/// Pushes waiting to be sent; a push finding the queue full is dropped.
const PUSH_QUEUE: usize = 65_536;
/// Most pushes and bytes in one batch to one access node.
const MAX_BATCH: usize = 1_024;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches in flight per access node before the sender waits.
const NODE_QUEUE: usize = 64;

impl RemotePushGateway {
    /// `access_nodes` follows the access-node role (pushes go to their
    /// internal address).
    pub fn start(access_nodes: Arc<Peers>) -> Arc<Self> {
        let (queue, rx) = mpsc::channel(PUSH_QUEUE);
        tokio::spawn(Self::deliver(access_nodes, rx));
        Arc::new(Self { queue })
    }

    /// Sorts queued pushes into per-node batches and hands each batch to
    /// that node's sender task.
    async fn deliver(access_nodes: Arc<Peers>, mut rx: mpsc::Receiver<(String, PushItem)>) {
        let mut senders: HashMap<String, mpsc::Sender<PushBatch>> = HashMap::new();
        while let Some(first) = rx.recv().await {
            let mut batches: HashMap<String, (Vec<PushItem>, usize)> = HashMap::new();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some((node, item)) = next.take() {
                let (items, bytes) = batches.entry(node.clone()).or_default();
                *bytes += item.message.len();
                items.push(item);
                taken += 1;
                if *bytes >= MAX_BATCH_BYTES {
                    let (items, _) = batches.remove(&node).unwrap_or_default();
                    Self::hand_over(&access_nodes, &mut senders, node, items).await;
                }
                if taken < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            for (node, (items, _)) in batches {
                Self::hand_over(&access_nodes, &mut senders, node, items).await;
            }
        }
    }

    async fn hand_over(
        access_nodes: &Arc<Peers>,
        senders: &mut HashMap<String, mpsc::Sender<PushBatch>>,
        node: String,
        items: Vec<PushItem>,
    ) {
        senders.retain(|_, tx| !tx.is_closed());
        let tx = senders.entry(node.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(NODE_QUEUE);
            tokio::spawn(Self::send_to_node(access_nodes.clone(), node.clone(), rx));
            tx
        });
        if tx.try_send(PushBatch { items }).is_err() {
            tracing::warn!(%node, "access node is not keeping up; push batch dropped (messages stay offline)");
        }
    }

    /// Sends one node's batches in order; ends when the node has been gone
    /// from the registry for a while and nothing is queued for it.
    async fn send_to_node(access_nodes: Arc<Peers>, node: String, mut batches: mpsc::Receiver<PushBatch>) {
        while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(60), batches.recv()).await {
            let channel = match access_nodes.node(&node, Dial::Internal) {
                Ok(Some(channel)) => channel,
                // Gone: its clients reconnect elsewhere and pull.
                _ => continue,
            };
            let mut client = AccessPushClient::new(channel)
                .max_decoding_message_size(MAX_RPC_MESSAGE)
                .max_encoding_message_size(MAX_RPC_MESSAGE);
            match tokio::time::timeout(Duration::from_secs(5), client.push(batch)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => tracing::warn!(%node, %status, "push batch failed"),
                Err(_) => tracing::warn!(%node, "push batch timed out"),
            }
        }
    }
}

impl RemotePushGateway {
    /// Queues `item` for the node of `placement`; a full queue drops it.
    fn enqueue(&self, placement: &Placement, item: PushItem) {
        if self.queue.try_send((placement.node_id.clone(), item)).is_err() {
            tracing::warn!("push queue full; push dropped (the message stays offline)");
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
            message: message.to_vec(),
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
            message: Vec::new(),
            sync_notice: Some(reason.to_owned()),
        };
        self.enqueue(placement, item);
    }
}
