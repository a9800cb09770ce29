//! One client connection: TLS handshake, the request loop, and the writer
//! task that drains the outbound queue.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tern_proto::pb::{self, NoticeKind};
use tern_proto::{ErrorCode, Frame, FrameCodec, RequestType, ServiceError, ServiceResult};
use tern_router_auth::Identity;
use tern_store::Placement;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{AccessNode, ConnHandle};

/// What the writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    Frame(Frame),
    /// Flush what is queued, then close the connection.
    Close,
}

pub(crate) async fn serve(
    node: Arc<AccessNode>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
) {
    let id = node.next_connection_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = tracing::info_span!("conn", %peer, conn = id, user = tracing::field::Empty);
    async move {
        match tls {
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(node.config.handshake_timeout, acceptor.accept(stream)).await;
                match handshake {
                    Ok(Ok(stream)) => run(node, stream, id).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
            None => run(node, stream, id).await,
        }
    }
    .instrument(span)
    .await
}

async fn run<S>(node: Arc<AccessNode>, stream: S, id: u64)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let codec = FrameCodec::new(node.config.max_body_len);
    let (tx, rx) = mpsc::channel(node.config.outbound_queue);
    let handle = Arc::new(ConnHandle {
        outbound: tx,
        identity: std::sync::Mutex::new(None),
        unacked: std::sync::Mutex::new(Default::default()),
        cancel: CancellationToken::new(),
    });
    node.lock_connections().insert(id, handle.clone());
    let mut writer = tokio::spawn(write_loop(FramedWrite::new(write_half, codec), rx));

    let conn = Connection { node: node.clone(), handle: handle.clone(), id };
    conn.read_loop(FramedRead::new(read_half, codec)).await;

    // Whatever ended the read loop, let the writer flush and close (if the
    // queue is full the writer is aborted below instead).
    let _ = handle.outbound.try_send(Outbound::Close);
    node.lock_connections().remove(&id);
    let identity = handle.identity.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(identity) = identity {
        let placement = Placement {
            user_id: identity.user_id,
            device_id: identity.device_id,
            node_id: node.config.node_id.clone(),
            connection_id: id,
        };
        if let Err(e) = node.services.auth.detach(&placement).await {
            tracing::warn!(error = %e, "placement not removed");
        }
    }
    // Let the writer flush what is queued, but a writer stuck on a peer that
    // stopped reading is aborted, which closes the socket.
    if tokio::time::timeout(node.config.handshake_timeout, &mut writer).await.is_err() {
        writer.abort();
    }
    tracing::debug!("connection closed");
}

async fn write_loop<W>(mut sink: FramedWrite<W, FrameCodec>, mut rx: mpsc::Receiver<Outbound>)
where
    W: AsyncWrite + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut close = false;
        // Coalesce everything already queued into one flush (one syscall
        // batch) instead of a write per frame.
        while let Some(item) = next.take() {
            match item {
                Outbound::Frame(frame) => {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                Outbound::Close => {
                    close = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
        if close {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Whether the read loop goes on after a request.
enum Flow {
    Continue,
    Close,
}

struct Connection {
    node: Arc<AccessNode>,
    handle: Arc<ConnHandle>,
    id: u64,
}

impl Connection {
    fn identity(&self) -> Option<Identity> {
        self.handle.identity.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues a response, waiting for room (back-pressure on this client's
    /// reads) — but not past a cancellation (slow consumer, kick, drain) or
    /// the idle timeout: a client that stops reading loses the connection.
    async fn send(&self, frame: Frame) -> Flow {
        let queued = tokio::select! {
            _ = self.handle.cancel.cancelled() => return Flow::Close,
            queued = tokio::time::timeout(self.node.config.idle_timeout, self.handle.outbound.send(Outbound::Frame(frame))) => queued,
        };
        match queued {
            Ok(Ok(())) => Flow::Continue,
            Ok(Err(_)) => Flow::Close,
            Err(_) => {
                tracing::debug!("client stopped reading; closing");
                Flow::Close
            }
        }
    }

    /// Sends an error frame; closes the connection when the code says so.
    async fn fail(&self, sequence: u32, error: &ServiceError) -> Flow {
        tracing::debug!(code = %error.code, message = %error.message, "request failed");
        let flow = self.send(Frame::error(sequence, error.code, error.message.clone())).await;
        if error.code.closes_connection() { Flow::Close } else { flow }
    }

    async fn reply<M: prost::Message>(
        &self,
        frame: &Frame,
        kind: RequestType,
        result: ServiceResult<M>,
    ) -> Flow {
        match result {
            Ok(body) => self.send(Frame::new(kind, frame.sequence, &body)).await,
            Err(e) => self.fail(frame.sequence, &e).await,
        }
    }

    async fn read_loop<R>(&self, mut frames: FramedRead<R, FrameCodec>)
    where
        R: AsyncRead + Unpin,
    {
        let config = &self.node.config;
        let mut ack_check = tokio::time::interval(config.push_ack_timeout / 2);
        // A connection must log in within the handshake timeout, whatever it
        // sends before; after LOGIN, each frame restarts the idle timeout.
        let mut deadline = tokio::time::Instant::now() + config.handshake_timeout;
        loop {
            let next = tokio::select! {
                _ = self.handle.cancel.cancelled() => return,
                _ = ack_check.tick() => {
                    self.check_unacked().await;
                    continue;
                }
                next = tokio::time::timeout_at(deadline, frames.next()) => next,
            };
            let frame = match next {
                Err(_) => {
                    tracing::debug!("idle timeout");
                    return;
                }
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    if let Some(code) = e.code() {
                        let _ = self.fail(0, &ServiceError::new(code, e.to_string())).await;
                    }
                    return;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Flow::Close = self.handle_frame(frame).await {
                return;
            }
            if self.identity().is_some() {
                deadline = tokio::time::Instant::now() + config.idle_timeout;
            }
        }
    }

    /// Tells a client whose pushes went unacknowledged to pull them.
    async fn check_unacked(&self) {
        let timeout = self.node.config.push_ack_timeout;
        let overdue = {
            let mut unacked = self.handle.unacked.lock().unwrap_or_else(|e| e.into_inner());
            let overdue = unacked.values().any(|pushed| pushed.elapsed() >= timeout);
            if overdue {
                unacked.clear();
            }
            overdue
        };
        if overdue {
            let notice =
                pb::Notice { kind: NoticeKind::Sync as i32, reason: "unacknowledged messages: pull".into() };
            let _ =
                self.handle.outbound.try_send(Outbound::Frame(Frame::new(RequestType::Notice, 0, &notice)));
        }
    }

    async fn handle_frame(&self, frame: Frame) -> Flow {
        let Some(kind) = frame.kind() else {
            let e = ServiceError::new(
                ErrorCode::UnknownRequestType,
                format!("unknown requestType {}", frame.request_type),
            );
            return self.fail(frame.sequence, &e).await;
        };
        match kind {
            RequestType::Heartbeat => {
                self.send(Frame::new(RequestType::Heartbeat, frame.sequence, &pb::Heartbeat {})).await
            }
            RequestType::Login => self.login(&frame).await,
            RequestType::PushMessage | RequestType::Notice | RequestType::Error => {
                let e = ServiceError::new(
                    ErrorCode::UnknownRequestType,
                    format!("requestType {} is sent by servers only", frame.request_type),
                );
                self.fail(frame.sequence, &e).await
            }
            _ => match self.identity() {
                None => {
                    let e = ServiceError::new(ErrorCode::NotLoggedIn, "log in first");
                    self.fail(frame.sequence, &e).await
                }
                Some(identity) => self.request(kind, &frame, &identity).await,
            },
        }
    }

    async fn login(&self, frame: &Frame) -> Flow {
        if self.identity().is_some() {
            let e = ServiceError::new(ErrorCode::AlreadyLoggedIn, "this connection is already logged in");
            return self.fail(frame.sequence, &e).await;
        }
        if self.node.draining.load(std::sync::atomic::Ordering::SeqCst) {
            let notice = pb::Notice {
                kind: NoticeKind::Reconnect as i32,
                reason: "server is shutting down; reconnect".into(),
            };
            let _ = self.send(Frame::new(RequestType::Notice, 0, &notice)).await;
            return Flow::Close;
        }
        let req: pb::LoginRequest = match decode(frame) {
            Ok(req) => req,
            Err(e) => return self.fail(frame.sequence, &e).await,
        };
        let node = &self.node;
        let attached =
            node.services.auth.attach(&req.token, &req.device_id, &node.config.node_id, self.id).await;
        let (identity, previous) = match attached {
            Ok(ok) => ok,
            Err(e) => return self.fail(frame.sequence, &e).await,
        };
        tracing::Span::current().record("user", identity.user_id.as_str());
        *self.handle.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
        if let Some(previous) = previous {
            // The same device logged in again: the newer connection wins.
            const REASON: &str = "logged in again from the same device";
            if previous.node_id == node.config.node_id {
                if previous.connection_id != self.id {
                    node.kick(&previous, REASON);
                }
            } else if let Some(remote) = &node.services.remote_kick {
                remote.kick(&previous, REASON);
            }
        }
        let pending =
            node.services.offline.pending(&identity.user_id, &identity.device_id).await.unwrap_or(0);
        let response = pb::LoginResponse {
            user_id: identity.user_id,
            device_id: identity.device_id,
            connection_id: self.id,
            heartbeat_interval_ms: node.config.heartbeat_interval.as_millis() as u32,
            idle_timeout_ms: node.config.idle_timeout.as_millis() as u32,
            pending_offline: pending,
        };
        self.send(Frame::new(RequestType::Login, frame.sequence, &response)).await
    }

    async fn request(&self, kind: RequestType, frame: &Frame, identity: &Identity) -> Flow {
        let services = &self.node.services;
        let (user, device) = (identity.user_id.as_str(), identity.device_id.as_str());
        match kind {
            RequestType::SendSingle => {
                let result =
                    async { services.dispatch.send_single(user, device, decode(frame)?).await }.await;
                self.reply(frame, kind, result).await
            }
            RequestType::SendGroup => {
                let result = async { services.dispatch.send_group(user, device, decode(frame)?).await }.await;
                self.reply(frame, kind, result).await
            }
            RequestType::AckMessages => {
                let result = async {
                    let req: pb::AckMessagesRequest = decode(frame)?;
                    services.offline.ack(user, device, &req.msg_ids).await?;
                    let mut unacked = self.handle.unacked.lock().unwrap_or_else(|e| e.into_inner());
                    for id in &req.msg_ids {
                        unacked.remove(id);
                    }
                    Ok(pb::Empty {})
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::PullOffline => {
                let result = async {
                    let req: pb::PullOfflineRequest = decode(frame)?;
                    let (messages, more) =
                        services.offline.pull(user, device, req.after_msg_id, req.limit).await?;
                    Ok(pb::PullOfflineResponse { messages, more })
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::CreateGroup => {
                let result = async { services.dispatch.create_group(user, decode(frame)?).await }.await;
                self.reply(frame, kind, result).await
            }
            RequestType::JoinGroup | RequestType::LeaveGroup | RequestType::GroupMembers => {
                let result = async {
                    let req: pb::GroupRequest = decode(frame)?;
                    match kind {
                        RequestType::JoinGroup => services.dispatch.join_group(user, &req.group_id).await,
                        RequestType::LeaveGroup => services.dispatch.leave_group(user, &req.group_id).await,
                        _ => services.dispatch.group_members(user, &req.group_id).await,
                    }
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::ListGroups => {
                let result = async {
                    let _: pb::Empty = decode(frame)?;
                    Ok(pb::ListGroupsResponse { groups: services.dispatch.list_groups(user).await? })
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::GroupHistory => {
                let result = async {
                    let req: pb::GroupHistoryRequest = decode(frame)?;
                    let (messages, more) =
                        services.history.history(user, &req.group_id, req.before_msg_id, req.limit).await?;
                    Ok(pb::GroupHistoryResponse { messages, more })
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::OnlineUsers => {
                let result = async {
                    let _: pb::Empty = decode(frame)?;
                    let user_ids = services
                        .sessions
                        .online_users(1_000)
                        .await
                        .map_err(|e| ServiceError::internal(format!("backend failure: {e}")))?;
                    Ok(pb::OnlineUsersResponse { user_ids })
                }
                .await;
                self.reply(frame, kind, result).await
            }
            RequestType::Login
            | RequestType::Heartbeat
            | RequestType::PushMessage
            | RequestType::Notice
            | RequestType::Error => unreachable!("handled before login check"),
        }
    }
}

fn decode<M: prost::Message + Default>(frame: &Frame) -> ServiceResult<M> {
    frame.decode().map_err(|e| {
        ServiceError::new(
            ErrorCode::BadBody,
            format!("body of requestType {} does not decode: {e}", frame.request_type),
        )
    })
}
