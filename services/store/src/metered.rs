//! The event store's metrics, for any adapter: [`Metered`] wraps an
//! [`EventLog`] and records every append (each in an `eventstore.append`
//! span, a child of the caller's).
//!
//! - `eventfold_store_appends_total{outcome}`: `ok`, `duplicate` (the first
//!   answer of a request id again), `conflict` (wrong expected version),
//!   `refused` (any other caller mistake) or `failed` (the storage);
//! - `eventfold_store_events_appended_total`: events stored (duplicates not
//!   counted again);
//! - `eventfold_store_append_seconds`: latency of each append.
//!
//! The PostgreSQL adapter adds `eventfold_store_group_commit_size` (appends
//! per commit), and [`crate::Subscriptions`] `eventfold_store_subscribers`
//! and `eventfold_store_subscribers_fell_behind_total`.

use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::Instrument;

use crate::{
    error::{Error, Result},
    log::EventLog,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, ListStreams, RequestKey, Snapshot, SnapshotQuery, StreamInfo,
        StreamPage, StreamRead, StreamSlice, VerifyReport,
    },
};

/// An [`EventLog`] whose appends are counted and timed.
#[derive(Debug)]
pub struct Metered<L> {
    inner: L,
}

impl<L: EventLog> Metered<L> {
    pub fn new(inner: L) -> Self {
        Self { inner }
    }
}

/// The `outcome` label of an append's answer.
fn outcome(result: &Result<AppendOutcome>) -> &'static str {
    match result {
        Ok(o) if o.duplicate => "duplicate",
        Ok(_) => "ok",
        Err(Error::WrongExpectedVersion { .. }) => "conflict",
        Err(Error::Unavailable(_) | Error::Internal(_)) => "failed",
        Err(_) => "refused",
    }
}

#[async_trait]
impl<L: EventLog> EventLog for Metered<L> {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "eventstore.append",
            otel.name = "append",
            stream = %request.stream_id,
            events = request.events.len(),
        );
        let result = self.inner.append(request).instrument(span).await;
        metrics::histogram!("eventfold_store_append_seconds").record(started.elapsed());
        metrics::counter!("eventfold_store_appends_total", "outcome" => outcome(&result)).increment(1);
        if let Ok(o) = &result
            && !o.duplicate
        {
            metrics::counter!("eventfold_store_events_appended_total").increment(o.positions.len() as u64);
        }
        result
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        self.inner.read_stream(read).await
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        self.inner.read_all(read).await
    }

    async fn last_position(&self) -> Result<u64> {
        self.inner.last_position().await
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        self.inner.stream_info(stream_id).await
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        self.inner.list_streams(query).await
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        self.inner.delete_stream(stream_id, expected_version).await
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        self.inner.branch_stream(source, at_version, branch).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<Snapshot> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(query).await
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        self.inner.find_request(key).await
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.inner.appended()
    }

    async fn check_health(&self) -> Result<()> {
        self.inner.check_health().await
    }

    async fn verify_stream(&self, stream_id: &str) -> Result<VerifyReport> {
        self.inner.verify_stream(stream_id).await
    }
}

/// Describes the metrics of this crate (the `# HELP` lines of `/metrics`)
/// and registers those without labels at zero, so that they are exported
/// before their first event.
pub fn describe() {
    metrics::describe_counter!("eventfold_store_appends_total", "Appends answered, by outcome");
    metrics::describe_counter!("eventfold_store_events_appended_total", "Events stored by appends");
    metrics::describe_histogram!("eventfold_store_append_seconds", "Latency of appends, in seconds");
    metrics::describe_histogram!(
        "eventfold_store_group_commit_size",
        "Appends committed together by one PostgreSQL group commit"
    );
    metrics::describe_histogram!(
        "eventfold_store_group_commit_seconds",
        "Latency of one PostgreSQL group commit (its transaction and retries), in seconds"
    );
    metrics::describe_gauge!("eventfold_store_subscribers", "Subscriptions running");
    metrics::describe_counter!(
        "eventfold_store_subscribers_fell_behind_total",
        "Live subscribers that fell behind the log and caught up from storage again"
    );
    metrics::describe_gauge!("eventfold_db_pool_connections", "Connections of a PostgreSQL pool");
    metrics::describe_gauge!("eventfold_db_pool_idle_connections", "Idle connections of a PostgreSQL pool");
    metrics::describe_gauge!("eventfold_db_pool_max_connections", "Most connections of a PostgreSQL pool");
    metrics::describe_gauge!("eventfold_db_pool_waiters", "Callers waiting for a connection of a PostgreSQL pool");
    metrics::describe_counter!(
        "eventfold_db_pool_acquires_total",
        "Connections taken from a PostgreSQL pool: at once, after a wait, or timed out"
    );
    metrics::describe_histogram!(
        "eventfold_db_pool_acquire_seconds",
        "Time to take a connection from a PostgreSQL pool, in seconds"
    );
    metrics::gauge!("eventfold_store_subscribers").increment(0.0);
    metrics::counter!("eventfold_store_subscribers_fell_behind_total").increment(0);
}
