//! Upcasting: events stored under an older schema version are read as the
//! current one. An [`Upcasters`] registry holds one step per (event type,
//! from version); [`Upcasting`] wraps any [`EventLog`] and applies the steps
//! to everything it reads, so aggregates, reads of streams and of the global
//! log, and subscriptions built on it only ever see current versions.
//!
//! The stored event, and the hash chain over it, stay as written:
//! `verify_stream` checks the stored form.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    error::Result,
    log::EventLog,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, ListStreams, RecordedEvent, RequestKey, Snapshot,
        SnapshotQuery, StreamInfo, StreamPage, StreamRead, StreamSlice, VerifyReport,
    },
};

/// One step: the body of `from_version` → the body of `from_version + 1`.
pub type UpcastFn = Arc<dyn Fn(Value) -> std::result::Result<Value, String> + Send + Sync>;

/// The upcasting steps, keyed by event type, then from version (looked up
/// by `&str` on every event read: no allocation per event).
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<String, HashMap<u32, UpcastFn>>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<(&String, &u32)> =
            self.steps.iter().flat_map(|(t, versions)| versions.keys().map(move |v| (t, v))).collect();
        keys.sort();
        f.debug_struct("Upcasters").field("steps", &keys).finish()
    }
}

impl Upcasters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step from `from_version` of `event_type`. A second
    /// step for the same key replaces the first.
    pub fn register(
        &mut self,
        event_type: impl Into<String>,
        from_version: u32,
        step: impl Fn(Value) -> std::result::Result<Value, String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.steps.entry(event_type.into()).or_default().insert(from_version, Arc::new(step));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Brings `event` to the newest version the registry knows, step by
    /// step. A body a step cannot read (written by some other client under
    /// the same type name) stays as stored, at its stored version, and the
    /// failure is logged: generic reads still deliver it as it is, and code
    /// that needs the current version refuses it by its version.
    pub fn upcast(&self, event: &mut RecordedEvent) {
        let Some(versions) = self.steps.get(event.event_type.as_str()) else { return };
        while let Some(step) = versions.get(&event.schema_version) {
            match step(event.data.clone()) {
                Ok(data) => {
                    event.data = data;
                    event.schema_version = event.schema_version.saturating_add(1);
                }
                Err(message) => {
                    tracing::warn!(
                        event_id = %event.event_id,
                        event_type = %event.event_type,
                        schema_version = event.schema_version,
                        position = event.global_position,
                        stream = %event.stream_id,
                        %message,
                        "event cannot be upcast; delivered at its stored version"
                    );
                    return;
                }
            }
        }
    }

    fn upcast_all(&self, events: &mut [RecordedEvent]) {
        events.iter_mut().for_each(|e| self.upcast(e));
    }
}

/// An [`EventLog`] whose reads come out upcast.
#[derive(Debug)]
pub struct Upcasting<L> {
    inner: L,
    upcasters: Upcasters,
}

impl<L: EventLog> Upcasting<L> {
    pub fn new(inner: L, upcasters: Upcasters) -> Self {
        Self { inner, upcasters }
    }

    pub fn inner(&self) -> &L {
        &self.inner
    }
}

#[async_trait]
impl<L: EventLog> EventLog for Upcasting<L> {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        let mut slice = self.inner.read_stream(read).await?;
        self.upcasters.upcast_all(&mut slice.events);
        Ok(slice)
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        let mut slice = self.inner.read_all(read).await?;
        self.upcasters.upcast_all(&mut slice.events);
        Ok(slice)
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

    /// The chain covers the events as stored, not as upcast.
    async fn verify_stream(&self, stream_id: &str) -> Result<VerifyReport> {
        self.inner.verify_stream(stream_id).await
    }
}

#[async_trait]
impl<L: EventLog + ?Sized> EventLog for Arc<L> {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        (**self).append(request).await
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        (**self).read_stream(read).await
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        (**self).read_all(read).await
    }

    async fn last_position(&self) -> Result<u64> {
        (**self).last_position().await
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        (**self).stream_info(stream_id).await
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        (**self).list_streams(query).await
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        (**self).delete_stream(stream_id, expected_version).await
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        (**self).branch_stream(source, at_version, branch).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<Snapshot> {
        (**self).save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        (**self).load_snapshot(query).await
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        (**self).find_request(key).await
    }

    fn appended(&self) -> watch::Receiver<u64> {
        (**self).appended()
    }

    async fn check_health(&self) -> Result<()> {
        (**self).check_health().await
    }

    async fn verify_stream(&self, stream_id: &str) -> Result<VerifyReport> {
        (**self).verify_stream(stream_id).await
    }
}
