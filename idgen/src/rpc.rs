//! The idgen role over gRPC: batches of snowflake ids, and Leaf-style
//! segments (a caller receives a whole range of ids and hands them out
//! locally; [`SegmentAllocator`] fetches the next range before the current
//! one runs out, so callers never wait on the network at a range boundary).

use std::sync::Arc;

use async_trait::async_trait;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::id_gen_client::IdGenClient;
use tern_proto::rpc::internal::id_gen_server::{self, IdGenServer};
use tern_proto::rpc::internal::{NextIdsRequest, NextIdsResponse, SegmentRequest, SegmentResponse};
use tern_proto::{ServiceError, ServiceResult, validate_id};
use tern_store::SequenceStore;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::Snowflake;

/// Registry role name of idgen nodes.
pub const IDGEN_ROLE: &str = "idgen";
/// Most snowflake ids one call returns.
pub const MAX_BATCH: u32 = 10_000;
/// Default segment size.
pub const DEFAULT_STEP: u32 = 1_000;

/// Serves ids from a snowflake generator and segments from a counter store
/// (Redis INCR in cluster mode). The counter numbers a tag's segments and the
/// step is fixed per service, so segment n is `[n*step, (n+1)*step)` and no
/// two callers ever share an id.
pub struct IdGenService {
    snowflake: Arc<Snowflake>,
    segments: Arc<dyn SequenceStore>,
    step: u32,
}

impl IdGenService {
    pub fn new(snowflake: Arc<Snowflake>, segments: Arc<dyn SequenceStore>, step: u32) -> Self {
        Self { snowflake, segments, step: step.max(1) }
    }

    pub fn into_service(self) -> IdGenServer<Self> {
        IdGenServer::new(self)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE)
    }

    /// The next segment of `biz_tag`. `size` must be 0 or the service's
    /// step (segments of mixed sizes could overlap).
    pub async fn next_segment(&self, biz_tag: &str, size: u32) -> ServiceResult<(u64, u64)> {
        validate_id("biz_tag", biz_tag)?;
        if size != 0 && size != self.step {
            return Err(ServiceError::invalid(format!("segment size must be 0 or {}", self.step)));
        }
        let key = format!("segment:{biz_tag}");
        let n = self.segments.incr(&key).await.map_err(|e| ServiceError::internal(e.to_string()))? - 1;
        let step = u64::from(self.step);
        let start = n.checked_mul(step).ok_or_else(|| ServiceError::internal("segment space exhausted"))?;
        Ok((start, start + step))
    }
}

#[async_trait]
impl id_gen_server::IdGen for IdGenService {
    async fn next_ids(&self, request: Request<NextIdsRequest>) -> Result<Response<NextIdsResponse>, Status> {
        let count = request.into_inner().count;
        if count == 0 || count > MAX_BATCH {
            return Err(ServiceError::invalid(format!("count must be 1 to {MAX_BATCH}")).into());
        }
        let mut ids = vec![0; count as usize];
        self.snowflake.fill(&mut ids).map_err(ServiceError::unavailable)?;
        Ok(Response::new(NextIdsResponse { ids }))
    }

    async fn next_segment(
        &self,
        request: Request<SegmentRequest>,
    ) -> Result<Response<SegmentResponse>, Status> {
        let r = request.into_inner();
        let (start, end) = IdGenService::next_segment(self, &r.biz_tag, r.size).await?;
        Ok(Response::new(SegmentResponse { start, end }))
    }
}

/// Where segments come from.
#[async_trait]
pub trait SegmentSource: Send + Sync + 'static {
    async fn fetch(&self, biz_tag: &str, size: u32) -> ServiceResult<(u64, u64)>;
}

#[async_trait]
impl SegmentSource for IdGenService {
    async fn fetch(&self, biz_tag: &str, size: u32) -> ServiceResult<(u64, u64)> {
        self.next_segment(biz_tag, size).await
    }
}

/// A remote idgen node.
pub struct RemoteIdGen {
    client: IdGenClient<tonic::transport::Channel>,
}

impl RemoteIdGen {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        let client = IdGenClient::new(channel)
            .max_decoding_message_size(MAX_RPC_MESSAGE)
            .max_encoding_message_size(MAX_RPC_MESSAGE);
        Self { client }
    }

    pub async fn next_ids(&self, count: u32) -> ServiceResult<Vec<u64>> {
        Ok(self.client.clone().next_ids(NextIdsRequest { count }).await?.into_inner().ids)
    }
}

#[async_trait]
impl SegmentSource for RemoteIdGen {
    async fn fetch(&self, biz_tag: &str, size: u32) -> ServiceResult<(u64, u64)> {
        let request = SegmentRequest { biz_tag: biz_tag.to_owned(), size };
        let r = self.client.clone().next_segment(request).await?.into_inner();
        Ok((r.start, r.end))
    }
}

struct Buffers {
    /// Next id to hand out, end of the current segment.
    current: (u64, u64),
    segment_start: u64,
    next: Option<(u64, u64)>,
    prefetching: bool,
}

/// Hands out ids from segments, double-buffered: once a tenth of the current
/// segment is used, the next one is fetched in the background.
pub struct SegmentAllocator {
    source: Arc<dyn SegmentSource>,
    biz_tag: String,
    buffers: Arc<Mutex<Buffers>>,
    /// Signalled when a prefetch lands (or fails).
    landed: Arc<tokio::sync::Notify>,
}

impl SegmentAllocator {
    pub async fn new(source: Arc<dyn SegmentSource>, biz_tag: &str) -> ServiceResult<Self> {
        let first = source.fetch(biz_tag, 0).await?;
        Ok(Self {
            source,
            biz_tag: biz_tag.to_owned(),
            buffers: Arc::new(Mutex::new(Buffers {
                current: first,
                segment_start: first.0,
                next: None,
                prefetching: false,
            })),
            landed: Arc::default(),
        })
    }

    /// The next id. Ids from one allocator increase: segments are used in
    /// the order they were fetched.
    pub async fn next_id(&self) -> ServiceResult<u64> {
        let mut b = loop {
            let mut b = self.buffers.lock().await;
            if b.current.0 < b.current.1 {
                break b;
            }
            if let Some(next) = b.next.take() {
                b.current = next;
            } else if b.prefetching {
                // Wait for the segment already on its way: fetching another
                // now would make the late prefetch an older, lower segment.
                let landed = self.landed.notified();
                drop(b);
                landed.await;
                continue;
            } else {
                b.current = self.source.fetch(&self.biz_tag, 0).await?;
            }
            b.segment_start = b.current.0;
            break b;
        };
        let id = b.current.0;
        b.current.0 += 1;
        let size = b.current.1 - b.segment_start;
        let used = b.current.0 - b.segment_start;
        if b.next.is_none() && !b.prefetching && used * 10 >= size {
            b.prefetching = true;
            let (source, tag, buffers) = (self.source.clone(), self.biz_tag.clone(), self.buffers.clone());
            let landed = self.landed.clone();
            tokio::spawn(async move {
                let fetched = source.fetch(&tag, 0).await;
                let mut b = buffers.lock().await;
                b.prefetching = false;
                match fetched {
                    Ok(range) => b.next = Some(range),
                    Err(e) => tracing::warn!(error = %e, "segment prefetch failed; will fetch inline"),
                }
                drop(b);
                landed.notify_waiters();
            });
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::ErrorCode;
    use tern_store::embedded::EmbeddedSequenceStore;

    #[tokio::test]
    async fn segments_never_overlap_and_allocators_prefetch() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(EmbeddedSequenceStore::open(&dir.path().join("seq.redb")).unwrap());
        let service = Arc::new(IdGenService::new(Arc::new(Snowflake::new(1).unwrap()), counters, 100));
        assert_eq!(service.next_segment("orders", 0).await.unwrap(), (0, 100));
        assert_eq!(service.next_segment("orders", 100).await.unwrap(), (100, 200));
        assert_eq!(service.next_segment("other", 0).await.unwrap(), (0, 100));
        assert_eq!(service.next_segment("orders", 50).await.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(service.next_segment("bad tag", 0).await.unwrap_err().code, ErrorCode::InvalidArgument);

        // Two allocators on one tag hand out disjoint, gap-tolerant ids.
        let a = SegmentAllocator::new(service.clone(), "users").await.unwrap();
        let b = SegmentAllocator::new(service.clone(), "users").await.unwrap();
        let mut seen = std::collections::HashSet::new();
        let (mut last_a, mut last_b) = (None, None);
        for _ in 0..1_000 {
            let (x, y) = (a.next_id().await.unwrap(), b.next_id().await.unwrap());
            assert!(seen.insert(x) && seen.insert(y), "ids overlap");
            assert!(last_a < Some(x) && last_b < Some(y), "ids from one allocator increase");
            (last_a, last_b) = (Some(x), Some(y));
        }
        // Prefetch: each allocator used ~10 segments for 1000 ids; the
        // counter advanced by at most one spare segment per allocator.
        let used_segments = service.next_segment("users", 0).await.unwrap().0 / 100;
        assert!((20..=23).contains(&used_segments), "{used_segments} segments fetched");
    }
}
