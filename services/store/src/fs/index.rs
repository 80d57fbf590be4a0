//! The index file of a file-system log: the in-memory index (where each
//! event lies, every stream's versions and head, event ids, request ids,
//! snapshots) written beside the segments, so that opening a large log
//! reads the index and only the segments' tail after it instead of every
//! segment.
//!
//! It is written (to a temporary file, synced, renamed) when the log opens
//! and when it closes, and when a segment fills. Its parts are frames like
//! the segments' (length, CRC32C, JSON), so damage is detected. It records
//! what it covers: a segment, the offset where its coverage ends there, and
//! a CRC32C of up to 4 KiB of the segment before that offset. On open it is
//! used only if every part reads back, and the segment it names still holds
//! at least that much with the same bytes before its end; else it is stale
//! (segments replaced, cut, restored from elsewhere) or missing, and the
//! index is rebuilt from the segments. What follows the covered offset is
//! replayed as on a full rebuild (a torn tail is cut off the same way).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs::File,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    frame,
    record::{Hash, Namespace},
    state::{Answered, Entry, Loc, State, StreamState},
};
use crate::model::{AppendOutcome, StreamInfo, from_micros, to_micros};

const FILE: &str = "index";
const VERSION: u32 = 1;
/// Bytes before the covered offset whose checksum tells a stale index.
const TAIL: u64 = 4096;
/// Entries per part.
const CHUNK: usize = 10_000;

/// What an index covers: segment `segment` up to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cover {
    pub(crate) segment: u32,
    pub(crate) end: u64,
    /// CRC32C of the segment's bytes `[end - 4 KiB, end)`.
    tail_crc: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Part {
    Header { version: u32, cover: Cover, events: u64 },
    Names { names: Vec<String> },
    Entries { rows: Vec<(u32, u64, u32, u32, u32)> },
    Ids { ids: Vec<Uuid> },
    Stream(Box<StreamPart>),
    Snapshot { stream: String, namespace: Namespace, version: u64, loc: (u32, u64, u32), schema: u32 },
    Request(Box<RequestPart>),
    End { parts: u64 },
}

#[derive(Serialize, Deserialize)]
struct StreamPart {
    id: String,
    version: Option<u64>,
    first: Option<u64>,
    last: Option<u64>,
    created: i64,
    updated: i64,
    deleted: Option<i64>,
    parent: Option<(String, u64)>,
    head: Option<Hash>,
    base: u64,
    own: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct RequestPart {
    scope: String,
    id: String,
    fingerprint: Hash,
    stream: String,
    first_version: u64,
    last_version: u64,
    positions: Vec<u64>,
    at: i64,
}

/// Append `part` to `out` as one frame.
fn push(out: &mut Vec<u8>, parts: &mut u64, part: &Part) -> io::Result<()> {
    let payload = serde_json::to_vec(part).map_err(io::Error::other)?;
    frame::push(out, &payload).ok_or_else(|| io::Error::other("an index part is too large"))?;
    *parts = parts.saturating_add(1);
    Ok(())
}

fn tail_crc(file: &File, end: u64) -> io::Result<u32> {
    let start = end.saturating_sub(TAIL);
    let mut buf = vec![0; usize::try_from(end.saturating_sub(start)).unwrap_or(0)];
    file.read_exact_at(&mut buf, start)?;
    Ok(crc32c::crc32c(&buf))
}

/// What `segment` up to `end` is, as an index records it.
pub(crate) fn cover(segment_file: &File, segment: u32, end: u64) -> io::Result<Cover> {
    Ok(Cover { segment, end, tail_crc: tail_crc(segment_file, end)? })
}

/// Write the index of `state`, covering up to `cover`.
pub(crate) fn write(dir: &Path, state: &State, cover: Cover) -> io::Result<()> {
    let mut out = Vec::new();
    let mut parts = 0u64;
    push(&mut out, &mut parts, &Part::Header { version: VERSION, cover, events: state.head() })?;
    push(&mut out, &mut parts, &Part::Names { names: state.names.iter().map(|n| n.to_string()).collect() })?;
    for chunk in state.entries.chunks(CHUNK) {
        let rows = chunk.iter().map(|e| (e.loc.segment, e.loc.offset, e.loc.len, e.stream, e.event_type)).collect();
        push(&mut out, &mut parts, &Part::Entries { rows })?;
    }
    let ids: Vec<Uuid> = state.event_ids.iter().copied().collect();
    for chunk in ids.chunks(CHUNK) {
        push(&mut out, &mut parts, &Part::Ids { ids: chunk.to_vec() })?;
    }
    for (id, stream) in &state.streams {
        let info = &stream.info;
        push(
            &mut out,
            &mut parts,
            &Part::Stream(Box::new(StreamPart {
                id: id.clone(),
                version: info.version,
                first: info.first_position,
                last: info.last_position,
                created: to_micros(info.created_at),
                updated: to_micros(info.updated_at),
                deleted: info.deleted_at.map(to_micros),
                parent: info.parent.clone(),
                head: info.head_hash.map(Hash),
                base: stream.base,
                own: stream.own.clone(),
            })),
        )?;
    }
    for ((stream, namespace, version), (loc, schema)) in &state.snapshots {
        push(
            &mut out,
            &mut parts,
            &Part::Snapshot {
                stream: stream.clone(),
                namespace: (*namespace).into(),
                version: *version,
                loc: (loc.segment, loc.offset, loc.len),
                schema: *schema,
            },
        )?;
    }
    for ((scope, id), answered) in &state.requests {
        push(
            &mut out,
            &mut parts,
            &Part::Request(Box::new(RequestPart {
                scope: scope.clone(),
                id: id.clone(),
                fingerprint: Hash(answered.fingerprint),
                stream: answered.outcome.stream_id.clone(),
                first_version: answered.outcome.first_version,
                last_version: answered.outcome.last_version,
                positions: answered.outcome.positions.clone(),
                at: answered.at,
            })),
        )?;
    }
    let end = Part::End { parts: parts.saturating_add(1) };
    push(&mut out, &mut parts, &end)?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(&out)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()
}

/// The index of `dir`, if there is one that reads back whole and still
/// matches the segments (`segment_path` names each).
pub(crate) fn load(dir: &Path, segment_path: impl Fn(u32) -> PathBuf, last_segment: u32) -> Option<(State, Cover)> {
    let file = File::open(dir.join(FILE)).ok()?;
    let mut parts = Vec::new();
    let scanned = frame::scan::<()>(&file, 0, |_, _, payload| {
        parts.push(serde_json::from_slice::<Part>(payload).map_err(drop)?);
        Ok(())
    })
    .ok()?
    .ok()?;
    if scanned.valid_end != scanned.file_len {
        return None;
    }
    let mut parts = parts.into_iter();
    let Some(Part::Header { version: VERSION, cover, events }) = parts.next() else { return None };
    if cover.segment == 0 || cover.segment > last_segment {
        return None;
    }
    let segment = File::open(segment_path(cover.segment)).ok()?;
    if segment.metadata().ok()?.len() < cover.end || tail_crc(&segment, cover.end).ok()? != cover.tail_crc {
        return None;
    }
    let mut state = State::default();
    let mut names = Vec::new();
    let mut ids = HashSet::new();
    let mut requests = HashMap::new();
    let mut times = Vec::new();
    let mut count = 1u64;
    let mut ended = false;
    for part in parts {
        count = count.saturating_add(1);
        match part {
            Part::Header { .. } => return None,
            Part::Names { names: found } => names = found,
            Part::Entries { rows } => {
                for (segment, offset, len, stream, event_type) in rows {
                    state.entries.push(Entry { loc: Loc { segment, offset, len }, stream, event_type });
                }
            }
            Part::Ids { ids: found } => ids.extend(found),
            Part::Stream(s) => {
                let info = StreamInfo {
                    stream_id: s.id.clone(),
                    version: s.version,
                    first_position: s.first,
                    last_position: s.last,
                    created_at: from_micros(s.created),
                    updated_at: from_micros(s.updated),
                    deleted_at: s.deleted.map(from_micros),
                    parent: s.parent,
                    head_hash: s.head.map(|h| h.0),
                };
                state.streams.insert(s.id, StreamState { info, base: s.base, own: s.own });
            }
            Part::Snapshot { stream, namespace, version, loc, schema } => {
                let loc = Loc { segment: loc.0, offset: loc.1, len: loc.2 };
                state.snapshots.insert((stream, namespace.into(), version), (loc, schema));
            }
            Part::Request(r) => {
                let outcome = AppendOutcome {
                    stream_id: r.stream,
                    first_version: r.first_version,
                    last_version: r.last_version,
                    positions: r.positions,
                    duplicate: false,
                };
                times.push((r.at, (r.scope.clone(), r.id.clone())));
                requests.insert((r.scope, r.id), Answered { fingerprint: r.fingerprint.0, outcome, at: r.at });
            }
            Part::End { parts } => {
                ended = parts == count;
            }
        }
    }
    if !ended || state.head() != events || ids.len() as u64 != events {
        return None;
    }
    times.sort();
    state.restore(names, ids, requests, VecDeque::from(times));
    // Every name an entry points at exists.
    let known = u32::try_from(state.names.len()).ok()?;
    if state.entries.iter().any(|e| e.stream >= known || e.event_type >= known) {
        return None;
    }
    Some((state, cover))
}
