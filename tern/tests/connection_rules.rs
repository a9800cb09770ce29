//! Connection-level rules of the access node: idle cutoff, heartbeats,
//! unacknowledged pushes, a second login of the same device.

mod common;

use std::time::Duration;

use common::{Server, next_message, text};
use tern_proto::RequestType;
use tern_sdk::ServerEvent;
use tern_sdk::pb::{self, NoticeKind};

const WAIT: Duration = Duration::from_secs(15);

const SHORT_TIMEOUTS: &str =
    "[access_tcp]\nheartbeat_interval_ms = 1000\nidle_timeout_ms = 2500\npush_ack_timeout_ms = 800\n";

async fn wait_closed(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<ServerEvent>,
    within: Duration,
) -> bool {
    tokio::time::timeout(within, async {
        while let Some(event) = events.recv().await {
            if let ServerEvent::Closed(_) = event {
                return true;
            }
        }
        true
    })
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn silent_connection_is_cut_and_heartbeats_keep_one_alive() {
    let (server, _dir) = Server::start_with_config(SHORT_TIMEOUTS);
    let (silent, mut silent_events) = server.raw_logged_in("alice").await;
    let (beating, mut beating_events) = server.raw_logged_in("bob").await;
    let heartbeats = tokio::spawn(async move {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _: pb::Heartbeat = beating.request(RequestType::Heartbeat, &pb::Heartbeat {}).await.unwrap();
        }
    });
    assert!(wait_closed(&mut silent_events, Duration::from_secs(8)).await, "silent connection not closed");
    heartbeats.await.unwrap();
    assert!(
        !wait_closed(&mut beating_events, Duration::from_millis(100)).await,
        "heartbeating connection closed"
    );
    drop(silent);
}

#[tokio::test]
async fn unacknowledged_push_asks_the_client_to_pull() {
    let (server, _dir) = Server::start_with_config(SHORT_TIMEOUTS);
    let (bob_raw, mut bob_events) = server.raw_logged_in("bob").await;
    let (alice, _alice_events) = server.client("alice").await;
    let ack = alice.send_single("bob", "ack me").await.unwrap();

    // bob receives the push but does not ACK it: a SYNC notice follows.
    let mut pushed = false;
    let mut synced = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(pushed && synced) {
        match tokio::time::timeout_at(deadline, bob_events.recv()).await {
            Ok(Some(ServerEvent::Message(m))) => pushed |= m.msg_id == ack.msg_id,
            Ok(Some(ServerEvent::Notice(n))) => synced |= n.kind == NoticeKind::Sync as i32,
            other => panic!("push={pushed} sync={synced}, then {other:?}"),
        }
    }
    // The message is still in the offline store until ACKed.
    let page: pb::PullOfflineResponse = bob_raw
        .request(RequestType::PullOffline, &pb::PullOfflineRequest { after_msg_id: 0, limit: 10 })
        .await
        .unwrap();
    assert_eq!(page.messages.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [ack.msg_id]);
    let _: pb::Empty = bob_raw
        .request(RequestType::AckMessages, &pb::AckMessagesRequest { msg_ids: vec![ack.msg_id] })
        .await
        .unwrap();
    let page: pb::PullOfflineResponse = bob_raw
        .request(RequestType::PullOffline, &pb::PullOfflineRequest { after_msg_id: 0, limit: 10 })
        .await
        .unwrap();
    assert!(page.messages.is_empty());
}

#[tokio::test]
async fn second_login_of_a_device_kicks_the_first() {
    let (server, _dir) = Server::start();
    let (_first, mut first_events) = server.raw_logged_in("alice").await;
    let (_second, _second_events) = server.raw_logged_in("alice").await;
    let mut kicked = false;
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, first_events.recv()).await {
        match event {
            ServerEvent::Notice(n) if n.kind == NoticeKind::Kicked as i32 => kicked = true,
            ServerEvent::Closed(_) => break,
            _ => {}
        }
    }
    assert!(kicked, "the older connection was not told why it was closed");

    // Messages are kept for the device (the raw connections' "raw") and
    // reach its next login.
    let (bob, _bob_events) = server.client("bob").await;
    bob.send_single("alice", "to the new one").await.unwrap();
    let (alice, mut alice_events) = server.deployment().client_on("alice", "raw").await;
    assert_eq!(text(&next_message(&mut alice_events, WAIT).await), "to the new one");
    drop(alice);
}

/// The SDK keeps one TLS configuration per CA, so a reconnect resumes the
/// previous session with the ticket the access node issued (no certificate
/// signature or verification), while the first connection does the full
/// handshake.
#[tokio::test]
async fn a_reconnect_resumes_the_tls_session() {
    let (server, _dir) = Server::start();
    let mut resumed = Vec::new();
    for _ in 0..2 {
        let (conn, _events) = server.raw_logged_in("carol").await;
        resumed.push(conn.tls_resumed());
        // The LOGIN answer came after the ticket: the session is cached.
        conn.close().await;
    }
    assert_eq!(resumed, [Some(false), Some(true)]);
}
