//! The end-to-end suite that runs against both deployments: standalone
//! (tests/standalone.rs) and a cluster of processes (tests/cluster.rs).

use std::collections::BTreeSet;
use std::time::Duration;

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
