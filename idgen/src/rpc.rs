//! The idgen role over gRPC: batches of snowflake ids, and Leaf-style
//! segments (a caller receives a whole range of ids and hands them out
//! locally; [`SegmentAllocator`] fetches the next range before the current
//! one runs out, so callers never wait on the network at a range boundary).
//!
//! [`SegmentAllocator`] hands ids out without a lock (one compare-and-swap
//! on an atomic cursor per call); [`SegmentAllocator::next_range`] claims a
//! run of up to `n` consecutive ids in that one operation, for callers that
//! need many.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use tern_proto::rpc::MAX_RPC_MESSAGE;
use tern_proto::rpc::internal::id_gen_client::IdGenClient;
use tern_proto::rpc::internal::id_gen_server::{self, IdGenServer};
use tern_proto::rpc::internal::{NextIdsRequest, NextIdsResponse, SegmentRequest, SegmentResponse};
use tern_proto::{ServiceError, ServiceResult, validate_id};
use tern_store::SequenceStore;
use tokio::sync::Notify;
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

/// The part of an allocator every call touches, on a cache line of its own.
///
/// `end` is stored last (Release) when a segment is installed, after
/// `cursor` and `prefetch_at`; a caller loads it first (Acquire).
#[repr(align(128))]
struct Current {
    /// End (exclusive) of the segment in use.
    end: AtomicU64,
    /// Next id to hand out; equal to `end` once the segment is used up.
    /// Never decreases: it only moves up within a segment, and a new segment
    /// starts at or above the end of the previous one.
    cursor: AtomicU64,
    /// The caller whose run holds this id starts the prefetch.
    prefetch_at: AtomicU64,
}

struct Shared {
    current: Current,
    source: Arc<dyn SegmentSource>,
    biz_tag: String,
    runtime: tokio::runtime::Handle,
    /// A fetch (prefetch or inline) is in flight: there is at most one, so
    /// segments arrive in the order they were asked for.
    fetching: AtomicBool,
    /// A prefetched segment waiting for the current one to run out.
    next: std::sync::Mutex<Option<(u64, u64)>>,
    /// Serialises segment switches; held across an inline fetch.
    switch: tokio::sync::Mutex<()>,
    /// Signalled when a fetch ends (landed, failed or cancelled).
    landed: Notify,
}

/// Clears `fetching` and wakes waiters when a fetch ends, including when
/// its future is dropped half-way (a cancelled caller, a runtime shutting
/// down), so the allocator never waits for a fetch that will not land.
struct FetchClaim(Arc<Shared>);

impl Drop for FetchClaim {
    fn drop(&mut self) {
        self.0.fetching.store(false, Ordering::Release);
        self.0.landed.notify_waiters();
    }
}

/// Hands out ids from segments, double-buffered: once a tenth of the current
/// segment is handed out, the next one is fetched in the background.
///
/// The fast path takes no lock: the current segment is an atomic cursor
/// below an atomic end, and a call claims a run `[cursor, cursor + n)` with
/// one compare-and-swap. Only the switch to the next segment takes a lock
/// (one caller installs the prefetched segment, or fetches one inline; the
/// others wait for it).
///
/// Guarantees:
/// - no id is handed out twice, whatever the number of concurrent callers;
/// - ids increase: each call returns ids above those of every call that
///   returned before it started, since segments are used in the order they
///   were fetched and a segment that does not lie above the one in use is
///   refused (an error: the source went backwards);
/// - an error from the source is returned to the caller that needed the
///   segment (a failed prefetch is logged and the fetch retried inline when
///   the current segment runs out);
/// - no id of a segment is skipped at a switch: a run never crosses a
///   segment end, it is cut short there ([`next_range`](Self::next_range)
///   returns fewer ids) and the next run starts the next segment. Ids are
///   lost only when the allocator is dropped (the rest of its segment and
///   any prefetched one) — gaps are expected, as in every Leaf-style scheme.
///
/// Must be created inside a tokio runtime: prefetches are spawned on it.
pub struct SegmentAllocator {
    shared: Arc<Shared>,
}

impl SegmentAllocator {
    pub async fn new(source: Arc<dyn SegmentSource>, biz_tag: &str) -> ServiceResult<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| ServiceError::internal(format!("segment allocator needs a tokio runtime: {e}")))?;
        let (start, end) = source.fetch(biz_tag, 0).await?;
        if start >= end {
            return Err(ServiceError::internal(format!(
                "segment source returned an empty segment {start}..{end}"
            )));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                current: Current {
                    end: AtomicU64::new(end),
                    cursor: AtomicU64::new(start),
                    prefetch_at: AtomicU64::new(prefetch_mark(start, end)),
                },
                source,
                biz_tag: biz_tag.to_owned(),
                runtime,
                fetching: AtomicBool::new(false),
                next: std::sync::Mutex::new(None),
                switch: tokio::sync::Mutex::new(()),
                landed: Notify::new(),
            }),
        })
    }

    /// The next id.
    pub async fn next_id(&self) -> ServiceResult<u64> {
        Ok(self.next_range(1).await?.start)
    }

    /// A run of 1 to `max` consecutive ids claimed in one atomic operation:
    /// `max` of them unless the current segment ends first (a run never
    /// spans two segments); the next call continues in the next segment.
    /// `max == 0` gives an empty range.
    pub async fn next_range(&self, max: u64) -> ServiceResult<Range<u64>> {
        if max == 0 {
            return Ok(0..0);
        }
        loop {
            if let Some(run) = self.try_take(max) {
                return Ok(run);
            }
            self.switch().await?;
        }
    }

    /// Fills `out` with increasing ids, one [`next_range`](Self::next_range)
    /// per segment touched. On error, `out` may be partly written.
    pub async fn fill(&self, out: &mut [u64]) -> ServiceResult<()> {
        let mut rest = out;
        while !rest.is_empty() {
            let run = self.next_range(rest.len() as u64).await?;
            let (head, tail) = rest.split_at_mut(run.end.saturating_sub(run.start) as usize);
            for (slot, id) in head.iter_mut().zip(run) {
                *slot = id;
            }
            rest = tail;
        }
        Ok(())
    }

    /// The fast path: claims up to `max` ids of the current segment, `None`
    /// when it is used up.
    ///
    /// Why a successful swap claims ids of the segment in use even when a
    /// switch races with it: the cursor never decreases and every segment
    /// starts at or above the previous end. If `end` belongs to an older
    /// segment, `at < end` lies below the segment in use, which the cursor
    /// has left for good, so the swap fails. If `end` belongs to the segment
    /// in use, the store of its start to the cursor is visible (Acquire on
    /// `end`), so the swap succeeds only with `at` at or above that start.
    fn try_take(&self, max: u64) -> Option<Range<u64>> {
        let current = &self.shared.current;
        let mut end = current.end.load(Ordering::Acquire);
        let mut mark = current.prefetch_at.load(Ordering::Acquire);
        let mut at = current.cursor.load(Ordering::Relaxed);
        loop {
            if at >= end {
                return None;
            }
            let last = at + max.min(end - at);
            match current.cursor.compare_exchange_weak(at, last, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    if (at..last).contains(&mark) {
                        self.prefetch(end);
                    }
                    return Some(at..last);
                }
                Err(now) => {
                    at = now;
                    end = current.end.load(Ordering::Acquire);
                    mark = current.prefetch_at.load(Ordering::Acquire);
                }
            }
        }
    }

    /// Starts fetching the segment after the one ending at `segment_end`,
    /// in the background, unless a fetch is in flight already or that
    /// segment is no longer in use (a caller that crossed the mark just
    /// before the switch: the switch fetched or is fetching it).
    fn prefetch(&self, segment_end: u64) {
        let shared = &self.shared;
        if shared.fetching.swap(true, Ordering::AcqRel) {
            return;
        }
        // Taken before spawning: if the task is dropped unpolled (runtime
        // shutting down), the claim still ends.
        let claim = FetchClaim(shared.clone());
        if shared.current.end.load(Ordering::Acquire) != segment_end {
            return;
        }
        shared.runtime.spawn(async move {
            let shared = &claim.0;
            match shared.source.fetch(&shared.biz_tag, 0).await {
                Ok(segment) => {
                    let mut next = lock(&shared.next);
                    // Not expected (one prefetch per segment, `next` taken
                    // before the segment is installed); should a spare be
                    // waiting, keep the lower one and let this one be a gap.
                    if next.is_none() {
                        *next = Some(segment);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "segment prefetch failed; will fetch inline"),
            }
            drop(claim);
        });
    }

    /// Moves to the next segment once the current one is used up: the
    /// prefetched one, or one fetched inline. Returns when there is a
    /// segment with ids left (possibly installed by another caller).
    async fn switch(&self) -> ServiceResult<()> {
        let shared = &self.shared;
        loop {
            let guard = shared.switch.lock().await;
            let current = &shared.current;
            if current.cursor.load(Ordering::Acquire) < current.end.load(Ordering::Acquire) {
                return Ok(());
            }
            // Created before looking, so a fetch ending in between wakes it.
            let landed = shared.landed.notified();
            let fetching = shared.fetching.swap(true, Ordering::AcqRel);
            if let Some(segment) = lock(&shared.next).take() {
                let installed = self.install(segment);
                if !fetching {
                    drop(FetchClaim(shared.clone()));
                }
                return installed;
            }
            if fetching {
                // Wait for the segment already on its way: fetching another
                // now could install segments out of order.
                drop(guard);
                landed.await;
                continue;
            }
            // Installed before the claim ends, so that a caller who crossed
            // the old segment's mark late sees the switch and starts no
            // prefetch of its own.
            let claim = FetchClaim(shared.clone());
            let installed = shared.source.fetch(&shared.biz_tag, 0).await.and_then(|s| self.install(s));
            drop(claim);
            return installed;
        }
    }

    /// Makes `segment` current. Called with the switch lock held, when the
    /// current segment is used up.
    fn install(&self, (start, end): (u64, u64)) -> ServiceResult<()> {
        let current = &self.shared.current;
        let previous_end = current.end.load(Ordering::Relaxed);
        if start >= end || start < previous_end {
            return Err(ServiceError::internal(format!(
                "segment source went backwards or returned an empty segment: {start}..{end} after ..{previous_end}"
            )));
        }
        current.cursor.store(start, Ordering::Relaxed);
        current.prefetch_at.store(prefetch_mark(start, end), Ordering::Release);
        current.end.store(end, Ordering::Release);
        Ok(())
    }
}

/// The id whose run starts the prefetch: a tenth into the segment.
fn prefetch_mark(start: u64, end: u64) -> u64 {
    start + (end - start) / 10
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
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

    /// Segment k is `[k*(step+gap), k*(step+gap)+step)`: the gaps between
    /// segments belong to nobody, so an id from a gap is caught.
    struct TestSource {
        step: u64,
        gap: u64,
        /// Segments handed out, in order.
        segments: std::sync::Mutex<Vec<(u64, u64)>>,
        /// Fetches from now on fail (UNAVAILABLE) while set.
        failing: AtomicBool,
        /// Fetch calls so far, failed ones included.
        calls: AtomicU64,
        /// Call number `n` (1-based) never returns.
        hang_at: AtomicU64,
        /// Yield this many times inside each fetch, so fetches interleave
        /// with callers.
        yields: u32,
    }

    impl TestSource {
        fn new(step: u64, gap: u64) -> Self {
            Self {
                step,
                gap,
                segments: Default::default(),
                failing: AtomicBool::new(false),
                calls: AtomicU64::new(0),
                hang_at: AtomicU64::new(0),
                yields: 0,
            }
        }

        fn fetched(&self) -> Vec<(u64, u64)> {
            self.segments.lock().unwrap().clone()
        }

        /// Every id of the fetched segments, in order.
        fn all_ids(&self) -> Vec<u64> {
            self.fetched().into_iter().flat_map(|(a, b)| a..b).collect()
        }

        fn owns(&self, id: u64) -> bool {
            self.fetched().iter().any(|&(a, b)| (a..b).contains(&id))
        }
    }

    #[async_trait]
    impl SegmentSource for TestSource {
        async fn fetch(&self, _biz_tag: &str, _size: u32) -> ServiceResult<(u64, u64)> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            for _ in 0..self.yields {
                tokio::task::yield_now().await;
            }
            if self.hang_at.load(Ordering::SeqCst) == call {
                std::future::pending::<()>().await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(ServiceError::unavailable("source down"));
            }
            let mut segments = self.segments.lock().unwrap();
            let start = segments.len() as u64 * (self.step + self.gap);
            segments.push((start, start + self.step));
            Ok((start, start + self.step))
        }
    }

    /// Deterministic xorshift, for property-style loops without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    async fn until_fetched(source: &TestSource, n: usize) {
        for _ in 0..10_000 {
            if source.fetched().len() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("fetch {n} never happened");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_get_unique_increasing_ids_from_fetched_segments() {
        let run = tokio::time::timeout(Duration::from_secs(60), concurrent_callers());
        run.await.expect("allocator wedged");
    }

    async fn concurrent_callers() {
        for (step, gap) in [(1, 1), (7, 3), (64, 1000)] {
            let source = Arc::new(TestSource { yields: 3, ..TestSource::new(step, gap) });
            let alloc = Arc::new(SegmentAllocator::new(source.clone(), "t").await.unwrap());
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let alloc = alloc.clone();
                    tokio::spawn(async move {
                        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                        let mut ids = Vec::new();
                        while ids.len() < 3_000 {
                            if t % 2 == 0 {
                                ids.push(alloc.next_id().await.unwrap());
                            } else {
                                let max = 1 + rng.below(20);
                                let run = alloc.next_range(max).await.unwrap();
                                assert!(!run.is_empty() && run.end - run.start <= max, "{run:?} for {max}");
                                ids.extend(run);
                            }
                        }
                        ids
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                let ids = task.await.unwrap();
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids of one caller increase");
                all.extend(ids);
            }
            let n = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), n, "an id was handed out twice (step {step})");
            let owned = source.fetched();
            assert!(
                all.iter().all(|id| owned.iter().any(|&(a, b)| (a..b).contains(id))),
                "an id outside every fetched segment (step {step})"
            );
            // No id is skipped at a switch: all but the last two segments
            // (in use, prefetched) were handed out entirely.
            let done = &owned[..owned.len().saturating_sub(2)];
            let skipped = done.iter().flat_map(|&(a, b)| a..b).find(|id| all.binary_search(id).is_err());
            assert_eq!(skipped, None, "an id skipped at a switch (step {step})");
        }
    }

    #[tokio::test]
    async fn one_caller_gets_every_id_in_runs_cut_at_segment_ends() {
        for seed in 1..=50u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let (step, gap) = (1 + rng.below(30), rng.below(5));
            let source = Arc::new(TestSource { yields: rng.below(3) as u32, ..TestSource::new(step, gap) });
            let alloc = SegmentAllocator::new(source.clone(), "t").await.unwrap();
            assert_eq!(alloc.next_range(0).await.unwrap(), 0..0);
            let mut got = Vec::new();
            for _ in 0..200 {
                let max = 1 + rng.below(3 * step);
                let run = alloc.next_range(max).await.unwrap();
                let segment = source.fetched().into_iter().find(|&(a, b)| (a..b).contains(&run.start));
                let (_, end) = segment.expect("run starts in a fetched segment");
                // The run is `max` ids, or the rest of its segment.
                assert_eq!(run.end, (run.start + max).min(end), "seed {seed}: {run:?} for {max}");
                got.extend(run);
            }
            // Every id of every segment, in order, with none skipped.
            let all = source.all_ids();
            assert_eq!(got[..], all[..got.len()], "seed {seed}");
        }
    }

    #[tokio::test]
    async fn switch_uses_the_segment_prefetched_after_a_tenth() {
        let source = Arc::new(TestSource::new(100, 50));
        let alloc = SegmentAllocator::new(source.clone(), "t").await.unwrap();
        assert_eq!(alloc.next_range(10).await.unwrap(), 0..10);
        tokio::task::yield_now().await;
        assert_eq!(source.fetched().len(), 1, "no prefetch before a tenth is used");
        assert_eq!(alloc.next_id().await.unwrap(), 10);
        until_fetched(&source, 2).await;
        assert_eq!(source.fetched()[1], (150, 250));
        // The run stops at the segment end; the next continues in the
        // prefetched segment, with no fetch inline.
        assert_eq!(alloc.next_range(1_000).await.unwrap(), 11..100);
        assert_eq!(alloc.next_id().await.unwrap(), 150);
        assert_eq!(source.fetched().len(), 2);
        let mut ids = [0u64; 150];
        alloc.fill(&mut ids).await.unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((ids[0], ids[98], ids[99]), (151, 249, 300), "fill crosses into the third segment");
    }

    #[tokio::test]
    async fn source_errors_are_returned_and_recovered_from() {
        let source = Arc::new(TestSource::new(10, 0));
        source.failing.store(true, Ordering::SeqCst);
        let err = SegmentAllocator::new(source.clone(), "t").await.err().expect("first fetch fails");
        assert_eq!(err.code, ErrorCode::Unavailable);

        source.failing.store(false, Ordering::SeqCst);
        let alloc = SegmentAllocator::new(source.clone(), "t").await.unwrap();
        source.failing.store(true, Ordering::SeqCst);
        // The prefetch fails (logged); the segment in use is still served.
        let mut ids = vec![0u64; 10];
        alloc.fill(&mut ids).await.unwrap();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        // Used up: the inline fetch fails and the caller sees why.
        for _ in 0..3 {
            assert_eq!(alloc.next_id().await.unwrap_err().code, ErrorCode::Unavailable);
            assert_eq!(alloc.next_range(5).await.unwrap_err().code, ErrorCode::Unavailable);
        }
        source.failing.store(false, Ordering::SeqCst);
        let next = alloc.next_id().await.unwrap();
        assert!(next >= 10 && source.owns(next), "{next} after recovery");
    }

    /// Hands out the scripted segments, then fails.
    struct Script(std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>);

    #[async_trait]
    impl SegmentSource for Script {
        async fn fetch(&self, _biz_tag: &str, _size: u32) -> ServiceResult<(u64, u64)> {
            self.0.lock().unwrap().pop_front().ok_or_else(|| ServiceError::unavailable("script ended"))
        }
    }

    #[tokio::test]
    async fn segments_below_the_one_in_use_or_empty_are_refused() {
        let script = [(100, 110), (50, 60), (200, 200), (105, 120), (300, 310)];
        let alloc =
            SegmentAllocator::new(Arc::new(Script(std::sync::Mutex::new(script.into()))), "t").await.unwrap();
        assert_eq!(alloc.next_range(10).await.unwrap(), 100..110);
        for _ in 0..3 {
            assert_eq!(alloc.next_id().await.unwrap_err().code, ErrorCode::Internal);
        }
        assert_eq!(alloc.next_id().await.unwrap(), 300);

        let empty = Arc::new(Script(std::sync::Mutex::new([(5, 5)].into())));
        assert_eq!(SegmentAllocator::new(empty, "t").await.err().unwrap().code, ErrorCode::Internal);
    }

    #[tokio::test]
    async fn a_cancelled_inline_fetch_does_not_wedge_the_allocator() {
        let source = Arc::new(TestSource::new(10, 0));
        let alloc = SegmentAllocator::new(source.clone(), "t").await.unwrap();
        // The prefetch (call 2) fails, so running out means an inline fetch.
        source.failing.store(true, Ordering::SeqCst);
        assert_eq!(alloc.next_range(10).await.unwrap(), 0..10);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // The inline fetch (call 3) hangs and its caller gives up.
        source.failing.store(false, Ordering::SeqCst);
        source.hang_at.store(3, Ordering::SeqCst);
        let gave_up = tokio::time::timeout(Duration::from_millis(50), alloc.next_id()).await;
        assert!(gave_up.is_err());
        // The next caller fetches again rather than waiting for call 3.
        let next = tokio::time::timeout(Duration::from_secs(5), alloc.next_id()).await;
        assert_eq!(next.expect("not wedged").unwrap(), 10);
        assert_eq!(source.calls.load(Ordering::SeqCst), 4);
    }
}
