//! Bad input against a real `tern standalone`: every case gets its documented
//! ERROR frame, the connection is closed exactly when the code says so,
//! nothing is stored for a rejected request, and other clients keep being
//! served.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use common::{Server, next_message, no_message, text};
use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tern_proto::pb;
use tern_proto::{ErrorCode, Frame, FrameCodec, FrameHeader, HEADER_LEN, PROTOCOL_VERSION, RequestType};
use tern_sdk::{Client, ClientError, Event};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

/// Upper bound for anything the server is expected to do.
const WAIT: Duration = Duration::from_secs(15);
/// How long "nothing arrives" is watched, after a synchronising round trip.
const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------
// A raw TLS connection: arbitrary bytes out, frames in.
// ---------------------------------------------------------------------------

async fn tls_stream(server: &Server) -> TlsStream<TcpStream> {
    let pem = std::fs::read(&server.ca).expect("read CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let (host, _) = server.access.rsplit_once(':').expect("host:port");
    let name = ServerName::try_from(host.to_owned()).expect("server name");
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(&server.access))
        .await
        .expect("connect in time")
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

/// A raw framed TLS connection; sequences are chosen by the test.
struct Raw {
    framed: Framed<TlsStream<TcpStream>, FrameCodec>,
}

fn header(head_length: u32, request_type: u32, sequence: u32, body_length: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    FrameHeader { head_length, client_version: PROTOCOL_VERSION, request_type, sequence, body_length }
        .write(&mut bytes);
    bytes
}

fn raw_frame(request_type: u32, sequence: u32, body: impl Into<Bytes>) -> Frame {
    Frame { client_version: PROTOCOL_VERSION, request_type, sequence, body: body.into() }
}

impl Raw {
    async fn connect(server: &Server) -> Raw {
        Raw { framed: Framed::new(tls_stream(server).await, FrameCodec::default()) }
    }

    /// Connects and logs in as `user` (registering it if needed).
    async fn logged_in(server: &Server, user: &str) -> Raw {
        let mut raw = Raw::connect(server).await;
        let token = server.token(user).await;
        let response = raw.login(1, &token).await;
        assert_eq!(response.user_id, user);
        raw
    }

    /// Writes bytes as they are, bypassing the codec.
    async fn send_bytes(&mut self, bytes: &[u8]) {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
    }

    async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send frame");
    }

    /// Ends the write side (TLS close_notify, then TCP FIN); reading goes on.
    async fn shutdown_write(&mut self) {
        self.framed.get_mut().shutdown().await.expect("shutdown write side");
    }

    /// The next frame, or `None` at a clean end of stream.
    async fn next_frame(&mut self) -> Option<Frame> {
        match tokio::time::timeout(WAIT, self.framed.next()).await {
            Err(_) => panic!("no frame and no close within {WAIT:?}"),
            Ok(None) => None,
            Ok(Some(Ok(frame))) => Some(frame),
            Ok(Some(Err(e))) => panic!("reading from the server failed: {e}"),
        }
    }

    /// Sends a request and returns the frame that answers it.
    async fn call(&mut self, frame: Frame) -> Frame {
        self.send(frame).await;
        self.next_frame().await.expect("a response, not a close")
    }

    async fn login(&mut self, sequence: u32, token: &str) -> pb::LoginResponse {
        let body = pb::LoginRequest { token: token.to_owned(), device_id: "raw".into() };
        let response = self.call(Frame::new(RequestType::Login, sequence, &body)).await;
        assert_eq!(response.request_type, RequestType::Login as u32, "LOGIN failed: {response:?}");
        assert_eq!(response.sequence, sequence);
        response.decode().expect("LoginResponse")
    }

    /// Reads the next frame and checks it is an ERROR for `sequence` with `code`.
    async fn expect_error(&mut self, sequence: u32, code: ErrorCode) -> pb::ErrorBody {
        let frame =
            self.next_frame().await.unwrap_or_else(|| panic!("closed without the {code} error frame"));
        assert_eq!(frame.request_type, RequestType::Error as u32, "expected an ERROR frame, got {frame:?}");
        assert_eq!(frame.sequence, sequence, "the error must echo the request's sequence");
        let body: pb::ErrorBody = frame.decode().expect("ErrorBody decodes");
        assert_eq!(ErrorCode::from_u32(body.code), Some(code), "wrong error code: {body:?}");
        assert!(!body.message.is_empty(), "the error carries a message");
        body
    }

    /// Sends a request and checks the server answers with `code`.
    async fn call_expecting(&mut self, frame: Frame, code: ErrorCode) -> pb::ErrorBody {
        let sequence = frame.sequence;
        self.send(frame).await;
        self.expect_error(sequence, code).await
    }

    /// The server closes the connection: nothing but a clean end of stream.
    async fn expect_closed(&mut self) {
        if let Some(frame) = self.next_frame().await {
            panic!("expected the connection to close, got {frame:?}");
        }
    }

    /// The connection is still usable: a HEARTBEAT is answered.
    async fn expect_open(&mut self, sequence: u32) {
        let response = self.call(Frame::new(RequestType::Heartbeat, sequence, &pb::Heartbeat {})).await;
        assert_eq!(
            response.request_type,
            RequestType::Heartbeat as u32,
            "heartbeat not answered: {response:?}"
        );
        assert_eq!(response.sequence, sequence);
    }
}

// ---------------------------------------------------------------------------
// High-level clients: bystanders and receivers.
// ---------------------------------------------------------------------------

/// A logged-in SDK client. A LOGIN may race a very short token lifetime on a
/// loaded machine; the retry then takes a fresh token.
async fn client(server: &Server, user: &str) -> (Client, mpsc::Receiver<Event>) {
    let mut attempt = 1;
    loop {
        match Client::connect(server.client_config(user)).await {
            Ok(ok) => return ok,
            Err(ClientError::Server(e)) if e.code == ErrorCode::TokenExpired && attempt < 5 => attempt += 1,
            Err(e) => panic!("{user} cannot connect: {e}"),
        }
    }
}

/// alice and bob, connected before the bad input arrives.
struct Bystanders {
    alice: Client,
    bob: Client,
    bob_events: mpsc::Receiver<Event>,
}

impl Bystanders {
    async fn connect(server: &Server) -> Bystanders {
        let (alice, _alice_events) = client(server, "alice").await;
        let (bob, bob_events) = client(server, "bob").await;
        Bystanders { alice, bob, bob_events }
    }

    /// alice can still send to bob, and bob gets it.
    async fn still_served(mut self) {
        let ack = self.alice.send_single("bob", "still serving").await.expect("alice's send is acknowledged");
        let message = next_message(&mut self.bob_events, WAIT).await;
        assert_eq!(message.msg_id, ack.msg_id);
        assert_eq!(message.sender, "alice");
        assert_eq!(text(&message), "still serving");
        self.alice.close().await;
        self.bob.close().await;
    }
}

/// `user` logs in and finds nothing: no offline message, no push.
async fn assert_nothing_stored_for(server: &Server, user: &str) {
    let (receiver, mut events) = client(server, user).await;
    let login = receiver.login_info().expect("login info");
    assert_eq!(login.pending_offline, 0, "{user} has offline messages");
    no_message(&mut events, QUIET).await;
    receiver.close().await;
}

fn send_single(sequence: u32, client_msg_id: &str, sender: &str, receiver: &str) -> Frame {
    let body = pb::SendSingleRequest {
        client_msg_id: client_msg_id.to_owned(),
        sender: sender.to_owned(),
        receiver: receiver.to_owned(),
        content: b"should not be stored".to_vec(),
    };
    Frame::new(RequestType::SendSingle, sequence, &body)
}

// ---------------------------------------------------------------------------
// Framing errors: error frame, then close.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_head_length_is_bad_header_and_closes() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::connect(&server).await;
    // A well-formed HEARTBEAT header except for headLength.
    raw.send_bytes(&header(16, RequestType::Heartbeat as u32, 1, 0)).await;
    raw.expect_error(0, ErrorCode::BadHeader).await;
    raw.expect_closed().await;

    bystanders.still_served().await;
}

#[tokio::test]
async fn oversized_body_length_is_rejected_from_the_header_alone() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::connect(&server).await;
    // Only the header, claiming 1 MiB; no body byte is ever sent and the
    // write side stays open, so the answer cannot wait for the body.
    raw.send_bytes(&header(HEADER_LEN as u32, RequestType::SendSingle as u32, 1, 1 << 20)).await;
    raw.expect_error(0, ErrorCode::FrameTooLarge).await;
    raw.expect_closed().await;

    bystanders.still_served().await;
}

#[tokio::test]
async fn garbage_bytes_are_bad_header_and_close() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::connect(&server).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: tern.example\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n")
        .await;
    raw.expect_error(0, ErrorCode::BadHeader).await;
    raw.expect_closed().await;

    // Binary noise too (fixed, so the first word is certainly not 20).
    let mut raw = Raw::connect(&server).await;
    let noise: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(151).wrapping_add(0x9d) % 251) as u8).collect();
    assert_ne!(&noise[..4], &[0, 0, 0, 20]);
    raw.send_bytes(&noise).await;
    raw.expect_error(0, ErrorCode::BadHeader).await;
    raw.expect_closed().await;

    bystanders.still_served().await;
}

#[tokio::test]
async fn truncated_frame_at_end_of_stream_is_reported_then_closed() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::connect(&server).await;
    let mut bytes = header(HEADER_LEN as u32, RequestType::Heartbeat as u32, 5, 100);
    bytes.extend_from_slice(&[0u8; 10]);
    raw.send_bytes(&bytes).await;
    raw.shutdown_write().await;
    raw.expect_error(0, ErrorCode::TruncatedFrame).await;
    raw.expect_closed().await;

    // Ending inside the header is truncation too.
    let mut raw = Raw::connect(&server).await;
    raw.send_bytes(&header(HEADER_LEN as u32, RequestType::Heartbeat as u32, 6, 0)[..10]).await;
    raw.shutdown_write().await;
    raw.expect_error(0, ErrorCode::TruncatedFrame).await;
    raw.expect_closed().await;

    bystanders.still_served().await;
}

// ---------------------------------------------------------------------------
// Request errors: error frame echoing the sequence, connection stays usable.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unknown_request_type_keeps_the_connection() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    // Before LOGIN: the type is checked before the login state.
    let mut raw = Raw::connect(&server).await;
    raw.call_expecting(raw_frame(77, 7, Bytes::new()), ErrorCode::UnknownRequestType).await;
    raw.expect_open(8).await;
    // The connection can still log in and is then equally tolerant.
    let token = server.token("mallory").await;
    raw.login(9, &token).await;
    raw.call_expecting(raw_frame(77, 10, vec![1, 2, 3]), ErrorCode::UnknownRequestType).await;
    raw.call_expecting(raw_frame(0, 11, Bytes::new()), ErrorCode::UnknownRequestType).await;
    raw.expect_open(12).await;

    bystanders.still_served().await;
}

#[tokio::test]
async fn server_only_request_types_from_a_client_are_unknown() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    server.token("carol").await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    // A PUSH_MESSAGE that would look like a message to carol.
    let push = pb::Message {
        msg_id: 42,
        kind: pb::ConversationKind::Single as i32,
        sender: "alice".into(),
        receiver: "carol".into(),
        seq: 1,
        content: b"forged push".to_vec(),
        client_msg_id: "forged".into(),
        ..Default::default()
    };
    raw.call_expecting(Frame::new(RequestType::PushMessage, 2, &push), ErrorCode::UnknownRequestType).await;
    let notice = pb::Notice { kind: pb::NoticeKind::Sync as i32, reason: "forged".into() };
    raw.call_expecting(Frame::new(RequestType::Notice, 3, &notice), ErrorCode::UnknownRequestType).await;
    raw.call_expecting(Frame::error(4, ErrorCode::Internal, "forged"), ErrorCode::UnknownRequestType).await;
    raw.expect_open(5).await;

    assert_nothing_stored_for(&server, "carol").await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn undecodable_body_is_bad_body_and_stores_nothing() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    server.token("carol").await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    let send = RequestType::SendSingle as u32;
    raw.call_expecting(raw_frame(send, 2, vec![0xff, 0xff, 0xff]), ErrorCode::BadBody).await;
    // A valid request to carol with trailing junk is still undecodable.
    let mut body = send_single(0, "m-1", "", "carol").body.to_vec();
    body.extend_from_slice(&[0xff, 0xff, 0xff]);
    raw.call_expecting(raw_frame(send, 3, body), ErrorCode::BadBody).await;
    raw.expect_open(4).await;

    assert_nothing_stored_for(&server, "carol").await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn request_before_login_is_not_logged_in_and_stores_nothing() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    server.token("carol").await;

    let mut raw = Raw::connect(&server).await;
    raw.call_expecting(send_single(1, "m-1", "", "carol"), ErrorCode::NotLoggedIn).await;
    raw.call_expecting(send_single(2, "m-2", "alice", "carol"), ErrorCode::NotLoggedIn).await;
    raw.expect_open(3).await;
    // LOGIN still works on the same connection afterwards.
    let token = server.token("mallory").await;
    raw.login(4, &token).await;
    raw.expect_open(5).await;

    assert_nothing_stored_for(&server, "carol").await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn second_login_is_already_logged_in_and_keeps_the_connection() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    let token = server.token("carol").await;
    let login = pb::LoginRequest { token, device_id: "raw".into() };
    raw.call_expecting(Frame::new(RequestType::Login, 2, &login), ErrorCode::AlreadyLoggedIn).await;
    raw.expect_open(3).await;

    bystanders.still_served().await;
}

// ---------------------------------------------------------------------------
// Authentication errors: error frame, then close.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_token_is_invalid_and_closes() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    for token in ["", "not-a-token", "v1.x.y", "v1..", "a.b.c.d"] {
        let mut raw = Raw::connect(&server).await;
        let login = pb::LoginRequest { token: token.into(), device_id: "raw".into() };
        raw.call_expecting(Frame::new(RequestType::Login, 3, &login), ErrorCode::InvalidToken).await;
        raw.expect_closed().await;
    }

    bystanders.still_served().await;
}

#[tokio::test]
async fn forged_token_signature_is_invalid_and_closes() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let token = server.token("mallory").await;
    let (version, rest) = token.split_once('.').expect("token format v1.<claims>.<mac>");
    let (claims, mac) = rest.split_once('.').expect("token format v1.<claims>.<mac>");

    // The signature altered (one character swapped for another valid one).
    let flip = |c: char| if c == 'A' { 'B' } else { 'A' };
    let mut bad_mac: Vec<char> = mac.chars().collect();
    bad_mac[0] = flip(bad_mac[0]);
    let altered_mac = format!("{version}.{claims}.{}", bad_mac.into_iter().collect::<String>());
    // The claims rewritten to another user, keeping mallory's signature.
    let json = format!(r#"{{"sub":"bob","iat":0,"exp":{}}}"#, u64::MAX / 2);
    let forged_claims = format!("{version}.{}.{mac}", B64.encode(json));
    // A signature made up from scratch.
    let made_up = format!("{version}.{claims}.{}", B64.encode([7u8; 32]));

    for forged in [altered_mac, forged_claims, made_up] {
        assert_ne!(forged, token);
        let mut raw = Raw::connect(&server).await;
        let login = pb::LoginRequest { token: forged.clone(), device_id: "raw".into() };
        raw.call_expecting(Frame::new(RequestType::Login, 1, &login), ErrorCode::InvalidToken).await;
        raw.expect_closed().await;
    }
    // The genuine token still works.
    Raw::connect(&server).await.login(1, &token).await;

    bystanders.still_served().await;
}

#[tokio::test]
async fn expired_token_is_rejected_and_closes() {
    let (server, _dir) = Server::start_with_config("[router_auth]\ntoken_ttl_secs = 1\n");
    let bystanders = Bystanders::connect(&server).await;

    let token = server.token("mallory").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut raw = Raw::connect(&server).await;
    let login = pb::LoginRequest { token, device_id: "raw".into() };
    raw.call_expecting(Frame::new(RequestType::Login, 1, &login), ErrorCode::TokenExpired).await;
    raw.expect_closed().await;

    bystanders.still_served().await;
}

// ---------------------------------------------------------------------------
// Refused sends: error frame, connection stays, nothing stored.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn group_send_by_a_non_member_is_refused_and_stores_nothing() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    let (dave, _dave_events) = client(&server, "dave").await;
    let (erin, mut erin_events) = client(&server, "erin").await;
    dave.create_group("g1", "dave and erin", &["erin"]).await.expect("create group");

    let mut raw = Raw::logged_in(&server, "mallory").await;
    let body = pb::SendGroupRequest {
        client_msg_id: "m-1".into(),
        sender: String::new(),
        group_id: "g1".into(),
        content: b"should not be stored".to_vec(),
    };
    raw.call_expecting(Frame::new(RequestType::SendGroup, 2, &body), ErrorCode::NotGroupMember).await;
    raw.expect_open(3).await;

    no_message(&mut erin_events, QUIET).await;
    let history = dave.group_history("g1", 0, 50).await.expect("history");
    assert!(history.messages.is_empty(), "history holds {:?}", history.messages);

    // A legitimate message is the first and only one the group ever saw.
    let ack = dave.send_group("g1", "legit").await.expect("dave's send");
    assert_eq!(ack.seq, 1, "the refused send must not take a sequence number");
    let message = next_message(&mut erin_events, WAIT).await;
    assert_eq!((message.msg_id, text(&message)), (ack.msg_id, "legit".to_owned()));
    let deadline = tokio::time::Instant::now() + WAIT;
    let history = loop {
        let history = dave.group_history("g1", 0, 50).await.expect("history");
        if !history.messages.is_empty() {
            break history;
        }
        assert!(tokio::time::Instant::now() < deadline, "the legit message never reached history");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids: Vec<u64> = history.messages.iter().map(|m| m.msg_id).collect();
    assert_eq!(ids, vec![ack.msg_id]);

    dave.close().await;
    erin.close().await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn sender_field_naming_another_user_is_refused() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    server.token("carol").await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    raw.call_expecting(send_single(2, "m-1", "alice", "carol"), ErrorCode::SenderMismatch).await;
    raw.expect_open(3).await;

    assert_nothing_stored_for(&server, "carol").await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn send_to_a_nonexistent_user_is_no_such_user() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    raw.call_expecting(send_single(2, "m-1", "", "nobody"), ErrorCode::NoSuchUser).await;
    raw.expect_open(3).await;

    // Registering the name later does not reveal a stored message.
    assert_nothing_stored_for(&server, "nobody").await;
    bystanders.still_served().await;
}

/// The bytes of `frame` on the wire.
fn wire_bytes(frame: &Frame) -> Vec<u8> {
    let mut bytes = header(HEADER_LEN as u32, frame.request_type, frame.sequence, frame.body.len() as u32);
    bytes.extend_from_slice(&frame.body);
    bytes
}

fn send_text(sequence: u32, client_msg_id: &str, receiver: &str, content: &str) -> Frame {
    let body = pb::SendSingleRequest {
        client_msg_id: client_msg_id.to_owned(),
        sender: String::new(),
        receiver: receiver.to_owned(),
        content: content.as_bytes().to_vec(),
    };
    Frame::new(RequestType::SendSingle, sequence, &body)
}

/// A burst of pipelined sends, written at once, is served as one batch
/// (PROTOCOL.md §3): each request still gets its own answer, in request
/// order; a bad one fails alone; a client message id repeated inside the
/// burst is stored once; a framing error after the burst is reported after
/// the burst's answers.
#[tokio::test]
async fn pipelined_sends_are_answered_in_order_and_fail_alone() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    let (erin, mut erin_events) = client(&server, "erin").await;

    let mut raw = Raw::logged_in(&server, "dave").await;
    let mut burst = Vec::new();
    burst.extend(wire_bytes(&send_text(10, "p-1", "erin", "one")));
    burst.extend(wire_bytes(&raw_frame(RequestType::SendSingle as u32, 11, vec![0xff, 0xff])));
    burst.extend(wire_bytes(&send_text(12, "p-2", "erin", "two")));
    burst.extend(wire_bytes(&send_text(13, "p-1", "erin", "one again")));
    burst.extend(wire_bytes(&send_text(14, "p-x", "nobody", "lost")));
    burst.extend(wire_bytes(&Frame::new(RequestType::Heartbeat, 15, &pb::Heartbeat {})));
    burst.extend(wire_bytes(&send_text(16, "p-3", "erin", "three")));
    burst.extend(header(19, RequestType::Heartbeat as u32, 17, 0));
    raw.send_bytes(&burst).await;

    let mut acks = Vec::new();
    for sequence in [10, 12, 13, 16] {
        if sequence == 12 {
            raw.expect_error(11, ErrorCode::BadBody).await;
        }
        if sequence == 16 {
            raw.expect_error(14, ErrorCode::NoSuchUser).await;
            let heartbeat = raw.next_frame().await.expect("heartbeat answer");
            assert_eq!((heartbeat.request_type, heartbeat.sequence), (RequestType::Heartbeat as u32, 15));
        }
        let frame = raw.next_frame().await.expect("a SendAck");
        assert_eq!(frame.request_type, RequestType::SendSingle as u32, "expected a SendAck, got {frame:?}");
        assert_eq!(frame.sequence, sequence, "answers come in request order");
        acks.push(frame.decode::<pb::SendAck>().expect("SendAck"));
    }
    let seqs: Vec<(u64, bool)> = acks.iter().map(|a| (a.seq, a.duplicate)).collect();
    assert_eq!(seqs, vec![(1, false), (2, false), (1, true), (3, false)]);
    assert_eq!(acks[2].msg_id, acks[0].msg_id, "the repeated client message id is the same message");
    raw.expect_error(0, ErrorCode::BadHeader).await;
    raw.expect_closed().await;

    let mut received = Vec::new();
    for _ in 0..3 {
        let message = next_message(&mut erin_events, WAIT).await;
        received.push((text(&message), message.seq));
    }
    assert_eq!(received, vec![("one".into(), 1), ("two".into(), 2), ("three".into(), 3)]);
    no_message(&mut erin_events, QUIET).await;
    erin.close().await;
    assert_nothing_stored_for(&server, "nobody").await;
    bystanders.still_served().await;
}

#[tokio::test]
async fn empty_client_msg_id_is_invalid_argument() {
    let (server, _dir) = Server::start();
    let bystanders = Bystanders::connect(&server).await;
    server.token("carol").await;

    let mut raw = Raw::logged_in(&server, "mallory").await;
    raw.call_expecting(send_single(2, "", "", "carol"), ErrorCode::InvalidArgument).await;
    raw.expect_open(3).await;
    // Other malformed fields get the same code.
    let long_id = "x".repeat(1_000);
    raw.call_expecting(send_single(4, &long_id, "", "carol"), ErrorCode::InvalidArgument).await;
    raw.call_expecting(send_single(5, "m-5", "", "carol:bob"), ErrorCode::InvalidArgument).await;
    let empty_content =
        pb::SendSingleRequest { client_msg_id: "m-6".into(), receiver: "carol".into(), ..Default::default() };
    raw.call_expecting(Frame::new(RequestType::SendSingle, 6, &empty_content), ErrorCode::InvalidArgument)
        .await;
    raw.expect_open(7).await;

    assert_nothing_stored_for(&server, "carol").await;
    bystanders.still_served().await;
}

/// An ACK with sequence 0 is not answered when it succeeds (a receiver ACKs
/// every burst of pushes, PROTOCOL §5.3); one that fails still gets its
/// ERROR, with sequence 0, and the connection stays open.
#[tokio::test]
async fn an_ack_with_sequence_0_is_answered_only_if_it_fails() {
    let (server, _dir) = Server::start();
    let mut raw = Raw::logged_in(&server, "dave").await;
    let (alice, _alice_events) = client(&server, "alice").await;
    let sent = alice.send_single("dave", "ack me quietly").await.expect("alice's send");
    let push = raw.next_frame().await.expect("the push");
    assert_eq!((push.request_type, push.sequence), (RequestType::PushMessage as u32, 0));
    assert_eq!(push.decode::<pb::Message>().expect("Message").msg_id, sent.msg_id);

    raw.send(Frame::new(RequestType::AckMessages, 0, &pb::AckMessagesRequest { msg_ids: vec![sent.msg_id] }))
        .await;
    // The next frame answers the heartbeat sent after the ACK: nothing
    // answered the ACK.
    raw.expect_open(3).await;
    let page = raw
        .call(Frame::new(RequestType::PullOffline, 4, &pb::PullOfflineRequest { after_msg_id: 0, limit: 10 }))
        .await;
    assert_eq!(page.sequence, 4, "expected the page, got {page:?}");
    let page: pb::PullOfflineResponse = page.decode().expect("PullOfflineResponse");
    assert!(page.messages.is_empty(), "the quiet ACK took effect: {:?}", page.messages);

    let too_many = pb::AckMessagesRequest { msg_ids: (1..=1_001).collect() };
    raw.call_expecting(Frame::new(RequestType::AckMessages, 0, &too_many), ErrorCode::InvalidArgument).await;
    raw.expect_open(5).await;
    alice.close().await;
}

// ---------------------------------------------------------------------------
// A receiver that stops reading (DELIVERY R8).
// ---------------------------------------------------------------------------

#[tokio::test]
async fn receiver_that_stops_reading_is_cut_and_loses_nothing() {
    // A short outbound queue, so the queue fills soon after the kernel's
    // socket buffers do.
    let (server, _dir) = Server::start_with_config("[access_tcp]\noutbound_queue = 4\n");
    // bob logs in on device "raw", then never reads again.
    let mut stalled = Raw::logged_in(&server, "bob").await;
    let (alice, _alice_events) = client(&server, "alice").await;
    // About 10 MB of pushes: more than loopback socket buffers hold.
    const MESSAGES: usize = 200;
    let mut sent = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let mut content = format!("{i:04} ").into_bytes();
        content.resize(48 * 1024, b'.');
        sent.push(alice.send_single("bob", content).await.expect("acknowledged").msg_id);
    }
    // The server gave up on bob's connection: reading now finds what was
    // buffered, then the end of the stream (or a reset).
    let mut read_before_close = 0;
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.framed.next().await {
                Some(Ok(_)) => read_before_close += 1,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a connection that stopped reading");
    assert!(read_before_close < MESSAGES, "every push fit in the buffers; the test proves nothing");
    assert!(server.log().contains("slow consumer"), "the close was not the slow-consumer policy");
    // Reconnected on the same device, bob gets every message, in order, once.
    let mut config = server.client_config("bob");
    config.device_id = "raw".into();
    let (bob, mut events) = Client::connect(config).await.expect("bob reconnects");
    let mut got = Vec::with_capacity(MESSAGES);
    while got.len() < MESSAGES {
        got.push(next_message(&mut events, WAIT).await.msg_id);
    }
    assert_eq!(got, sent, "every message, in order, once");
    no_message(&mut events, QUIET).await;
    alice.close().await;
    bob.close().await;
}
