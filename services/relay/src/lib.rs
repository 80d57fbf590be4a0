//! The outbox relay of eventfold: every stored event, in global order, to a
//! Kafka topic per aggregate type, keyed by stream id.
//!
//! OVERVIEW: the relay reads the log gap-safely after its checkpoint
//! (`bus.relay_checkpoints`), encodes each event (a [`ValueEncoder`]: Avro
//! in the Confluent wire format), sends each partition's records in one
//! produce request, and moves the checkpoint only after the broker
//! acknowledged every record of the batch. A crash or a broker outage in
//! between re-sends the batch: delivery is at-least-once, and consumers
//! drop what they have applied (per stream version).
//!
//! A key's partition is Kafka's default (murmur2 of the key), so a stream's
//! events stay in order on one partition and other Kafka clients agree on
//! where a stream lives.

mod avro;

pub use crate::avro::AvroEncoder;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use eventfold_bus::{Kafka, Outage};
use eventfold_store::{AllRead, Backoff, Database, EventFilter, EventLog, RecordedEvent};
use rskafka::{client::partition::Compression, record::Record};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Where unencodable events go (value: the stored JSON body, header
/// `error`), so that the relay goes on and nothing is lost.
pub const UNENCODABLE_TOPIC: &str = "eventfold.unencodable.v1";

/// Settings of the relay (`[relay]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Partitions of the topics the relay creates.
    pub partitions: i32,
    /// Replication factor of the topics the relay creates.
    pub replication_factor: i16,
    /// Most events per batch.
    pub batch_size: usize,
    /// The checkpoint's name (one per relay deployment).
    pub name: String,
    /// Longest sleep when caught up (appends of this process wake it
    /// sooner).
    pub idle_poll_ms: u64,
    /// After being woken by new events, how long to let more arrive so
    /// that they go in one produce request per partition (Kafka's
    /// `linger.ms`): fewer, larger requests for a few ms of latency.
    pub linger_ms: u64,
    /// Longest wait for one broker request before it counts as failed.
    pub request_timeout_ms: u64,
    /// Longest pause between retries while the broker is unreachable.
    pub max_backoff_ms: u64,
    /// Connect to the brokers over TLS, trusting `[tls] ca_file` and
    /// presenting `[tls] cert_file` (for brokers that require client
    /// certificates); the consumers and the Kafka-fed projectors too.
    pub tls: bool,
    /// The TLS of `tls`, set at run time from `[tls]`.
    #[serde(skip)]
    pub tls_config: eventfold_bus::BrokerTls,
}

impl Config {
    /// The pauses before a failed [`Relay::run`] runs again (the
    /// supervisor's): from 50 ms up to `max_backoff_ms`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_millis(self.max_backoff_ms.max(50)))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            partitions: 3,
            replication_factor: 1,
            batch_size: 1000,
            name: "relay".to_owned(),
            idle_poll_ms: 200,
            linger_ms: 5,
            request_timeout_ms: 10_000,
            max_backoff_ms: 5_000,
            tls: false,
            tls_config: eventfold_bus::BrokerTls::default(),
        }
    }
}

/// Why an event has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The event itself does not fit (unknown type, body not matching its
    /// schema): it goes to [`UNENCODABLE_TOPIC`] and the relay goes on.
    #[error("{0}")]
    Unencodable(String),
    /// Something the encoder needs is away (e.g. the schema registry): the
    /// batch is retried.
    #[error("{0}")]
    Unavailable(String),
}

/// Turns an event into its Kafka value.
#[async_trait::async_trait]
pub trait ValueEncoder: Send + Sync + 'static {
    /// The topic an event goes to.
    fn topic(&self, event: &RecordedEvent) -> String;

    /// The record value of `event` on `topic`.
    async fn encode(&self, topic: &str, event: &RecordedEvent) -> Result<Vec<u8>, EncodeError>;
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The event log, or no connection from the pool.
    #[error(transparent)]
    Store(#[from] eventfold_store::Error),
    #[error("broker: {0}")]
    Broker(String),
    #[error("encoder: {0}")]
    Encoder(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broker error of the shared connection, as the relay's.
fn from_bus(e: eventfold_bus::Error) -> Error {
    match e {
        eventfold_bus::Error::Broker(message) => Error::Broker(message),
        other => Error::Broker(other.to_string()),
    }
}

/// Kafka's murmur2 (the hash of its default partitioner).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions`, as Kafka's default
/// partitioner chooses it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// The W3C `traceparent` recorded in an event's metadata
/// (`custom.traceparent`: the context of the command that appended it).
pub fn traceparent(event: &RecordedEvent) -> Option<String> {
    event.metadata.custom.get(eventfold_platform::trace::TRACEPARENT).cloned()
}

/// The record of `event` with `value`: key = stream id, headers for the
/// event's identity, type, versions, position and trace context.
pub fn record(event: &RecordedEvent, value: Vec<u8>) -> Record {
    let mut headers = BTreeMap::new();
    headers.insert("event_id".to_owned(), event.event_id.to_string().into_bytes());
    headers.insert("event_type".to_owned(), event.event_type.clone().into_bytes());
    headers.insert("schema_version".to_owned(), event.schema_version.to_string().into_bytes());
    headers.insert("stream_version".to_owned(), event.version.to_string().into_bytes());
    headers.insert("global_position".to_owned(), event.global_position.to_string().into_bytes());
    // The record timestamp has milliseconds; consumers rebuilding the event
    // need the stored microseconds.
    let micros = event.created_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    headers.insert("created_at_us".to_owned(), micros.to_string().into_bytes());
    if let Some(id) = &event.metadata.correlation_id {
        headers.insert("correlation_id".to_owned(), id.clone().into_bytes());
    }
    if let Some(id) = &event.metadata.causation_id {
        headers.insert("causation_id".to_owned(), id.clone().into_bytes());
    }
    if let Some(parent) = traceparent(event) {
        headers.insert("traceparent".to_owned(), parent.into_bytes());
    }
    let timestamp = chrono::DateTime::<chrono::Utc>::from(event.created_at);
    Record { key: Some(event.stream_id.clone().into_bytes()), value: Some(value), headers, timestamp }
}

/// What a relay has sent since it was made (see [`Relay::stats`]).
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches acknowledged: one produce request per partition each.
    pub batches: AtomicU64,
    /// Events acknowledged.
    pub events: AtomicU64,
    /// Produce requests (one per partition of a batch) that the broker
    /// refused or did not answer in time: their batch is sent again, the
    /// checkpoint did not move.
    pub failed_produces: AtomicU64,
}

/// See the crate documentation. Clones share the broker connection and
/// the stats: the supervisor runs a clone again after a failure.
#[derive(Clone)]
pub struct Relay {
    database: Database,
    log: Arc<dyn EventLog>,
    encoder: Arc<dyn ValueEncoder>,
    config: Config,
    kafka: Arc<tokio::sync::Mutex<Option<Kafka>>>,
    stats: Arc<Stats>,
    /// Since when the steps fail (for the log line of the recovery).
    outage: Outage,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay from `log` to the brokers of `config`, keeping its checkpoint
    /// in `database` (which holds the migrations). A checkpoint lost in a
    /// server crash only makes the relay send that batch again (consumers
    /// drop what they applied): `database` may be one whose sessions do not
    /// wait for the WAL flush. Connections are made when needed.
    pub async fn new(
        database: Database,
        log: Arc<dyn EventLog>,
        encoder: Arc<dyn ValueEncoder>,
        config: Config,
    ) -> Result<Self> {
        Ok(Self {
            database,
            log,
            encoder,
            config,
            kafka: Arc::default(),
            stats: Arc::default(),
            outage: Outage::default(),
        })
    }

    /// What this relay has sent, readable while it runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms.max(1))
    }

    /// Every event up to here is on the broker.
    pub async fn position(&self) -> Result<u64> {
        let client = self.database.get().await?;
        let row = client
            .query_opt("SELECT position FROM bus.relay_checkpoints WHERE name = $1", &[&self.config.name])
            .await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn connect(&self) -> Result<Kafka> {
        let max_backoff = Duration::from_millis(self.config.max_backoff_ms);
        Kafka::connect(&self.config.brokers, &self.config.tls_config, self.timeout(), max_backoff)
            .await
            .map_err(from_bus)
    }

    /// Relays at most one batch. Returns how many events it sent; 0 means
    /// caught up with what was visible.
    pub async fn step(&self) -> Result<usize> {
        let position = self.position().await?;
        let read =
            AllRead { after: position, max_count: self.config.batch_size.max(1), filter: EventFilter::default() };
        let slice = self.log.read_all(read).await?;
        if slice.events.is_empty() {
            if slice.next_position > position {
                self.save(slice.next_position, 0).await?;
            }
            return Ok(0);
        }
        let mut kafka = self.kafka.lock().await;
        if kafka.is_none() {
            *kafka = Some(self.connect().await?);
        }
        let result = self.send(kafka.as_mut().expect("connected"), &slice.events).await;
        if result.is_err() {
            // A fresh connection next time: a broker that hung or went away
            // leaves the old one in an unknown state.
            *kafka = None;
        }
        drop(kafka);
        result?;
        // Failpoint `relay::after_ack`: the broker acknowledged every record
        // of the batch, the checkpoint is not yet committed. A crash here
        // sends the batch again (duplicates on Kafka, nothing lost); the
        // crash tests stop the relay at exactly this instant.
        eventfold_store::failpoint!("relay::after_ack");
        self.save(slice.next_position, slice.events.len() as i64).await?;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.events.fetch_add(slice.events.len() as u64, Ordering::Relaxed);
        let head = self.log.last_position().await.unwrap_or(slice.next_position);
        metrics::gauge!("eventfold_relay_position").set(slice.next_position as f64);
        metrics::gauge!("eventfold_relay_lag_positions").set(head.saturating_sub(slice.next_position) as f64);
        metrics::counter!("eventfold_relay_events_total").increment(slice.events.len() as u64);
        Ok(slice.events.len())
    }

    /// Encodes and produces `events`; Ok once the broker acknowledged all.
    async fn send(&self, kafka: &mut Kafka, events: &[RecordedEvent]) -> Result<()> {
        let mut batches: BTreeMap<(String, i32), Vec<Record>> = BTreeMap::new();
        for event in events {
            // The event's publication, in the event's own trace: the record
            // carries this span's context, so consumers continue the trace.
            let span = tracing::info_span!(
                "relay.publish",
                otel.name = "publish",
                otel.kind = "producer",
                messaging.system = "kafka",
                position = event.global_position,
                event_type = %event.event_type,
            );
            eventfold_platform::trace::set_parent(&span, traceparent(event).as_deref(), None);
            let topic = self.encoder.topic(event);
            let (topic, mut record) = match self.encoder.encode(&topic, event).await {
                Ok(value) => (topic, record(event, value)),
                Err(EncodeError::Unavailable(why)) => {
                    return Err(Error::Encoder(format!("cannot encode {}: {why}", event.event_type)));
                }
                Err(EncodeError::Unencodable(error)) => {
                    tracing::error!(
                        position = event.global_position,
                        event_type = %event.event_type,
                        %error,
                        "event cannot be encoded; sent to {UNENCODABLE_TOPIC}"
                    );
                    metrics::counter!("eventfold_relay_unencodable_total").increment(1);
                    let mut r = record(event, event.data.to_string().into_bytes());
                    r.headers.insert("error".to_owned(), error.into_bytes());
                    r.headers.insert("origin_topic".to_owned(), topic.into_bytes());
                    (UNENCODABLE_TOPIC.to_owned(), r)
                }
            };
            if let Some(parent) = eventfold_platform::trace::traceparent_of(&span) {
                record.headers.insert(eventfold_platform::trace::TRACEPARENT.to_owned(), parent.into_bytes());
            }
            let (count, replication) = (self.config.partitions, self.config.replication_factor);
            let partitions = kafka.ensure_topic(&topic, count, replication, self.timeout()).await.map_err(from_bus)?;
            let partition = partition_for(event.stream_id.as_bytes(), partitions);
            batches.entry((topic, partition)).or_default().push(record);
        }
        let mut sends = Vec::new();
        for ((topic, partition), records) in batches {
            let client = kafka.partition(&topic, partition, self.timeout()).await.map_err(from_bus)?;
            let timeout = self.timeout();
            let stats = self.stats.clone();
            sends.push(async move {
                let n = records.len();
                let started = std::time::Instant::now();
                let result =
                    match tokio::time::timeout(timeout, client.produce(records, Compression::NoCompression)).await {
                        Ok(Ok(offsets)) if offsets.len() == n => Ok(()),
                        Ok(Ok(offsets)) => Err(Error::Broker(format!(
                            "{topic}/{partition}: {} of {n} records acknowledged",
                            offsets.len()
                        ))),
                        Ok(Err(e)) => Err(Error::Broker(format!("{topic}/{partition}: {e}"))),
                        Err(_) => Err(Error::Broker(format!("{topic}/{partition}: produce timed out"))),
                    };
                metrics::histogram!("eventfold_relay_produce_seconds").record(started.elapsed());
                if result.is_err() {
                    stats.failed_produces.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("eventfold_kafka_errors_total", "client" => "relay", "operation" => "produce")
                        .increment(1);
                }
                result
            });
        }
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }

    async fn save(&self, position: u64, produced: i64) -> Result<()> {
        let client = self.database.get().await?;
        client
            .execute(
                "INSERT INTO bus.relay_checkpoints (name, position, produced) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, \
                    produced = bus.relay_checkpoints.produced + EXCLUDED.produced, updated_at = clock_timestamp()",
                &[&self.config.name, &(position as i64), &produced],
            )
            .await?;
        Ok(())
    }

    /// Relays until `token` is cancelled (then `Ok`). A failed step (the
    /// broker, the registry or the database away) ends the run with its
    /// error: the supervisor runs the relay again after a pause
    /// ([`Config::backoff`]), from the checkpoint. A step cut short by the
    /// cancellation moves no checkpoint (its batch is sent again).
    pub async fn run(self, token: CancellationToken) -> Result<()> {
        let mut wake = self.log.appended();
        // Exported at zero until a produce fails (alerts see the series).
        metrics::counter!("eventfold_kafka_errors_total", "client" => "relay", "operation" => "produce").increment(0);
        while !token.is_cancelled() {
            let step = tokio::select! {
                step = self.step() => step,
                () = token.cancelled() => break,
            };
            let sent = step.inspect_err(|_| self.outage.failed())?;
            if let Some(after) = self.outage.recovered() {
                tracing::info!(?after, "relay recovered");
            }
            if sent == 0 {
                tokio::select! {
                    _ = wake.changed() => {
                        tokio::time::sleep(Duration::from_millis(self.config.linger_ms)).await;
                    }
                    () = tokio::time::sleep(Duration::from_millis(self.config.idle_poll_ms)) => {}
                    () = token.cancelled() => {}
                }
            }
        }
        Ok(())
    }
}

/// A relay's checkpoint, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The relay (`relay.name`).
    pub name: String,
    /// Every event up to this global position is on Kafka.
    pub position: u64,
    /// When it last moved.
    pub updated_at: std::time::SystemTime,
}

/// Every relay's checkpoint in `database`, by name.
pub async fn checkpoints(database: &Database) -> Result<Vec<Checkpoint>> {
    let rows = database
        .get()
        .await?
        .query("SELECT name, position, updated_at FROM bus.relay_checkpoints ORDER BY name", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Checkpoint {
            name: r.get(0),
            position: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            updated_at: r.get(2),
        })
        .collect())
}

/// Describes the relay's metrics (the `# HELP` lines of `/metrics`).
pub fn describe_metrics() {
    metrics::describe_gauge!("eventfold_relay_position", "Global position relayed up to");
    metrics::describe_gauge!("eventfold_relay_lag_positions", "Positions of the log not relayed yet");
    metrics::describe_counter!("eventfold_relay_events_total", "Events produced to Kafka");
    metrics::describe_counter!("eventfold_relay_unencodable_total", "Events that could not be encoded in Avro");
    metrics::describe_histogram!("eventfold_relay_produce_seconds", "Latency of produce requests, in seconds");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's own test vectors for Utils.murmur2.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58_897_971);
        assert_eq!(murmur2(b"abc"), 479_470_107);
        for key in [&b"order-1"[..], b"", b"x"] {
            assert!((0..3).contains(&partition_for(key, 3)));
        }
    }

    #[test]
    fn traceparent_comes_from_the_metadata_only() {
        let mut event = RecordedEvent {
            event_id: "0190a6a2-7c4e-7c1d-9a4b-0123456789ab".parse().unwrap(),
            stream_id: "order-1".into(),
            version: 0,
            global_position: 1,
            event_type: "OrderCreated".into(),
            schema_version: 2,
            data: serde_json::json!({}),
            metadata: eventfold_store::EventMetadata::default(),
            created_at: std::time::SystemTime::UNIX_EPOCH,
            hash: [0; 32],
        };
        assert_eq!(traceparent(&event), None, "none recorded");
        event.metadata.correlation_id = Some("4bf92f35-77b3-4da6-a3ce-929d0e0e4736".into());
        assert_eq!(traceparent(&event), None, "never made up from the correlation id");
        event.metadata.custom.insert("traceparent".into(), "00-abc-def-01".into());
        assert_eq!(traceparent(&event).unwrap(), "00-abc-def-01");
        let r = record(&event, b"v".to_vec());
        assert_eq!(r.key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(r.headers["event_type"], b"OrderCreated");
        assert_eq!(r.headers["global_position"], b"1");
    }
}
