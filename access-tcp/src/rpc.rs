//! The access node's internal gRPC endpoint: pushes from offline-svc.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tern_offline_svc::PushGateway;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::access_push_server::{self, AccessPushServer};
use tern_proto::rpc::internal::{Empty, PushBatch};
use tern_store::Placement;
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
            self.0.push(&placement, item.msg_id, Bytes::from(item.message));
        }
        Ok(Response::new(Empty {}))
    }
}

/// The push service to mount on the node's internal gRPC server.
pub fn service(node: Arc<AccessNode>) -> AccessPushServer<impl access_push_server::AccessPush> {
    AccessPushServer::new(Server(node))
        .max_decoding_message_size(MAX_RPC_MESSAGE)
        .max_encoding_message_size(MAX_RPC_MESSAGE)
}
