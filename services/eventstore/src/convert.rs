//! Proto ↔ store conversions (JSON ↔ `google.protobuf.Struct`, timestamps,
//! page tokens).

use std::time::SystemTime;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use eventfold_proto::eventstore as pb;
use eventfold_store::{EventMetadata, FieldViolation, RecordedEvent, Snapshot, StreamInfo};
use prost_types::{ListValue, Struct, Timestamp, value::Kind};
use serde_json::{Map, Number, Value};

/// Largest integer a double holds exactly: beyond it, numbers stay floats.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A `google.protobuf.Struct` as JSON; values JSON cannot hold (NaN,
/// infinities) are reported as violations of `field`.
pub fn struct_to_json(s: Struct, field: &str, violations: &mut Vec<FieldViolation>) -> Value {
    Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| {
                let path = format!("{field}.{k}");
                let json = value_to_json(v, &path, violations);
                (k, json)
            })
            .collect::<Map<_, _>>(),
    )
}

fn value_to_json(value: prost_types::Value, field: &str, violations: &mut Vec<FieldViolation>) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() {
                violations.push(FieldViolation::new(field, "numbers must be finite"));
                Value::Null
            } else if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                // Exact: a whole number within ±2^53 converts without loss.
                #[allow(clippy::cast_possible_truncation)]
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StructValue(s)) => struct_to_json(s, field, violations),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("{field}[{i}]"), violations))
                .collect(),
        ),
    }
}

/// A JSON object as a `google.protobuf.Struct` (any other value under the
/// key `value`).
pub fn json_to_struct(value: Value) -> Struct {
    match value {
        Value::Object(map) => Struct { fields: map.into_iter().map(|(k, v)| (k, json_to_value(v))).collect() },
        other => Struct { fields: [("value".to_owned(), json_to_value(other))].into() },
    }
}

/// Taken apart as it is converted, so that a page of large events is never
/// held twice (as JSON and as protobuf) at once.
fn json_to_value(value: Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(ListValue { values: items.into_iter().map(json_to_value).collect() }),
        object @ Value::Object(_) => Kind::StructValue(json_to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A time as a protobuf timestamp.
pub fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from(time)
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

pub(crate) fn metadata_from_proto(m: Option<pb::EventMetadata>) -> EventMetadata {
    let m = m.unwrap_or_default();
    EventMetadata {
        correlation_id: non_empty(m.correlation_id),
        causation_id: non_empty(m.causation_id),
        user_id: non_empty(m.user_id),
        custom: m.custom.into_iter().collect(),
    }
}

fn metadata_to_proto(m: EventMetadata) -> pb::EventMetadata {
    pb::EventMetadata {
        correlation_id: m.correlation_id.unwrap_or_default(),
        causation_id: m.causation_id.unwrap_or_default(),
        user_id: m.user_id.unwrap_or_default(),
        custom: m.custom.into_iter().collect(),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len().saturating_mul(2)), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Consumes `e`: its payload moves into the message rather than being
/// copied (see [`json_to_struct`]).
pub(crate) fn event_to_proto(e: RecordedEvent) -> pb::RecordedEvent {
    pb::RecordedEvent {
        event_id: e.event_id.to_string(),
        hash: hex(&e.hash),
        stream_id: e.stream_id,
        version: e.version,
        global_position: e.global_position,
        event_type: e.event_type,
        schema_version: e.schema_version,
        data: Some(json_to_struct(e.data)),
        metadata: Some(metadata_to_proto(e.metadata)),
        create_time: Some(timestamp(e.created_at)),
    }
}

pub(crate) fn stream_to_proto(s: &StreamInfo) -> pb::StreamInfo {
    pb::StreamInfo {
        stream_id: s.stream_id.clone(),
        version: s.version,
        first_position: s.first_position.unwrap_or_default(),
        last_position: s.last_position.unwrap_or_default(),
        create_time: Some(timestamp(s.created_at)),
        update_time: Some(timestamp(s.updated_at)),
        delete_time: s.deleted_at.map(timestamp),
        parent_stream_id: s.parent.as_ref().map(|(p, _)| p.clone()).unwrap_or_default(),
        parent_version: s.parent.as_ref().map(|(_, v)| *v),
        head_hash: s.head_hash.as_ref().map(|h| hex(h)).unwrap_or_default(),
    }
}

pub(crate) fn snapshot_to_proto(s: &Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        stream_id: s.stream_id.clone(),
        version: s.version,
        schema_version: s.schema_version,
        state: Some(json_to_struct(s.state.clone())),
        create_time: Some(timestamp(s.created_at)),
    }
}

/// AIP-158 page token of ListStreams: the last id of the previous page,
/// bound to the filter it was issued for.
pub(crate) fn encode_page_token(after: &str, prefix: &str, show_deleted: bool) -> String {
    let raw = serde_json::json!({ "a": after, "p": prefix, "d": show_deleted }).to_string();
    URL_SAFE_NO_PAD.encode(raw)
}

pub(crate) fn decode_page_token(token: &str, prefix: &str, show_deleted: bool) -> Result<String, FieldViolation> {
    let bad = || FieldViolation::new("page_token", "not a page token of this listing");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    if value["p"].as_str() != Some(prefix) || value["d"].as_bool() != Some(show_deleted) {
        return Err(FieldViolation::new("page_token", "the filter differs from the one the token was issued for"));
    }
    value["a"].as_str().map(str::to_owned).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_survives_struct_round_trips() {
        let json = json!({"s": "x", "i": 42, "f": 2.5, "b": true, "n": null, "l": [1, {"k": "v"}], "o": {"x": -7}});
        let mut violations = Vec::new();
        let back = struct_to_json(json_to_struct(json.clone()), "data", &mut violations);
        assert!(violations.is_empty());
        assert_eq!(back, json);
    }

    #[test]
    fn non_finite_numbers_are_violations() {
        let s = Struct {
            fields: [("x".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(f64::NAN)) })].into(),
        };
        let mut violations = Vec::new();
        struct_to_json(s, "events[0].data", &mut violations);
        assert_eq!(violations[0].field, "events[0].data.x");
    }

    #[test]
    fn page_tokens_are_bound_to_their_filter() {
        let token = encode_page_token("order-9", "order-", false);
        assert_eq!(decode_page_token(&token, "order-", false).unwrap(), "order-9");
        assert!(decode_page_token(&token, "pay-", false).is_err());
        assert!(decode_page_token("%%%", "order-", false).is_err());
    }
}
