//! The access node's internal gRPC endpoint: pushes and SYNC notices from
//! offline-svc, kicks from other access nodes.

use std::sync::Arc;

use async_trait::async_trait;
use tern_offline_svc::PushGateway;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::access_push_client::AccessPushClient;
use tern_proto::rpc::internal::access_push_server::{self, AccessPushServer};
use tern_proto::rpc::internal::{Empty, KickRequest, PushBatch};
use tern_store::Placement;
use tern_store::discovery::{Dial, Peers};
use tonic::{Request, Response, Status};

use crate::AccessNode;

struct Server(Arc<AccessNode>);

#[async_trait]
impl access_push_server::AccessPush for Server {
    async fn push(&self, request: Request<PushBatch>) -> Result<Response<Empty>, Status> {
        let node_id = self.0.node_id().to_owned();
        for item in request.into_inner().items {
            let placement = Placement {
                user_id: item.user_id,
                device_id: item.device_id,
                node_id: node_id.clone(),
                connection_id: item.connection_id,
            };
            match item.sync_notice {
                Some(reason) => self.0.sync_notice(&placement, &reason),
                None => self.0.push(&placement, item.msg_id, item.message),
            }
        }
        Ok(Response::new(Empty {}))
    }

    async fn kick(&self, request: Request<KickRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let placement = Placement {
            user_id: r.user_id,
            device_id: r.device_id,
            node_id: self.0.node_id().to_owned(),
            connection_id: r.connection_id,
        };
        self.0.kick(&placement, &r.reason);
        Ok(Response::new(Empty {}))
    }
}

/// Kicks over gRPC on the access node that holds the old connection.
pub struct PeerKick {
    access_nodes: Arc<Peers>,
}

impl PeerKick {
    pub fn new(access_nodes: Arc<Peers>) -> Arc<Self> {
        Arc::new(Self { access_nodes })
    }
}

impl crate::RemoteKick for PeerKick {
    fn kick(&self, placement: &Placement, reason: &str) {
        let Ok(Some(channel)) = self.access_nodes.node(&placement.node_id, Dial::Internal) else { return };
        let request = KickRequest {
            user_id: placement.user_id.clone(),
            device_id: placement.device_id.clone(),
            connection_id: placement.connection_id,
            reason: reason.to_owned(),
        };
        tokio::spawn(async move {
            let mut client = AccessPushClient::new(channel);
            if let Err(status) = client.kick(request).await {
                tracing::warn!(%status, "kick on another access node failed");
            }
        });
    }
}

/// The push service to mount on the node's internal gRPC server.
pub fn service(node: Arc<AccessNode>) -> AccessPushServer<impl access_push_server::AccessPush> {
    AccessPushServer::new(Server(node))
        .max_decoding_message_size(MAX_RPC_MESSAGE)
        .max_encoding_message_size(MAX_RPC_MESSAGE)
}
