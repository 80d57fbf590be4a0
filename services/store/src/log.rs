use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    error::Result,
    hash::ChainVerifier,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, ListStreams, RequestKey, Snapshot, SnapshotQuery, StreamInfo,
        StreamPage, StreamRead, StreamSlice, VerifyReport,
    },
};

/// The event log: the one trait every storage adapter implements, checked by
/// the shared conformance suite (`tests/conformance.rs`).
///
/// Guarantees every adapter gives:
/// - per-stream versions are 0, 1, 2, … with no gap or duplicate;
/// - `append` is atomic and honours its expected version;
/// - `read_all` is gap-safe: it never returns an event at a position beyond
///   one that may still appear later (a transaction that committed out of
///   position order), so a reader that continues from `next_position` never
///   skips an event.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Append events to one stream atomically.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome>;

    /// Read one stream (for a branch: the shared history, then its own).
    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice>;

    /// Read the global log forwards, gap-safely.
    async fn read_all(&self, read: AllRead) -> Result<AllSlice>;

    /// The highest global position stored so far (0 when empty).
    async fn last_position(&self) -> Result<u64>;

    /// Describe a stream; deleted streams answer `StreamDeleted`.
    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo>;

    /// List streams in id order.
    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage>;

    /// Soft-delete a stream: reads answer `StreamDeleted`, history is kept.
    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo>;

    /// Fork `source` at `at_version` into a new stream `branch`.
    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo>;

    /// Store a snapshot (replacing one at the same version).
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<Snapshot>;

    /// The latest snapshot matching the query.
    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>>;

    /// The first answer of an append made with `key`'s request id in its
    /// scope (AIP-155), as a duplicate; `None` if no append with it
    /// succeeded (or it expired); `RequestIdReused` if it was made for a
    /// request with another fingerprint.
    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>>;

    /// Changes whenever the log may have grown (the value is a position hint).
    /// Live subscriptions wake on it instead of polling.
    fn appended(&self) -> watch::Receiver<u64>;

    /// Whether the backing storage answers.
    async fn check_health(&self) -> Result<()>;

    /// Recompute the stream's hash chain, shared history included.
    async fn verify_stream(&self, stream_id: &str) -> Result<VerifyReport> {
        let mut verifier = ChainVerifier::new();
        let mut from = None;
        loop {
            let mut read = StreamRead::forwards(stream_id, 1000);
            read.from_version = from;
            let slice = self.read_stream(read).await?;
            for event in &slice.events {
                if !verifier.push(event) {
                    return Ok(verifier.finish());
                }
            }
            match slice.events.last() {
                Some(last) if !slice.end_of_stream => from = Some(last.version.saturating_add(1)),
                _ => return Ok(verifier.finish()),
            }
        }
    }
}
