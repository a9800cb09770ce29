//! `RemotePushGateway` in cluster mode: pushes and SYNC notices reach the
//! access node's `AccessPush` endpoint in the order they were handed over.

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

/// An access node's push endpoint that records what it receives.
#[derive(Clone, Default)]
struct FakeAccessNode(Arc<Mutex<Vec<PushItem>>>);

#[tonic::async_trait]
impl AccessPush for FakeAccessNode {
    async fn push(&self, request: Request<PushBatch>) -> Result<Response<Empty>, Status> {
        self.0.lock().unwrap().extend(request.into_inner().items);
        Ok(Response::new(Empty {}))
    }

    async fn kick(&self, _request: Request<KickRequest>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }
}

#[tokio::test]
async fn sync_notices_travel_in_order_with_pushes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let node = FakeAccessNode::default();
    let server = tonic::transport::Server::builder()
        .add_service(AccessPushServer::new(node.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let registry = InProcessRegistry::new();
    let info = NodeInfo {
        node_id: "access-1".into(),
        role: "access-tcp".into(),
        addr: "127.0.0.1:1".into(),
        internal_addr: addr.to_string(),
        connections: 0,
    };
    registry.register(&info).await.unwrap();
    let gateway = RemotePushGateway::start(Peers::follow(&registry, "access-tcp").await.unwrap());
    let bob = Placement {
        user_id: "bob".into(),
        device_id: "phone".into(),
        node_id: "access-1".into(),
        connection_id: 7,
    };
    gateway.push(&bob, 1, Bytes::from_static(b"one"));
    gateway.sync_notice(&bob, "30 new messages in group g1; pull");
    gateway.push(&bob, 2, Bytes::from_static(b"two"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.0.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let items = node.0.lock().unwrap().clone();
    let seen: Vec<(u64, Vec<u8>, Option<String>)> =
        items.iter().map(|i| (i.msg_id, i.message.clone(), i.sync_notice.clone())).collect();
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
