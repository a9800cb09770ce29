//! `Client` against a scripted fake server: a plaintext access node built
//! from `TcpListener` + `FrameCodec` that answers LOGIN, PULL_OFFLINE,
//! ACK_MESSAGES, SEND_* and HEARTBEAT as each test dictates, and a
//! router-auth stand-in for the HTTP login. This reaches situations the real
//! server does not produce on demand: a huge offline backlog, a peer that
//! stops answering, a failing sync, pushes out of `seq` order, a seq that
//! never comes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tern_sdk::proto::{Frame, FrameCodec, RequestType};
use tern_sdk::{Client, ClientConfig, ClientError, ErrorCode, Event, TlsMode, pb};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// How long any single step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);
/// The server's limit per ACK_MESSAGES (offline-svc `max_ack_ids`).
const MAX_ACK_IDS: usize = 1_000;

/// Starts a router-auth stand-in whose login accepts the password "secret".
async fn fake_auth() -> String {
    async fn login(Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
        if body["password"] == "secret" {
            let token =
                json!({"user_id": body["user_id"], "token": "t", "expires_at_ms": 4_000_000_000_000u64});
            (StatusCode::OK, Json(token))
        } else {
            (StatusCode::UNAUTHORIZED, Json(json!({"error": "BAD_CREDENTIALS", "message": "wrong password"})))
        }
    }
    let app = axum::Router::new().route("/v1/login", axum::routing::post(login));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A fake access node; each `accept` is one client connection.
struct FakeAccess {
    listener: TcpListener,
}

impl FakeAccess {
    async fn bind() -> FakeAccess {
        FakeAccess { listener: TcpListener::bind("127.0.0.1:0").await.unwrap() }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    async fn accept(&self) -> Peer {
        let (tcp, _) =
            tokio::time::timeout(STEP, self.listener.accept()).await.expect("no connection").unwrap();
        Peer {
            frames: Framed::new(tcp, FrameCodec::new(tern_sdk::proto::MAX_SERVER_BODY_LEN)),
            heartbeats: true,
        }
    }
}

/// The server side of one connection.
struct Peer {
    frames: Framed<TcpStream, FrameCodec>,
    /// Whether HEARTBEATs are answered (otherwise they are swallowed).
    heartbeats: bool,
}

impl Peer {
    /// The next frame other than a HEARTBEAT; `None` once the client closed
    /// its side.
    async fn next_request(&mut self) -> Option<Frame> {
        loop {
            let frame = tokio::time::timeout(STEP, self.frames.next()).await.expect("client went quiet")?;
            let frame = frame.expect("undecodable frame from the client");
            if frame.kind() != Some(RequestType::Heartbeat) {
                return Some(frame);
            }
            if self.heartbeats {
                self.send(Frame::new(RequestType::Heartbeat, frame.sequence, &pb::Heartbeat {})).await;
            }
        }
    }

    async fn expect(&mut self, kind: RequestType) -> Frame {
        let frame =
            self.next_request().await.unwrap_or_else(|| panic!("connection closed; expected {kind:?}"));
        assert_eq!(frame.kind(), Some(kind), "unexpected request");
        frame
    }

    async fn send(&mut self, frame: Frame) {
        self.frames.send(frame).await.unwrap();
    }

    async fn reply(&mut self, request: &Frame, body: &impl prost::Message) {
        let kind = request.kind().unwrap();
        self.send(Frame::new(kind, request.sequence, body)).await;
    }

    /// Answers the LOGIN.
    async fn login(&mut self, heartbeat_interval_ms: u32, idle_timeout_ms: u32, pending_offline: u64) {
        let request = self.expect(RequestType::Login).await;
        let response = pb::LoginResponse {
            user_id: "bob".into(),
            device_id: "default".into(),
            connection_id: 1,
            heartbeat_interval_ms,
            idle_timeout_ms,
            pending_offline,
        };
        self.reply(&request, &response).await;
    }

    /// Answers a LOGIN and then the sync of an empty offline store.
    async fn login_empty(&mut self, heartbeat_interval_ms: u32, idle_timeout_ms: u32) {
        self.login(heartbeat_interval_ms, idle_timeout_ms, 0).await;
        let pull = self.expect(RequestType::PullOffline).await;
        self.reply(&pull, &pb::PullOfflineResponse { messages: vec![], more: false }).await;
    }

    /// Waits until the client has closed the connection.
    async fn expect_closed(&mut self) {
        while let Some(frame) = self.next_request().await {
            assert_ne!(frame.kind(), Some(RequestType::Login), "client logged in again on a dead connection");
        }
    }

    /// Serves PULL_OFFLINE from `store` in pages of `page` and records the
    /// ACKs (refusing, like the server, more than 1000 ids) until every id
    /// in `store` and `extra` is ACKed. `on_first_pull` runs before the
    /// first page is answered. Returns the id count of every ACK.
    async fn serve_offline(
        &mut self,
        store: &[pb::Message],
        page: usize,
        extra: &[u64],
        on_first_pull: Vec<Frame>,
    ) -> Vec<usize> {
        let mut unacked: BTreeSet<u64> =
            store.iter().map(|m| m.msg_id).chain(extra.iter().copied()).collect();
        let mut on_first_pull = Some(on_first_pull);
        let mut ack_sizes = vec![];
        while !unacked.is_empty() {
            let request = self.next_request().await.expect("client closed before ACKing everything");
            match request.kind() {
                Some(RequestType::PullOffline) => {
                    for push in on_first_pull.take().unwrap_or_default() {
                        self.send(push).await;
                    }
                    let pull: pb::PullOfflineRequest = request.decode().unwrap();
                    let rest: Vec<_> = store.iter().filter(|m| m.msg_id > pull.after_msg_id).collect();
                    let more = rest.len() > page;
                    let messages = rest.into_iter().take(page).cloned().collect();
                    self.reply(&request, &pb::PullOfflineResponse { messages, more }).await;
                }
                Some(RequestType::AckMessages) => {
                    let ack: pb::AckMessagesRequest = request.decode().unwrap();
                    ack_sizes.push(ack.msg_ids.len());
                    if ack.msg_ids.len() > MAX_ACK_IDS {
                        let error =
                            Frame::error(request.sequence, ErrorCode::InvalidArgument, "too many ids");
                        self.send(error).await;
                        continue;
                    }
                    for id in &ack.msg_ids {
                        unacked.remove(id);
                    }
                    self.reply(&request, &pb::Empty {}).await;
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
        ack_sizes
    }
}

/// What a [`Served`] connection holds and has seen.
#[derive(Default)]
struct ServedState {
    /// The device's offline store: messages stored or pushed and not yet
    /// ACKed (the real server writes before it pushes).
    offline: BTreeMap<u64, pb::Message>,
    /// Every ACKed id, in ACK order.
    acked: Vec<u64>,
    /// PULL_OFFLINE requests answered (pages, not syncs).
    pulls: usize,
    /// Answers to SEND_SINGLE / SEND_GROUP, in order.
    send_answers: VecDeque<Result<pb::SendAck, ErrorCode>>,
}

/// A logged-in connection served by a background task, like a real access
/// node with offline-svc behind it: PULL_OFFLINE pages come from the
/// offline store, ACKs remove from it, sends get the scripted answers.
/// Dropping it closes the connection.
struct Served {
    pushes: mpsc::UnboundedSender<pb::Message>,
    state: Arc<Mutex<ServedState>>,
}

impl Served {
    fn state(&self) -> std::sync::MutexGuard<'_, ServedState> {
        self.state.lock().unwrap()
    }

    /// Writes `message` to the offline store and pushes it.
    fn push(&self, message: pb::Message) {
        self.pushes.send(message).unwrap();
    }

    /// Writes `message` to the offline store only: a pull finds it.
    fn store(&self, message: pb::Message) {
        self.state().offline.insert(message.msg_id, message);
    }

    fn acked(&self) -> Vec<u64> {
        self.state().acked.clone()
    }

    fn pulls(&self) -> usize {
        self.state().pulls
    }

    /// Waits until every id in `ids` has been ACKed.
    async fn wait_acked(&self, ids: &[u64]) {
        self.wait_acked_times(ids, 1).await;
    }

    /// Waits until every id in `ids` has been ACKed at least `times` times.
    async fn wait_acked_times(&self, ids: &[u64], times: usize) {
        let deadline = tokio::time::Instant::now() + STEP;
        let done = |acked: &[u64]| ids.iter().all(|id| acked.iter().filter(|a| *a == id).count() >= times);
        while !done(&self.state().acked) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ACKed {times}×: {ids:?}; ACKed: {:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Peer {
    /// Serves this (logged-in) connection in the background from here on,
    /// starting with the client's initial sync of `offline`.
    fn serve_in_background(
        mut self,
        offline: Vec<pb::Message>,
        send_answers: Vec<Result<pb::SendAck, ErrorCode>>,
    ) -> Served {
        let state = Arc::new(Mutex::new(ServedState {
            offline: offline.into_iter().map(|m| (m.msg_id, m)).collect(),
            send_answers: send_answers.into(),
            ..Default::default()
        }));
        let (pushes, mut commands) = mpsc::unbounded_channel::<pb::Message>();
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    command = commands.recv() => {
                        // `Served` dropped: close the connection.
                        let Some(message) = command else { return };
                        shared.lock().unwrap().offline.insert(message.msg_id, message.clone());
                        self.send(Frame::new(RequestType::PushMessage, 0, &message)).await;
                        continue;
                    }
                    frame = self.frames.next() => frame,
                };
                let Some(Ok(frame)) = frame else { return };
                match frame.kind() {
                    Some(RequestType::Heartbeat) => self.reply(&frame, &pb::Heartbeat {}).await,
                    Some(RequestType::PullOffline) => {
                        let pull: pb::PullOfflineRequest = frame.decode().unwrap();
                        let limit = if pull.limit == 0 { 200 } else { pull.limit as usize };
                        let page = {
                            let mut state = shared.lock().unwrap();
                            state.pulls += 1;
                            let rest: Vec<_> = state
                                .offline
                                .range(pull.after_msg_id + 1..)
                                .map(|(_, m)| m.clone())
                                .collect();
                            let more = rest.len() > limit;
                            pb::PullOfflineResponse { messages: rest.into_iter().take(limit).collect(), more }
                        };
                        self.reply(&frame, &page).await;
                    }
                    Some(RequestType::AckMessages) => {
                        let ack: pb::AckMessagesRequest = frame.decode().unwrap();
                        {
                            let mut state = shared.lock().unwrap();
                            for id in &ack.msg_ids {
                                state.offline.remove(id);
                            }
                            state.acked.extend(&ack.msg_ids);
                        }
                        self.reply(&frame, &pb::Empty {}).await;
                    }
                    Some(RequestType::SendSingle | RequestType::SendGroup) => {
                        let answer =
                            shared.lock().unwrap().send_answers.pop_front().expect("unexpected send");
                        match answer {
                            Ok(ack) => self.reply(&frame, &ack).await,
                            Err(code) => self.send(Frame::error(frame.sequence, code, "scripted")).await,
                        }
                    }
                    other => panic!("unexpected request {other:?}"),
                }
            }
        });
        Served { pushes, state }
    }
}

/// Accepts the next connection, answers its LOGIN and serves it in the
/// background (see [`Peer::serve_in_background`]).
async fn serve_next(
    access: &FakeAccess,
    offline: Vec<pb::Message>,
    send_answers: Vec<Result<pb::SendAck, ErrorCode>>,
) -> Served {
    let mut peer = access.accept().await;
    peer.login(60_000, 0, offline.len() as u64).await;
    peer.serve_in_background(offline, send_answers)
}

/// Connects `config` to `access`, served in the background.
async fn connect_served(
    access: &FakeAccess,
    config: ClientConfig,
    offline: Vec<pb::Message>,
    send_answers: Vec<Result<pb::SendAck, ErrorCode>>,
) -> (Client, mpsc::Receiver<Event>, Served) {
    let (connected, served) =
        tokio::join!(Client::connect(config), serve_next(access, offline, send_answers));
    let (client, events) = connected.expect("connect");
    (client, events, served)
}

/// A 1:1 message from alice to bob (conversation `p:alice:bob`).
fn from_alice(msg_id: u64, seq: u64) -> pb::Message {
    pb::Message { seq, ..message(msg_id) }
}

/// A message in group `g` (conversation `g:g`).
fn in_group(msg_id: u64, seq: u64) -> pb::Message {
    pb::Message {
        kind: pb::ConversationKind::Group as i32,
        receiver: String::new(),
        group_id: "g".into(),
        ..from_alice(msg_id, seq)
    }
}

/// Expects a message event and returns it.
async fn next_message(events: &mut mpsc::Receiver<Event>) -> pb::Message {
    match next_event(events).await {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn message(msg_id: u64) -> pb::Message {
    pb::Message {
        msg_id,
        kind: pb::ConversationKind::Single as i32,
        sender: "alice".into(),
        receiver: "bob".into(),
        seq: msg_id,
        content: format!("message {msg_id}").into_bytes(),
        client_msg_id: format!("c-{msg_id}"),
        ..Default::default()
    }
}

fn push(msg_id: u64) -> Frame {
    Frame::new(RequestType::PushMessage, 0, &message(msg_id))
}

fn config(auth_url: &str, access: &str) -> ClientConfig {
    let mut config = ClientConfig::new(auth_url, "bob", "secret", TlsMode::Plain);
    config.access_addr = Some(access.to_owned());
    config
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(STEP, events.recv()).await.expect("no event in time").expect("event stream ended")
}

/// Reads `count` messages and returns their ids in arrival order.
async fn message_ids(events: &mut mpsc::Receiver<Event>, count: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        match next_event(events).await {
            Event::Message(m) => ids.push(m.msg_id),
            other => panic!("unexpected event {other:?}"),
        }
    }
    ids
}

async fn no_event(events: &mut mpsc::Receiver<Event>, wait: Duration) {
    if let Ok(Some(event)) = tokio::time::timeout(wait, events.recv()).await {
        panic!("unexpected event {event:?}");
    }
}

/// More offline messages than the event channel holds (4096): `connect`
/// returns before the application reads any, and every message arrives
/// once, in order, followed by the pushes that came in during the sync.
#[tokio::test]
async fn connect_returns_before_a_large_backlog_is_read() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let addr = access.addr();
    let server = tokio::spawn(async move {
        let store: Vec<_> = (1..=5000).map(message).collect();
        let mut peer = access.accept().await;
        peer.login(60_000, 0, 5000).await;
        // Pushed while the sync runs: two new messages, and two that are in
        // the offline store too (to be shown once).
        let pushes = vec![push(5001), push(1), push(4999), push(5002)];
        let acks = peer.serve_offline(&store, 200, &[5001, 5002], pushes).await;
        (peer, acks)
    });

    let (client, mut events) = tokio::time::timeout(STEP, Client::connect(config(&auth, &addr)))
        .await
        .expect("connect blocked on the offline backlog")
        .expect("connect");
    assert_eq!(client.login_info().unwrap().pending_offline, 5000);
    // Let the sync fill the channel before anything is read.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ids = message_ids(&mut events, 5002).await;
    assert_eq!(ids, (1..=5002).collect::<Vec<_>>());
    let (_peer, acks) = server.await.unwrap();
    assert!(acks.iter().all(|&n| n <= MAX_ACK_IDS), "ACK sizes {acks:?}");
    no_event(&mut events, Duration::from_millis(300)).await;
    client.close().await;
}

/// An offline page and a batch of held pushes both larger than the
/// server's ACK limit are ACKed in requests of at most 1000 ids.
#[tokio::test]
async fn acks_are_split_at_the_server_limit() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let addr = access.addr();
    let server = tokio::spawn(async move {
        let store: Vec<_> = (1..=2500).map(message).collect();
        let pushed: Vec<u64> = (2501..=5500).collect();
        let mut peer = access.accept().await;
        peer.login(60_000, 0, 2500).await;
        // All 3000 pushes wait until the sync is done and then form one batch.
        let pushes = pushed.iter().map(|&id| push(id)).collect();
        let acks = peer.serve_offline(&store, 2500, &pushed, pushes).await;
        (peer, acks)
    });

    let (client, mut events) = Client::connect(config(&auth, &addr)).await.expect("connect");
    assert_eq!(message_ids(&mut events, 5500).await, (1..=5500).collect::<Vec<_>>());
    let (_peer, acks) = tokio::time::timeout(STEP, server).await.expect("not everything was ACKed").unwrap();
    assert!(acks.iter().all(|&n| n <= MAX_ACK_IDS), "ACK sizes {acks:?}");
    assert_eq!(acks.iter().sum::<usize>(), 5500, "ACK sizes {acks:?}");
    client.close().await;
}

/// A server that stops answering heartbeats (but keeps the socket open) is
/// dropped after the request timeout: Disconnected, then a reconnect.
#[tokio::test]
async fn unanswered_heartbeats_end_the_connection() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    config.request_timeout = Duration::from_secs(1);
    let server = tokio::spawn(async move {
        let mut first = access.accept().await;
        // No idle timeout: only the heartbeat can notice.
        first.login_empty(1_000, 0).await;
        first.heartbeats = false;
        first.expect_closed().await;
        let mut second = access.accept().await;
        second.login_empty(60_000, 0).await;
        second
    });

    let (client, mut events) = Client::connect(config).await.expect("connect");
    assert!(matches!(next_event(&mut events).await, Event::Disconnected(None)));
    assert!(matches!(next_event(&mut events).await, Event::Reconnected));
    let _second = server.await.unwrap();
    client.close().await;
}

/// A server that sends nothing for its advertised idle timeout is dropped
/// even when no heartbeat is due yet.
#[tokio::test]
async fn a_server_silent_for_the_idle_timeout_is_dropped() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let config = config(&auth, &access.addr());
    let server = tokio::spawn(async move {
        let mut first = access.accept().await;
        // The first heartbeat would come after a minute.
        first.login_empty(60_000, 1_000).await;
        first.expect_closed().await;
        let mut second = access.accept().await;
        second.login_empty(60_000, 0).await;
        second
    });

    let started = tokio::time::Instant::now();
    let (client, mut events) = Client::connect(config).await.expect("connect");
    assert!(matches!(next_event(&mut events).await, Event::Disconnected(None)));
    assert!(started.elapsed() >= Duration::from_secs(1), "dropped before the idle timeout");
    assert!(matches!(next_event(&mut events).await, Event::Reconnected));
    let _second = server.await.unwrap();
    client.close().await;
}

/// Login failures come back from `connect`, and a connection whose LOGIN
/// failed is closed rather than left to the server's timeout.
#[tokio::test]
async fn connect_returns_login_errors_and_closes_the_connection() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;

    let mut wrong_password = config(&auth, &access.addr());
    wrong_password.password = "wrong".into();
    match Client::connect(wrong_password).await {
        Err(ClientError::Http { code, .. }) => assert_eq!(code, "BAD_CREDENTIALS"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected with a wrong password"),
    }

    let closed_port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
    let unreachable = Client::connect(config(&auth, &closed_port)).await;
    assert!(unreachable.is_err(), "connected to a closed port");

    let addr = access.addr();
    let server = tokio::spawn(async move {
        let mut peer = access.accept().await;
        let login = peer.expect(RequestType::Login).await;
        // The real server would close after INVALID_TOKEN; this one waits
        // for the client to do it.
        peer.send(Frame::error(login.sequence, ErrorCode::InvalidToken, "bad token")).await;
        peer.expect_closed().await;
    });
    match Client::connect(config(&auth, &addr)).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::InvalidToken), "{e}"),
        Ok(_) => panic!("connected with a refused token"),
    }
    server.await.unwrap();
}

/// A failed offline sync closes the connection and counts as not
/// connected: after the initial connect it is a Disconnected, and during a
/// reconnect the client keeps trying (one Reconnected, once a sync works).
#[tokio::test]
async fn a_failed_sync_closes_the_connection_and_retries() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let config = config(&auth, &access.addr());
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let mut peer = access.accept().await;
            peer.login(60_000, 0, 0).await;
            let pull = peer.expect(RequestType::PullOffline).await;
            peer.send(Frame::error(pull.sequence, ErrorCode::Internal, "store down")).await;
            peer.expect_closed().await;
        }
        let mut peer = access.accept().await;
        peer.login_empty(60_000, 0).await;
        peer
    });

    let (client, mut events) =
        Client::connect(config).await.expect("a sync failure is not a connect failure");
    match next_event(&mut events).await {
        Event::Disconnected(Some(e)) => assert_eq!(e.code, ErrorCode::Internal),
        other => panic!("unexpected event {other:?}"),
    }
    assert!(matches!(next_event(&mut events).await, Event::Reconnected));
    let _peer = server.await.unwrap();
    no_event(&mut events, Duration::from_millis(300)).await;
    client.close().await;
}

/// Pushes arriving out of `seq` order are shown in `seq` order, per
/// conversation (a group's order is independent of a 1:1 chat's), with no
/// Skipped event, and everything is ACKed.
#[tokio::test]
async fn pushes_out_of_order_are_shown_in_seq_order() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let (client, mut events, served) =
        connect_served(&access, config(&auth, &access.addr()), vec![], vec![]).await;

    // 1:1 seqs arrive 1, 3, 2; the group's 1, 3, 2.
    for m in
        [from_alice(1, 1), in_group(2, 1), from_alice(3, 3), in_group(4, 3), in_group(5, 2), from_alice(6, 2)]
    {
        served.push(m);
    }
    assert_eq!(message_ids(&mut events, 6).await, [1, 2, 5, 4, 6, 3]);
    served.wait_acked(&[1, 2, 3, 4, 5, 6]).await;
    no_event(&mut events, Duration::from_millis(300)).await;
    let expected = HashMap::from([("p:alice:bob".to_owned(), 3), ("g:g".to_owned(), 3)]);
    assert_eq!(client.cursors(), expected);
    client.close().await;
}

/// A gap makes the client pull the offline store shortly after; the
/// missing message, which the server has only in the offline store (its
/// push was lost), is shown before the held one, well before the gap
/// timeout.
#[tokio::test]
async fn a_gap_is_filled_by_the_pull_it_triggers() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    config.gap_timeout = Duration::from_secs(5);
    let (client, mut events, served) = connect_served(&access, config, vec![], vec![]).await;

    served.push(from_alice(1, 1));
    assert_eq!(next_message(&mut events).await.msg_id, 1);
    assert_eq!(served.pulls(), 1, "only the login sync so far");
    served.store(from_alice(2, 2));
    let pushed = tokio::time::Instant::now();
    served.push(from_alice(3, 3));
    assert_eq!(next_message(&mut events).await.msg_id, 2);
    assert_eq!(next_message(&mut events).await.msg_id, 3);
    assert!(pushed.elapsed() < Duration::from_secs(4), "released by the timeout, not the pull");
    assert_eq!(served.pulls(), 2, "one pull for the gap");
    served.wait_acked(&[1, 2, 3]).await;
    no_event(&mut events, Duration::from_millis(300)).await;
    client.close().await;
}

/// A seq that never comes: after the gap timeout the held message is shown
/// after a Skipped event naming the missing seq. The missing message, if it
/// turns up later, is still shown (late), and the conversation goes on.
#[tokio::test]
async fn a_gap_never_filled_is_given_up_after_the_timeout() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    let gap_timeout = Duration::from_millis(600);
    config.gap_timeout = gap_timeout;
    let (client, mut events, served) = connect_served(&access, config, vec![], vec![]).await;

    served.push(from_alice(1, 1));
    assert_eq!(next_message(&mut events).await.msg_id, 1);
    let pushed = tokio::time::Instant::now();
    served.push(from_alice(3, 3));
    match next_event(&mut events).await {
        Event::Skipped { conversation, missing } => {
            assert_eq!(conversation, "p:alice:bob");
            assert_eq!(missing, [2..=2]);
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    assert!(pushed.elapsed() >= gap_timeout, "given up before the gap timeout");
    assert_eq!(next_message(&mut events).await.msg_id, 3);
    assert!(served.pulls() >= 2, "the gap was looked for in the offline store");
    assert_eq!(client.cursors()["p:alice:bob"], 3);

    served.push(from_alice(2, 2));
    assert_eq!(next_message(&mut events).await.msg_id, 2, "a late message is still shown");
    served.push(from_alice(4, 4));
    assert_eq!(next_message(&mut events).await.msg_id, 4);
    served.wait_acked(&[1, 2, 3, 4]).await;
    assert_eq!(client.cursors()["p:alice:bob"], 4);
    client.close().await;
}

/// A message held behind a gap is not ACKed (not even when the gap's pull
/// delivers it again) until it is shown; a process dying meanwhile would
/// otherwise lose it.
#[tokio::test]
async fn a_held_message_is_not_acked_before_it_is_shown() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    config.gap_timeout = Duration::from_secs(5);
    let (client, mut events, served) = connect_served(&access, config, vec![], vec![]).await;

    served.push(from_alice(1, 1));
    assert_eq!(next_message(&mut events).await.msg_id, 1);
    served.wait_acked(&[1]).await;
    served.push(from_alice(3, 3));
    // Past the gap's pull, which returns 3 (still in the offline store).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(served.pulls() >= 2, "no pull for the gap");
    assert!(!served.acked().contains(&3), "held message ACKed: {:?}", served.acked());
    no_event(&mut events, Duration::from_millis(100)).await;

    served.push(from_alice(2, 2));
    assert_eq!(message_ids(&mut events, 2).await, [2, 3]);
    served.wait_acked(&[2, 3]).await;
    client.close().await;
}

/// This device never receives its own messages: the seq of its own send
/// (acknowledged as a duplicate after a retry) closes the gap it left in
/// the 1:1 conversation, which is keyed by the two user ids whichever way
/// the message went.
#[tokio::test]
async fn own_send_ack_closes_a_gap_in_a_one_to_one_chat() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    config.gap_timeout = Duration::from_secs(5);
    let answers = vec![
        Err(ErrorCode::Unavailable),
        Ok(pb::SendAck { client_msg_id: "c".into(), msg_id: 2, seq: 2, sent_at_ms: 1, duplicate: true }),
    ];
    let (client, mut events, served) = connect_served(&access, config, vec![], answers).await;

    served.push(from_alice(1, 1));
    assert_eq!(next_message(&mut events).await.msg_id, 1);
    served.push(from_alice(3, 3));
    no_event(&mut events, Duration::from_millis(200)).await;
    let sent = tokio::time::Instant::now();
    let ack = client.send_single("alice", "hi").await.expect("send");
    assert_eq!(ack.seq, 2);
    assert_eq!(next_message(&mut events).await.msg_id, 3);
    assert!(sent.elapsed() < Duration::from_secs(4), "released by the timeout, not the send");
    served.wait_acked(&[1, 3]).await;
    assert_eq!(client.cursors(), HashMap::from([("p:alice:bob".to_owned(), 3)]));
    served.push(from_alice(4, 4));
    assert_eq!(next_message(&mut events).await.msg_id, 4);
    client.close().await;
}

/// Cursors live in the client, not the connection: after a reconnect a
/// push that skips a seq is held as before.
#[tokio::test]
async fn cursors_survive_a_reconnect() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let (client, mut events, served) =
        connect_served(&access, config(&auth, &access.addr()), vec![], vec![]).await;
    served.push(from_alice(1, 1));
    served.push(from_alice(2, 2));
    assert_eq!(message_ids(&mut events, 2).await, [1, 2]);
    served.wait_acked(&[1, 2]).await;

    drop(served);
    assert!(matches!(next_event(&mut events).await, Event::Disconnected(None)));
    let served = serve_next(&access, vec![], vec![]).await;
    assert!(matches!(next_event(&mut events).await, Event::Reconnected));
    served.push(from_alice(4, 4));
    no_event(&mut events, Duration::from_millis(200)).await;
    served.push(from_alice(3, 3));
    assert_eq!(message_ids(&mut events, 2).await, [3, 4]);
    client.close().await;
}

/// Cursors given at connect (from an earlier run) are resumed: a
/// conversation whose next seq is missing from the offline store is
/// reported as skipped; one that continues is shown at once.
#[tokio::test]
async fn seeded_cursors_are_resumed_at_connect() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let mut config = config(&auth, &access.addr());
    config.gap_timeout = Duration::from_millis(500);
    config.cursors = HashMap::from([("p:alice:bob".to_owned(), 4), ("g:g".to_owned(), 7)]);
    let offline = vec![from_alice(10, 6), in_group(11, 8)];
    let (client, mut events, served) = connect_served(&access, config, offline, vec![]).await;

    assert_eq!(next_message(&mut events).await.msg_id, 11);
    match next_event(&mut events).await {
        Event::Skipped { conversation, missing } => {
            assert_eq!(conversation, "p:alice:bob");
            assert_eq!(missing, [5..=5]);
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    assert_eq!(next_message(&mut events).await.msg_id, 10);
    served.wait_acked(&[10, 11]).await;
    let expected = HashMap::from([("p:alice:bob".to_owned(), 6), ("g:g".to_owned(), 8)]);
    assert_eq!(client.cursors(), expected);
    client.close().await;
}

/// DELIVERY R2: a send whose connection drops before the SendAck is sent
/// again, with the same client message id, on the next connection.
#[tokio::test]
async fn a_send_cut_off_by_a_dropped_connection_is_retried_with_the_same_id() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let config = config(&auth, &access.addr());
    let (connected, mut first) = tokio::join!(Client::connect(config), async {
        let mut peer = access.accept().await;
        peer.login_empty(60_000, 0).await;
        peer
    });
    let (client, _events) = connected.expect("connect");
    let sending = tokio::spawn({
        let client = client.clone();
        async move { client.send_single("alice", "hi").await }
    });
    let request: pb::SendSingleRequest = first.expect(RequestType::SendSingle).await.decode().unwrap();
    // The connection dies before the server answers.
    drop(first);

    let mut second = access.accept().await;
    second.login(60_000, 0, 0).await;
    // The offline sync and the retried send may come in either order.
    let mut retried = None;
    while retried.is_none() {
        let frame = second.next_request().await.expect("client closed the new connection");
        match frame.kind() {
            Some(RequestType::PullOffline) => {
                second.reply(&frame, &pb::PullOfflineResponse { messages: vec![], more: false }).await;
            }
            Some(RequestType::SendSingle) => {
                let again: pb::SendSingleRequest = frame.decode().unwrap();
                let ack = pb::SendAck {
                    client_msg_id: again.client_msg_id.clone(),
                    msg_id: 9,
                    seq: 1,
                    sent_at_ms: 1,
                    duplicate: true,
                };
                second.reply(&frame, &ack).await;
                retried = Some(again);
            }
            other => panic!("unexpected request {other:?}"),
        }
    }
    let retried = retried.unwrap();
    assert_eq!(retried.client_msg_id, request.client_msg_id, "the retry reuses the client message id");
    assert_eq!((retried.receiver.as_str(), retried.content.as_slice()), ("alice", b"hi".as_slice()));
    let ack =
        tokio::time::timeout(STEP, sending).await.expect("send finished").unwrap().expect("acknowledged");
    assert_eq!(ack.msg_id, 9);
    client.close().await;
}

/// DELIVERY R6: a message that arrives twice (push, then again) is shown
/// once and ACKed both times.
#[tokio::test]
async fn a_message_arriving_twice_is_shown_once_and_acked_twice() {
    let auth = fake_auth().await;
    let access = FakeAccess::bind().await;
    let (client, mut events, served) =
        connect_served(&access, config(&auth, &access.addr()), vec![], vec![]).await;
    served.push(from_alice(1, 1));
    assert_eq!(next_message(&mut events).await.msg_id, 1);
    served.wait_acked(&[1]).await;
    served.push(from_alice(1, 1));
    served.push(from_alice(2, 2));
    assert_eq!(next_message(&mut events).await.msg_id, 2, "the copy of 1 is not shown again");
    served.wait_acked(&[2]).await;
    // The copy of 1 is ACKed too.
    served.wait_acked_times(&[1], 2).await;
    no_event(&mut events, Duration::from_millis(200)).await;
    client.close().await;
}
