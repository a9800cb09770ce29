//! `RemotePushGateway` in cluster mode: pushes and SYNC notices reach the
//! access node's `AccessPush` endpoint in the order they were handed over,
//! and a connection whose pushes were dropped is told to pull once the
//! dropped messages are stored.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tern_offline_svc::PushGateway;
use tern_offline_svc::rpc::RemotePushGateway;
use tern_proto::rpc::internal::access_push_server::{AccessPush, AccessPushServer};
use tern_proto::rpc::internal::{Empty, KickRequest, PushBatch, PushItem};
use tern_store::discovery::Peers;
use tern_store::embedded::InProcessRegistry;
use tern_store::{NodeInfo, Placement, Registry};
use tonic::{Request, Response, Status};

/// An access node's push endpoint that records what it receives. While
/// the test holds `busy` for writing, every push call waits.
#[derive(Clone, Default)]
struct FakeAccessNode {
    received: Arc<Mutex<Vec<PushItem>>>,
    busy: Arc<tokio::sync::RwLock<()>>,
}

#[tonic::async_trait]
impl AccessPush for FakeAccessNode {
    async fn push(&self, request: Request<PushBatch>) -> Result<Response<Empty>, Status> {
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

/// An access node that stops answering makes the gateway drop push batches
/// (its queue holds 64). Every connection whose push was dropped gets a
/// NOTICE SYNC, but only after the consumer reports the batch of those
/// pushes stored, so the pull it triggers finds them.
#[tokio::test]
async fn dropped_pushes_are_replaced_by_a_sync_notice_once_stored() {
    let node = FakeAccessNode::default();
    let registry = InProcessRegistry::new();
    let server = serve(&node, &registry).await;
    let gateway = RemotePushGateway::start(Peers::follow(&registry, "access-tcp").await.unwrap());

    const USERS: u64 = 150;
    let busy = node.busy.write().await;
    let batch = gateway.batch_started();
    for i in 0..USERS {
        gateway.push(&placement(&format!("u{i}"), i), i + 1, Bytes::from_static(b"hello"));
        // One batch per push: the gateway batches what has queued up.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(busy);

    // The node answers again, but the dropped messages are not stored yet:
    // nobody may be told to pull.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_stored = node.received.lock().unwrap().clone();
    assert!(
        before_stored.iter().all(|i| i.sync_notice.is_none()),
        "SYNC notice before the messages were stored"
    );
    let pushed: BTreeSet<String> = before_stored.iter().map(|i| i.user_id.clone()).collect();
    assert!((pushed.len() as u64) < USERS, "no push was dropped; the test did not overload the node");

    gateway.batch_stored(batch);
    let everyone: BTreeSet<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reached = loop {
        let reached: BTreeSet<String> =
            node.received.lock().unwrap().iter().map(|i| i.user_id.clone()).collect();
        if reached == everyone || tokio::time::Instant::now() > deadline {
            break reached;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reached, everyone, "every connection gets its push or a SYNC notice");
    let items = node.received.lock().unwrap().clone();
    for item in &items[before_stored.len()..] {
        let notice = item.sync_notice.as_deref().expect("only notices after the node caught up");
        assert!(notice.contains("pull"), "{notice}");
        assert_eq!(item.connection_id, item.user_id[1..].parse::<u64>().unwrap());
    }
    server.abort();
}
