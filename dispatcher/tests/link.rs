//! The access-node ↔ dispatcher links over real gRPC on loopback: register,
//! routing by conversation key, and failover when a dispatcher dies before
//! the registry notices.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tern_dispatcher::DispatchService;
use tern_dispatcher::link::{DISPATCHER_ROLE, DispatcherLinks, LinkServer, pick_node};
use tern_proto::{ErrorCode, ServiceError, ServiceResult, pb};
use tern_store::discovery::Peers;
use tern_store::embedded::InProcessRegistry;
use tern_store::{NodeInfo, Registry};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// Answers every send with its own number as the message id.
struct Numbered(u64);

#[async_trait]
impl DispatchService for Numbered {
    async fn send_single(
        &self,
        sender: &str,
        _: &str,
        req: pb::SendSingleRequest,
    ) -> ServiceResult<pb::SendAck> {
        if req.receiver == "nobody" {
            return Err(ServiceError::new(ErrorCode::NoSuchUser, format!("{sender} wrote to nobody")));
        }
        Ok(pb::SendAck { client_msg_id: req.client_msg_id, msg_id: self.0, ..Default::default() })
    }
    async fn send_group(&self, _: &str, _: &str, req: pb::SendGroupRequest) -> ServiceResult<pb::SendAck> {
        Ok(pb::SendAck { client_msg_id: req.client_msg_id, msg_id: self.0, ..Default::default() })
    }
    async fn create_group(&self, _: &str, _: pb::CreateGroupRequest) -> ServiceResult<pb::GroupInfo> {
        Ok(pb::GroupInfo::default())
    }
    async fn join_group(&self, _: &str, _: &str) -> ServiceResult<pb::GroupInfo> {
        Ok(pb::GroupInfo::default())
    }
    async fn leave_group(&self, _: &str, _: &str) -> ServiceResult<pb::GroupInfo> {
        Ok(pb::GroupInfo::default())
    }
    async fn group_members(&self, _: &str, _: &str) -> ServiceResult<pb::GroupInfo> {
        Ok(pb::GroupInfo::default())
    }
    async fn list_groups(&self, _: &str) -> ServiceResult<Vec<pb::GroupInfo>> {
        Ok(vec![])
    }
}

struct Running {
    linked: Arc<LinkServer>,
    stop: CancellationToken,
}

async fn start_dispatcher(registry: &InProcessRegistry, id: u64) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = Arc::new(LinkServer::new(Arc::new(Numbered(id)), stop.clone()));
    let service = tern_proto::rpc::internal::dispatcher_server::DispatcherServer::from_arc(server.clone());
    let router = tonic::transport::Server::builder().add_service(service);
    let stopped = stop.clone();
    tokio::spawn(async move {
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped.cancelled_owned()).await
    });
    let node = NodeInfo {
        node_id: format!("d{id}"),
        role: DISPATCHER_ROLE.into(),
        addr: addr.to_string(),
        internal_addr: String::new(),
        connections: 0,
    };
    registry.register(&node).await.unwrap();
    Running { linked: server, stop }
}

async fn send(links: &DispatcherLinks, group: &str) -> ServiceResult<u64> {
    let req =
        pb::SendGroupRequest { client_msg_id: "c".into(), group_id: group.into(), ..Default::default() };
    Ok(links.send_group("alice", "phone", req).await?.msg_id)
}

#[tokio::test]
async fn links_register_route_by_key_and_fail_over() {
    let registry = InProcessRegistry::new();
    let d1 = start_dispatcher(&registry, 1).await;
    let d2 = start_dispatcher(&registry, 2).await;
    let peers = Peers::follow(&registry, DISPATCHER_ROLE).await.unwrap();
    let links = DispatcherLinks::start("access-x", peers);

    // Both links come up and each dispatcher knows the access node.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while links.linked().len() < 2
        || d1.linked.linked_nodes().is_empty()
        || d2.linked.linked_nodes().is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "links not established: {:?}", links.linked());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d1.linked.linked_nodes(), ["access-x"]);

    // A group always goes to the dispatcher rendezvous hashing picks, and
    // groups spread over both.
    let mut served = std::collections::BTreeSet::new();
    for i in 0..40 {
        let group = format!("group-{i}");
        let owner = pick_node(&tern_proto::group_conversation_key(&group), ["d1", "d2"]).unwrap();
        let by = send(&links, &group).await.unwrap();
        assert_eq!(format!("d{by}"), owner, "{group} went to the wrong dispatcher");
        served.insert(by);
    }
    assert_eq!(served.len(), 2, "groups spread over both dispatchers");

    // Errors travel back with their code.
    let req =
        pb::SendSingleRequest { client_msg_id: "c".into(), receiver: "nobody".into(), ..Default::default() };
    let err = links.send_single("alice", "phone", req).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoSuchUser);

    // d1 dies; the registry still lists it (as ZooKeeper does until the
    // session times out), but its groups move to d2 once the link breaks.
    let d1_group = (0..40)
        .map(|i| format!("group-{i}"))
        .find(|g| pick_node(&tern_proto::group_conversation_key(g), ["d1", "d2"]) == Some("d1"));
    let d1_group = d1_group.expect("some group belongs to d1");
    d1.stop.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match send(&links, &d1_group).await {
            Ok(2) => break,
            Ok(other) => assert!(tokio::time::Instant::now() < deadline, "still served by d{other}"),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
                assert!(tokio::time::Instant::now() < deadline, "no failover: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registry.list(DISPATCHER_ROLE).await.unwrap().len(), 2, "registry has not noticed yet");
    drop(d2);
}
