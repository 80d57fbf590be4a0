//! Where a consumer (a projection, the saga orchestrator) gets its events:
//! the store's own log (the embedded default, [`LogSource`]) or Kafka (in
//! `eventfold-bus`). A consumer pulls a batch inside its own PostgreSQL
//! transaction, applies it, and acknowledges it in that same transaction, so
//! the source's progress commits with the consumer's writes.

use std::{any::Any, sync::Arc};

use tokio::sync::watch;
use tokio_postgres::Transaction;

use crate::{AllRead, AllSlice, EventFilter, EventLog, RecordedEvent};

/// A batch pulled from a source.
pub struct Pulled {
    /// New to the consumer, each stream's events in version order.
    pub events: Vec<RecordedEvent>,
    /// Records the source consumed without an event for the consumer
    /// (duplicates, dead letters): progress to acknowledge all the same.
    pub skipped: usize,
    /// What the source keeps to acknowledge the batch.
    pub progress: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Pulled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulled").field("events", &self.events.len()).finish_non_exhaustive()
    }
}

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] crate::Error),
    #[error("{0}")]
    Unavailable(String),
}

/// Where a consumer stands when it pulls a batch and acknowledges it: its
/// transaction, its name and its checkpoint.
#[derive(Clone, Copy)]
pub struct Cursor<'a> {
    /// The consumer's transaction, which the source's progress commits with.
    pub tx: &'a Transaction<'a>,
    /// The consumer's name.
    pub consumer: &'a str,
    /// The consumer's checkpoint: every event up to it is applied.
    pub position: u64,
}

impl std::fmt::Debug for Cursor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor").field("consumer", &self.consumer).field("position", &self.position).finish()
    }
}

/// See the module documentation.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync + 'static {
    /// Up to `max` events the consumer of `at` has not applied, after its
    /// checkpoint.
    async fn pull(&self, at: Cursor<'_>, max: usize) -> Result<Pulled, SourceError>;

    /// Records in the transaction of `at` that the first `applied` events
    /// of `pulled` are applied (a consumer may stop early); the consumer's
    /// new checkpoint (never below the one of `at`).
    async fn ack(&self, at: Cursor<'_>, pulled: &Pulled, applied: usize) -> Result<u64, SourceError>;

    /// Changes when new events may be there.
    fn changed(&self) -> watch::Receiver<u64>;
}

/// The store's log, read gap-safely after the checkpoint; the next batch is
/// read while the current one applies.
pub struct LogSource {
    log: Arc<dyn EventLog>,
    filter: EventFilter,
    prefetch: std::sync::Mutex<Option<(AllRead, tokio::task::JoinHandle<crate::Result<AllSlice>>)>>,
}

impl std::fmt::Debug for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSource").finish_non_exhaustive()
    }
}

impl LogSource {
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self::filtered(log, EventFilter::default())
    }

    /// Only the events of `filter`: the read skips the others server-side
    /// (still gap-safely: the checkpoint moves over them all the same).
    pub fn filtered(log: Arc<dyn EventLog>, filter: EventFilter) -> Self {
        Self { log, filter, prefetch: std::sync::Mutex::new(None) }
    }

    fn take_prefetch(&self) -> Option<(AllRead, tokio::task::JoinHandle<crate::Result<AllSlice>>)> {
        self.prefetch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

#[async_trait::async_trait]
impl EventSource for LogSource {
    async fn pull(&self, at: Cursor<'_>, max: usize) -> Result<Pulled, SourceError> {
        let read = AllRead { after: at.position, max_count: max.max(1), filter: self.filter.clone() };
        let mut slice = None;
        if let Some((prefetched, handle)) = self.take_prefetch() {
            // A gap-safe read from the same position, only earlier.
            if prefetched == read {
                if let Ok(result) = handle.await {
                    slice = Some(result?);
                }
            } else {
                handle.abort();
            }
        }
        let slice = match slice {
            Some(slice) => slice,
            None => self.log.read_all(read.clone()).await?,
        };
        if slice.events.len() >= read.max_count {
            // More is waiting: read it while this batch applies.
            let next = AllRead { after: slice.next_position, ..read };
            let (log, request) = (self.log.clone(), next.clone());
            let handle = tokio::spawn(async move { log.read_all(request).await });
            if let Some((_, stale)) =
                self.prefetch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replace((next, handle))
            {
                stale.abort();
            }
        }
        Ok(Pulled { events: slice.events, skipped: 0, progress: Box::new(slice.next_position) })
    }

    async fn ack(&self, at: Cursor<'_>, pulled: &Pulled, applied: usize) -> Result<u64, SourceError> {
        let position = at.position;
        let next = if applied < pulled.events.len() {
            // Stopped early: up to the last applied event.
            applied.checked_sub(1).map_or(position, |last| pulled.events[last].global_position)
        } else {
            pulled.progress.downcast_ref::<u64>().copied().unwrap_or(position)
        };
        Ok(next.max(position))
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.log.appended()
    }
}
