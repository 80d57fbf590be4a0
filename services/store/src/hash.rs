//! The per-stream hash chain. Each event's link is
//! `sha256(previous link ‖ version ‖ created_at µs ‖ stream id ‖ content)`
//! where `content` digests the event id, type, schema version and the
//! canonical JSON of data and metadata; the first link's predecessor is 32
//! zero bytes. Every adapter computes links with [`link`] (the PostgreSQL
//! one from the stream heads it locks, with the database's clock; the SQL
//! function `eventstore.append_batch` of `migrations/0001_event_store.up.sql`
//! computes the same layout and stays as the reference of its tests), and
//! verification recomputes them from what is stored.

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
        Value::Number(n) => write_number(n, out),
        other => out.push_str(&other.to_string()),
    }
}

/// Numbers by value: PostgreSQL's `numeric` keeps the digits but not how a
/// number was typed (`1e16` comes back as `10000000000000000`, `-0.0` as
/// `0.0`), so an integral value prints as an integer whatever its JSON type,
/// and other floats print in their shortest round-trip form.
fn write_number(n: &serde_json::Number, out: &mut String) {
    if n.is_i64() || n.is_u64() {
        out.push_str(&n.to_string());
        return;
    }
    let repr = n.to_string();
    if n.as_f64().is_some_and(|f| f.fract() == 0.0) {
        out.push_str(&integral_digits(&repr));
    } else {
        out.push_str(&repr);
    }
}

/// The shortest representation of an integral float (`1.5e18`,
/// `1000000000000000.0`) written out as plain integer digits, which is how
/// PostgreSQL's `numeric` gives it back.
fn integral_digits(repr: &str) -> String {
    let (negative, body) = match repr.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, repr),
    };
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits = format!("{int}{frac}");
    let point = usize::try_from(i64::try_from(int.len()).unwrap_or(i64::MAX).saturating_add(exponent)).unwrap_or(0);
    if point >= digits.len() {
        digits.extend(std::iter::repeat_n('0', point.saturating_sub(digits.len())));
    } else {
        digits.truncate(point);
    }
    let digits = digits.trim_start_matches('0');
    match (digits.is_empty(), negative) {
        (true, _) => "0".to_owned(),
        (false, true) => format!("-{digits}"),
        (false, false) => digits.to_owned(),
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
        self.checked = self.checked.saturating_add(1);
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
        assert_eq!(canonical_json(&v), r#"{"a":{"x":null,"y":[1,2.5,"x"]},"b":1,"c":0}"#);
    }

    #[test]
    fn canonical_json_survives_a_reparse() {
        let v = json!({"s": "é\"\n", "n": 1e21, "f": 0.1, "i": -42, "u": 18446744073709551615u64});
        let text = canonical_json(&v);
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(canonical_json(&back), text);
    }

    #[test]
    fn numbers_are_canonical_by_value() {
        for (a, b) in [("1e16", "10000000000000000"), ("1.0", "1"), ("-0.0", "0"), ("2.50", "2.5")] {
            let a: Value = serde_json::from_str(a).unwrap();
            let b: Value = serde_json::from_str(b).unwrap();
            assert_eq!(canonical_json(&a), canonical_json(&b));
        }
        let big: Value = serde_json::from_str("1.152921504606847e18").unwrap();
        assert_eq!(canonical_json(&big), "1152921504606847000");
        let back: Value = serde_json::from_str("1152921504606847000").unwrap();
        assert_eq!(canonical_json(&back), "1152921504606847000");
        assert_eq!(integral_digits("-1.5e3"), "-1500");
        assert_eq!(integral_digits("1e300").len(), 301);
        let f: Value = serde_json::from_str("1.5309576695984775").unwrap();
        assert_eq!(canonical_json(&f), "1.5309576695984775");
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
