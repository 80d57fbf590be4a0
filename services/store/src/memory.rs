//! The in-memory adapter: the embedded default of `eventfold dev` and the
//! reference behaviour for the conformance suite. Nothing survives the
//! process.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    hash::{self, GENESIS},
    log::EventLog,
    model::{
        AllRead, AllSlice, AppendOutcome, AppendRequest, Direction, ListStreams, MAX_PAGE_BYTES, RecordedEvent,
        RequestKey, Snapshot, SnapshotNamespace, SnapshotQuery, StreamInfo, StreamPage, StreamRead, StreamSlice,
        check_stream_id, check_version, now_micros, to_micros,
    },
};

#[derive(Debug, Clone)]
struct StreamState {
    info: StreamInfo,
    /// Indexes into `Inner::events` of the stream's own events.
    own: Vec<usize>,
}

/// The first answer to a request id, with what identifies its request.
#[derive(Debug)]
struct Answered {
    fingerprint: [u8; 32],
    outcome: AppendOutcome,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<RecordedEvent>,
    /// [`RecordedEvent::size`] of each event of `events`, computed once.
    sizes: Vec<usize>,
    event_ids: HashSet<uuid::Uuid>,
    streams: BTreeMap<String, StreamState>,
    snapshots: BTreeMap<(String, SnapshotNamespace, u64), Snapshot>,
    /// By (scope, request id).
    requests: HashMap<(String, String), Answered>,
    /// Request keys in the order they were answered, for expiry.
    request_times: VecDeque<(Instant, (String, String))>,
}

/// An event log held in memory.
#[derive(Debug)]
pub struct MemoryEventLog {
    inner: Mutex<Inner>,
    appended: watch::Sender<u64>,
    request_retention: Duration,
}

/// How long request ids are remembered by default (AIP-155 retries).
pub const DEFAULT_REQUEST_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for MemoryEventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventLog {
    pub fn new() -> Self {
        Self::with_request_retention(DEFAULT_REQUEST_RETENTION)
    }

    /// A log that forgets request ids `retention` after their first answer.
    pub fn with_request_retention(retention: Duration) -> Self {
        Self { inner: Mutex::new(Inner::default()), appended: watch::channel(0).0, request_retention: retention }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied append:
        // every mutation is prepared first and applied without fallible steps.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// The first answer of `key`'s request id, if it is the same request.
    fn answered(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        match self.requests.get(&(key.scope.clone(), key.request_id.clone())) {
            None => Ok(None),
            Some(first) if key.matches(Some(&first.fingerprint)) => {
                Ok(Some(AppendOutcome { duplicate: true, ..first.outcome.clone() }))
            }
            Some(_) => Err(Error::RequestIdReused { request_id: key.request_id.clone() }),
        }
    }

    fn forget_requests_before(&mut self, horizon: Instant) {
        while let Some((at, _)) = self.request_times.front()
            && *at < horizon
        {
            if let Some((_, key)) = self.request_times.pop_front() {
                self.requests.remove(&key);
            }
        }
    }

    fn live_stream(&self, stream_id: &str) -> Result<&StreamState> {
        match self.streams.get(stream_id) {
            None => Err(Error::StreamNotFound(stream_id.to_owned())),
            Some(s) if s.info.deleted_at.is_some() => Err(Error::StreamDeleted(stream_id.to_owned())),
            Some(s) => Ok(s),
        }
    }

    fn size_of(&self, event: &RecordedEvent) -> usize {
        usize::try_from(event.global_position)
            .ok()
            .and_then(|p| p.checked_sub(1))
            .and_then(|i| self.sizes.get(i).copied())
            .unwrap_or_else(|| event.size())
    }

    /// The stream's events in version order, shared history first.
    fn history(&self, stream_id: &str, upto: Option<u64>) -> Vec<&RecordedEvent> {
        let Some(state) = self.streams.get(stream_id) else { return Vec::new() };
        let mut out = match &state.info.parent {
            Some((parent, at)) => {
                let limit = upto.map_or(*at, |u| u.min(*at));
                self.history(parent, Some(limit))
            }
            None => Vec::new(),
        };
        out.extend(state.own.iter().map(|&i| &self.events[i]).filter(|e| upto.is_none_or(|u| e.version <= u)));
        out
    }
}

#[async_trait]
impl EventLog for MemoryEventLog {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        request.validate()?;
        let key = request.request_key();
        let mut inner = self.lock();
        if let Some(horizon) = Instant::now().checked_sub(self.request_retention) {
            inner.forget_requests_before(horizon);
        }
        if let Some(key) = &key
            && let Some(first) = inner.answered(key)?
        {
            return Ok(first);
        }
        let state = inner.streams.get(&request.stream_id);
        if state.is_some_and(|s| s.info.deleted_at.is_some()) {
            return Err(Error::StreamDeleted(request.stream_id));
        }
        let current = state.and_then(|s| s.info.version);
        if !request.expected.admits(current) {
            return Err(Error::WrongExpectedVersion {
                stream: request.stream_id,
                expected: request.expected,
                actual: current,
            });
        }
        if let Some(dup) = request.events.iter().find(|e| inner.event_ids.contains(&e.event_id)) {
            return Err(Error::DuplicateEventId { event_id: dup.event_id.to_string() });
        }

        let now = now_micros();
        let micros = to_micros(now);
        let mut prev = state.and_then(|s| s.info.head_hash).unwrap_or(GENESIS);
        let mut version = current.map_or(0, |v| v.saturating_add(1));
        let first_version = version;
        let mut position = inner.events.len() as u64;
        let mut positions = Vec::with_capacity(request.events.len());
        let mut recorded = Vec::with_capacity(request.events.len());
        for event in request.events {
            position = position.saturating_add(1);
            let content = hash::content_digest(
                &event.event_id,
                &event.event_type,
                event.schema_version,
                &event.data,
                &event.metadata,
            );
            let link = hash::link(&prev, version, micros, &request.stream_id, &content);
            recorded.push(RecordedEvent {
                event_id: event.event_id,
                stream_id: request.stream_id.clone(),
                version,
                global_position: position,
                event_type: event.event_type,
                schema_version: event.schema_version,
                data: event.data,
                metadata: event.metadata,
                created_at: now,
                hash: link,
            });
            positions.push(position);
            prev = link;
            version = version.saturating_add(1);
        }
        let last_version = version.saturating_sub(1);

        let start = inner.events.len();
        let state = inner.streams.entry(request.stream_id.clone()).or_insert_with(|| StreamState {
            info: StreamInfo {
                stream_id: request.stream_id.clone(),
                version: None,
                first_position: None,
                last_position: None,
                created_at: now,
                updated_at: now,
                deleted_at: None,
                parent: None,
                head_hash: None,
            },
            own: Vec::new(),
        });
        state.own.extend(start..start.saturating_add(recorded.len()));
        state.info.version = Some(last_version);
        state.info.first_position.get_or_insert(positions[0]);
        state.info.last_position = positions.last().copied();
        state.info.updated_at = now;
        state.info.head_hash = Some(prev);
        for event in &recorded {
            inner.event_ids.insert(event.event_id);
            inner.sizes.push(event.size());
        }
        inner.events.extend(recorded);
        let outcome =
            AppendOutcome { stream_id: request.stream_id, first_version, last_version, positions, duplicate: false };
        if let Some(key) = key {
            let id = (key.scope, key.request_id);
            inner.request_times.push_back((Instant::now(), id.clone()));
            inner.requests.insert(id, Answered { fingerprint: key.fingerprint, outcome: outcome.clone() });
        }
        let head = inner.events.len() as u64;
        drop(inner);
        self.appended.send_replace(head);
        Ok(outcome)
    }

    async fn read_stream(&self, read: StreamRead) -> Result<StreamSlice> {
        read.validate()?;
        let inner = self.lock();
        let state = inner.live_stream(&read.stream_id)?;
        let stream_version = state.info.version;
        let mut history = inner.history(&read.stream_id, None);
        if read.direction == Direction::Backwards {
            history.reverse();
        }
        let mut events = Vec::new();
        let mut end_of_stream = true;
        let mut bytes = 0usize;
        for event in history.into_iter().filter(|e| read.admits(e.version, e.created_at)) {
            bytes = bytes.saturating_add(inner.size_of(event));
            if events.len() == read.max_count || (!events.is_empty() && bytes > MAX_PAGE_BYTES) {
                end_of_stream = false;
                break;
            }
            events.push(event.clone());
        }
        Ok(StreamSlice { events, stream_version, end_of_stream })
    }

    async fn read_all(&self, read: AllRead) -> Result<AllSlice> {
        read.validate()?;
        let inner = self.lock();
        let start = usize::try_from(read.after).unwrap_or(usize::MAX).min(inner.events.len());
        let mut events = Vec::new();
        let mut next_position = read.after;
        let mut bytes = 0usize;
        for (event, size) in inner.events[start..].iter().zip(&inner.sizes[start..]) {
            if events.len() == read.max_count {
                break;
            }
            let matched = read.filter.matches(&event.stream_id, &event.event_type);
            if matched {
                bytes = bytes.saturating_add(*size);
                if !events.is_empty() && bytes > MAX_PAGE_BYTES {
                    break;
                }
                events.push(event.clone());
            }
            next_position = event.global_position;
        }
        let end_of_log = next_position >= inner.events.len() as u64;
        Ok(AllSlice { events, next_position: next_position.max(read.after), end_of_log })
    }

    async fn last_position(&self) -> Result<u64> {
        Ok(self.lock().events.len() as u64)
    }

    async fn stream_info(&self, stream_id: &str) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        Ok(self.lock().live_stream(stream_id)?.info.clone())
    }

    async fn list_streams(&self, query: ListStreams) -> Result<StreamPage> {
        query.validate()?;
        let inner = self.lock();
        let mut streams = Vec::new();
        let mut next_after = None;
        for (id, state) in &inner.streams {
            if query.after.as_ref().is_some_and(|a| id <= a)
                || query.prefix.as_ref().is_some_and(|p| !id.starts_with(p.as_str()))
                || (!query.show_deleted && state.info.deleted_at.is_some())
            {
                continue;
            }
            if streams.len() == query.limit {
                next_after = streams.last().map(|s: &StreamInfo| s.stream_id.clone());
                break;
            }
            streams.push(state.info.clone());
        }
        Ok(StreamPage { streams, next_after })
    }

    async fn delete_stream(&self, stream_id: &str, expected_version: Option<u64>) -> Result<StreamInfo> {
        check_stream_id("stream_id", stream_id)?;
        check_version("expected_version", expected_version)?;
        let mut inner = self.lock();
        let state = inner.live_stream(stream_id)?;
        if let Some(expected) = expected_version
            && state.info.version != Some(expected)
        {
            return Err(Error::WrongExpectedVersion {
                stream: stream_id.to_owned(),
                expected: crate::model::ExpectedVersion::Exact(expected),
                actual: state.info.version,
            });
        }
        let now = now_micros();
        let Some(state) = inner.streams.get_mut(stream_id) else {
            return Err(Error::StreamNotFound(stream_id.to_owned()));
        };
        state.info.deleted_at = Some(now);
        state.info.updated_at = now;
        Ok(state.info.clone())
    }

    async fn branch_stream(&self, source: &str, at_version: u64, branch: &str) -> Result<StreamInfo> {
        check_stream_id("source_stream_id", source)?;
        check_stream_id("branch_stream_id", branch)?;
        check_version("at_version", Some(at_version))?;
        let mut inner = self.lock();
        let state = inner.live_stream(source)?;
        if state.info.version.is_none_or(|v| at_version > v) {
            return Err(Error::invalid(
                "at_version",
                format!("stream {source} has no version {at_version} (current: {:?})", state.info.version),
            ));
        }
        if inner.streams.contains_key(branch) {
            return Err(Error::StreamAlreadyExists(branch.to_owned()));
        }
        let head = inner.history(source, Some(at_version)).last().map(|e| e.hash);
        let now = now_micros();
        let info = StreamInfo {
            stream_id: branch.to_owned(),
            version: Some(at_version),
            first_position: None,
            last_position: None,
            created_at: now,
            updated_at: now,
            deleted_at: None,
            parent: Some((source.to_owned(), at_version)),
            head_hash: head,
        };
        inner.streams.insert(branch.to_owned(), StreamState { info: info.clone(), own: Vec::new() });
        Ok(info)
    }

    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<Snapshot> {
        snapshot.validate()?;
        let mut inner = self.lock();
        let state = inner.live_stream(&snapshot.stream_id)?;
        let head = match state.info.version {
            Some(v) if snapshot.version <= v => {
                inner.history(&snapshot.stream_id, Some(snapshot.version)).last().map(|e| e.hash)
            }
            _ => None,
        };
        let Some(head) = head else {
            return Err(Error::invalid(
                "version",
                format!("stream {} has no version {}", snapshot.stream_id, snapshot.version),
            ));
        };
        snapshot.head_hash = head;
        snapshot.created_at = now_micros();
        let key = (snapshot.stream_id.clone(), snapshot.namespace, snapshot.version);
        inner.snapshots.insert(key, snapshot.clone());
        Ok(snapshot)
    }

    async fn load_snapshot(&self, query: SnapshotQuery) -> Result<Option<Snapshot>> {
        query.validate()?;
        let inner = self.lock();
        inner.live_stream(&query.stream_id)?;
        let upper = query.max_version.unwrap_or(u64::MAX);
        let (id, namespace) = (query.stream_id.clone(), query.namespace);
        Ok(inner
            .snapshots
            .range((id.clone(), namespace, 0)..=(id, namespace, upper))
            .rev()
            .map(|(_, s)| s)
            .find(|s| query.schema_version.is_none_or(|v| s.schema_version == v))
            .cloned())
    }

    async fn find_request(&self, key: &RequestKey) -> Result<Option<AppendOutcome>> {
        self.lock().answered(key)
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    async fn check_health(&self) -> Result<()> {
        Ok(())
    }
}
