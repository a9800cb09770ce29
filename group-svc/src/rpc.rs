//! group-svc over gRPC: the server adapter for [`HistoryApi`] and the
//! client access nodes use.

use std::sync::Arc;

use async_trait::async_trait;
use tern_proto::pb;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::HistoryRequest;
use tern_proto::rpc::internal::history_client::HistoryClient;
use tern_proto::rpc::internal::history_server::{self, HistoryServer};
use tern_proto::{ServiceError, ServiceResult};
use tern_store::discovery::{Dial, Peers};
use tonic::{Request, Response, Status};

use crate::HistoryApi;

/// Registry role name of group-svc nodes.
pub const GROUP_ROLE: &str = "group-svc";

struct Server(Arc<dyn HistoryApi>);

#[async_trait]
impl history_server::History for Server {
    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<pb::GroupHistoryResponse>, Status> {
        let r = request.into_inner();
        let (messages, more) = self.0.history(&r.user_id, &r.group_id, r.before_msg_id, r.limit).await?;
        Ok(Response::new(pb::GroupHistoryResponse { messages, more }))
    }
}

pub fn service(api: Arc<dyn HistoryApi>) -> HistoryServer<impl history_server::History> {
    HistoryServer::new(Server(api))
        .max_decoding_message_size(MAX_RPC_MESSAGE)
        .max_encoding_message_size(MAX_RPC_MESSAGE)
}

/// [`HistoryApi`] on the live group-svc nodes (round robin).
pub struct RemoteHistory {
    peers: Arc<Peers>,
}

impl RemoteHistory {
    pub fn new(peers: Arc<Peers>) -> Self {
        Self { peers }
    }
}

#[async_trait]
impl HistoryApi for RemoteHistory {
    async fn history(
        &self,
        user: &str,
        group_id: &str,
        before_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)> {
        let (_, channel) = self.peers.any(Dial::Addr).map_err(ServiceError::unavailable)?;
        let request =
            HistoryRequest { user_id: user.to_owned(), group_id: group_id.to_owned(), before_msg_id, limit };
        let mut client = HistoryClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        let r = client.history(request).await?.into_inner();
        Ok((r.messages, r.more))
    }
}
