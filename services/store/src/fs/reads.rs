//! The reads of a log indexed by [`State`], whatever holds the payloads:
//! what to load for a read (from the index alone) and how to cut what was
//! loaded into the answer. The file-system and the blob adapters load the
//! records their own way between the two.

use std::ops::Bound;

use super::{
    record::Record,
    state::{Loc, State},
};
use crate::{
    error::{Error, Result},
    model::{
        AllRead, Direction, ListStreams, MAX_PAGE_BYTES, RecordedEvent, Snapshot, SnapshotQuery, StreamInfo,
        StreamPage, StreamRead, from_micros,
    },
};

/// Most index entries one `read_all` looks at, matching or not: a filter
/// that matches little does not hold the index for long.
const MAX_SCAN: usize = 100_000;

/// Whether `version` passes the read's version bounds.
fn version_admitted(read: &StreamRead, version: u64) -> bool {
    let from_ok = match (read.direction, read.from_version) {
        (_, None) => true,
        (Direction::Forwards, Some(from)) => version >= from,
        (Direction::Backwards, Some(from)) => version <= from,
    };
    from_ok && read.max_version.is_none_or(|max| version <= max)
}

/// What a stream read needs loaded.
pub(crate) struct StreamPlan {
    pub(crate) stream_version: Option<u64>,
    pub(crate) locs: Vec<Loc>,
    /// Candidates beyond `locs` (the stream goes on).
    pub(crate) more: bool,
}

pub(crate) fn plan_stream(state: &State, read: &StreamRead) -> Result<StreamPlan> {
    let stream_version = state.live_stream(&read.stream_id)?.info.version;
    let mut history = state.history(&read.stream_id, None);
    if read.direction == Direction::Backwards {
        history.reverse();
    }
    let mut candidates = history.into_iter().filter(|(v, _)| version_admitted(read, *v));
    // Without a time bound, the first `max_count` candidates are the
    // answer; with one, any candidate may be.
    let timed = read.start_time.is_some() || read.end_time.is_some();
    let wanted = if timed { usize::MAX } else { read.max_count };
    let mut locs = Vec::new();
    for (_, position) in candidates.by_ref().take(wanted) {
        locs.push(state.entry(position).ok_or_else(|| Error::Internal("index gap".into()))?.loc);
    }
    Ok(StreamPlan { stream_version, locs, more: candidates.next().is_some() })
}

/// The events of a stream read from what was loaded for its plan; whether
/// the page was cut (by count or bytes) before the candidates ended.
pub(crate) fn cut_stream(
    read: &StreamRead,
    loaded: impl Iterator<Item = Result<RecordedEvent>>,
) -> Result<(Vec<RecordedEvent>, bool)> {
    let mut events = Vec::new();
    let mut bytes = 0usize;
    for event in loaded {
        let event = event?;
        if !read.admits(event.version, event.created_at) {
            continue;
        }
        bytes = bytes.saturating_add(event.size());
        if events.len() == read.max_count || (!events.is_empty() && bytes > MAX_PAGE_BYTES) {
            return Ok((events, true));
        }
        events.push(event);
    }
    Ok((events, false))
}

/// What a read of the global log needs loaded.
pub(crate) struct AllPlan {
    /// Positions and where their events lie.
    pub(crate) picks: Vec<(u64, Loc)>,
    pub(crate) scanned_to: u64,
    pub(crate) head: u64,
}

pub(crate) fn plan_all(state: &State, read: &AllRead) -> AllPlan {
    let head = state.head();
    let start = usize::try_from(read.after).unwrap_or(usize::MAX).min(state.entries.len());
    let mut picks = Vec::new();
    let mut scanned_to = read.after;
    for (position, entry) in (read.after.saturating_add(1)..).zip(state.entries[start..].iter().take(MAX_SCAN)) {
        if picks.len() == read.max_count {
            break;
        }
        if read.filter.matches(state.name(entry.stream), state.name(entry.event_type)) {
            picks.push((position, entry.loc));
        }
        scanned_to = position;
    }
    AllPlan { picks, scanned_to, head }
}

/// The page of a read of the global log from what was loaded for its
/// plan: events, and where the next read continues.
pub(crate) fn cut_all(
    read: &AllRead,
    plan_end: (u64, u64),
    loaded: impl Iterator<Item = (u64, Result<RecordedEvent>)>,
) -> Result<crate::model::AllSlice> {
    let (scanned_to, head) = plan_end;
    let mut events = Vec::new();
    let mut bytes = 0usize;
    let mut cut_at = None;
    for (position, event) in loaded {
        let event = event?;
        bytes = bytes.saturating_add(event.size());
        if !events.is_empty() && bytes > MAX_PAGE_BYTES {
            cut_at = Some(position.saturating_sub(1));
            break;
        }
        events.push(event);
    }
    let next_position = cut_at.unwrap_or(scanned_to).max(read.after);
    Ok(crate::model::AllSlice { events, next_position, end_of_log: next_position >= head })
}

pub(crate) fn list_streams(state: &State, query: &ListStreams) -> StreamPage {
    let mut streams = Vec::new();
    let mut next_after = None;
    let from = query.after.clone().map_or(Bound::Unbounded, Bound::Excluded);
    for (id, stream) in state.streams.range::<String, _>((from, Bound::Unbounded)) {
        if query.prefix.as_ref().is_some_and(|p| !id.starts_with(p.as_str()))
            || (!query.show_deleted && stream.info.deleted_at.is_some())
        {
            continue;
        }
        if streams.len() == query.limit {
            next_after = streams.last().map(|s: &StreamInfo| s.stream_id.clone());
            break;
        }
        streams.push(stream.info.clone());
    }
    StreamPage { streams, next_after }
}

/// Where the snapshot the query asks for lies.
pub(crate) fn plan_snapshot(state: &State, query: &SnapshotQuery) -> Result<Option<Loc>> {
    state.live_stream(&query.stream_id)?;
    let upper = query.max_version.unwrap_or(u64::MAX);
    let (id, namespace) = (query.stream_id.clone(), query.namespace);
    Ok(state
        .snapshots
        .range((id.clone(), namespace, 0)..=(id, namespace, upper))
        .rev()
        .find(|(_, (_, schema))| query.schema_version.is_none_or(|v| *schema == v))
        .map(|(_, (loc, _))| *loc))
}

pub(crate) fn snapshot_of(record: Record) -> Result<Snapshot> {
    match record {
        Record::Snapshot(s) => Ok(Snapshot {
            stream_id: s.stream,
            namespace: s.namespace.into(),
            version: s.version,
            schema_version: s.schema_version,
            state: s.state,
            created_at: from_micros(s.at),
            head_hash: s.head.0,
        }),
        _ => Err(Error::Internal("the index points at a record that is not a snapshot".into())),
    }
}

#[cfg(any(feature = "blob", test))]
pub(crate) fn event_of(record: Record) -> Result<RecordedEvent> {
    match record {
        Record::Event(event) => Ok(event.into_event()),
        _ => Err(Error::Internal("the index points at a record that is not an event".into())),
    }
}
