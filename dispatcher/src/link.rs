//! The access-node ↔ dispatcher link of cluster mode.
//!
//! Every access node keeps one bidirectional gRPC stream (`Dispatcher.Link`)
//! to every live dispatcher: it sends a register message first, then a
//! heartbeat every [`HEARTBEAT`] (skipped while the link's queue is full:
//! traffic is flowing then); either side drops a link on which nothing
//! arrived for [`LINK_IDLE`]. Requests travel as client frames (request type
//! and body of the public protocol) on behalf of an authenticated user.
//!
//! [`DispatcherLinks`] is the access node's side and implements
//! [`DispatchService`]: it routes every request by rendezvous (highest random
//! weight) hashing of its conversation key over the live links, so one
//! dispatcher serves a group or a 1:1 conversation while the dispatcher set
//! is stable, and only the conversations of a dispatcher that leaves move.
//! [`LinkServer`] is the dispatcher's side.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use prost::Message as _;
use tern_proto::pb;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::dispatcher_client::DispatcherClient;
use tern_proto::rpc::internal::dispatcher_server::{self, DispatcherServer};
use tern_proto::rpc::internal::{
    LinkDown, LinkHeartbeat, LinkRegister, LinkRequest, LinkResponse, LinkUp, link_down, link_up,
};
use tern_proto::{
    ErrorCode, RequestType, ServiceError, ServiceResult, group_conversation_key, single_conversation_key,
};
use tern_store::NodeInfo;
use tern_store::discovery::{self, Peers};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::DispatchService;

/// Registry role name of dispatchers.
pub const DISPATCHER_ROLE: &str = "dispatcher";
/// Heartbeat interval on a link, both directions.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A link with no traffic for this long is dropped.
pub const LINK_IDLE: Duration = Duration::from_secs(30);
/// How long a request waits for its response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ErrorCode::Unavailable, message)
}

fn decode<M: prost::Message + Default>(kind: RequestType, body: &[u8]) -> ServiceResult<M> {
    M::decode(body)
        .map_err(|e| ServiceError::new(ErrorCode::BadBody, format!("body of {kind:?} does not decode: {e}")))
}

/// Runs one linked request against the local dispatcher.
async fn serve_request(dispatch: &dyn DispatchService, request: LinkRequest) -> LinkResponse {
    let user = request.user_id.as_str();
    let device = request.device_id.as_str();
    let body = request.body.as_slice();
    let result: ServiceResult<(RequestType, Vec<u8>)> = async {
        let kind = RequestType::from_u32(request.request_type).ok_or_else(|| {
            ServiceError::new(ErrorCode::UnknownRequestType, format!("requestType {}", request.request_type))
        })?;
        let encoded = match kind {
            RequestType::SendSingle => {
                dispatch.send_single(user, device, decode(kind, body)?).await?.encode_to_vec()
            }
            RequestType::SendGroup => {
                dispatch.send_group(user, device, decode(kind, body)?).await?.encode_to_vec()
            }
            RequestType::CreateGroup => {
                dispatch.create_group(user, decode(kind, body)?).await?.encode_to_vec()
            }
            RequestType::JoinGroup | RequestType::LeaveGroup | RequestType::GroupMembers => {
                let req: pb::GroupRequest = decode(kind, body)?;
                let info = match kind {
                    RequestType::JoinGroup => dispatch.join_group(user, &req.group_id).await?,
                    RequestType::LeaveGroup => dispatch.leave_group(user, &req.group_id).await?,
                    _ => dispatch.group_members(user, &req.group_id).await?,
                };
                info.encode_to_vec()
            }
            RequestType::ListGroups => {
                pb::ListGroupsResponse { groups: dispatch.list_groups(user).await? }.encode_to_vec()
            }
            other => {
                return Err(ServiceError::new(
                    ErrorCode::UnknownRequestType,
                    format!("{other:?} is not a dispatcher request"),
                ));
            }
        };
        Ok((kind, encoded))
    }
    .await;
    match result {
        Ok((kind, body)) => LinkResponse { id: request.id, request_type: kind as u32, body },
        Err(e) => LinkResponse {
            id: request.id,
            request_type: RequestType::Error as u32,
            body: e.to_body().encode_to_vec(),
        },
    }
}

/// The dispatcher's side of the links.
pub struct LinkServer {
    dispatch: Arc<dyn DispatchService>,
    /// Access nodes linked right now, with the time of their last frame.
    linked: Arc<Mutex<HashMap<String, Instant>>>,
    /// Ends every link: a gRPC server's graceful shutdown waits for open
    /// streams, and links never end on their own.
    closing: tokio_util::sync::CancellationToken,
}

impl LinkServer {
    /// Links end when `closing` is cancelled (the dispatcher is stopping,
    /// after it has left the registry and access nodes have moved away).
    pub fn new(dispatch: Arc<dyn DispatchService>, closing: tokio_util::sync::CancellationToken) -> Self {
        Self { dispatch, linked: Arc::default(), closing }
    }

    /// Ids of the access nodes linked to this dispatcher.
    pub fn linked_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> =
            self.linked.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    pub fn into_service(self) -> DispatcherServer<Self> {
        DispatcherServer::new(self)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE)
    }
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<LinkDown, Status>> + Send>>;

#[async_trait]
impl dispatcher_server::Dispatcher for LinkServer {
    type LinkStream = LinkStream;

    async fn link(&self, request: Request<Streaming<LinkUp>>) -> Result<Response<LinkStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<LinkDown, Status>>(1024);
        let dispatch = self.dispatch.clone();
        let linked = self.linked.clone();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let mut node_id: Option<String> = None;
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            let mut idle_deadline = tokio::time::Instant::now() + LINK_IDLE;
            loop {
                let next = tokio::select! {
                    _ = closing.cancelled() => break,
                    _ = heartbeat.tick() => {
                        let beat = LinkDown { kind: Some(link_down::Kind::Heartbeat(LinkHeartbeat {})) };
                        if !queue_heartbeat(&tx, Ok(beat)) {
                            break;
                        }
                        continue;
                    }
                    next = tokio::time::timeout_at(idle_deadline, inbound.message()) => next,
                };
                idle_deadline = tokio::time::Instant::now() + LINK_IDLE;
                let up = match next {
                    Err(_) => {
                        tracing::warn!(node = ?node_id, "link idle for 30 s; dropping it");
                        break;
                    }
                    Ok(Ok(Some(up))) => up,
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                };
                if let Some(node) = &node_id {
                    linked.lock().unwrap_or_else(|e| e.into_inner()).insert(node.clone(), Instant::now());
                }
                match up.kind {
                    Some(link_up::Kind::Register(LinkRegister { node_id: id })) => {
                        tracing::info!(node = %id, "access node linked");
                        linked.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), Instant::now());
                        node_id = Some(id);
                    }
                    Some(link_up::Kind::Heartbeat(_)) | None => {}
                    Some(link_up::Kind::Request(request)) => {
                        let dispatch = dispatch.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let response = serve_request(&*dispatch, request).await;
                            let _ = tx
                                .send(Ok(LinkDown { kind: Some(link_down::Kind::Response(response)) }))
                                .await;
                        });
                    }
                }
            }
            if let Some(node) = node_id {
                tracing::info!(%node, "access node unlinked");
                linked.lock().unwrap_or_else(|e| e.into_inner()).remove(&node);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Queues a heartbeat on a link's outgoing queue without waiting; returns
/// whether the link is still open. A full queue means traffic is flowing
/// (which keeps the other side's idle timer reset), so the beat is skipped.
/// Waiting for room instead could deadlock a busy link: each side's loop,
/// blocked on its own heartbeat, would stop reading what the other sends.
fn queue_heartbeat<T>(queue: &mpsc::Sender<T>, beat: T) -> bool {
    !matches!(queue.try_send(beat), Err(mpsc::error::TrySendError::Closed(_)))
}

/// Rendezvous hashing: the node with the highest weight for `key` wins.
pub fn pick_node<'a>(key: &str, node_ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    node_ids.into_iter().max_by_key(|id| (tern_proto::rendezvous_weight(key, id), *id))
}

/// One live link from this access node to a dispatcher.
struct Link {
    up: mpsc::Sender<LinkUp>,
    pending: Mutex<HashMap<u64, oneshot::Sender<LinkResponse>>>,
    next_id: AtomicU64,
    alive: AtomicBool,
}

impl Link {
    fn fail_pending(&self) {
        self.alive.store(false, Ordering::SeqCst);
        // Dropping the senders fails every waiting request with UNAVAILABLE.
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Removes a link from the table when dropped.
struct Unlink<'a> {
    links: &'a DispatcherLinks,
    node_id: &'a str,
    link: &'a Arc<Link>,
}

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        self.link.fail_pending();
        let mut links = self.links.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(self.node_id).is_some_and(|l| Arc::ptr_eq(l, self.link)) {
            links.remove(self.node_id);
        }
        drop(links);
        self.links.changed.notify_waiters();
    }
}

/// The access node's side: links to every live dispatcher, and
/// [`DispatchService`] routed over them.
pub struct DispatcherLinks {
    node_id: String,
    links: Mutex<BTreeMap<String, Arc<Link>>>,
    changed: tokio::sync::Notify,
}

impl DispatcherLinks {
    /// Starts linking to the dispatchers `peers` follows; links come and go
    /// with the registry.
    pub fn start(node_id: impl Into<String>, peers: Arc<Peers>) -> Arc<Self> {
        let links =
            Arc::new(Self { node_id: node_id.into(), links: Mutex::default(), changed: Default::default() });
        tokio::spawn(Self::manage(Arc::downgrade(&links), peers));
        links
    }

    /// Dispatchers currently linked.
    pub fn linked(&self) -> Vec<String> {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Keeps one connect loop per registered dispatcher.
    async fn manage(this: std::sync::Weak<Self>, peers: Arc<Peers>) {
        let mut watched = peers.subscribe();
        // Keyed by node id and address: a dispatcher that comes back under
        // the same id at a new address gets a new connect loop.
        let mut running: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let nodes: Vec<NodeInfo> = watched.borrow_and_update().clone();
            let listed = |id: &str, addr: &str| nodes.iter().any(|n| n.node_id == id && n.addr == addr);
            let mut departed = Vec::new();
            running.retain(|(id, addr), task| {
                let keep = listed(id, addr) && !task.is_finished();
                if !keep {
                    departed.push((id.clone(), task.abort_handle()));
                }
                keep
            });
            let Some(links) = this.upgrade() else { return };
            for (id, task) in departed {
                // No new requests go to a dispatcher that left the registry;
                // those in flight may still finish (a stopping dispatcher
                // serves them before it closes its links). Then the loop is
                // stopped, which ends the link if it is still open.
                if let Some(link) = links.links.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                    link.alive.store(false, Ordering::SeqCst);
                }
                tokio::spawn(async move {
                    tokio::time::sleep(REQUEST_TIMEOUT).await;
                    task.abort();
                });
            }
            links.changed.notify_waiters();
            drop(links);
            for node in nodes {
                let key = (node.node_id.clone(), node.addr.clone());
                running.entry(key).or_insert_with(|| tokio::spawn(Self::connect_loop(this.clone(), node)));
            }
            if watched.changed().await.is_err() {
                return;
            }
        }
    }

    /// Links to one dispatcher again and again while it is registered.
    async fn connect_loop(this: std::sync::Weak<Self>, node: NodeInfo) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(links) = this.upgrade() else { return };
            match links.connect(&node).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(dispatcher = %node.node_id, error = %e, "link failed");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            drop(links);
            tokio::time::sleep(backoff).await;
        }
    }

    /// Runs one link until it breaks.
    async fn connect(&self, node: &NodeInfo) -> Result<(), String> {
        let channel = discovery::channel(&node.addr).map_err(|e| e.to_string())?;
        let (up_tx, up_rx) = mpsc::channel::<LinkUp>(1024);
        let register =
            LinkUp { kind: Some(link_up::Kind::Register(LinkRegister { node_id: self.node_id.clone() })) };
        up_tx.send(register).await.map_err(|e| e.to_string())?;
        let mut client = DispatcherClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        let mut inbound =
            client.link(ReceiverStream::new(up_rx)).await.map_err(|e| e.to_string())?.into_inner();
        let link = Arc::new(Link {
            up: up_tx.clone(),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        });
        self.links.lock().unwrap_or_else(|e| e.into_inner()).insert(node.node_id.clone(), link.clone());
        self.changed.notify_waiters();
        tracing::info!(dispatcher = %node.node_id, "linked");
        // However this function ends — the link breaks, or the connect loop
        // is aborted — the link leaves the table and its waiters fail.
        let _unlink = Unlink { links: self, node_id: &node.node_id, link: &link };

        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        // Moves only when something arrives: heartbeats we send do not count.
        let mut idle_deadline = tokio::time::Instant::now() + LINK_IDLE;
        loop {
            let next = tokio::select! {
                _ = heartbeat.tick() => {
                    let beat = LinkUp { kind: Some(link_up::Kind::Heartbeat(LinkHeartbeat {})) };
                    if !queue_heartbeat(&up_tx, beat) {
                        break Err("link closed".to_owned());
                    }
                    continue;
                }
                next = tokio::time::timeout_at(idle_deadline, inbound.message()) => next,
            };
            idle_deadline = tokio::time::Instant::now() + LINK_IDLE;
            match next {
                Err(_) => break Err("idle for 30 s".to_owned()),
                Ok(Ok(Some(LinkDown { kind: Some(link_down::Kind::Response(response)) }))) => {
                    let waiter = link.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&response.id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(response);
                    }
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => break Err("dispatcher closed the link".to_owned()),
                Ok(Err(status)) => break Err(status.to_string()),
            }
        }
    }

    /// The link that owns `key`, waiting briefly for one to exist (at start,
    /// or while a failed dispatcher's links are re-established).
    async fn route(&self, key: &str) -> ServiceResult<(String, Arc<Link>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.changed.notified();
            {
                let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
                let alive = links.iter().filter(|(_, l)| l.alive.load(Ordering::SeqCst));
                let ids: Vec<&str> = alive.map(|(id, _)| id.as_str()).collect();
                if let Some(id) = pick_node(key, ids) {
                    return Ok((id.to_owned(), links[id].clone()));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(unavailable("no dispatcher is linked"));
            }
        }
    }

    /// `(user, device)`: who the request is for; the device matters only
    /// for sends.
    async fn call<M: prost::Message + Default>(
        &self,
        key: &str,
        (user, device): (&str, &str),
        kind: RequestType,
        body: Vec<u8>,
    ) -> ServiceResult<M> {
        let (dispatcher, link) = self.route(key).await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let request = LinkRequest {
            id,
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            request_type: kind as u32,
            body,
        };
        // One deadline for queueing the request and for its answer: a link
        // whose queue stays full (the dispatcher is not reading) fails the
        // request in time instead of holding its caller.
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let queued = tokio::time::timeout_at(
            deadline,
            link.up.send(LinkUp { kind: Some(link_up::Kind::Request(request)) }),
        )
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            link.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(unavailable(match queued {
                Err(_) => format!("link to {dispatcher} did not take the request in time"),
                _ => format!("link to {dispatcher} is down"),
            }));
        }
        let response = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return Err(unavailable(format!("link to {dispatcher} broke"))),
            Err(_) => {
                link.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                return Err(unavailable(format!("{dispatcher} did not answer in time")));
            }
        };
        if response.request_type == RequestType::Error as u32 {
            let body = pb::ErrorBody::decode(response.body.as_slice()).unwrap_or_default();
            let code = ErrorCode::from_u32(body.code).unwrap_or(ErrorCode::Internal);
            return Err(ServiceError::new(code, body.message));
        }
        M::decode(Bytes::from(response.body))
            .map_err(|e| ServiceError::internal(format!("undecodable response from {dispatcher}: {e}")))
    }
}

#[async_trait]
impl DispatchService for DispatcherLinks {
    async fn send_single(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendSingleRequest,
    ) -> ServiceResult<pb::SendAck> {
        let key = single_conversation_key(sender, &req.receiver);
        self.call(&key, (sender, device), RequestType::SendSingle, req.encode_to_vec()).await
    }

    async fn send_group(
        &self,
        sender: &str,
        device: &str,
        req: pb::SendGroupRequest,
    ) -> ServiceResult<pb::SendAck> {
        let key = group_conversation_key(&req.group_id);
        self.call(&key, (sender, device), RequestType::SendGroup, req.encode_to_vec()).await
    }

    async fn create_group(&self, creator: &str, req: pb::CreateGroupRequest) -> ServiceResult<pb::GroupInfo> {
        let key =
            if req.group_id.is_empty() { creator.to_owned() } else { group_conversation_key(&req.group_id) };
        self.call(&key, (creator, ""), RequestType::CreateGroup, req.encode_to_vec()).await
    }

    async fn join_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let body = pb::GroupRequest { group_id: group_id.to_owned() }.encode_to_vec();
        self.call(&group_conversation_key(group_id), (user, ""), RequestType::JoinGroup, body).await
    }

    async fn leave_group(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let body = pb::GroupRequest { group_id: group_id.to_owned() }.encode_to_vec();
        self.call(&group_conversation_key(group_id), (user, ""), RequestType::LeaveGroup, body).await
    }

    async fn group_members(&self, user: &str, group_id: &str) -> ServiceResult<pb::GroupInfo> {
        let body = pb::GroupRequest { group_id: group_id.to_owned() }.encode_to_vec();
        self.call(&group_conversation_key(group_id), (user, ""), RequestType::GroupMembers, body).await
    }

    async fn list_groups(&self, user: &str) -> ServiceResult<Vec<pb::GroupInfo>> {
        let response: pb::ListGroupsResponse =
            self.call(user, (user, ""), RequestType::ListGroups, pb::Empty {}.encode_to_vec()).await?;
        Ok(response.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_never_waits_for_room() {
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        assert!(queue_heartbeat(&tx, 1));
        // Full: skipped at once, the link still counts as open.
        assert!(queue_heartbeat(&tx, 2));
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(rx.try_recv().is_err(), "the beat that found the queue full was dropped");
        drop(rx);
        assert!(!queue_heartbeat(&tx, 3), "a closed link is reported");
    }

    /// A link whose dispatcher stopped reading (its queue stays full) fails
    /// a request with UNAVAILABLE after the request timeout, and forgets it.
    #[tokio::test(start_paused = true)]
    async fn a_request_on_a_congested_link_fails_in_time() {
        let (up, _never_read) = mpsc::channel::<LinkUp>(1);
        up.try_send(LinkUp { kind: Some(link_up::Kind::Heartbeat(LinkHeartbeat {})) }).unwrap();
        let link = Arc::new(Link {
            up,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        });
        let links = DispatcherLinks {
            node_id: "access-x".into(),
            links: Mutex::new(BTreeMap::from([("d1".to_owned(), link.clone())])),
            changed: Default::default(),
        };
        let started = tokio::time::Instant::now();
        let req =
            pb::SendSingleRequest { client_msg_id: "c".into(), receiver: "bob".into(), ..Default::default() };
        let err = links.send_single("alice", "phone", req).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
        assert!(err.message.contains("did not take the request in time"), "{err}");
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
        assert!(link.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_leavers_keys() {
        let nodes = ["d1", "d2", "d3"];
        let keys: Vec<String> = (0..1000).map(|i| format!("g:group-{i}")).collect();
        let before: Vec<&str> = keys.iter().map(|k| pick_node(k, nodes).unwrap()).collect();
        // Same answer every time, and every node gets a share.
        for (k, owner) in keys.iter().zip(&before) {
            assert_eq!(pick_node(k, nodes), Some(*owner));
        }
        for n in nodes {
            let share = before.iter().filter(|o| **o == n).count();
            assert!(share > 200, "{n} owns only {share} of 1000 keys");
        }
        // d2 leaves: only its keys move.
        let after: Vec<&str> = keys.iter().map(|k| pick_node(k, ["d1", "d3"]).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "d2" {
                assert_eq!(b, a, "a key moved although its dispatcher stayed");
            }
        }
        assert_eq!(pick_node("k", std::iter::empty()), None);
    }
}
