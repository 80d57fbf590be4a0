//! The per-stream hash chain. Each event's link is
//! `sha256(previous link ‖ version ‖ created_at µs ‖ stream id ‖ content)`
//! where `content` digests the event id, type, schema version and the
//! canonical JSON of data and metadata; the first link's predecessor is 32
//! zero bytes. The PostgreSQL adapter computes links in SQL with exactly this
//! layout (see `migrations/0001_event_store.up.sql`); verification recomputes
//! them here from what is stored.

use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::model::{BrokenLink, EventMetadata, RecordedEvent, VerifyReport, to_micros};

/// The predecessor of a stream's first link.
pub const GENESIS: [u8; 32] = [0; 32];

/// Compact JSON with object keys sorted and `-0` written as `0`: the same
/// text before storing and after a PostgreSQL `jsonb` round trip.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f == 0.0 => out.push_str("0.0"),
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

fn put_bytes(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// Digest of an event's content (everything but its place in the stream).
pub fn content_digest(
    event_id: &Uuid,
    event_type: &str,
    schema_version: u32,
    data: &Value,
    metadata: &EventMetadata,
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(event_id.as_bytes());
    put_bytes(&mut hasher, event_type.as_bytes());
    hasher.update(schema_version.to_be_bytes());
    put_bytes(&mut hasher, canonical_json(data).as_bytes());
    put_bytes(&mut hasher, canonical_json(&metadata.to_json()).as_bytes());
    hasher.finalize().into()
}

/// One link of the chain.
pub fn link(prev: &[u8; 32], version: u64, created_micros: i64, stream_id: &str, content: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(version.to_be_bytes());
    hasher.update(created_micros.to_be_bytes());
    hasher.update(stream_id.as_bytes());
    hasher.update(content);
    hasher.finalize().into()
}

/// The link a stored event should carry, given its predecessor's.
pub fn expected_link(prev: &[u8; 32], event: &RecordedEvent) -> [u8; 32] {
    let content =
        content_digest(&event.event_id, &event.event_type, event.schema_version, &event.data, &event.metadata);
    link(prev, event.version, to_micros(event.created_at), &event.stream_id, &content)
}

/// Incremental verification over a stream's events in version order.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    prev: Option<[u8; 32]>,
    checked: u64,
    broken: Option<BrokenLink>,
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next event; returns false once a broken link was found.
    pub fn push(&mut self, event: &RecordedEvent) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let prev = self.prev.unwrap_or(GENESIS);
        let computed = expected_link(&prev, event);
        self.checked += 1;
        if computed != event.hash {
            self.broken = Some(BrokenLink {
                stream_id: event.stream_id.clone(),
                version: event.version,
                global_position: event.global_position,
                event_id: event.event_id,
                stored: event.hash,
                computed,
            });
            return false;
        }
        self.prev = Some(event.hash);
        true
    }

    pub fn finish(self) -> VerifyReport {
        VerifyReport { events_checked: self.checked, head_hash: self.prev, first_broken: self.broken }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_is_compact() {
        let v = json!({"b": 1, "a": {"y": [1, 2.5, "x"], "x": null}, "c": -0.0});
        assert_eq!(canonical_json(&v), r#"{"a":{"x":null,"y":[1,2.5,"x"]},"b":1,"c":0.0}"#);
    }

    #[test]
    fn canonical_json_survives_a_reparse() {
        let v = json!({"s": "é\"\n", "n": 1e21, "f": 0.1, "i": -42, "u": 18446744073709551615u64});
        let text = canonical_json(&v);
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(canonical_json(&back), text);
    }

    #[test]
    fn link_depends_on_every_input() {
        let c = [7u8; 32];
        let base = link(&GENESIS, 0, 1, "s", &c);
        assert_ne!(base, link(&[1; 32], 0, 1, "s", &c));
        assert_ne!(base, link(&GENESIS, 1, 1, "s", &c));
        assert_ne!(base, link(&GENESIS, 0, 2, "s", &c));
        assert_ne!(base, link(&GENESIS, 0, 1, "t", &c));
        assert_ne!(base, link(&GENESIS, 0, 1, "s", &[8; 32]));
    }
}
