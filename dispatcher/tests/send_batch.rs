//! `Dispatcher::send_batch` on the embedded backends: a burst of one
//! connection's sends is answered per message, in order, as if sent one at
//! a time, and the new messages reach the bus in that order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tern_dispatcher::{DispatchService, Dispatcher, DispatcherBackends, DispatcherConfig, SendRequest};
use tern_proto::pb::{self, BusEnvelope};
use tern_proto::{ErrorCode, ServiceResult};
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, DedupRecord, DedupStore, GroupRecord, MetaStore, StoreError, StoreResult, UserRecord};

fn single(client_msg_id: &str, receiver: &str) -> SendRequest {
    SendRequest::Single(pb::SendSingleRequest {
        client_msg_id: client_msg_id.into(),
        sender: String::new(),
        receiver: receiver.into(),
        content: client_msg_id.as_bytes().to_vec(),
    })
}

fn group(client_msg_id: &str, group_id: &str) -> SendRequest {
    SendRequest::Group(pb::SendGroupRequest {
        client_msg_id: client_msg_id.into(),
        sender: String::new(),
        group_id: group_id.into(),
        content: client_msg_id.as_bytes().to_vec(),
    })
}

fn error_code(result: &ServiceResult<pb::SendAck>) -> Option<ErrorCode> {
    result.as_ref().err().map(|e| e.code)
}

fn ack(result: &ServiceResult<pb::SendAck>) -> &pb::SendAck {
    result.as_ref().unwrap_or_else(|e| panic!("expected a SendAck, got {e}"))
}

async fn dispatcher() -> (tempfile::TempDir, EmbeddedBackends, Dispatcher) {
    dispatcher_with(|dedup| dedup).await
}

/// The dispatcher over the embedded backends, its dedup store wrapped by
/// `dedup`.
async fn dispatcher_with(
    dedup: impl FnOnce(Arc<dyn DedupStore>) -> Arc<dyn DedupStore>,
) -> (tempfile::TempDir, EmbeddedBackends, Dispatcher) {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    for user in ["alice", "bob", "carol"] {
        let record = UserRecord { user_id: user.into(), password_hash: String::new(), created_at_ms: 0 };
        assert!(backends.meta.create_user(&record).await.unwrap());
    }
    let g = GroupRecord {
        group_id: "g".into(),
        name: "g".into(),
        owner: "alice".into(),
        members: vec!["alice".into(), "bob".into()],
        created_at_ms: 0,
    };
    assert!(backends.meta.create_group(&g).await.unwrap());
    let dispatcher = Dispatcher::new(
        DispatcherBackends {
            meta: backends.meta.clone(),
            log: backends.log.clone(),
            dedup: dedup(backends.dedup.clone()),
            bus: backends.bus.clone(),
        },
        Arc::new(tern_idgen::Snowflake::new(0).unwrap()),
        DispatcherConfig::default(),
    );
    (dir, backends, dispatcher)
}

#[tokio::test]
async fn a_burst_is_answered_per_message_in_order() {
    let (_dir, backends, dispatcher) = dispatcher().await;
    let burst = vec![
        single("a1", "bob"),
        single("x", "nobody"),
        group("g1", "g"),
        single("a2", "bob"),
        single("a1", "bob"),
        group("n", "no-group"),
        single("c1", "carol"),
        single("", "bob"),
        group("g2", "g"),
    ];
    let results = dispatcher.send_batch("alice", "phone", burst).await;
    assert_eq!(results.len(), 9, "one answer per send");
    assert_eq!(ack(&results[0]).seq, 1);
    assert_eq!(error_code(&results[1]), Some(ErrorCode::NoSuchUser));
    assert_eq!(ack(&results[2]).seq, 1);
    assert_eq!(ack(&results[3]).seq, 2);
    assert!(!ack(&results[3]).duplicate);
    // The same client message id twice in one burst is one message.
    assert!(ack(&results[4]).duplicate);
    assert_eq!(ack(&results[4]).msg_id, ack(&results[0]).msg_id);
    assert_eq!(ack(&results[4]).seq, 1);
    assert_eq!(error_code(&results[5]), Some(ErrorCode::NoSuchGroup));
    assert_eq!(ack(&results[6]).seq, 1);
    assert_eq!(error_code(&results[7]), Some(ErrorCode::InvalidArgument));
    assert_eq!(ack(&results[8]).seq, 2);
    let ids: Vec<u64> = [0, 2, 3, 6, 8].iter().map(|&i| ack(&results[i]).msg_id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "message ids increase in burst order: {ids:?}");

    // A later burst retrying some of them gets the original answers.
    let retries =
        dispatcher.send_batch("alice", "phone", vec![single("a2", "bob"), single("a3", "bob")]).await;
    assert!(ack(&retries[0]).duplicate);
    assert_eq!(ack(&retries[0]).msg_id, ack(&results[3]).msg_id);
    assert_eq!((ack(&retries[1]).seq, ack(&retries[1]).duplicate), (3, false));

    // The bus has the new messages in burst order; a retry publishes its
    // message again (as it would sent on its own: the first publish may
    // never have happened in a cluster), here a1 in the burst and a2 later.
    let mut consumer =
        backends.bus.subscribe(&DispatcherConfig::default().bus.messages_topic, "test").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let records = consumer.poll(100, Duration::from_secs(5)).await.unwrap();
        assert!(!records.is_empty(), "bus records missing; have {seen:?}");
        for record in records {
            let envelope: BusEnvelope = prost::Message::decode(record.payload).unwrap();
            let message = envelope.message.unwrap();
            seen.push((message.client_msg_id, message.seq));
        }
    }
    let expected = [("a1", 1), ("g1", 1), ("a2", 2), ("a1", 1), ("c1", 1), ("g2", 2), ("a2", 2), ("a3", 3)];
    assert_eq!(seen, expected.map(|(c, s)| (c.to_owned(), s)).to_vec());
}

#[tokio::test]
async fn a_sender_who_left_the_group_still_gets_the_answer_to_a_retry() {
    let (_dir, backends, dispatcher) = dispatcher().await;
    let first = dispatcher.send_batch("bob", "phone", vec![group("b1", "g")]).await;
    let original = ack(&first[0]).clone();
    backends.meta.remove_member("g", "bob").await.unwrap();
    let again = dispatcher.send_batch("bob", "phone", vec![group("b1", "g"), group("b2", "g")]).await;
    assert_eq!(ack(&again[0]).msg_id, original.msg_id, "the retry is answered with the original ids");
    assert!(ack(&again[0]).duplicate);
    assert_eq!(error_code(&again[1]), Some(ErrorCode::NotGroupMember), "a new message is refused");
}

/// A client message id repeated in a burst is answered as if each copy
/// were sent on its own: a retry of the stored first copy, or a send of its
/// own when the first copy failed its checks.
#[tokio::test]
async fn a_repeated_id_in_a_burst_is_answered_as_if_sent_alone() {
    let (_dir, _backends, dispatcher) = dispatcher().await;
    let burst = vec![single("x", "bob"), single("x", "nobody"), single("y", "nobody"), single("y", "bob")];
    let results = dispatcher.send_batch("alice", "phone", burst).await;
    assert_eq!((ack(&results[0]).seq, ack(&results[0]).duplicate), (1, false));
    assert!(ack(&results[1]).duplicate, "a retry is answered even if its copy would fail the checks");
    assert_eq!(ack(&results[1]).msg_id, ack(&results[0]).msg_id);
    assert_eq!(error_code(&results[2]), Some(ErrorCode::NoSuchUser));
    assert_eq!(
        (ack(&results[3]).seq, ack(&results[3]).duplicate),
        (2, false),
        "the first copy stored nothing"
    );
}

/// A dedup store whose record of one client message id cannot be read.
struct UnreadableRecord {
    inner: Arc<dyn DedupStore>,
    unreadable: &'static str,
}

impl UnreadableRecord {
    fn corrupt() -> StoreError {
        StoreError::Corrupt("dedup record: expected value at line 1 column 1".into())
    }
}

#[async_trait]
impl DedupStore for UnreadableRecord {
    async fn get(&self, sender: &str, client_msg_id: &str) -> StoreResult<Option<DedupRecord>> {
        if client_msg_id == self.unreadable {
            return Err(Self::corrupt());
        }
        self.inner.get(sender, client_msg_id).await
    }

    async fn get_many(&self, sender: &str, client_msg_ids: &[&str]) -> StoreResult<Vec<Option<DedupRecord>>> {
        if client_msg_ids.contains(&self.unreadable) {
            return Err(Self::corrupt());
        }
        self.inner.get_many(sender, client_msg_ids).await
    }

    async fn put(
        &self,
        sender: &str,
        client_msg_id: &str,
        record: DedupRecord,
        ttl: Duration,
    ) -> StoreResult<()> {
        self.inner.put(sender, client_msg_id, record, ttl).await
    }
}

/// One unreadable dedup record fails only its own send, with an error that
/// says what to do; the rest of the burst is stored and answered.
#[tokio::test]
async fn an_unreadable_dedup_record_fails_only_its_own_send() {
    let (_dir, _backends, dispatcher) =
        dispatcher_with(|inner| Arc::new(UnreadableRecord { inner, unreadable: "bad" })).await;
    let burst = vec![single("a1", "bob"), single("bad", "bob"), single("a2", "bob")];
    let results = dispatcher.send_batch("alice", "phone", burst).await;
    assert_eq!((ack(&results[0]).seq, ack(&results[0]).duplicate), (1, false));
    let refused = results[1].as_ref().expect_err("its record cannot be read");
    assert_eq!(refused.code, ErrorCode::Internal);
    assert!(refused.message.contains("new client message id"), "{refused}");
    assert_eq!((ack(&results[2]).seq, ack(&results[2]).duplicate), (2, false), "the burst goes on past it");
}

/// Bursts of two senders over the same conversations, concurrently: they
/// lock the conversations' stripes in one order, so none waits on another
/// forever, and each conversation's sequences follow each sender's request
/// order with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_over_shared_conversations_all_complete_in_order() {
    let (_dir, backends, dispatcher) = dispatcher().await;
    let dispatcher = Arc::new(dispatcher);
    let g2 = GroupRecord {
        group_id: "g2".into(),
        name: "g2".into(),
        owner: "alice".into(),
        members: vec!["alice".into(), "bob".into()],
        created_at_ms: 0,
    };
    assert!(backends.meta.create_group(&g2).await.unwrap());
    const ROUNDS: usize = 50;
    const BURST: usize = 8;
    let senders = [("alice", ["g", "g2"]), ("bob", ["g2", "g"])];
    let tasks = senders.map(|(sender, groups)| {
        let dispatcher = dispatcher.clone();
        tokio::spawn(async move {
            let mut acks: Vec<(&str, u64)> = Vec::new();
            for round in 0..ROUNDS {
                let burst =
                    (0..BURST).map(|i| group(&format!("{sender}-{round}-{i}"), groups[i % 2])).collect();
                for (i, result) in dispatcher.send_batch(sender, "phone", burst).await.iter().enumerate() {
                    acks.push((groups[i % 2], ack(result).seq));
                }
            }
            acks
        })
    });
    let mut by_group: HashMap<&str, Vec<u64>> = HashMap::new();
    for task in tasks {
        let acks = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("bursts over shared conversations complete")
            .unwrap();
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (group, seq) in acks {
            let previous = last.insert(group, seq).unwrap_or(0);
            assert!(seq > previous, "a sender's messages get increasing seqs in {group}");
            by_group.entry(group).or_default().push(seq);
        }
    }
    for (group, mut seqs) in by_group {
        seqs.sort_unstable();
        let every: Vec<u64> = (1..=(ROUNDS * BURST) as u64).collect();
        assert_eq!(seqs, every, "{group}: every sequence used once, no gap");
    }
}
