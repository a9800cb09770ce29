//! group-svc: durable group history.
//!
//! Its bus consumer stores every group message under its group, and
//! [`HistoryService`] serves pages newest first to group members.

use std::future::Future;
use std::sync::Arc;

pub mod rpc;

use async_trait::async_trait;
use prost::Message as _;
use tern_proto::pb::{self, ConversationKind};
use tern_proto::{BusNames, ErrorCode, ServiceError, ServiceResult, validate_id};
use tern_store::{Bus, BusRecord, HistoryStore, MetaStore, StoreError};

/// Largest page a history query returns.
pub const MAX_PAGE: u32 = 200;

/// What access nodes call for history.
#[async_trait]
pub trait HistoryApi: Send + Sync + 'static {
    /// Up to `limit` messages of `group_id` older than `before_msg_id` (0 =
    /// newest), newest first, and whether older ones exist. Members only.
    async fn history(
        &self,
        user: &str,
        group_id: &str,
        before_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)>;
}

pub struct HistoryService {
    history: Arc<dyn HistoryStore>,
    meta: Arc<dyn MetaStore>,
}

impl HistoryService {
    pub fn new(history: Arc<dyn HistoryStore>, meta: Arc<dyn MetaStore>) -> Self {
        Self { history, meta }
    }
}

#[async_trait]
impl HistoryApi for HistoryService {
    async fn history(
        &self,
        user: &str,
        group_id: &str,
        before_msg_id: u64,
        limit: u32,
    ) -> ServiceResult<(Vec<pb::Message>, bool)> {
        validate_id("group_id", group_id)?;
        let group = self
            .meta
            .get_group(group_id)
            .await
            .map_err(ServiceError::backend)?
            .ok_or_else(|| ServiceError::new(ErrorCode::NoSuchGroup, format!("no group {group_id:?}")))?;
        if !group.members.iter().any(|m| m == user) {
            return Err(ServiceError::new(
                ErrorCode::NotGroupMember,
                format!("you are not a member of group {group_id:?}"),
            ));
        }
        let limit = if limit == 0 { 50 } else { limit.min(MAX_PAGE) } as usize;
        let mut rows =
            self.history.page(group_id, before_msg_id, limit + 1).await.map_err(ServiceError::backend)?;
        let more = tern_proto::cut_page(&mut rows, limit, |(_, payload)| payload.len());
        let messages = rows
            .into_iter()
            .filter_map(|(msg_id, payload)| match pb::Message::decode(payload) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(msg_id, error = %e, "corrupt history row skipped");
                    None
                }
            })
            .collect();
        Ok((messages, more))
    }
}

/// Consumes the messages topic until `shutdown` resolves, storing group
/// messages; commits after the writes, so a crash replays (idempotently).
pub async fn run_consumer(
    bus: Arc<dyn Bus>,
    names: BusNames,
    history: Arc<dyn HistoryStore>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tern_store::StoreError> {
    let process = |batch: Vec<BusRecord>| {
        let history = history.clone();
        async move {
            let mut rows = Vec::new();
            // 1:1 records are skipped by their key, undecoded.
            for record in batch.iter().filter(|r| tern_proto::is_group_conversation_key(&r.key)) {
                // Only the message is read: the receivers (every member
                // but the sender) stay encoded, and the message is stored
                // as the dispatcher encoded it, a slice of the record.
                let routing = tern_proto::EnvelopeParts::split(&record.payload).ok().and_then(|parts| {
                    let routing = pb::MessageRouting::decode(&parts.message[..]).ok()?;
                    (!parts.message.is_empty()).then_some((routing, parts.message))
                });
                match routing {
                    Some((routing, message)) => {
                        if routing.kind == ConversationKind::Group as i32 {
                            rows.push((routing.group_id, routing.msg_id, message));
                        }
                    }
                    None => tracing::error!(offset = record.offset, "undecodable bus record skipped"),
                }
            }
            let writes = rows.iter().map(|(group, id, payload)| {
                let history = &history;
                async move {
                    match history.append(group, *id, payload.clone()).await {
                        // Retrying cannot mend a corrupt stored history (the
                        // wrong type under its key), and failing the batch
                        // on it would stall every group's history.
                        Err(StoreError::Corrupt(e)) => {
                            tracing::error!(error = %e, group = %group, msg_id = id, "group history corrupt: message not added to it (repair or delete it)");
                            Ok(())
                        }
                        other => other,
                    }
                }
            });
            futures::future::try_join_all(writes).await?;
            Ok(())
        }
    };
    tern_store::consume::consume(&*bus, &names.messages_topic, &names.history_group, shutdown, process).await
}
