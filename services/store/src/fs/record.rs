//! What the frames of a segment hold: one JSON record per frame.
//!
//! An append of n events is n consecutive `event` records carrying their
//! place in it (`i` of `n`); the last one carries the request id, if any.
//! Recovery applies an append only when all n are there, so an append is
//! stored whole or not at all.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::{EventMetadata, RecordedEvent, SnapshotNamespace, from_micros};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub(crate) enum Record {
    Event(Box<EventRecord>),
    Delete { stream: String, at: i64 },
    Branch { stream: String, source: String, at_version: u64, head: Option<Hash>, at: i64 },
    Snapshot(SnapshotRecord),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EventRecord {
    pub(crate) id: Uuid,
    pub(crate) stream: String,
    pub(crate) version: u64,
    pub(crate) position: u64,
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) schema_version: u32,
    pub(crate) data: Value,
    #[serde(default)]
    pub(crate) metadata: EventMetadata,
    /// Microseconds since the Unix epoch.
    pub(crate) at: i64,
    pub(crate) hash: Hash,
    /// This event's place in its append: `i` of `n` (0-based).
    pub(crate) i: u32,
    pub(crate) n: u32,
    /// On the last event of an append made with a request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) request: Option<RequestRecord>,
}

impl EventRecord {
    pub(crate) fn into_event(self) -> RecordedEvent {
        RecordedEvent {
            event_id: self.id,
            stream_id: self.stream,
            version: self.version,
            global_position: self.position,
            event_type: self.event_type,
            schema_version: self.schema_version,
            data: self.data,
            metadata: self.metadata,
            created_at: from_micros(self.at),
            hash: self.hash.0,
        }
    }

    /// Whether this is the last event of its append.
    pub(crate) fn closes_append(&self) -> bool {
        self.i.checked_add(1) == Some(self.n)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RequestRecord {
    pub(crate) scope: String,
    pub(crate) id: String,
    pub(crate) fingerprint: Hash,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) stream: String,
    pub(crate) namespace: Namespace,
    pub(crate) version: u64,
    pub(crate) schema_version: u32,
    pub(crate) state: Value,
    pub(crate) at: i64,
    pub(crate) head: Hash,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Namespace {
    Client,
    Aggregate,
}

impl From<SnapshotNamespace> for Namespace {
    fn from(ns: SnapshotNamespace) -> Self {
        match ns {
            SnapshotNamespace::Client => Self::Client,
            SnapshotNamespace::Aggregate => Self::Aggregate,
        }
    }
}

impl From<Namespace> for SnapshotNamespace {
    fn from(ns: Namespace) -> Self {
        match ns {
            Namespace::Client => Self::Client,
            Namespace::Aggregate => Self::Aggregate,
        }
    }
}

/// A SHA-256 digest, stored as 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hash(pub(crate) [u8; 32]);

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        serializer.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = text.as_bytes();
        let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
        let mut out = [0; 32];
        if bytes.len() != 64 {
            return Err(serde::de::Error::custom("a hash is 64 hex digits"));
        }
        for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => *byte = (hi << 4) | lo,
                _ => return Err(serde::de::Error::custom("a hash is 64 hex digits")),
            }
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json() {
        let mut hash = [0u8; 32];
        hash.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 7) as u8);
        let record =
            Record::Branch { stream: "b".into(), source: "a".into(), at_version: 3, head: Some(Hash(hash)), at: -5 };
        let json = serde_json::to_string(&record).expect("serialize");
        assert!(json.contains(r#""k":"branch""#), "{json}");
        match serde_json::from_str(&json).expect("deserialize") {
            Record::Branch { head: Some(Hash(h)), at: -5, .. } => assert_eq!(h, hash),
            other => panic!("unexpected {other:?}"),
        }
        assert!(serde_json::from_str::<Hash>(r#""zz""#).is_err());
    }
}
