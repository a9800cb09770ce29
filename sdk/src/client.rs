//! The high-level client: logs in over HTTP, connects, keeps the connection
//! alive and reconnects, pulls offline messages, ACKs and deduplicates
//! pushes, shows each conversation in `seq` order (see `order.rs`), and
//! retries sends until the server ACKs them.
//!
//! One background task (`Shared::supervise`) owns the connection's events:
//! it pulls the offline store, then shows the pushes that arrived meanwhile
//! (they wait in the connection's unbounded event queue), and reconnects
//! when the connection drops. It alone ACKs messages and hands them to the
//! application, so what the ordering buffer releases keeps its order
//! whatever released it (a push, a pull, the gap timer, which it waits on
//! alongside the connection's events, or this device's own SendAck, which
//! wakes it). A second task per connection heartbeats it and aborts it when
//! a heartbeat goes unanswered, so a half-open connection is noticed;
//! heartbeats are independent of the first task, which can be blocked for
//! long on an application that reads events slowly.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_proto::pb::{self, NoticeKind};
use tern_proto::{ErrorCode, Frame, RequestType, ServiceError};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::ClientError;
use crate::connection::{ConnectOptions, Connection, ServerEvent, TlsMode};
use crate::http::{AuthClient, IssuedToken};
use crate::order::{Admission, Inbox, MAX_HELD, Output};

/// The most ids the server takes in one ACK_MESSAGES (PROTOCOL §5.3;
/// offline-svc `max_ack_ids`); a longer list is refused as a whole.
const MAX_ACK_IDS: usize = 1_000;

/// How many shown message ids are remembered for deduplication.
const SEEN_IDS: usize = 100_000;

/// How a [`Client`] logs in and connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// router-auth base URL, e.g. `http://127.0.0.1:7880`.
    pub auth_url: String,
    pub user_id: String,
    pub password: String,
    pub device_id: String,
    pub tls: TlsMode,
    /// Certificate name to check; defaults to the host of the access address.
    pub server_name: Option<String>,
    /// Access node `host:port`; `None` asks ipList and takes the least loaded.
    pub access_addr: Option<String>,
    /// Create the account when the login says it does not exist.
    pub register_if_missing: bool,
    pub request_timeout: Duration,
    /// How many times a send is tried before giving up.
    pub send_attempts: u32,
    /// Reconnect after the connection drops.
    pub reconnect: bool,
    /// How long a gap in a conversation's `seq` may stay open before the
    /// messages held behind it are shown anyway and [`Event::Skipped`]
    /// reports the missing seqs. Default 5 s; keep it below the server's
    /// push-ACK timeout (10 s), since held messages are not ACKed.
    pub gap_timeout: Duration,
    /// Cursors to resume from, as returned by [`Client::cursors`] of an
    /// earlier run (conversation key → highest seq accounted for). A
    /// conversation not listed starts at the first message seen.
    pub cursors: HashMap<String, u64>,
}

impl ClientConfig {
    pub fn new(
        auth_url: impl Into<String>,
        user_id: impl Into<String>,
        password: impl Into<String>,
        tls: TlsMode,
    ) -> Self {
        Self {
            auth_url: auth_url.into(),
            user_id: user_id.into(),
            password: password.into(),
            device_id: "default".into(),
            tls,
            server_name: None,
            access_addr: None,
            register_if_missing: false,
            request_timeout: Duration::from_secs(10),
            send_attempts: 8,
            reconnect: true,
            gap_timeout: Duration::from_secs(5),
            cursors: HashMap::new(),
        }
    }
}

/// What the application is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new message (pulled or pushed), shown once: duplicates are dropped.
    /// Within a conversation messages come in `seq` order, except a message
    /// whose seq was already reported in [`Event::Skipped`], which still
    /// comes, late, when it arrives.
    Message(pb::Message),
    /// A gap in a conversation stayed open for
    /// [`ClientConfig::gap_timeout`] (or too many messages were held): the
    /// messages after it follow this event, and these seqs were never
    /// received. `conversation` is a key as in [`Client::cursors`];
    /// `missing` lists the seqs as inclusive ranges (a gap can be long).
    Skipped { conversation: String, missing: Vec<RangeInclusive<u64>> },
    /// The connection dropped; the client is reconnecting if configured to.
    Disconnected(Option<ServiceError>),
    /// A new connection is logged in and the offline store was pulled.
    Reconnected,
    /// Another login of the same device replaced this one; the client stops.
    Kicked(String),
}

struct Shared {
    config: ClientConfig,
    auth: AuthClient,
    token: Mutex<Option<IssuedToken>>,
    connection: watch::Sender<Option<Connection>>,
    /// Deduplication and per-conversation order; outlives connections.
    inbox: Mutex<Inbox>,
    /// Wakes the supervisor when a send changed the inbox.
    inbox_changed: Notify,
    events: mpsc::Sender<Event>,
    closed: CancellationToken,
    client_msg_counter: AtomicU64,
    client_msg_prefix: String,
    login: Mutex<Option<pb::LoginResponse>>,
    /// ACKs on their way, so `close` can let them land first.
    acks_in_flight: Mutex<tokio::task::JoinSet<()>>,
}

/// A logged-in tern client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a failed send may be retried with the same client message id.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Server(s) => matches!(s.code, ErrorCode::Internal | ErrorCode::Unavailable),
        ClientError::Timeout | ClientError::Closed | ClientError::Io(_) | ClientError::NotConnected => true,
        _ => false,
    }
}

impl Client {
    /// Logs in, connects and starts the background task that pulls the
    /// offline store and keeps the connection. Events (messages, offline ones
    /// first) arrive on the returned receiver. Login and connection errors
    /// are returned; the offline store is pulled after this returns, so a
    /// large backlog never waits on the application reading events.
    pub async fn connect(config: ClientConfig) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        let (events, events_rx) = mpsc::channel(4096);
        let (connection, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            auth: AuthClient::new(config.auth_url.clone()),
            client_msg_prefix: format!("{}-{:016x}", config.device_id, rand::random::<u64>()),
            inbox: Mutex::new(Inbox::new(config.gap_timeout, MAX_HELD, SEEN_IDS, &config.cursors)),
            inbox_changed: Notify::new(),
            config,
            token: Mutex::new(None),
            connection,
            events,
            closed: CancellationToken::new(),
            client_msg_counter: AtomicU64::new(0),
            login: Mutex::new(None),
            acks_in_flight: Mutex::default(),
        });
        let (conn, server_events) = shared.establish().await?;
        let client = Client { shared: shared.clone() };
        shared.connection.send_replace(Some(conn.clone()));
        tokio::spawn(shared.supervise(conn, server_events));
        Ok((client, events_rx))
    }

    pub fn user_id(&self) -> &str {
        &self.shared.config.user_id
    }

    /// A snapshot of every conversation's cursor: the highest seq this
    /// device has accounted for (shown, given up on, or sent itself) with
    /// nothing missing below it. Keys are `p:<a>:<b>` (the two user ids of
    /// a 1:1 chat, sorted) and `g:<group id>`, as [`crate::conversation_key`]
    /// gives them. Persist it and pass it back in [`ClientConfig::cursors`]
    /// to resume after a restart.
    pub fn cursors(&self) -> HashMap<String, u64> {
        self.shared.lock_inbox().cursors()
    }

    /// The last LOGIN response (connection id, pending count, intervals).
    pub fn login_info(&self) -> Option<pb::LoginResponse> {
        self.shared.login.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A fresh client message id, unique for this client.
    pub fn new_client_msg_id(&self) -> String {
        let n = self.shared.client_msg_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.shared.client_msg_prefix)
    }

    /// The current connection, waiting up to the request timeout while a
    /// reconnect is in progress.
    async fn connection(&self) -> Result<Connection, ClientError> {
        let mut rx = self.shared.connection.subscribe();
        let wait = rx.wait_for(|c| c.is_some());
        match tokio::time::timeout(self.shared.config.request_timeout, wait).await {
            Ok(Ok(conn)) => Ok(conn.clone().expect("waited for Some")),
            _ => Err(ClientError::NotConnected),
        }
    }

    /// One request on the current connection. A send made this way is not
    /// counted in its conversation's cursor (use [`Client::send_single`] or
    /// [`Client::send_group`]), so this device sees a gap at its seq.
    pub async fn request<Req, Resp>(&self, kind: RequestType, body: &Req) -> Result<Resp, ClientError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        self.connection().await?.request(kind, body).await
    }

    async fn send_with_retry<Req: prost::Message>(
        &self,
        kind: RequestType,
        body: Req,
    ) -> Result<pb::SendAck, ClientError> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let result = match self.connection().await {
                Ok(conn) => conn.request(kind, &body).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(ack) => return Ok(ack),
                Err(e) if retryable(&e) && attempt < self.shared.config.send_attempts => {
                    tracing::debug!(error = %e, attempt, "send not acknowledged; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a 1:1 message; returns once the server has it durably. Retries
    /// (with the same client message id, so it is stored once) across
    /// timeouts and reconnects. The acknowledged seq counts as accounted for
    /// in the conversation (this device never receives its own message).
    pub async fn send_single(
        &self,
        receiver: &str,
        content: impl Into<Vec<u8>>,
    ) -> Result<pb::SendAck, ClientError> {
        let body = pb::SendSingleRequest {
            client_msg_id: self.new_client_msg_id(),
            sender: String::new(),
            receiver: receiver.to_owned(),
            content: content.into(),
        };
        let ack = self.send_with_retry(RequestType::SendSingle, body).await?;
        self.shared.own_send(tern_proto::single_conversation_key(self.user_id(), receiver), ack.seq);
        Ok(ack)
    }

    /// Sends a group message; see [`Client::send_single`].
    pub async fn send_group(
        &self,
        group_id: &str,
        content: impl Into<Vec<u8>>,
    ) -> Result<pb::SendAck, ClientError> {
        let body = pb::SendGroupRequest {
            client_msg_id: self.new_client_msg_id(),
            sender: String::new(),
            group_id: group_id.to_owned(),
            content: content.into(),
        };
        let ack = self.send_with_retry(RequestType::SendGroup, body).await?;
        self.shared.own_send(tern_proto::group_conversation_key(group_id), ack.seq);
        Ok(ack)
    }

    pub async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        members: &[&str],
    ) -> Result<pb::GroupInfo, ClientError> {
        let body = pb::CreateGroupRequest {
            group_id: group_id.to_owned(),
            name: name.to_owned(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        self.request(RequestType::CreateGroup, &body).await
    }

    pub async fn join_group(&self, group_id: &str) -> Result<pb::GroupInfo, ClientError> {
        self.request(RequestType::JoinGroup, &pb::GroupRequest { group_id: group_id.to_owned() }).await
    }

    pub async fn leave_group(&self, group_id: &str) -> Result<pb::GroupInfo, ClientError> {
        self.request(RequestType::LeaveGroup, &pb::GroupRequest { group_id: group_id.to_owned() }).await
    }

    pub async fn group_members(&self, group_id: &str) -> Result<pb::GroupInfo, ClientError> {
        self.request(RequestType::GroupMembers, &pb::GroupRequest { group_id: group_id.to_owned() }).await
    }

    pub async fn list_groups(&self) -> Result<Vec<pb::GroupInfo>, ClientError> {
        let response: pb::ListGroupsResponse = self.request(RequestType::ListGroups, &pb::Empty {}).await?;
        Ok(response.groups)
    }

    /// A page of group history, newest first; `before_msg_id` 0 = newest.
    pub async fn group_history(
        &self,
        group_id: &str,
        before_msg_id: u64,
        limit: u32,
    ) -> Result<pb::GroupHistoryResponse, ClientError> {
        let body = pb::GroupHistoryRequest { group_id: group_id.to_owned(), before_msg_id, limit };
        self.request(RequestType::GroupHistory, &body).await
    }

    pub async fn online_users(&self) -> Result<Vec<String>, ClientError> {
        let response: pb::OnlineUsersResponse = self.request(RequestType::OnlineUsers, &pb::Empty {}).await?;
        Ok(response.user_ids)
    }

    /// Stops the background task and closes the connection, after giving
    /// ACKs already on their way up to two seconds to land (a message shown
    /// but not ACKed would be shown again by the next login's pull, then
    /// dropped as a duplicate only if this client is still the one pulling).
    pub async fn close(&self) {
        let mut acks =
            std::mem::take(&mut *self.shared.acks_in_flight.lock().unwrap_or_else(|e| e.into_inner()));
        let _ =
            tokio::time::timeout(Duration::from_secs(2), async { while acks.join_next().await.is_some() {} })
                .await;
        self.shared.closed.cancel();
        if let Some(conn) = self.shared.connection.send_replace(None) {
            conn.close().await;
        }
    }
}

impl Shared {
    async fn token(&self) -> Result<String, ClientError> {
        {
            let token = self.token.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = token.as_ref()
                && t.expires_at_ms > now_ms() + 60_000
            {
                return Ok(t.token.clone());
            }
        }
        let config = &self.config;
        let issued = if config.register_if_missing {
            self.auth.login_or_register(&config.user_id, &config.password).await?
        } else {
            self.auth.login(&config.user_id, &config.password).await?
        };
        let token = issued.token.clone();
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(issued);
        Ok(token)
    }

    async fn access_addr(&self) -> Result<String, ClientError> {
        if let Some(addr) = &self.config.access_addr {
            return Ok(addr.clone());
        }
        let nodes = self.auth.ip_list().await?;
        nodes.into_iter().next().map(|n| n.addr).ok_or(ClientError::NoAccessNode)
    }

    /// Connects and logs in once. On failure the connection is closed.
    async fn establish(&self) -> Result<(Connection, mpsc::UnboundedReceiver<ServerEvent>), ClientError> {
        let token = self.token().await?;
        let addr = self.access_addr().await?;
        let mut options = ConnectOptions::new(addr, self.config.tls.clone());
        options.server_name = self.config.server_name.clone();
        options.request_timeout = self.config.request_timeout;
        let (conn, events) = Connection::connect(&options).await?;
        let login = pb::LoginRequest { token, device_id: self.config.device_id.clone() };
        match conn.request::<_, pb::LoginResponse>(RequestType::Login, &login).await {
            Ok(response) => {
                // A server that stays silent this long is gone (the
                // heartbeat answers alone arrive more often).
                let idle = response.idle_timeout_ms;
                conn.set_idle_timeout((idle > 0).then(|| Duration::from_millis(u64::from(idle))));
                *self.login.lock().unwrap_or_else(|e| e.into_inner()) = Some(response);
                Ok((conn, events))
            }
            Err(e) => {
                // Dropping the Connection would leave its reader holding the
                // socket open.
                conn.abort().await;
                if let ClientError::Server(s) = &e
                    && matches!(s.code, ErrorCode::InvalidToken | ErrorCode::TokenExpired)
                {
                    // Next attempt logs in over HTTP again.
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e)
            }
        }
    }

    fn lock_inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records this device's own sent seq and lets the supervisor show what
    /// it released.
    fn own_send(&self, conversation: String, seq: u64) {
        self.lock_inbox().own_send(conversation, seq, tokio::time::Instant::now());
        self.inbox_changed.notify_one();
    }

    /// Takes received messages into the inbox and returns the ids to ACK at
    /// once: those shown before (the server drops its copy too). Fresh
    /// messages are ACKed by `flush` when they are shown; a second copy of
    /// a held message is not ACKed at all (the held one will be).
    fn admit(&self, messages: Vec<pb::Message>) -> Vec<u64> {
        let now = tokio::time::Instant::now();
        let mut inbox = self.lock_inbox();
        messages
            .into_iter()
            .filter_map(|message| {
                let id = message.msg_id;
                (inbox.admit(message, now) == Admission::Duplicate).then_some(id)
            })
            .collect()
    }

    /// Takes received messages into the inbox, then shows and ACKs what can
    /// be shown (`flush`).
    async fn receive(&self, conn: &Connection, messages: Vec<pb::Message>) {
        if messages.is_empty() {
            return;
        }
        let duplicates = self.admit(messages);
        self.flush(conn, duplicates).await;
    }

    /// Gives up on expired gaps, then ACKs `ack_now` and every message the
    /// inbox released, and hands those to the application. The ACK is
    /// queued before the messages are handed over, so `close` right after
    /// the application saw one still lets its ACK land.
    async fn flush(&self, conn: &Connection, mut ack_now: Vec<u64>) {
        let ready = {
            let mut inbox = self.lock_inbox();
            inbox.expire(tokio::time::Instant::now());
            inbox.take_ready()
        };
        ack_now.extend(ready.iter().filter_map(|o| match o {
            Output::Show(m) => Some(m.msg_id),
            Output::Skipped { .. } => None,
        }));
        self.ack(conn, ack_now);
        for output in ready {
            let event = match output {
                Output::Show(message) => Event::Message(message),
                Output::Skipped { conversation, missing } => Event::Skipped { conversation, missing },
            };
            let _ = self.events.send(event).await;
        }
    }

    /// The gap timer fired: pulls the offline store if a hole asked for it,
    /// and gives up on expired gaps.
    async fn on_gap_timer(&self, conn: &Connection) {
        let pull = self.lock_inbox().take_pull(tokio::time::Instant::now());
        if pull && let Err(e) = self.sync_offline(conn).await {
            tracing::debug!(error = %e, "pull for a gap failed");
        }
        self.flush(conn, Vec::new()).await;
    }

    /// Pulls every page of the offline store into the inbox; shows and ACKs
    /// what it can (a message held behind a gap is ACKed when shown).
    async fn sync_offline(&self, conn: &Connection) -> Result<(), ClientError> {
        let mut after = 0;
        loop {
            let page: pb::PullOfflineResponse = conn
                .request(
                    RequestType::PullOffline,
                    &pb::PullOfflineRequest { after_msg_id: after, limit: 200 },
                )
                .await?;
            if let Some(last) = page.messages.last() {
                after = last.msg_id;
            }
            self.receive(conn, page.messages).await;
            if !page.more {
                return Ok(());
            }
        }
    }

    /// Puts a logged-in connection into service: starts its heartbeats and
    /// pulls the offline store. Pushes that arrive meanwhile wait in
    /// `events` until `serve_connection` handles them, so they are shown
    /// after the offline messages (and dropped if already shown). If the
    /// sync fails, the connection is aborted and why it ended is returned.
    async fn start_connection(
        &self,
        conn: &Connection,
        events: &mut mpsc::UnboundedReceiver<ServerEvent>,
    ) -> Result<(), EndReason> {
        spawn_heartbeats(conn.clone(), self.heartbeat_interval());
        let synced = tokio::select! {
            _ = self.closed.cancelled() => {
                conn.close().await;
                return Err(EndReason::Closed);
            }
            synced = self.sync_offline(conn) => synced,
        };
        let Err(e) = synced else { return Ok(()) };
        tracing::debug!(error = %e, "offline sync failed; dropping the connection");
        conn.abort().await;
        // The held pushes are dropped (unACKed, they stay in the offline
        // store for the next sync), but a KICKED notice still counts.
        let sync_error = match e {
            ClientError::Server(s) => Some(s),
            _ => None,
        };
        while let Some(event) = events.recv().await {
            match event {
                ServerEvent::Notice(n) if n.kind == NoticeKind::Kicked as i32 => {
                    return Err(EndReason::Kicked(n.reason));
                }
                ServerEvent::Closed(error) => return Err(EndReason::Dropped(error.or(sync_error))),
                _ => {}
            }
        }
        Err(EndReason::Dropped(sync_error))
    }

    fn heartbeat_interval(&self) -> Duration {
        self.login
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| Duration::from_millis(u64::from(l.heartbeat_interval_ms.max(1_000))))
            .unwrap_or(Duration::from_secs(30))
    }

    /// Keeps a connection: syncs it, handles its events, and reconnects when
    /// it drops.
    async fn supervise(
        self: Arc<Self>,
        mut conn: Connection,
        mut events: mpsc::UnboundedReceiver<ServerEvent>,
    ) {
        // The first sync runs here, not in `connect`: it sends into the
        // bounded event channel, which the application can only drain once
        // `connect` has returned the receiver.
        let mut started = self.start_connection(&conn, &mut events).await;
        loop {
            let reason = match started {
                Ok(()) => self.serve_connection(&conn, &mut events).await,
                Err(reason) => reason,
            };
            self.connection.send_replace(None);
            match reason {
                EndReason::Closed => return,
                EndReason::Kicked(why) => {
                    let _ = self.events.send(Event::Kicked(why)).await;
                    return;
                }
                EndReason::Dropped(error) => {
                    // The reader has stopped, but the write half still holds
                    // the socket open (e.g. after an idle timeout).
                    conn.abort().await;
                    let _ = self.events.send(Event::Disconnected(error)).await;
                    if !self.config.reconnect {
                        return;
                    }
                }
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = self.closed.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let (new_conn, mut new_events) = match self.establish().await {
                    Ok(established) => established,
                    Err(e) => {
                        tracing::debug!(error = %e, "reconnect failed");
                        continue;
                    }
                };
                self.connection.send_replace(Some(new_conn.clone()));
                started = self.start_connection(&new_conn, &mut new_events).await;
                match &started {
                    Ok(()) => {
                        let _ = self.events.send(Event::Reconnected).await;
                    }
                    // Not reconnected until the offline store is pulled: that
                    // connection is closed already; try another.
                    Err(EndReason::Dropped(_)) => {
                        self.connection.send_replace(None);
                        continue;
                    }
                    // Kicked or closed: the outer loop ends the client.
                    Err(_) => {}
                }
                conn = new_conn;
                events = new_events;
                break;
            }
        }
    }

    async fn serve_connection(
        &self,
        conn: &Connection,
        events: &mut mpsc::UnboundedReceiver<ServerEvent>,
    ) -> EndReason {
        // Held messages released while no connection served (a send's ACK
        // can close a gap during a reconnect).
        self.flush(conn, Vec::new()).await;
        loop {
            // The earliest open gap (or pull it asked for) wakes the loop;
            // recomputed on every turn, as every turn can change it.
            let wake = self.lock_inbox().next_wake();
            let event = tokio::select! {
                _ = self.closed.cancelled() => {
                    conn.close().await;
                    return EndReason::Closed;
                }
                () = self.inbox_changed.notified() => {
                    self.flush(conn, Vec::new()).await;
                    continue;
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)),
                    if wake.is_some() =>
                {
                    self.on_gap_timer(conn).await;
                    continue;
                }
                event = events.recv() => event,
            };
            // The reader always ends with Closed; None means it died.
            let Some(event) = event else { return EndReason::Dropped(None) };
            // Everything already received is one burst: one ACK frame
            // covers the messages it shows at once and its duplicates.
            let mut burst = vec![event];
            while let Ok(event) = events.try_recv() {
                burst.push(event);
            }
            // In arrival order; the messages up to a notice (or the end of
            // the burst) go into the inbox together.
            let mut messages = Vec::new();
            for event in burst {
                match event {
                    ServerEvent::Message(message) => messages.push(message),
                    ServerEvent::Notice(notice) => {
                        self.receive(conn, std::mem::take(&mut messages)).await;
                        match NoticeKind::try_from(notice.kind) {
                            Ok(NoticeKind::Sync) => {
                                if let Err(e) = self.sync_offline(conn).await {
                                    tracing::debug!(error = %e, "sync after notice failed");
                                }
                            }
                            Ok(NoticeKind::Kicked) => return EndReason::Kicked(notice.reason),
                            // RECONNECT: the server closes the connection
                            // next; the Closed event starts the reconnect.
                            _ => {}
                        }
                    }
                    ServerEvent::Closed(error) => {
                        self.receive(conn, messages).await;
                        return EndReason::Dropped(error);
                    }
                }
            }
            self.receive(conn, messages).await;
        }
    }

    fn ack(&self, conn: &Connection, msg_ids: Vec<u64>) {
        if msg_ids.is_empty() {
            return;
        }
        let conn = conn.clone();
        let mut acks = self.acks_in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while acks.try_join_next().is_some() {}
        acks.spawn(async move {
            if let Err(e) = ack_all(&conn, &msg_ids).await {
                // Unacked messages stay in the offline store and come back
                // at the next sync, where they are deduplicated.
                tracing::debug!(error = %e, "ACK failed");
            }
        });
    }
}

/// ACKs `msg_ids` in as many requests as the server's per-request limit
/// needs (a batch of pushes can be larger). With sequence 0, which the
/// server answers only if the ACK fails (PROTOCOL §5.3): nothing waits for
/// the answer, and an ACK that does not arrive only means the messages come
/// back at the next sync.
async fn ack_all(conn: &Connection, msg_ids: &[u64]) -> Result<(), ClientError> {
    for chunk in msg_ids.chunks(MAX_ACK_IDS) {
        let ack = pb::AckMessagesRequest { msg_ids: chunk.to_vec() };
        conn.send_frame(Frame::new(RequestType::AckMessages, 0, &ack)).await?;
    }
    Ok(())
}

/// Heartbeats `conn` every `interval` until it ends. A heartbeat without an
/// answer within the request timeout means the peer is gone even if the
/// socket looks open (half-open TCP never reports EOF): the connection is
/// aborted, and its Closed event makes the supervisor reconnect.
fn spawn_heartbeats(conn: Connection, interval: Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = conn.ended() => return,
                _ = ticks.tick() => {}
            }
            match conn.request::<_, pb::Heartbeat>(RequestType::Heartbeat, &pb::Heartbeat {}).await {
                // An error frame still proves the server is there.
                Ok(_) | Err(ClientError::Server(_)) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat failed; dropping the connection");
                    conn.abort().await;
                    return;
                }
            }
        }
    });
}

enum EndReason {
    Closed,
    Kicked(String),
    Dropped(Option<ServiceError>),
}
