//! Rows to the store's model, and the SQL the reads share: the column lists
//! the conversions expect and the gap-safe scan of the global log.

use serde_json::Value;
use tokio_postgres::{Client, Row};

use super::tables::Tables;
#[cfg(doc)]
use crate::model::MAX_PAGE_BYTES;
use crate::{
    error::{Error, Result},
    model::{EventMetadata, RecordedEvent, StreamInfo, from_bigint},
    pg::db_error,
};

pub(super) const STREAM_COLUMNS: &str = "stream_id, version, head_hash, first_position, last_position, created_at, \
                              updated_at, deleted_at, parent_stream_id, parent_version";

pub(super) async fn fetch_stream(client: &Client, tables: &Tables, stream_id: &str) -> Result<Option<StreamInfo>> {
    let row = client
        .query_opt(
            &*tables.sql(&format!(
                "SELECT {STREAM_COLUMNS} FROM eventstore.streams \
                 WHERE stream_id = $1 AND (version >= 0 OR parent_stream_id IS NOT NULL)"
            )),
            &[&stream_id],
        )
        .await
        .map_err(db_error)?;
    row.map(|r| stream_from_row(&r)).transpose()
}

pub(super) fn stream_from_row(row: &Row) -> Result<StreamInfo> {
    let version: i64 = row.get("version");
    let head: Option<Vec<u8>> = row.get("head_hash");
    let parent: Option<String> = row.get("parent_stream_id");
    let parent_version: Option<i64> = row.get("parent_version");
    Ok(StreamInfo {
        stream_id: row.get("stream_id"),
        version: u64::try_from(version).ok(),
        first_position: row.get::<_, Option<i64>>("first_position").map(from_bigint),
        last_position: row.get::<_, Option<i64>>("last_position").map(from_bigint),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        deleted_at: row.get("deleted_at"),
        parent: parent.zip(parent_version.map(from_bigint)),
        head_hash: head.map(|h| to_hash(&h)).transpose()?,
    })
}

pub(super) fn to_hash(bytes: &[u8]) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| Error::Internal(format!("stored hash has {} bytes, not 32", bytes.len())))
}

pub(super) const EVENT_COLUMNS: &str = "e.global_position, e.stream_id, e.version, e.event_id, e.event_type, \
                             e.schema_version, e.data, e.metadata, e.created_at, e.hash";

/// The columns of a paged read's outer query, but its payloads.
pub(super) const PAGED_COLUMNS: &str =
    "x.global_position, x.stream_id, x.version, x.event_id, x.event_type, x.schema_version, x.created_at, x.hash";

/// What an event weighs against [`MAX_PAGE_BYTES`]: its payload and
/// metadata as sent (jsonb travels as JSON text).
pub(super) const EVENT_SIZE: &str = "(octet_length(e.data::text) + octet_length(e.metadata::text))";

/// The event of `row`; `None` when the row came without its payload (it
/// lies beyond the page's byte budget).
pub(super) fn event_from_row(row: &Row) -> Result<Option<RecordedEvent>> {
    let position: i64 = row.get("global_position");
    let unreadable = |what: &str, e: tokio_postgres::Error| {
        Error::Internal(format!("stored {what} of the event at position {position} cannot be read: {e}"))
    };
    let data: Option<Value> = row.try_get("data").map_err(|e| unreadable("data", e))?;
    let Some(data) = data else { return Ok(None) };
    let metadata: Value = row.try_get("metadata").map_err(|e| unreadable("metadata", e))?;
    let metadata: EventMetadata = serde_json::from_value(metadata)
        .map_err(|e| Error::Internal(format!("stored metadata is not eventfold metadata: {e}")))?;
    let hash: Vec<u8> = row.get("hash");
    Ok(Some(RecordedEvent {
        event_id: row.get("event_id"),
        stream_id: row.get("stream_id"),
        version: from_bigint(row.get("version")),
        global_position: from_bigint(position),
        event_type: row.get("event_type"),
        schema_version: u32::try_from(row.get::<_, i32>("schema_version")).unwrap_or(0),
        data,
        metadata,
        created_at: row.get("created_at"),
        hash: to_hash(&hash)?,
    }))
}

pub(super) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len().saturating_add(1));
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// A scan of the global log after `$1` (at most `$4` rows) that carries
/// payloads only for rows the filter (`$2` prefixes, `$3` types) matches,
/// and only up to `$5` bytes of them (the first matching row always): the
/// rows beyond come without data and end the page. The scan stops after
/// the `$6`-th matching row (`matched_run <= $6` is a run condition of the
/// window: PostgreSQL ends the index scan there rather than filter the rows
/// after it), so a filter reads no further than the page it fills; the
/// unmatched rows up to the next match may follow. Sizes are computed only
/// for matching rows.
pub(super) const SCAN_SQL: &str = "SELECT pg_current_snapshot()::text AS snap, \
        x.global_position, x.stream_id, x.version, x.event_id, x.event_type, x.schema_version, x.created_at, \
        x.hash, x.matched, \
        CASE WHEN x.matched AND (x.run <= $5 OR x.run = x.size) THEN x.data END AS data, \
        CASE WHEN x.matched AND (x.run <= $5 OR x.run = x.size) THEN x.metadata END AS metadata \
      FROM (SELECT z.*, sum(z.size) OVER (ORDER BY z.global_position ROWS UNBOUNDED PRECEDING) AS run \
            FROM (SELECT y.*, \
                         CASE WHEN y.matched THEN octet_length(y.data::text) + octet_length(y.metadata::text) \
                              ELSE 0 END AS size \
                    FROM (SELECT e.global_position, e.stream_id, e.version, e.event_id, e.event_type, \
                                 e.schema_version, e.created_at, e.hash, e.data, e.metadata, m.matched, \
                                 count(*) FILTER (WHERE m.matched) \
                                     OVER (ORDER BY e.global_position ROWS UNBOUNDED PRECEDING) AS matched_run \
                            FROM eventstore.events e, \
                                 LATERAL (SELECT ($2::text[] IS NULL OR e.stream_id LIKE ANY ($2)) \
                                             AND ($3::text[] IS NULL OR e.event_type = ANY ($3)) AS matched) m \
                           WHERE e.global_position > $1) y \
                   WHERE y.matched_run <= $6 \
                   ORDER BY y.global_position LIMIT $4) z) x \
      ORDER BY x.global_position";
