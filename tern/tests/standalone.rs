//! End-to-end behaviour of `tern standalone` over real TLS sockets: 1:1 and
//! group chat, offline delivery, durability across SIGKILL, SIGTERM drain,
//! pull notices for large groups.

mod common;

use std::time::Duration;

use common::{Server, next_message, no_message, text};
use tern_sdk::pb::{self, NoticeKind};
use tern_sdk::{Event, ServerEvent};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn alice_and_bob_chat_one_to_one() {
    let (server, _dir) = Server::start();
    common::suite::one_to_one(&server.deployment()).await;
}

#[tokio::test]
async fn group_of_three_sees_one_order() {
    let (server, _dir) = Server::start();
    common::suite::group_order(&server.deployment()).await;
}

#[tokio::test]
async fn offline_receiver_gets_exactly_three_in_order_once() {
    let (server, _dir) = Server::start();
    common::suite::offline_three(&server.deployment()).await;
}

#[tokio::test]
async fn every_device_gets_every_message() {
    let (server, _dir) = Server::start();
    common::suite::multi_device(&server.deployment()).await;
}

#[tokio::test]
async fn acknowledged_message_survives_sigkill() {
    let (server, dir) = Server::start();
    server.token("bob").await;
    let (alice, _alice_events) = server.client("alice").await;
    alice.create_group("crash", "", &["bob"]).await.unwrap();
    let single = alice.send_single("bob", "survive this").await.unwrap();
    let group = alice.send_group("crash", "and this").await.unwrap();
    // SIGKILL right after the ACKs: no drain, no orderly shutdown.
    server.kill();

    let server = Server::start_in(dir.path(), "");
    let (bob, mut bob_events) = server.client("bob").await;
    let first = next_message(&mut bob_events, WAIT).await;
    let second = next_message(&mut bob_events, WAIT).await;
    assert_eq!((first.msg_id, text(&first).as_str()), (single.msg_id, "survive this"));
    assert_eq!((second.msg_id, text(&second).as_str()), (group.msg_id, "and this"));
    no_message(&mut bob_events, Duration::from_millis(500)).await;
    let history = bob.group_history("crash", 0, 10).await.unwrap();
    assert_eq!(history.messages.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [group.msg_id]);

    // Sequences continue where they were.
    let (alice, _alice_events) = server.client("alice").await;
    assert_eq!(alice.send_single("bob", "after restart").await.unwrap().seq, 2);
}

#[tokio::test]
async fn sigterm_drains_clients_and_placements() {
    let (server, dir) = Server::start_with_config("shutdown_grace_secs = 5\n");
    let (_alice_conn, mut alice_raw) = server.raw_logged_in("alice").await;
    let (bob, mut bob_events) = server.client("bob").await;
    assert_eq!(bob.online_users().await.unwrap(), ["alice", "bob"]);

    let started = std::time::Instant::now();
    let status = server.terminate(Duration::from_secs(10)).expect("exits within the grace period");
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());

    // The raw client was told to reconnect, then the connection closed.
    let mut saw_reconnect = false;
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, alice_raw.recv()).await {
        match event {
            ServerEvent::Notice(n) if n.kind == NoticeKind::Reconnect as i32 => saw_reconnect = true,
            ServerEvent::Closed(_) => break,
            _ => {}
        }
    }
    assert!(saw_reconnect, "no RECONNECT notice before close");
    // The SDK client noticed and is trying to reconnect.
    let disconnected = tokio::time::timeout(WAIT, async {
        while let Some(event) = bob_events.recv().await {
            if matches!(event, Event::Disconnected(_)) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(disconnected, Ok(true));
    bob.close().await;

    // The drain cleared the node's placements before the exit (standalone
    // keeps placements in memory, so they could not outlive it anyway).
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    assert!(log.contains("drained"), "no drain record in the log:\n{log}");
}

#[tokio::test]
async fn retried_send_is_stored_once() {
    let (server, _dir) = Server::start();
    server.token("bob").await;
    let (conn, _events) = server.raw_logged_in("alice").await;
    let send = pb::SendSingleRequest {
        client_msg_id: "retry-1".into(),
        sender: String::new(),
        receiver: "bob".into(),
        content: b"once".to_vec(),
    };
    let first: pb::SendAck = conn.request(tern_proto::RequestType::SendSingle, &send).await.unwrap();
    let second: pb::SendAck = conn.request(tern_proto::RequestType::SendSingle, &send).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!((first.msg_id, first.seq), (second.msg_id, second.seq));

    // The retry published the message again under the same ids; bob is
    // shown it once.
    let (_bob, mut bob_events) = server.client("bob").await;
    assert_eq!(text(&next_message(&mut bob_events, WAIT).await), "once");
    no_message(&mut bob_events, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn offline_pages_larger_than_a_frame_maximum_arrive_whole() {
    let (server, _dir) = Server::start();
    server.token("bob").await;
    let (alice, _alice_events) = server.client("alice").await;
    // 40 × 60 KiB: the offline store holds more than 2 MiB for bob, more
    // than one page may carry.
    for i in 0..40u8 {
        alice.send_single("bob", vec![b'a' + (i % 26); 60 * 1024]).await.unwrap();
    }
    let (_bob, mut bob_events) = server.client("bob").await;
    for i in 0..40u64 {
        let m = next_message(&mut bob_events, WAIT).await;
        assert_eq!(m.seq, i + 1);
        assert_eq!(m.content.len(), 60 * 1024);
    }
    no_message(&mut bob_events, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn retry_after_leaving_the_group_still_gets_its_ack() {
    let (server, _dir) = Server::start();
    server.token("bob").await;
    let (conn, _events) = server.raw_logged_in("alice").await;
    let create =
        pb::CreateGroupRequest { group_id: "g".into(), name: String::new(), members: vec!["bob".into()] };
    let _: pb::GroupInfo = conn.request(tern_proto::RequestType::CreateGroup, &create).await.unwrap();
    let send = pb::SendGroupRequest {
        client_msg_id: "g-retry".into(),
        sender: String::new(),
        group_id: "g".into(),
        content: b"bye".to_vec(),
    };
    let first: pb::SendAck = conn.request(tern_proto::RequestType::SendGroup, &send).await.unwrap();
    let leave = pb::GroupRequest { group_id: "g".into() };
    let _: pb::GroupInfo = conn.request(tern_proto::RequestType::LeaveGroup, &leave).await.unwrap();
    let retry: pb::SendAck = conn.request(tern_proto::RequestType::SendGroup, &send).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.msg_id, first.msg_id);
    // A new message is refused now.
    let fresh = pb::SendGroupRequest { client_msg_id: "g-new".into(), ..send };
    let err = conn.request::<_, pb::SendAck>(tern_proto::RequestType::SendGroup, &fresh).await.unwrap_err();
    assert_eq!(err.code(), Some(tern_proto::ErrorCode::NotGroupMember));
}

/// R12: a burst of messages in large groups reaches an online member as
/// NOTICE SYNC (it pulls them) instead of a push per message.
#[tokio::test]
async fn large_group_burst_is_pulled_after_a_sync_notice() {
    let (server, _dir) = Server::start_with_config(&common::suite::large_group_config());
    common::suite::large_group_burst(&server.deployment()).await;
}
