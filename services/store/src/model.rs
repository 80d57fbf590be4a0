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
/// Most bytes of event payload and metadata (canonical JSON) one read page
/// carries; a page always holds at least one event, and one event (data and
/// metadata together) never exceeds [`MAX_EVENT_BYTES`].
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Longest correlation, causation, user or request id, in bytes (visible
/// ASCII only).
pub const MAX_ID_LEN: usize = 128;
/// Most entries of each list of an [`EventFilter`].
pub const MAX_FILTER_ENTRIES: usize = 100;
/// Longest entry of an [`EventFilter`] list, in bytes.
pub const MAX_FILTER_ENTRY_BYTES: usize = 256;
/// Most entries of an event's custom metadata.
pub const MAX_CUSTOM_METADATA: usize = 64;
/// Largest integer stored in a PostgreSQL `bigint`: versions and positions
/// from a request beyond it are refused, never cast.
pub const MAX_BIGINT: u64 = i64::MAX as u64;
/// 0001-01-01T00:00:00Z, the earliest accepted time, in Unix seconds.
pub const MIN_TIME_SECS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z, the latest accepted whole second, in Unix seconds.
pub const MAX_TIME_SECS: i64 = 253_402_300_799;

/// Refuse `value` unless it fits a PostgreSQL `bigint`.
pub fn check_bigint(field: &str, value: u64, violations: &mut Vec<FieldViolation>) {
    if value > MAX_BIGINT {
        violations.push(FieldViolation::new(field, format!("must be at most {MAX_BIGINT}, got {value}")));
    }
}

/// [`check_bigint`] for an optional version, as a result.
pub fn check_version(field: &str, version: Option<u64>) -> Result<()> {
    let mut violations = Vec::new();
    if let Some(v) = version {
        check_bigint(field, v, &mut violations);
    }
    result_of(violations)
}

/// `value` as a `bigint`, for values already checked by [`check_bigint`]
/// (saturating, never wrapping).
pub fn bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored `bigint` that must not be negative, as `u64` (0 when it is).
pub fn from_bigint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Refuse a time outside the years 0001 to 9999.
pub fn check_time(field: &str, time: SystemTime, violations: &mut Vec<FieldViolation>) {
    let secs = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| s.saturating_neg()),
    };
    if !(MIN_TIME_SECS..=MAX_TIME_SECS).contains(&secs) {
        violations.push(FieldViolation::new(field, "must lie between 0001-01-01 and 9999-12-31"));
    }
}

/// Check an id (request, correlation, causation, user): 1 to
/// [`MAX_ID_LEN`] bytes of visible ASCII.
pub fn check_id(field: &str, id: &str, violations: &mut Vec<FieldViolation>) {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        violations.push(FieldViolation::new(field, format!("must be 1 to {MAX_ID_LEN} bytes")));
    } else if !id.bytes().all(|b| b.is_ascii_graphic()) {
        violations.push(FieldViolation::new(field, "must be visible ASCII (no spaces or control characters)"));
    }
}

fn result_of(violations: Vec<FieldViolation>) -> Result<()> {
    if violations.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(violations)) }
}

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
    /// The ids, by their stored names.
    fn ids(&self) -> [(&'static str, &Option<String>); 3] {
        [("correlation_id", &self.correlation_id), ("causation_id", &self.causation_id), ("user_id", &self.user_id)]
    }

    /// The metadata as the JSON object that is stored and hashed.
    pub fn to_json(&self) -> Value {
        let mut map = serde_json::Map::new();
        for (key, id) in self.ids() {
            if let Some(id) = id {
                map.insert(key.to_owned(), Value::String(id.clone()));
            }
        }
        if !self.custom.is_empty() {
            let custom = self.custom.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            map.insert("custom".to_owned(), Value::Object(custom));
        }
        Value::Object(map)
    }

    /// Ids are visible ASCII of at most [`MAX_ID_LEN`] bytes; custom keys
    /// at most [`MAX_NAME_LEN`] bytes, at most [`MAX_CUSTOM_METADATA`] of
    /// them, and no control characters in keys or values (their size counts
    /// in the event's [`MAX_EVENT_BYTES`]).
    pub fn validate(&self, field: &str, violations: &mut Vec<FieldViolation>) {
        for (name, id) in self.ids() {
            if let Some(id) = id {
                check_id(&format!("{field}.{name}"), id, violations);
            }
        }
        if self.custom.len() > MAX_CUSTOM_METADATA {
            violations.push(FieldViolation::new(
                format!("{field}.custom"),
                format!("at most {MAX_CUSTOM_METADATA} entries, got {}", self.custom.len()),
            ));
            return;
        }
        for (key, value) in &self.custom {
            if key.is_empty() || key.len() > MAX_NAME_LEN {
                violations.push(FieldViolation::new(
                    format!("{field}.custom"),
                    format!("keys must be 1 to {MAX_NAME_LEN} bytes"),
                ));
            } else if key.chars().any(char::is_control) {
                // The key is not echoed: it is what holds the control character.
                violations
                    .push(FieldViolation::new(format!("{field}.custom"), "keys must not contain control characters"));
            } else if value.chars().any(char::is_control) {
                violations
                    .push(FieldViolation::new(format!("{field}.custom[{key}]"), "must not contain control characters"));
            }
        }
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
    /// Bytes of its canonical data and metadata: what counts against
    /// [`MAX_EVENT_BYTES`].
    pub fn size(&self) -> usize {
        crate::hash::canonical_json(&self.data).len().saturating_add(metadata_size(&self.metadata))
    }

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

impl RecordedEvent {
    /// Bytes of its canonical data and metadata: what counts against
    /// [`MAX_PAGE_BYTES`].
    pub fn size(&self) -> usize {
        crate::hash::canonical_json(&self.data).len().saturating_add(metadata_size(&self.metadata))
    }
}

fn metadata_size(metadata: &EventMetadata) -> usize {
    let ids: usize = metadata.ids().iter().map(|(_, id)| id.as_ref().map_or(0, String::len)).sum();
    let custom: usize = metadata.custom.iter().map(|(k, v)| k.len().saturating_add(v.len())).sum();
    ids.saturating_add(custom)
}

/// Append events to one stream atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// AIP-155: a retried request with the same id gets the first answer;
    /// the same id with a different request is refused.
    pub request_id: Option<String>,
    /// Where `request_id` is unique; `None`: the stream (raw appends). The
    /// command side scopes its ids per service and principal.
    pub request_scope: Option<String>,
    /// What makes two requests with one id the same request; `None`: a
    /// digest of the expected version and the events' content (not their
    /// ids, which a retry may draw anew).
    pub fingerprint: Option<[u8; 32]>,
}

/// The AIP-155 identity of a request: its id within a scope, and the
/// fingerprint a repeat must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    pub scope: String,
    pub request_id: String,
    pub fingerprint: [u8; 32],
}

impl RequestKey {
    /// The scope of the request ids of raw appends to `stream_id`.
    pub fn stream_scope(stream_id: &str) -> String {
        format!("stream/{stream_id}")
    }

    /// Whether a stored fingerprint (`None`: stored before fingerprints
    /// existed) admits this request as a repeat.
    pub fn matches(&self, stored: Option<&[u8]>) -> bool {
        stored.is_none_or(|f| f == self.fingerprint.as_slice())
    }
}

impl AppendRequest {
    pub fn new(stream_id: impl Into<String>, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self { stream_id: stream_id.into(), expected, events, request_id: None, request_scope: None, fingerprint: None }
    }

    /// The request's AIP-155 identity, when it has a request id.
    pub fn request_key(&self) -> Option<RequestKey> {
        let request_id = self.request_id.clone()?;
        let scope = self.request_scope.clone().unwrap_or_else(|| RequestKey::stream_scope(&self.stream_id));
        let fingerprint = self.fingerprint.unwrap_or_else(|| self.content_fingerprint());
        Some(RequestKey { scope, request_id, fingerprint })
    }

    fn content_fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(self.stream_id.as_bytes());
        hasher.update([0]);
        hasher.update(self.expected.to_string().as_bytes());
        for event in &self.events {
            for part in [
                event.event_type.as_bytes(),
                &event.schema_version.to_be_bytes(),
                crate::hash::canonical_json(&event.data).as_bytes(),
                crate::hash::canonical_json(&event.metadata.to_json()).as_bytes(),
            ] {
                hasher.update((part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
        }
        hasher.finalize().into()
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
        if let ExpectedVersion::Exact(v) = self.expected {
            check_bigint("expected_version", v, &mut violations);
        }
        if let Some(id) = &self.request_id {
            check_id("request_id", id, &mut violations);
        }
        if let Some(scope) = &self.request_scope
            && (scope.is_empty() || scope.len() > 2 * MAX_NAME_LEN || scope.chars().any(char::is_control))
        {
            violations.push(FieldViolation::new("request_scope", "must be 1 to 512 bytes, no control characters"));
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
            if event.schema_version == 0 || i32::try_from(event.schema_version).is_err() {
                violations.push(FieldViolation::new(field("schema_version"), "must be 1 to 2147483647"));
            }
            if !event.data.is_object() {
                violations.push(FieldViolation::new(field("data"), "must be a JSON object"));
            }
            if contains_nul(&event.data) {
                violations.push(FieldViolation::new(field("data"), "strings must not contain U+0000"));
            }
            event.metadata.validate(&field("metadata"), &mut violations);
            let size = event.size();
            if size > MAX_EVENT_BYTES {
                violations.push(FieldViolation::new(
                    field("data"),
                    format!("{size} bytes of data and metadata exceed the limit of {MAX_EVENT_BYTES}"),
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
    result_of(violations)
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

    /// Check the read: versions fit a `bigint`, times lie in 0001-9999.
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        validate_stream_id("stream_id", &self.stream_id, &mut violations);
        if let Some(v) = self.from_version {
            check_bigint("from_version", v, &mut violations);
        }
        if let Some(v) = self.max_version {
            check_bigint("max_version", v, &mut violations);
        }
        if let Some(t) = self.start_time {
            check_time("start_time", t, &mut violations);
        }
        if let Some(t) = self.end_time {
            check_time("end_time", t, &mut violations);
        }
        result_of(violations)
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

    /// At most [`MAX_FILTER_ENTRIES`] entries per list, each 1 to
    /// [`MAX_FILTER_ENTRY_BYTES`] bytes.
    pub fn validate(&self, field: &str, violations: &mut Vec<FieldViolation>) {
        for (name, entries) in [("stream_prefixes", &self.stream_prefixes), ("event_types", &self.event_types)] {
            if entries.len() > MAX_FILTER_ENTRIES {
                violations.push(FieldViolation::new(
                    format!("{field}.{name}"),
                    format!("at most {MAX_FILTER_ENTRIES} entries, got {}", entries.len()),
                ));
                continue;
            }
            for (i, entry) in entries.iter().enumerate() {
                if entry.is_empty() || entry.len() > MAX_FILTER_ENTRY_BYTES {
                    violations.push(FieldViolation::new(
                        format!("{field}.{name}[{i}]"),
                        format!("must be 1 to {MAX_FILTER_ENTRY_BYTES} bytes"),
                    ));
                } else if entry.chars().any(char::is_control) {
                    violations.push(FieldViolation::new(
                        format!("{field}.{name}[{i}]"),
                        "must not contain control characters",
                    ));
                }
            }
        }
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

impl AllRead {
    /// Check the read: the position fits a `bigint`, the filter its bounds.
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        check_bigint("from_position", self.after, &mut violations);
        self.filter.validate("filter", &mut violations);
        result_of(violations)
    }
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

impl ListStreams {
    /// The prefix and the id to continue after are bounded like stream ids
    /// and hold no control characters.
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        if let Some(prefix) = &self.prefix
            && (prefix.len() > MAX_NAME_LEN || prefix.chars().any(char::is_control))
        {
            violations.push(FieldViolation::new(
                "prefix",
                format!("must be at most {MAX_NAME_LEN} bytes, no control characters"),
            ));
        }
        if let Some(after) = &self.after
            && (after.len() > MAX_NAME_LEN || after.chars().any(char::is_control))
        {
            violations.push(FieldViolation::new("page_token", "not a page token of this listing"));
        }
        result_of(violations)
    }
}

/// A page of the stream list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPage {
    pub streams: Vec<StreamInfo>,
    /// The last id of this page when more follow.
    pub next_after: Option<String>,
}

/// Who wrote a snapshot. Snapshots saved through the public API are kept
/// apart from the command side's own: a client can store and load any
/// state it likes in [`SnapshotNamespace::Client`], and the command side,
/// which loads only [`SnapshotNamespace::Aggregate`], never folds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub enum SnapshotNamespace {
    #[default]
    Client,
    Aggregate,
}

impl SnapshotNamespace {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Aggregate => "aggregate",
        }
    }
}

/// A snapshot of a stream's folded state.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub stream_id: String,
    pub namespace: SnapshotNamespace,
    /// The last event folded into `state`.
    pub version: u64,
    pub schema_version: u32,
    pub state: Value,
    pub created_at: SystemTime,
    /// The stream's hash-chain link at `version`, recorded by the store when
    /// the snapshot is saved (what the caller passes is ignored): a reader
    /// uses the snapshot only while the stream's chain still has this link
    /// there.
    pub head_hash: [u8; 32],
}

impl Snapshot {
    /// A snapshot to save (the store records its time and head hash).
    pub fn new(stream_id: impl Into<String>, namespace: SnapshotNamespace, version: u64, state: Value) -> Self {
        Self {
            stream_id: stream_id.into(),
            namespace,
            version,
            schema_version: 1,
            state,
            created_at: UNIX_EPOCH,
            head_hash: [0; 32],
        }
    }

    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        validate_stream_id("stream_id", &self.stream_id, &mut violations);
        check_bigint("version", self.version, &mut violations);
        if self.schema_version == 0 || i32::try_from(self.schema_version).is_err() {
            violations.push(FieldViolation::new("schema_version", "must be 1 to 2147483647"));
        }
        if !self.state.is_object() {
            violations.push(FieldViolation::new("state", "must be a JSON object"));
        } else if contains_nul(&self.state) {
            violations.push(FieldViolation::new("state", "strings must not contain U+0000"));
        } else {
            let size = crate::hash::canonical_json(&self.state).len();
            if size > MAX_EVENT_BYTES {
                violations
                    .push(FieldViolation::new("state", format!("{size} bytes exceed the limit of {MAX_EVENT_BYTES}")));
            }
        }
        result_of(violations)
    }
}

/// Which snapshot to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub stream_id: String,
    pub namespace: SnapshotNamespace,
    /// Latest at or below this version.
    pub max_version: Option<u64>,
    /// Only this schema version.
    pub schema_version: Option<u32>,
}

impl SnapshotQuery {
    pub fn validate(&self) -> Result<()> {
        let mut violations = Vec::new();
        validate_stream_id("stream_id", &self.stream_id, &mut violations);
        if let Some(v) = self.max_version {
            check_bigint("max_version", v, &mut violations);
        }
        if let Some(v) = self.schema_version
            && i32::try_from(v).is_err()
        {
            violations.push(FieldViolation::new("schema_version", "must be at most 2147483647"));
        }
        result_of(violations)
    }
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
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, i64::saturating_neg),
    }
}

/// The inverse of [`to_micros`].
pub fn from_micros(micros: i64) -> SystemTime {
    // Any i64 of microseconds (±292,000 years) is a SystemTime on the
    // platforms eventfold runs on; the epoch is the fallback otherwise.
    let offset = Duration::from_micros(micros.unsigned_abs());
    let time = if micros >= 0 { UNIX_EPOCH.checked_add(offset) } else { UNIX_EPOCH.checked_sub(offset) };
    time.unwrap_or(UNIX_EPOCH)
}

/// `time` rounded up to a whole microsecond (what is stored): for stored
/// times, "at or after `time`" and "before `time`" keep their meaning.
pub fn ceil_micros(time: SystemTime) -> SystemTime {
    let floor = from_micros(to_micros(time));
    if floor < time { floor.checked_add(Duration::from_micros(1)).unwrap_or(floor) } else { floor }
}

/// The exclusive end of a read of what was stored "at or before `time`":
/// the first whole microsecond after it (stored times are whole
/// microseconds); `None` past the end of 9999, where every stored time is
/// before it.
pub fn end_at_or_before(time: SystemTime) -> Option<SystemTime> {
    let end = ceil_micros(time.checked_add(Duration::from_nanos(1))?);
    let mut beyond = Vec::new();
    check_time("time", end, &mut beyond);
    beyond.is_empty().then_some(end)
}

/// Now, truncated to microseconds.
pub fn now_micros() -> SystemTime {
    from_micros(to_micros(SystemTime::now()))
}
