//! `RemotePushGateway` in cluster mode: pushes and SYNC notices reach the
//! access node's `AccessPush` endpoint in the order they were handed over,
//! and a connection whose pushes were dropped is told to pull once a pull
//! finds the dropped messages.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tern_offline_svc::rpc::{PushLimits, RemotePushGateway};
use tern_offline_svc::{Holding, OfflineApi, OfflineConfig, OfflineService, PushGateway};
use tern_proto::BusNames;
use tern_proto::rpc::internal::access_push_server::{AccessPush, AccessPushServer};
use tern_proto::rpc::internal::{Empty, KickRequest, PushBatch, PushItem};
use tern_store::discovery::Peers;
use tern_store::embedded::{EmbeddedBackends, InProcessRegistry};
use tern_store::{Bus, MetaStore, NodeInfo, OfflineStore, Placement, Registry, SessionStore};
use tonic::{Request, Response, Status};

mod common;
use common::{consumer_backends, envelope, start_consumer};

/// An access node's push endpoint that records what it receives. While
/// the test holds `busy` for writing, every push call waits.
#[derive(Clone, Default)]
struct FakeAccessNode {
    received: Arc<Mutex<Vec<PushItem>>>,
    calls: Arc<AtomicUsize>,
    busy: Arc<tokio::sync::RwLock<()>>,
}

impl FakeAccessNode {
    /// The users the node has received a push or notice for, once that is
    /// every one of `expected` or after 10 s.
    async fn users_reached(&self, expected: &BTreeSet<String>) -> BTreeSet<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let reached: BTreeSet<String> =
                self.received.lock().unwrap().iter().map(|i| i.user_id.clone()).collect();
            if &reached == expected || tokio::time::Instant::now() > deadline {
                return reached;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl AccessPush for FakeAccessNode {
    async fn push(&self, request: Request<PushBatch>) -> Result<Response<Empty>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _not_busy = self.busy.read().await;
        self.received.lock().unwrap().extend(request.into_inner().items);
        Ok(Response::new(Empty {}))
    }

    async fn kick(&self, _request: Request<KickRequest>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }
}

/// Serves `node` on a loopback port and registers it as access node
/// "access-1"; returns the server task.
async fn serve(node: &FakeAccessNode, registry: &InProcessRegistry) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(AccessPushServer::new(node.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(async move { server.await.unwrap() });
    let info = NodeInfo {
        node_id: "access-1".into(),
        role: "access-tcp".into(),
        addr: "127.0.0.1:1".into(),
        internal_addr: addr.to_string(),
        connections: 0,
    };
    registry.register(&info).await.unwrap();
    server
}

fn placement(user: &str, connection_id: u64) -> Placement {
    Placement { user_id: user.into(), device_id: "phone".into(), node_id: "access-1".into(), connection_id }
}

#[tokio::test]
async fn sync_notices_travel_in_order_with_pushes() {
    let node = FakeAccessNode::default();
    let registry = InProcessRegistry::new();
    let server = serve(&node, &registry).await;
    let gateway = RemotePushGateway::start(Peers::follow(&registry, "access-tcp").await.unwrap());
    let bob = placement("bob", 7);
    gateway.push(&bob, 1, Bytes::from_static(b"one"));
    gateway.sync_notice(&bob, "30 new messages in group g1; pull");
    gateway.push(&bob, 2, Bytes::from_static(b"two"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.received.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let items = node.received.lock().unwrap().clone();
    let seen: Vec<(u64, Vec<u8>, Option<String>)> =
        items.iter().map(|i| (i.msg_id, i.message.to_vec(), i.sync_notice.clone())).collect();
    assert_eq!(
        seen,
        [
            (1, b"one".to_vec(), None),
            (0, Vec::new(), Some("30 new messages in group g1; pull".to_owned())),
            (2, b"two".to_vec(), None),
        ]
    );
    assert!(
        items
            .iter()
            .all(|i| (i.user_id.as_str(), i.device_id.as_str(), i.connection_id) == ("bob", "phone", 7))
    );
    server.abort();
}

/// A node queue of 64 items, so that 150 pushes overflow it.
const SMALL_QUEUE: PushLimits = PushLimits { node_queue_items: 64, node_queue_bytes: usize::MAX };

/// Pushes that queue up while a call to the node is under way go out
/// together in the next call: none is dropped, and the node is called a
/// few times, not once per push.
#[tokio::test]
async fn pushes_queued_behind_a_call_go_out_together() {
    let node = FakeAccessNode::default();
    let registry = InProcessRegistry::new();
    let server = serve(&node, &registry).await;
    let gateway = RemotePushGateway::start(Peers::follow(&registry, "access-tcp").await.unwrap());

    const USERS: u64 = 150;
    let busy = node.busy.write().await;
    for i in 0..USERS {
        gateway.push(&placement(&format!("u{i}"), i), i + 1, Bytes::from_static(b"hello"));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(busy);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.received.lock().unwrap().len() < USERS as usize && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids: Vec<u64> = node.received.lock().unwrap().iter().map(|i| i.msg_id).collect();
    assert_eq!(ids, (1..=USERS).collect::<Vec<_>>(), "every push, in order, and no notice");
    let calls = node.calls.load(Ordering::SeqCst);
    assert!(calls <= 3, "{calls} calls: the pushes queued behind the first call were not merged");
    server.abort();
}

/// An access node that stops answering makes the gateway drop push batches
/// (here its queue holds 64 pushes). Every connection whose push was dropped gets a
/// NOTICE SYNC, but only after the consumer reports the batch of those
/// pushes pullable (written, or held where a pull finds them), so the pull
/// it triggers finds them.
#[tokio::test]
async fn dropped_pushes_are_replaced_by_a_sync_notice_once_pullable() {
    let node = FakeAccessNode::default();
    let registry = InProcessRegistry::new();
    let server = serve(&node, &registry).await;
    let gateway =
        RemotePushGateway::start_with(Peers::follow(&registry, "access-tcp").await.unwrap(), SMALL_QUEUE);

    const USERS: u64 = 150;
    let busy = node.busy.write().await;
    let batch = gateway.batch_started();
    for i in 0..USERS {
        gateway.push(&placement(&format!("u{i}"), i), i + 1, Bytes::from_static(b"hello"));
        // One batch per push: the gateway batches what has queued up.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(busy);

    // The node answers again, but the dropped messages are not written or
    // held yet: nobody may be told to pull.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_pullable = node.received.lock().unwrap().clone();
    assert!(
        before_pullable.iter().all(|i| i.sync_notice.is_none()),
        "SYNC notice before a pull could find the messages"
    );
    let pushed: BTreeSet<String> = before_pullable.iter().map(|i| i.user_id.clone()).collect();
    assert!((pushed.len() as u64) < USERS, "no push was dropped; the test did not overload the node");

    gateway.batch_pullable(batch);
    let everyone: BTreeSet<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let reached = node.users_reached(&everyone).await;
    assert_eq!(reached, everyone, "every connection gets its push or a SYNC notice");
    let items = node.received.lock().unwrap().clone();
    for item in &items[before_pullable.len()..] {
        let notice = item.sync_notice.as_deref().expect("only notices after the node caught up");
        assert!(notice.contains("pull"), "{notice}");
        assert_eq!(item.connection_id, item.user_id[1..].parse::<u64>().unwrap());
    }
    server.abort();
}

/// End to end through `run_consumer`: pushes to an access node that stops
/// answering are dropped, and once it answers again every connection whose
/// push was dropped gets its NOTICE SYNC at once, while its copy is still
/// held waiting for an ACK (`ack_wait` here is far longer than the test),
/// and its pull finds the message in memory.
#[tokio::test]
async fn a_dropped_push_is_noticed_at_once_while_its_copy_is_held() {
    let node = FakeAccessNode::default();
    let registry = InProcessRegistry::new();
    let server = serve(&node, &registry).await;
    let gateway =
        RemotePushGateway::start_with(Peers::follow(&registry, "access-tcp").await.unwrap(), SMALL_QUEUE);

    const USERS: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for i in 0..USERS {
        let user = format!("u{i}");
        backends.meta.add_device(&user, "phone").await.unwrap();
        backends.sessions.put(&placement(&user, i)).await.unwrap();
    }
    let config = OfflineConfig { ack_wait: Duration::from_secs(600), ..OfflineConfig::default() };
    let offline = OfflineService::new(backends.offline.clone(), config.clone());
    let stores = consumer_backends(&backends, offline.held_writes(), Holding::Always);
    let (task, stop) = start_consumer(backends.bus.clone(), stores, gateway.clone(), config);

    let busy = node.busy.write().await;
    let topic = BusNames::default().messages_topic;
    for i in 0..USERS {
        let record = envelope(i + 1, "", "alice", &[&format!("u{i}")]);
        backends.bus.publish(&topic, Bytes::from_static(b"k"), record).await.unwrap();
        // About one consumer batch, so one push batch, per message.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Every copy is held (nobody ACKs), and the node's queue has overflowed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while offline.held_writes().len() < USERS as usize {
        assert!(tokio::time::Instant::now() < deadline, "not every message was consumed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(busy);

    let everyone: BTreeSet<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let reached = node.users_reached(&everyone).await;
    assert_eq!(reached, everyone, "every connection gets its push or a SYNC notice within the wait");
    let noticed: Vec<String> = node
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|i| i.sync_notice.is_some())
        .map(|i| i.user_id.clone())
        .collect();
    assert!(!noticed.is_empty(), "no push was dropped; the test did not overload the node");
    assert_eq!(offline.held_writes().len(), USERS as usize, "the notices came while the copies were held");
    for user in &noticed {
        let (pulled, _) = offline.pull(user, "phone", 0, 10).await.unwrap();
        let expected = user[1..].parse::<u64>().unwrap() + 1;
        assert_eq!(
            pulled.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
            [expected],
            "{user} pulls its message"
        );
    }
    let first_noticed = format!("{}/phone", noticed[0]);
    assert_eq!(
        backends.offline.count(&first_noticed).await.unwrap(),
        0,
        "served from memory, nothing written"
    );

    for i in 0..USERS {
        offline.ack(&format!("u{i}"), "phone", &[i + 1]).await.unwrap();
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("every copy was ACKed: the consumer stops at once")
        .unwrap()
        .unwrap();
    server.abort();
}
