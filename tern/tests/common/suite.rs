//! The end-to-end suite that runs against both deployments: standalone
//! (tests/standalone.rs) and a cluster of processes (tests/cluster.rs).

use std::collections::BTreeSet;
use std::time::Duration;

use tern_proto::RequestType;
use tern_sdk::pb::{self, NoticeKind};
use tern_sdk::{Connection, ServerEvent};

use super::{Deployment, next_message, no_message, text};

pub const WAIT: Duration = Duration::from_secs(20);

/// alice and bob chat 1:1; ACKed pushes leave the offline store.
pub async fn one_to_one(d: &Deployment) {
    let (alice, mut alice_events) = d.client("alice").await;
    let (bob, mut bob_events) = d.client("bob").await;

    let ack = alice.send_single("bob", "hi bob").await.unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    let m = next_message(&mut bob_events, WAIT).await;
    assert_eq!((m.sender.as_str(), m.receiver.as_str(), text(&m).as_str()), ("alice", "bob", "hi bob"));
    assert_eq!((m.msg_id, m.seq), (ack.msg_id, 1));

    let ack = bob.send_single("alice", "hi alice").await.unwrap();
    assert_eq!(ack.seq, 2, "both directions share the conversation sequence");
    let m = next_message(&mut alice_events, WAIT).await;
    assert_eq!((m.sender.as_str(), text(&m).as_str(), m.seq), ("bob", "hi alice", 2));

    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (bob_again, mut bob_again_events) = d.client("bob").await;
    assert_eq!(bob_again.login_info().unwrap().pending_offline, 0);
    no_message(&mut bob_again_events, Duration::from_millis(500)).await;
}

/// Three members send at once; everyone sees one order, history has all.
pub async fn group_order(d: &Deployment) {
    let names = ["alice", "bob", "carol"];
    let mut clients = Vec::new();
    for name in names {
        clients.push(d.client(name).await);
    }
    let info = clients[0].0.create_group("trio", "Trio", &["bob", "carol"]).await.unwrap();
    assert_eq!(info.members, ["alice", "bob", "carol"]);

    const PER_SENDER: usize = 10;
    let senders = clients.iter().map(|(client, _)| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_SENDER {
                let body = format!("{} #{i}", client.user_id());
                seqs.push(client.send_group("trio", body).await.unwrap().seq);
            }
            seqs
        })
    });
    let mut own_seqs = Vec::new();
    for handle in senders.collect::<Vec<_>>() {
        own_seqs.push(handle.await.unwrap());
    }
    let total = PER_SENDER * names.len();

    for (i, (_, events)) in clients.iter_mut().enumerate() {
        let mut received = Vec::new();
        for _ in 0..(total - PER_SENDER) {
            let m = next_message(events, WAIT).await;
            assert_eq!(m.group_id, "trio");
            assert_ne!(m.sender, names[i], "a sender does not get its own message pushed");
            received.push(m.seq);
        }
        assert!(received.windows(2).all(|w| w[0] < w[1]), "{} saw {received:?}", names[i]);
        let all: BTreeSet<u64> = received.iter().chain(own_seqs[i].iter()).copied().collect();
        assert_eq!(all, (1..=total as u64).collect(), "{} missed or duplicated a sequence", names[i]);
        no_message(events, Duration::from_millis(300)).await;
    }

    // History is written by a consumer: wait until it has caught up.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = clients[1].0.group_history("trio", 0, 200).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        if seqs.len() == total || tokio::time::Instant::now() > deadline {
            assert_eq!(seqs, (1..=total as u64).rev().collect::<Vec<_>>());
            assert!(!page.more);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// bob is offline while alice sends 3; he gets exactly those, in order, once.
pub async fn offline_three(d: &Deployment) {
    d.register("bob").await;
    let (alice, _alice_events) = d.client("alice").await;
    for i in 1..=3 {
        alice.send_single("bob", format!("while you were away {i}")).await.unwrap();
    }
    // The offline write follows the ACK through the bus: wait for it.
    let (bob, mut bob_events) = d.client("bob").await;
    for i in 1..=3 {
        let m = next_message(&mut bob_events, WAIT).await;
        assert_eq!(text(&m), format!("while you were away {i}"));
        assert_eq!(m.seq, i);
    }
    no_message(&mut bob_events, Duration::from_millis(500)).await;

    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (bob_again, mut bob_again_events) = d.client("bob").await;
    assert_eq!(bob_again.login_info().unwrap().pending_offline, 0);
    no_message(&mut bob_again_events, Duration::from_millis(500)).await;
}

/// Every device of a user gets every message; one device's ACK does not
/// clear another device's copy.
pub async fn multi_device(d: &Deployment) {
    let (alice, _alice_events) = d.client("alice").await;
    let (phone, mut phone_events) = d.client_on("bob", "phone").await;
    let (laptop, mut laptop_events) = d.client_on("bob", "laptop").await;

    alice.send_single("bob", "to both").await.unwrap();
    assert_eq!(text(&next_message(&mut phone_events, WAIT).await), "to both");
    assert_eq!(text(&next_message(&mut laptop_events, WAIT).await), "to both");

    laptop.close().await;
    alice.send_single("bob", "while the laptop is away").await.unwrap();
    // The phone shows and ACKs it...
    assert_eq!(text(&next_message(&mut phone_events, WAIT).await), "while the laptop is away");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and the laptop still gets its own copy when it comes back, but not
    // what it had already ACKed.
    let (_laptop, mut laptop_events) = d.client_on("bob", "laptop").await;
    assert_eq!(text(&next_message(&mut laptop_events, WAIT).await), "while the laptop is away");
    no_message(&mut laptop_events, Duration::from_millis(500)).await;
    no_message(&mut phone_events, Duration::from_millis(100)).await;

    // What one device sends reaches the user's other devices, not itself.
    phone.send_single("alice", "sent from the phone").await.unwrap();
    let copy = next_message(&mut laptop_events, WAIT).await;
    assert_eq!((copy.sender.as_str(), copy.receiver.as_str()), ("bob", "alice"));
    assert_eq!(text(&copy), "sent from the phone");
    no_message(&mut phone_events, Duration::from_millis(500)).await;
}

/// More than this many large-group messages in one batch make a device pull.
const PULL_NOTICE_THRESHOLD: usize = 2;

/// The configuration (standalone or cluster) [`large_group_burst`] needs:
/// every group of at least 3 members is large, and a low threshold.
pub fn large_group_config() -> String {
    format!("[offline_svc]\nlarge_group_members = 3\npull_notice_threshold = {PULL_NOTICE_THRESHOLD}\n")
}

/// Every page of the connection's offline set, oldest first.
async fn pull_all(conn: &Connection) -> Vec<pb::Message> {
    let mut messages = Vec::new();
    loop {
        let after_msg_id = messages.last().map_or(0, |m: &pb::Message| m.msg_id);
        let page: pb::PullOfflineResponse = conn
            .request(RequestType::PullOffline, &pb::PullOfflineRequest { after_msg_id, limit: 0 })
            .await
            .unwrap();
        messages.extend(page.messages);
        if !page.more {
            return messages;
        }
    }
}

/// ACKs `msg_ids` on the connection.
async fn ack(conn: &Connection, msg_ids: Vec<u64>) {
    let _: pb::Empty =
        conn.request(RequestType::AckMessages, &pb::AckMessagesRequest { msg_ids }).await.unwrap();
}

/// R12, on a deployment started with [`large_group_config`]: a burst of
/// messages in large groups reaches an online member as NOTICE SYNC (it
/// pulls them) instead of a push per message; the member still gets every
/// message once and in order.
pub async fn large_group_burst(d: &Deployment) {
    // Senders in several groups at once, so that the offline consumer finds
    // several messages for bob per batch: one group's sends are serialised
    // under its sequence, and alone they reach the consumer about one at a
    // time. Bursts are repeated until one became a notice.
    const GROUPS: usize = 6;
    const PER_GROUP: u64 = 10;
    const ROUNDS: u64 = 5;
    d.register("carol").await;
    let (bob, mut bob_events) = d.raw_on("bob", "phone").await;
    let mut senders = Vec::new();
    for g in 0..GROUPS {
        let (alice, _events) = d.raw_on("alice", &format!("sender-{g}")).await;
        let create = pb::CreateGroupRequest {
            group_id: format!("big-{g}"),
            name: String::new(),
            members: vec!["bob".into(), "carol".into()],
        };
        let _: pb::GroupInfo = alice.request(RequestType::CreateGroup, &create).await.unwrap();
        senders.push(alice);
    }

    // bob behaves like a client: handles events in arrival order, pulls on
    // SYNC, shows each message id once, ACKs what it got.
    let mut shown: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut seen = std::collections::HashSet::new();
    let (mut sent, mut pushes, mut notices) = (0u64, 0u64, Vec::new());
    for round in 0..ROUNDS {
        // The burst: every group's sends pipelined on its sender's
        // connection, all groups at once.
        let bursts = senders.iter().enumerate().map(|(g, alice)| {
            let sends = (0..PER_GROUP).map(move |i| {
                let send = pb::SendGroupRequest {
                    client_msg_id: format!("burst-{round}-{g}-{i}"),
                    sender: String::new(),
                    group_id: format!("big-{g}"),
                    content: format!("#{i}").into_bytes(),
                };
                async move { alice.request::<_, pb::SendAck>(RequestType::SendGroup, &send).await.unwrap() }
            });
            futures::future::join_all(sends)
        });
        for acks in futures::future::join_all(bursts).await {
            let seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
            assert_eq!(seqs, (round * PER_GROUP + 1..=(round + 1) * PER_GROUP).collect::<Vec<_>>());
        }
        sent += GROUPS as u64 * PER_GROUP;

        let deadline = tokio::time::Instant::now() + WAIT;
        while (seen.len() as u64) < sent {
            let received = match tokio::time::timeout_at(deadline, bob_events.recv()).await {
                Ok(Some(ServerEvent::Message(m))) => {
                    pushes += 1;
                    vec![m]
                }
                Ok(Some(ServerEvent::Notice(n))) if n.kind == NoticeKind::Sync as i32 => {
                    notices.push(n.reason);
                    pull_all(&bob).await
                }
                other => panic!("shown {shown:?}, pushes {pushes}, notices {notices:?}, then {other:?}"),
            };
            ack(&bob, received.iter().map(|m| m.msg_id).collect()).await;
            for m in received {
                if seen.insert(m.msg_id) {
                    shown.entry(m.group_id).or_default().push(m.seq);
                }
            }
        }
        if !notices.is_empty() {
            break;
        }
    }
    assert!(!notices.is_empty(), "no SYNC notice for {sent} messages ({pushes} pushes)");
    // Every message once, each group in order.
    assert_eq!(shown.len(), GROUPS);
    for (group, seqs) in &shown {
        assert_eq!(*seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{group}");
        assert_eq!(seqs.len() as u64 * GROUPS as u64, sent, "{group}");
    }

    // What bob has not read yet are duplicates of shown messages. Each
    // message was either pushed or counted in exactly one notice, and each
    // notice counted more than the threshold.
    let noticed = |notices: &[String]| -> u64 {
        notices
            .iter()
            .map(|reason| {
                let count: u64 = reason
                    .split_once(" new messages in group")
                    .filter(|_| reason.ends_with("; pull"))
                    .and_then(|(n, _)| n.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected reason {reason:?}"));
                assert!(count > PULL_NOTICE_THRESHOLD as u64, "{reason:?}");
                count
            })
            .sum()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while pushes + noticed(&notices) < sent {
        match tokio::time::timeout_at(deadline, bob_events.recv()).await {
            Ok(Some(ServerEvent::Message(m))) => {
                pushes += 1;
                assert!(seen.contains(&m.msg_id), "unexpected {m:?}");
                ack(&bob, vec![m.msg_id]).await;
            }
            Ok(Some(ServerEvent::Notice(n))) if n.kind == NoticeKind::Sync as i32 => notices.push(n.reason),
            other => panic!("pushes {pushes}, notices {notices:?}, then {other:?}"),
        }
    }
    assert_eq!(pushes + noticed(&notices), sent, "pushes {pushes}, notices {notices:?}");
    assert!(pushes < sent);
    assert_eq!(pull_all(&bob).await, []);
}
