//! The in-memory index of a file-system log: where each event lies, each
//! stream's versions and head, the event ids, the answered request ids and
//! the snapshots. Only locations and small facts are held here; payloads
//! stay on disk. It is built by applying the segments' records in order,
//! on open and after each commit, with the same code.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fs::File,
    sync::Arc,
    time::Duration,
};

use uuid::Uuid;

use super::record::{EventRecord, Record, SnapshotRecord};
use crate::{
    error::{Error, Result},
    model::{AppendOutcome, RequestKey, SnapshotNamespace, StreamInfo, from_micros, to_micros},
};

/// Where a frame lies: its segment (1-based), offset and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) segment: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// One event of the global log, by position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) loc: Loc,
    /// Index into [`State::names`] of the stream id and of the event type.
    pub(crate) stream: u32,
    pub(crate) event_type: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct StreamState {
    pub(crate) info: StreamInfo,
    /// The version of the stream's first own event (after the shared
    /// history of a branch).
    pub(crate) base: u64,
    /// Global positions of its own events, by version from `base`.
    pub(crate) own: Vec<u64>,
}

#[derive(Debug)]
pub(crate) struct Answered {
    pub(crate) fingerprint: [u8; 32],
    pub(crate) outcome: AppendOutcome,
    /// Microseconds since the Unix epoch of the first answer.
    pub(crate) at: i64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Read handles of the segments, segment 1 first.
    pub(crate) segments: Vec<Arc<File>>,
    /// By global position - 1.
    pub(crate) entries: Vec<Entry>,
    pub(crate) event_ids: HashSet<Uuid>,
    pub(crate) streams: BTreeMap<String, StreamState>,
    /// Interned stream ids and event types.
    pub(crate) names: Vec<Arc<str>>,
    name_index: HashMap<Arc<str>, u32>,
    pub(crate) snapshots: BTreeMap<(String, SnapshotNamespace, u64), (Loc, u32)>,
    pub(crate) requests: HashMap<(String, String), Answered>,
    request_times: VecDeque<(i64, (String, String))>,
}

impl State {
    /// Set what the index file does not spell out: the interned names, the
    /// event ids, the answered request ids and their order in time.
    pub(crate) fn restore(
        &mut self,
        names: Vec<String>,
        event_ids: HashSet<Uuid>,
        requests: HashMap<(String, String), Answered>,
        request_times: VecDeque<(i64, (String, String))>,
    ) {
        self.names = names.into_iter().map(Arc::from).collect();
        self.name_index = (0u32..).zip(&self.names).map(|(i, n)| (Arc::clone(n), i)).collect();
        self.event_ids = event_ids;
        self.requests = requests;
        self.request_times = request_times;
    }

    /// The highest global position.
    pub(crate) fn head(&self) -> u64 {
        self.entries.len() as u64
    }

    pub(crate) fn name(&self, index: u32) -> &str {
        usize::try_from(index).ok().and_then(|i| self.names.get(i)).map_or("", |n| n)
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(index) = self.name_index.get(name) {
            return *index;
        }
        let index = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(name);
        self.names.push(Arc::clone(&name));
        self.name_index.insert(name, index);
        index
    }

    pub(crate) fn segment(&self, segment: u32) -> Result<Arc<File>> {
        usize::try_from(segment)
            .ok()
            .and_then(|s| s.checked_sub(1))
            .and_then(|i| self.segments.get(i))
            .cloned()
            .ok_or_else(|| Error::Internal("the index names a segment that is not open".into()))
    }

    pub(crate) fn entry(&self, position: u64) -> Option<&Entry> {
        usize::try_from(position).ok().and_then(|p| p.checked_sub(1)).and_then(|i| self.entries.get(i))
    }

    pub(crate) fn live_stream(&self, stream_id: &str) -> Result<&StreamState> {
        match self.streams.get(stream_id) {
            None => Err(Error::StreamNotFound(stream_id.to_owned())),
            Some(s) if s.info.deleted_at.is_some() => Err(Error::StreamDeleted(stream_id.to_owned())),
            Some(s) => Ok(s),
        }
    }

    /// The stream's history up to `upto` (all of it: `None`) as
    /// (version, position), shared history first.
    pub(crate) fn history(&self, stream_id: &str, upto: Option<u64>) -> Vec<(u64, u64)> {
        let Some(state) = self.streams.get(stream_id) else { return Vec::new() };
        let mut out = match &state.info.parent {
            Some((parent, at)) => self.history(parent, Some(upto.map_or(*at, |u| u.min(*at)))),
            None => Vec::new(),
        };
        for (version, position) in (state.base..).zip(state.own.iter().copied()) {
            if upto.is_some_and(|u| version > u) {
                break;
            }
            out.push((version, position));
        }
        out
    }

    /// The position of the stream's event at `version` (shared history
    /// included).
    pub(crate) fn position_of(&self, stream_id: &str, version: u64) -> Option<u64> {
        let state = self.streams.get(stream_id)?;
        match version.checked_sub(state.base) {
            Some(i) => usize::try_from(i).ok().and_then(|i| state.own.get(i)).copied(),
            None => {
                let (parent, at) = state.info.parent.as_ref()?;
                if version > *at { None } else { self.position_of(parent, version) }
            }
        }
    }

    /// The first answer of `key`'s request id, if it is the same request
    /// and was answered within `retention` before `now`.
    pub(crate) fn answered(&self, key: &RequestKey, now: i64, retention: Duration) -> Result<Option<AppendOutcome>> {
        match self.requests.get(&(key.scope.clone(), key.request_id.clone())) {
            Some(first) if !expired(first.at, now, retention) => {
                if key.matches(Some(&first.fingerprint)) {
                    Ok(Some(AppendOutcome { duplicate: true, ..first.outcome.clone() }))
                } else {
                    Err(Error::RequestIdReused { request_id: key.request_id.clone() })
                }
            }
            _ => Ok(None),
        }
    }

    /// Forget request ids answered more than `retention` before `now`.
    pub(crate) fn forget_requests(&mut self, now: i64, retention: Duration) {
        while let Some((at, _)) = self.request_times.front()
            && expired(*at, now, retention)
        {
            if let Some((at, key)) = self.request_times.pop_front()
                && self.requests.get(&key).is_some_and(|a| a.at == at)
            {
                self.requests.remove(&key);
            }
        }
    }

    /// Apply one whole append: its events in order, each with its location.
    pub(crate) fn apply_append(&mut self, events: &[(EventRecord, Loc)], retention: Duration, now: i64) -> Result<()> {
        let (Some((first, _)), Some((last, _))) = (events.first(), events.last()) else { return Ok(()) };
        let at = from_micros(first.at);
        let stream_index = self.intern(&first.stream);
        if !self.streams.contains_key(&first.stream) {
            let info = StreamInfo {
                stream_id: first.stream.clone(),
                version: None,
                first_position: None,
                last_position: None,
                created_at: at,
                updated_at: at,
                deleted_at: None,
                parent: None,
                head_hash: None,
            };
            self.streams.insert(first.stream.clone(), StreamState { info, base: 0, own: Vec::new() });
        }
        for (event, loc) in events {
            if event.position != self.head().saturating_add(1) {
                return Err(Error::Internal(format!(
                    "the log is damaged: event at position {} follows position {}",
                    event.position,
                    self.head()
                )));
            }
            let type_index = self.intern(&event.event_type);
            self.entries.push(Entry { loc: *loc, stream: stream_index, event_type: type_index });
            self.event_ids.insert(event.id);
        }
        let positions: Vec<u64> = events.iter().map(|(e, _)| e.position).collect();
        if let Some(state) = self.streams.get_mut(&first.stream) {
            state.own.extend(&positions);
            state.info.version = Some(last.version);
            state.info.first_position.get_or_insert(first.position);
            state.info.last_position = Some(last.position);
            state.info.updated_at = from_micros(last.at);
            state.info.head_hash = Some(last.hash.0);
        }
        if let Some(request) = &last.request
            && !expired(last.at, now, retention)
        {
            let key = (request.scope.clone(), request.id.clone());
            let outcome = AppendOutcome {
                stream_id: first.stream.clone(),
                first_version: first.version,
                last_version: last.version,
                positions,
                duplicate: false,
            };
            self.request_times.push_back((last.at, key.clone()));
            self.requests.insert(key, Answered { fingerprint: request.fingerprint.0, outcome, at: last.at });
        }
        Ok(())
    }

    /// Apply a record other than an event.
    pub(crate) fn apply_other(&mut self, record: &Record, loc: Loc) -> Result<()> {
        match record {
            Record::Event(_) => Err(Error::Internal("an event outside an append".into())),
            Record::Delete { stream, at } => {
                let state = self
                    .streams
                    .get_mut(stream)
                    .ok_or_else(|| Error::Internal("the log deletes a stream it does not hold".into()))?;
                state.info.deleted_at = Some(from_micros(*at));
                state.info.updated_at = from_micros(*at);
                Ok(())
            }
            Record::Branch { stream, source, at_version, head, at } => {
                let base = at_version.saturating_add(1);
                let info = StreamInfo {
                    stream_id: stream.clone(),
                    version: Some(*at_version),
                    first_position: None,
                    last_position: None,
                    created_at: from_micros(*at),
                    updated_at: from_micros(*at),
                    deleted_at: None,
                    parent: Some((source.clone(), *at_version)),
                    head_hash: head.map(|h| h.0),
                };
                self.streams.insert(stream.clone(), StreamState { info, base, own: Vec::new() });
                Ok(())
            }
            Record::Snapshot(SnapshotRecord { stream, namespace, version, schema_version, .. }) => {
                self.snapshots.insert((stream.clone(), (*namespace).into(), *version), (loc, *schema_version));
                Ok(())
            }
        }
    }
}

/// Applies the records of a log in order: the events of an append once all
/// of them are there (on open, and for the blob adapter on catching up).
#[derive(Debug, Default)]
pub(crate) struct Replay {
    group: Vec<(EventRecord, Loc)>,
}

impl Replay {
    /// Apply `record`, found at `loc`; `Internal` when the records are not
    /// in an order the writer produces.
    pub(crate) fn push(
        &mut self,
        state: &mut State,
        record: Record,
        loc: Loc,
        retention: Duration,
        now: i64,
    ) -> Result<()> {
        match record {
            Record::Event(event) => {
                let mut event = *event;
                if usize::try_from(event.i).ok() != Some(self.group.len()) {
                    return Err(Error::Internal(format!("commit {}: an append is out of order", loc.segment)));
                }
                // The index needs no payload.
                event.data = serde_json::Value::Null;
                event.metadata = Default::default();
                let closes = event.closes_append();
                self.group.push((event, loc));
                if closes {
                    state.apply_append(&self.group, retention, now)?;
                    self.group.clear();
                }
                Ok(())
            }
            other if self.group.is_empty() => state.apply_other(&other, loc),
            _ => Err(Error::Internal(format!("commit {}: an append is interrupted", loc.segment))),
        }
    }

    /// The events of an append not yet complete.
    pub(crate) fn unfinished(&self) -> &[(EventRecord, Loc)] {
        &self.group
    }
}

fn expired(at: i64, now: i64, retention: Duration) -> bool {
    let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    now.saturating_sub(at) > retention
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    to_micros(std::time::SystemTime::now())
}
