//! router-auth's [`SessionAuthority`] over gRPC: the server adapter run by
//! `tern router-auth`, and the client access nodes use in cluster mode.

use std::sync::Arc;

use async_trait::async_trait;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::session_authority_client::SessionAuthorityClient;
use tern_proto::rpc::internal::session_authority_server::{self, SessionAuthorityServer};
use tern_proto::rpc::internal::{
    AttachRequest, AttachResponse, CountResponse, Empty, NodeRequest, PlacementMsg,
};
use tern_proto::{ServiceError, ServiceResult};
use tern_store::Placement;
use tern_store::discovery::{Dial, Peers};
use tonic::{Request, Response, Status};

use crate::{Identity, SessionAuthority};

/// Registry role name of router-auth nodes (their gRPC address).
pub const ROUTER_AUTH_ROLE: &str = "router-auth";

fn to_msg(p: &Placement) -> PlacementMsg {
    PlacementMsg {
        user_id: p.user_id.clone(),
        device_id: p.device_id.clone(),
        node_id: p.node_id.clone(),
        connection_id: p.connection_id,
    }
}

fn from_msg(p: PlacementMsg) -> Placement {
    Placement {
        user_id: p.user_id,
        device_id: p.device_id,
        node_id: p.node_id,
        connection_id: p.connection_id,
    }
}

struct Server(Arc<dyn SessionAuthority>);

#[async_trait]
impl session_authority_server::SessionAuthority for Server {
    async fn attach(&self, request: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let r = request.into_inner();
        let (identity, previous) = self.0.attach(&r.token, &r.device_id, &r.node_id, r.connection_id).await?;
        Ok(Response::new(AttachResponse {
            user_id: identity.user_id,
            device_id: identity.device_id,
            previous: previous.as_ref().map(to_msg),
        }))
    }

    async fn detach(&self, request: Request<PlacementMsg>) -> Result<Response<Empty>, Status> {
        self.0.detach(&from_msg(request.into_inner())).await?;
        Ok(Response::new(Empty {}))
    }

    async fn detach_node(&self, request: Request<NodeRequest>) -> Result<Response<CountResponse>, Status> {
        let count = self.0.detach_node(&request.into_inner().node_id).await?;
        Ok(Response::new(CountResponse { count: count as u64 }))
    }
}

/// The gRPC service to mount on a tonic server.
pub fn service(
    authority: Arc<dyn SessionAuthority>,
) -> SessionAuthorityServer<impl session_authority_server::SessionAuthority> {
    SessionAuthorityServer::new(Server(authority))
        .max_decoding_message_size(MAX_RPC_MESSAGE)
        .max_encoding_message_size(MAX_RPC_MESSAGE)
}

/// [`SessionAuthority`] on the live router-auth nodes (round robin).
pub struct RemoteSessionAuthority {
    peers: Arc<Peers>,
}

impl RemoteSessionAuthority {
    pub fn new(peers: Arc<Peers>) -> Self {
        Self { peers }
    }

    fn client(&self) -> ServiceResult<SessionAuthorityClient<tonic::transport::Channel>> {
        let (_, channel) = self.peers.any(Dial::Addr).map_err(ServiceError::unavailable)?;
        Ok(SessionAuthorityClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE))
    }
}

#[async_trait]
impl SessionAuthority for RemoteSessionAuthority {
    async fn attach(
        &self,
        token: &str,
        device_id: &str,
        node_id: &str,
        connection_id: u64,
    ) -> ServiceResult<(Identity, Option<Placement>)> {
        let request = AttachRequest {
            token: token.to_owned(),
            device_id: device_id.to_owned(),
            node_id: node_id.to_owned(),
            connection_id,
        };
        let r = self.client()?.attach(request).await?.into_inner();
        Ok((Identity { user_id: r.user_id, device_id: r.device_id }, r.previous.map(from_msg)))
    }

    async fn detach(&self, placement: &Placement) -> ServiceResult<()> {
        self.client()?.detach(to_msg(placement)).await?;
        Ok(())
    }

    async fn detach_node(&self, node_id: &str) -> ServiceResult<usize> {
        let r = self.client()?.detach_node(NodeRequest { node_id: node_id.to_owned() }).await?;
        Ok(r.into_inner().count as usize)
    }
}
