//! The history consumer on the embedded bus and history store: a group
//! whose stored history cannot take a message (a corrupt value under its
//! key, as Redis reports it) does not stop the other groups' histories.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use tern_proto::{BusNames, pb};
use tern_store::embedded::EmbeddedBackends;
use tern_store::{Bus, HistoryStore, StoreError, StoreResult};

/// A history store whose group `broken` is corrupt.
struct OneCorruptGroup {
    inner: Arc<dyn HistoryStore>,
}

#[async_trait]
impl HistoryStore for OneCorruptGroup {
    async fn append(&self, group_id: &str, msg_id: u64, payload: Bytes) -> StoreResult<()> {
        if group_id == "broken" {
            return Err(StoreError::Corrupt(format!("history of {group_id}: WRONGTYPE")));
        }
        self.inner.append(group_id, msg_id, payload).await
    }

    async fn page(&self, group_id: &str, before: u64, limit: usize) -> StoreResult<Vec<(u64, Bytes)>> {
        self.inner.page(group_id, before, limit).await
    }
}

async fn publish(bus: &Arc<dyn Bus>, group: &str, msg_id: u64) {
    let message = pb::Message {
        msg_id,
        kind: pb::ConversationKind::Group as i32,
        sender: "alice".into(),
        group_id: group.into(),
        seq: msg_id,
        content: b"hi".to_vec(),
        ..Default::default()
    };
    let envelope =
        pb::BusEnvelope { message: Some(message), receivers: vec!["bob".into()], ..Default::default() };
    let key = Bytes::from(tern_proto::group_conversation_key(group));
    bus.publish(&BusNames::default().messages_topic, key, Bytes::from(envelope.encode_to_vec()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_corrupt_group_history_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let backends = EmbeddedBackends::open(dir.path()).unwrap();
    let bus: Arc<dyn Bus> = backends.bus.clone();
    publish(&bus, "broken", 1).await;
    publish(&bus, "fine", 2).await;
    let history: Arc<dyn HistoryStore> = Arc::new(OneCorruptGroup { inner: backends.history.clone() });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer =
        tokio::spawn(tern_group_svc::run_consumer(bus.clone(), BusNames::default(), history, async {
            let _ = stopped.await;
        }));
    // A later batch too.
    publish(&bus, "fine", 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = backends.history.page("fine", 0, 10).await.unwrap();
        if page.iter().map(|(id, _)| *id).collect::<Vec<_>>() == [3, 2] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the other group's history stalled: {page:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(backends.history.page("broken", 0, 10).await.unwrap().is_empty());
    let _ = stop.send(());
    consumer.await.unwrap().unwrap();
}
