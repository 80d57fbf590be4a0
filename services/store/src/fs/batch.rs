//! A batch of appends being prepared: each append is checked against the
//! committed index and against what the batch already staged (stream
//! heads, event ids, request ids), and its records are encoded as frames,
//! so that one write (a segment's append, a blob's creation) commits them
//! all. Shared by the file-system and the blob adapters.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    frame,
    record::{EventRecord, Hash, RequestRecord, SnapshotRecord},
    state::{Loc, State, now},
};
use crate::{
    error::{Error, Result},
    hash::{self, GENESIS},
    model::{AppendOutcome, AppendRequest},
};

/// What a batch has staged but not yet written.
#[derive(Default)]
pub(crate) struct Staged {
    pub(crate) frames: Vec<u8>,
    pub(crate) appends: Vec<Vec<(EventRecord, Loc)>>,
    pub(crate) replies: Vec<(oneshot::Sender<Result<AppendOutcome>>, AppendOutcome)>,
    /// Stream heads (version, link) after the staged appends.
    pub(crate) heads: HashMap<String, (u64, [u8; 32])>,
    pub(crate) event_ids: HashSet<Uuid>,
    pub(crate) requests: HashMap<(String, String), ([u8; 32], AppendOutcome)>,
}

pub(crate) enum Prepared {
    /// A repeat of a request already answered: answer it now.
    Answered(AppendOutcome),
    /// To answer once the batch is durable.
    Staged(AppendOutcome),
}

/// Check one append against the committed index and the batch so far,
/// and stage its records.
pub(crate) fn prepare_append(
    state: &State,
    staged: &mut Staged,
    request: AppendRequest,
    (segment, base): (u32, u64),
    retention: Duration,
) -> Result<Prepared> {
    let now = now();
    let key = request.request_key();
    if let Some(key) = &key {
        if let Some((fingerprint, first)) = staged.requests.get(&(key.scope.clone(), key.request_id.clone())) {
            return if key.matches(Some(fingerprint)) {
                Ok(Prepared::Staged(AppendOutcome { duplicate: true, ..first.clone() }))
            } else {
                Err(Error::RequestIdReused { request_id: key.request_id.clone() })
            };
        }
        if let Some(first) = state.answered(key, now, retention)? {
            return Ok(Prepared::Answered(first));
        }
    }
    let committed = state.streams.get(&request.stream_id);
    if committed.is_some_and(|s| s.info.deleted_at.is_some()) {
        return Err(Error::StreamDeleted(request.stream_id));
    }
    let (current, head) = match staged.heads.get(&request.stream_id) {
        Some((version, head)) => (Some(*version), *head),
        None => (committed.and_then(|s| s.info.version), committed.and_then(|s| s.info.head_hash).unwrap_or(GENESIS)),
    };
    if !request.expected.admits(current) {
        return Err(Error::WrongExpectedVersion {
            stream: request.stream_id,
            expected: request.expected,
            actual: current,
        });
    }
    if let Some(dup) =
        request.events.iter().find(|e| state.event_ids.contains(&e.event_id) || staged.event_ids.contains(&e.event_id))
    {
        return Err(Error::DuplicateEventId { event_id: dup.event_id.to_string() });
    }

    let n = u32::try_from(request.events.len()).map_err(|_| Error::invalid("events", "too many events"))?;
    let staged_events: usize = staged.appends.iter().map(Vec::len).sum();
    let mut position = state.head().saturating_add(staged_events as u64);
    let mut version = current.map_or(0, |v| v.saturating_add(1));
    let first_version = version;
    let mut prev = head;
    let mut records = Vec::with_capacity(request.events.len());
    let mut positions = Vec::with_capacity(request.events.len());
    let mut frames = Vec::new();
    for (i, event) in (0u32..).zip(request.events) {
        position = position.saturating_add(1);
        let content = hash::content_digest(
            &event.event_id,
            &event.event_type,
            event.schema_version,
            &event.data,
            &event.metadata,
        );
        let link = hash::link(&prev, version, now, &request.stream_id, &content);
        let closes = i.checked_add(1) == Some(n);
        let mut record = EventRecord {
            id: event.event_id,
            stream: request.stream_id.clone(),
            version,
            position,
            event_type: event.event_type,
            schema_version: event.schema_version,
            data: event.data,
            metadata: event.metadata,
            at: now,
            hash: Hash(link),
            i,
            n,
            request: key.as_ref().filter(|_| closes).map(|k| RequestRecord {
                scope: k.scope.clone(),
                id: k.request_id.clone(),
                fingerprint: Hash(k.fingerprint),
            }),
        };
        let offset = base.saturating_add((staged.frames.len().saturating_add(frames.len())) as u64);
        let len = encode_into(&mut frames, &EventRef::Event(&record))?;
        // The index needs no payload: let it go now.
        record.data = serde_json::Value::Null;
        record.metadata = Default::default();
        records.push((record, Loc { segment, offset, len }));
        positions.push(position);
        prev = link;
        version = version.saturating_add(1);
    }
    let outcome = AppendOutcome {
        stream_id: request.stream_id.clone(),
        first_version,
        last_version: version.saturating_sub(1),
        positions,
        duplicate: false,
    };
    staged.frames.extend_from_slice(&frames);
    staged.event_ids.extend(records.iter().map(|(r, _)| r.id));
    staged.heads.insert(request.stream_id, (outcome.last_version, prev));
    if let Some(key) = key {
        staged.requests.insert((key.scope, key.request_id), (key.fingerprint, outcome.clone()));
    }
    staged.appends.push(records);
    Ok(Prepared::Staged(outcome))
}

/// Records serialized by reference (the same JSON as [`Record`]), so that
/// an event's payload is not copied to be written.
#[derive(serde::Serialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub(crate) enum EventRef<'a> {
    Event(&'a EventRecord),
    Snapshot(&'a SnapshotRecord),
}

/// Append `record` as one frame; its payload length.
pub(crate) fn encode_into(out: &mut Vec<u8>, record: &impl serde::Serialize) -> Result<u32> {
    let payload = serde_json::to_vec(record).map_err(|e| Error::Internal(format!("encoding a record: {e}")))?;
    frame::push(out, &payload).ok_or_else(|| Error::invalid("events", "an event is too large to store"))
}
