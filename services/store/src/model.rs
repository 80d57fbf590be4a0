//! The event log's vocabulary: what is appended, what is stored, how it is
//! read. No transport or database types appear here.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, FieldViolation, Result};

/// Longest accepted stream id, event type and request id, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Most events in one append.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;
/// Largest canonical JSON payload of one event, in bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Most events one read returns.
pub const MAX_READ_COUNT: usize = 10_000;

/// What the writer expects of a stream before appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// No check.
    #[default]
    Any,
    /// The stream must have no event yet.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose current version is `actual` satisfies this.
    pub fn admits(self, actual: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::StreamExists => actual.is_some(),
            Self::Exact(v) => actual == Some(v),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("stream exists"),
            Self::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// Correlation, causation, user and free-form metadata of an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, String>,
}

impl EventMetadata {
    /// The metadata as the JSON object that is stored and hashed.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("metadata serializes")
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    /// The payload: a JSON object.
    pub data: Value,
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// An event with a fresh time-ordered id, schema version 1 and no metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: EventMetadata::default(),
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    /// 0-based version within the stream.
    pub version: u64,
    /// 1-based position in the global log.
    pub global_position: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
    pub metadata: EventMetadata,
    /// When the event was stored (microsecond precision).
    pub created_at: SystemTime,
    /// The hash-chain link ending at this event.
    pub hash: [u8; 32],
}

/// Append events to one stream atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// AIP-155: a retried request with the same id gets the first answer.
    pub request_id: Option<String>,
}

impl AppendRequest {
    pub fn new(stream_id: impl Into<String>, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self { stream_id: stream_id.into(), expected, events, request_id: None }
    }

    /// Check the request; every violation is reported, not only the first.
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        validate_stream_id("stream_id", &self.stream_id, &mut violations);
        if self.events.is_empty() {
            violations.push(FieldViolation::new("events", "at least one event is required"));
        }
        if self.events.len() > MAX_EVENTS_PER_APPEND {
            violations.push(FieldViolation::new(
                "events",
                format!("at most {MAX_EVENTS_PER_APPEND} events per append, got {}", self.events.len()),
            ));
        }
        if let Some(id) = &self.request_id
            && (id.is_empty() || id.len() > MAX_NAME_LEN)
        {
            violations.push(FieldViolation::new("request_id", format!("must be 1 to {MAX_NAME_LEN} bytes")));
        }
        let mut ids = HashSet::new();
        for (i, event) in self.events.iter().enumerate() {
            let field = |name: &str| format!("events[{i}].{name}");
            if event.event_id.is_nil() {
                violations.push(FieldViolation::new(field("event_id"), "must not be the nil UUID"));
            } else if !ids.insert(event.event_id) {
                violations.push(FieldViolation::new(field("event_id"), "appears twice in this request"));
            }
            if event.event_type.is_empty() || event.event_type.len() > MAX_NAME_LEN {
                violations.push(FieldViolation::new(field("event_type"), format!("must be 1 to {MAX_NAME_LEN} bytes")));
            } else if event.event_type.chars().any(char::is_control) {
                violations.push(FieldViolation::new(field("event_type"), "must not contain control characters"));
            }
            if event.schema_version == 0 {
                violations.push(FieldViolation::new(field("schema_version"), "must be at least 1"));
            }
            if !event.data.is_object() {
                violations.push(FieldViolation::new(field("data"), "must be a JSON object"));
            }
            if contains_nul(&event.data) || contains_nul(&event.metadata.to_json()) {
                violations.push(FieldViolation::new(field("data"), "strings must not contain U+0000"));
            }
            let size = crate::hash::canonical_json(&event.data).len();
            if size > MAX_EVENT_BYTES {
                violations.push(FieldViolation::new(
                    field("data"),
                    format!("{size} bytes exceeds the limit of {MAX_EVENT_BYTES}"),
                ));
            }
        }
        if violations.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(violations)) }
    }
}

/// Check a stream id: 1 to 256 bytes, no control characters, not starting
/// with `$` (reserved for system streams such as `$all`).
pub fn validate_stream_id(field: &str, stream_id: &str, violations: &mut Vec<FieldViolation>) {
    if stream_id.is_empty() || stream_id.len() > MAX_NAME_LEN {
        violations.push(FieldViolation::new(field, format!("must be 1 to {MAX_NAME_LEN} bytes")));
    } else if stream_id.starts_with('$') {
        violations.push(FieldViolation::new(field, "must not start with '$' (reserved)"));
    } else if stream_id.chars().any(char::is_control) {
        violations.push(FieldViolation::new(field, "must not contain control characters"));
    }
}

/// [`validate_stream_id`] for a single id, as a result.
pub fn check_stream_id(field: &str, stream_id: &str) -> Result<()> {
    let mut violations = Vec::new();
    validate_stream_id(field, stream_id, &mut violations);
    if violations.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(violations)) }
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// The answer to an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub stream_id: String,
    /// Version of the first appended event.
    pub first_version: u64,
    /// Version of the last appended event: the stream's new version.
    pub last_version: u64,
    /// Global position of each appended event.
    pub positions: Vec<u64>,
    /// True when this replays the first answer of the same request id.
    pub duplicate: bool,
}

impl AppendOutcome {
    /// The position of the last appended event (a read-your-writes token).
    pub fn last_position(&self) -> u64 {
        self.positions.last().copied().unwrap_or_default()
    }
}

/// Read direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    Forwards,
    Backwards,
}

/// A read of one stream (a branch includes the history it shares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRead {
    pub stream_id: String,
    pub direction: Direction,
    /// First version to return; `None`: the start (forwards) or end (backwards).
    pub from_version: Option<u64>,
    pub max_count: usize,
    /// Only events stored at or after this time.
    pub start_time: Option<SystemTime>,
    /// Only events stored before this time.
    pub end_time: Option<SystemTime>,
    /// Only events up to this version (inclusive).
    pub max_version: Option<u64>,
}

impl StreamRead {
    /// Forwards from the first event, up to `max_count` events.
    pub fn forwards(stream_id: impl Into<String>, max_count: usize) -> Self {
        Self {
            stream_id: stream_id.into(),
            direction: Direction::Forwards,
            from_version: None,
            max_count,
            start_time: None,
            end_time: None,
            max_version: None,
        }
    }

    /// Whether `version`/`created_at` pass the read's bounds (memory adapter
    /// and tests use this; SQL adapters express the same in their query).
    pub fn admits(&self, version: u64, created_at: SystemTime) -> bool {
        let from_ok = match (self.direction, self.from_version) {
            (_, None) => true,
            (Direction::Forwards, Some(from)) => version >= from,
            (Direction::Backwards, Some(from)) => version <= from,
        };
        from_ok
            && self.max_version.is_none_or(|max| version <= max)
            && self.start_time.is_none_or(|t| created_at >= t)
            && self.end_time.is_none_or(|t| created_at < t)
    }
}

/// The answer to a stream read.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSlice {
    pub events: Vec<RecordedEvent>,
    /// The stream's current version.
    pub stream_version: Option<u64>,
    /// The read reached the end (forwards) or the start (backwards).
    pub end_of_stream: bool,
}

/// Which events of the global log to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Stream id prefixes (categories such as `order-`); empty keeps all.
    pub stream_prefixes: Vec<String>,
    /// Event types; empty keeps all.
    pub event_types: Vec<String>,
}

impl EventFilter {
    pub fn is_empty(&self) -> bool {
        self.stream_prefixes.is_empty() && self.event_types.is_empty()
    }

    pub fn matches(&self, stream_id: &str, event_type: &str) -> bool {
        (self.stream_prefixes.is_empty() || self.stream_prefixes.iter().any(|p| stream_id.starts_with(p.as_str())))
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
    }
}

/// A read of the global log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllRead {
    /// Return events after this position (0: from the beginning).
    pub after: u64,
    pub max_count: usize,
    pub filter: EventFilter,
}

/// The answer to a read of the global log.
#[derive(Debug, Clone, PartialEq)]
pub struct AllSlice {
    /// Matching events in global position order.
    pub events: Vec<RecordedEvent>,
    /// Every event up to here has been considered: continue after it.
    pub next_position: u64,
    /// Nothing beyond `next_position` was visible.
    pub end_of_log: bool,
}

/// A stream's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub stream_id: String,
    /// Version of the last event; `None` for a stream without events.
    pub version: Option<u64>,
    pub first_position: Option<u64>,
    pub last_position: Option<u64>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub deleted_at: Option<SystemTime>,
    /// For a branch: the stream and version it was forked from.
    pub parent: Option<(String, u64)>,
    pub head_hash: Option<[u8; 32]>,
}

/// A page request of the stream list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListStreams {
    /// Continue after this stream id.
    pub after: Option<String>,
    pub limit: usize,
    pub prefix: Option<String>,
    pub show_deleted: bool,
}

/// A page of the stream list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPage {
    pub streams: Vec<StreamInfo>,
    /// The last id of this page when more follow.
    pub next_after: Option<String>,
}

/// A snapshot of a stream's folded state.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub stream_id: String,
    /// The last event folded into `state`.
    pub version: u64,
    pub schema_version: u32,
    pub state: Value,
    pub created_at: SystemTime,
}

/// Which snapshot to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub stream_id: String,
    /// Latest at or below this version.
    pub max_version: Option<u64>,
    /// Only this schema version.
    pub schema_version: Option<u32>,
}

/// The first event whose stored link does not match its recomputed link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub stream_id: String,
    pub version: u64,
    pub global_position: u64,
    pub event_id: Uuid,
    pub stored: [u8; 32],
    pub computed: [u8; 32],
}

/// The result of verifying a stream's hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events_checked: u64,
    pub first_broken: Option<BrokenLink>,
    pub head_hash: Option<[u8; 32]>,
}

impl VerifyReport {
    pub fn is_valid(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// Microseconds since the Unix epoch (what PostgreSQL stores).
pub fn to_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`to_micros`].
pub fn from_micros(micros: i64) -> SystemTime {
    if micros >= 0 {
        UNIX_EPOCH + Duration::from_micros(micros.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(micros.unsigned_abs())
    }
}

/// Now, truncated to microseconds.
pub fn now_micros() -> SystemTime {
    from_micros(to_micros(SystemTime::now()))
}
