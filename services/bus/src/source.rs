//! [`KafkaSource`]: the events of the relay's topics as an
//! [`EventSource`], for projections (and sagas) fed from Kafka instead of
//! the store's log.
//!
//! A pull locks and reads the consumer's offsets of every partition in the
//! consumer's transaction, fetches from there, decodes each record (the
//! writer's schema by the id in the Confluent frame, from the registry,
//! cached; resolved to the catalog's schema of the event) back into the
//! stored event, and drops what the consumer already applied: the relay
//! delivers at least once, so a stream version at or below the last one
//! applied (`bus.consumer_streams`) is a duplicate. A record that cannot be
//! decoded goes to the dead-letter topic. The ack stores the offsets and
//! the stream versions in the same transaction.
//!
//! The consumer's checkpoint (every event up to it applied, what
//! read-your-writes waits on) moves per pull to the lowest of: the relay's
//! checkpoint as read before the fetches (for the partitions read to their
//! end) and, for each partition that is not, the highest position applied
//! from it (see [`KafkaSource::ack`]'s comment).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use eventfold_schemas::{Catalog, Registry, Schema};
use eventfold_store::{
    EventMetadata, EventSource, Pulled, RecordedEvent, SourceError, bigint, from_bigint, source::Cursor,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_postgres::Transaction;

use crate::{
    ConsumerConfig, Message,
    dead_letters::send_dead_letter,
    kafka::{Kafka, connected},
    offsets,
};

/// Settings of a Kafka source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSourceConfig {
    pub consumer: ConsumerConfig,
    /// Topics to read; default: every event topic of the catalog.
    pub topics: Vec<String>,
    /// The relay whose checkpoint marks what is on the broker.
    pub relay: String,
    /// How often an idle consumer looks for new records.
    pub poll_ms: u64,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            consumer: ConsumerConfig { fetch_wait_ms: 1, ..ConsumerConfig::default() },
            topics: eventfold_schemas::CATEGORIES.iter().map(|c| c.topic.to_owned()).collect(),
            relay: "relay".to_owned(),
            poll_ms: 20,
        }
    }
}

/// One partition's part of a pull.
#[derive(Debug)]
struct Fetched {
    topic: String,
    partition: i32,
    /// Offset → index of its event in the pull (None: skipped, i.e. a
    /// duplicate or a dead letter).
    records: Vec<(i64, Option<usize>)>,
    /// The offset the pull read from.
    start: i64,
    /// The next offset once every record is acknowledged.
    end: i64,
    /// Whether `end` is the partition's high watermark.
    caught_up: bool,
}

#[derive(Debug)]
struct Progress {
    fetched: Vec<Fetched>,
    relay_position: u64,
}

/// Turns the relay's records back into stored events: the writer's schema
/// by the id in the Confluent frame (from the registry, cached), resolved
/// to the catalog's schema of the event; the rest from the key and headers.
pub struct Decoder {
    catalog: Catalog,
    registry: Registry,
    writers: Mutex<HashMap<u32, Arc<Schema>>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("registry", &self.registry.url()).finish_non_exhaustive()
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    pub reason: String,
    /// Worth another attempt (the registry is away); otherwise the record
    /// itself is at fault (not in the wire format, an id the registry does
    /// not know, a body that does not match its schema).
    pub retriable: bool,
}

fn undecodable(reason: impl Into<String>) -> DecodeError {
    DecodeError { reason: reason.into(), retriable: false }
}

impl Decoder {
    pub fn new(catalog: Catalog, registry: Registry) -> Self {
        Self { catalog, registry, writers: Mutex::default() }
    }

    /// The writer's schema of registry id `id`. The registry being away is
    /// worth a retry; an id it does not know (40403) or a schema that does
    /// not parse is not.
    async fn writer(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        if let Some(schema) = self.writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id) {
            return Ok(schema.clone());
        }
        let text = self.registry.schema_by_id(id).await.map_err(|e| DecodeError {
            reason: format!("schema id {id}: {e}"),
            retriable: !matches!(e.registry_code(), Some(40403 | 404)),
        })?;
        let schema = Arc::new(Schema::parse_str(&text).map_err(|e| undecodable(format!("schema {id}: {e}")))?);
        self.writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, schema.clone());
        Ok(schema)
    }

    /// The stored event a record carries.
    pub async fn decode(&self, message: &Message) -> Result<RecordedEvent, DecodeError> {
        let header = |name: &str| message.header(name).ok_or_else(|| undecodable(format!("no {name} header")));
        let number = |name: &str| -> Result<u64, DecodeError> {
            header(name)?.parse().map_err(|_| undecodable(format!("header {name} is not a number")))
        };
        let event_type = header("event_type")?.to_owned();
        let schema_version =
            u32::try_from(number("schema_version")?).map_err(|_| undecodable("schema_version out of range"))?;
        let stream_id = message
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| undecodable("no UTF-8 key (stream id)"))?
            .to_owned();
        let event_id = header("event_id")?.parse().map_err(|_| undecodable("event_id is not a UUID"))?;
        let value = message.value.as_deref().ok_or_else(|| undecodable("no value"))?;
        let (id, body) = eventfold_schemas::unwire(value).map_err(|e| undecodable(e.to_string()))?;
        let writer = self.writer(id).await?;
        let data = self
            .catalog
            .decode_written_with(&event_type, schema_version, &writer, body)
            .map_err(|e| undecodable(e.to_string()))?;
        let created_at = match message.header("created_at_us").and_then(|m| m.parse::<u64>().ok()) {
            Some(micros) => UNIX_EPOCH + Duration::from_micros(micros),
            None => SystemTime::from(message.timestamp),
        };
        let metadata = EventMetadata {
            correlation_id: message.header("correlation_id").map(str::to_owned),
            causation_id: message.header("causation_id").map(str::to_owned),
            ..EventMetadata::default()
        };
        Ok(RecordedEvent {
            event_id,
            stream_id,
            version: number("stream_version")?,
            global_position: number("global_position")?,
            event_type,
            schema_version,
            data,
            metadata,
            created_at,
            hash: [0; 32],
        })
    }
}

/// See the module documentation.
pub struct KafkaSource {
    config: KafkaSourceConfig,
    decoder: Decoder,
    kafka: tokio::sync::Mutex<Option<Kafka>>,
    /// The partitions of the configured topics, once all exist (see
    /// [`KafkaSource::partitions`]).
    listing: Mutex<Option<(Instant, Partitions)>>,
    tick: watch::Receiver<u64>,
}

/// (topic, partition) pairs.
type Partitions = Vec<(String, i32)>;

/// How long a complete list of the configured topics' partitions is kept.
const LISTING_TTL: Duration = Duration::from_secs(30);

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").field("config", &self.config).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> SourceError {
    SourceError::Unavailable(e.to_string())
}

impl KafkaSource {
    /// A source over the brokers and the registry (`registry`).
    pub fn new(config: KafkaSourceConfig, catalog: Catalog, registry: Registry) -> Arc<Self> {
        let (tx, tick) = watch::channel(0u64);
        let poll = Duration::from_millis(config.poll_ms.max(1));
        let source = Arc::new(Self {
            config,
            decoder: Decoder::new(catalog, registry),
            kafka: tokio::sync::Mutex::new(None),
            listing: Mutex::default(),
            tick,
        });
        let weak = Arc::downgrade(&source);
        tokio::spawn(async move {
            let mut n = 0;
            while weak.strong_count() > 0 {
                tokio::time::sleep(poll).await;
                n += 1;
                if tx.send(n).is_err() {
                    return;
                }
            }
        });
        source
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.consumer.request_timeout_ms.max(1))
    }

    /// The partitions of the configured topics that exist. Listed again on
    /// each pull until every configured topic exists: the list is read
    /// after the relay's checkpoint, so it holds every topic with an event
    /// up to that checkpoint (the relay creates a topic before producing to
    /// it). Once all exist that cannot change, and the list is kept for
    /// [`LISTING_TTL`] (more partitions for a topic take a restart of the
    /// relay, which keeps its partition counts, anyway).
    async fn partitions(&self, kafka: &mut Kafka) -> Result<Partitions, SourceError> {
        if let Some((at, partitions)) = &*self.listing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            && at.elapsed() < LISTING_TTL
        {
            return Ok(partitions.clone());
        }
        let listed = tokio::time::timeout(self.timeout(), kafka.client.list_topics())
            .await
            .map_err(|_| unavailable("list_topics timed out"))?
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for topic in &self.config.topics {
            if let Some(t) = listed.iter().find(|t| &t.name == topic) {
                // A set: already in order.
                out.extend(t.partitions.iter().map(|p| (topic.clone(), *p)));
            }
        }
        let complete = self.config.topics.iter().all(|topic| listed.iter().any(|t| &t.name == topic));
        if complete {
            *self.listing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((Instant::now(), out.clone()));
        }
        Ok(out)
    }

    /// The records of one partition from `next`, at most `max`, fetching
    /// again while the broker answers fewer than there are: (next, records,
    /// whether they reach the high watermark).
    /// `eventfold_consumer_lag_messages{consumer, topic, partition}` is
    /// set to what remains on the partition after the records taken.
    async fn fetch_partition(
        &self,
        consumer: &str,
        (topic, partition): (&str, i32),
        client: Arc<rskafka::client::partition::PartitionClient>,
        next: i64,
        max: usize,
    ) -> Result<(i64, Vec<rskafka::record::RecordAndOffset>, bool), SourceError> {
        let mut out = Vec::new();
        let mut end = next;
        loop {
            let fetch = client.fetch_records(
                end,
                1..self.config.consumer.fetch_max_bytes.max(1),
                self.config.consumer.fetch_wait_ms.max(1),
            );
            let fetched = match tokio::time::timeout(self.timeout(), fetch).await {
                Ok(Ok(fetched)) => Ok(fetched),
                Ok(Err(e)) => Err(unavailable(format!("{topic}/{partition}: {e}"))),
                Err(_) => Err(unavailable(format!("{topic}/{partition}: fetch timed out"))),
            };
            if fetched.is_err() {
                metrics::counter!("eventfold_kafka_errors_total", "client" => "consumer", "operation" => "fetch")
                    .increment(1);
            }
            let (records, high_watermark) = fetched?;
            let from = end;
            let mut full = false;
            for record in records.into_iter().filter(|r| r.offset >= from) {
                if out.len() >= max {
                    full = true;
                    break;
                }
                end = record.offset + 1;
                out.push(record);
            }
            let caught_up = !full && end >= high_watermark;
            if caught_up || full || end == from {
                let labels = [
                    ("consumer", consumer.to_owned()),
                    ("topic", topic.to_owned()),
                    ("partition", partition.to_string()),
                ];
                metrics::gauge!("eventfold_consumer_lag_messages", &labels)
                    .set(high_watermark.saturating_sub(end).max(0) as f64);
                return Ok((next, out, caught_up));
            }
        }
    }

    async fn pull_inner(
        &self,
        tx: &Transaction<'_>,
        consumer: &str,
        max: usize,
        kafka: &mut Option<Kafka>,
    ) -> Result<Pulled, SourceError> {
        let relay_position: u64 = tx
            .query_opt("SELECT position FROM bus.relay_checkpoints WHERE name = $1", &[&self.config.relay])
            .await?
            .map_or(0, |r| from_bigint(r.get(0)));
        let connection = connected(kafka, &self.config.consumer).await.map_err(unavailable)?;
        let partitions = self.partitions(connection).await?;
        let (topics, numbers): (Vec<&str>, Vec<i32>) = partitions.iter().map(|(t, p)| (t.as_str(), *p)).unzip();
        offsets::register_all(tx, consumer, &topics, &numbers).await?;
        // A second instance of this consumer keeps off the partitions until
        // this batch commits.
        offsets::lock_offsets(tx, consumer, None).await?;
        // Exported at zero until something is dead-lettered or fails.
        metrics::counter!("eventfold_consumer_dead_letters_total", "consumer" => consumer.to_owned()).increment(0);
        metrics::counter!("eventfold_kafka_errors_total", "client" => "consumer", "operation" => "fetch").increment(0);
        let next_offsets = offsets::next_offsets(tx, consumer).await?;
        let mut clients = Vec::with_capacity(partitions.len());
        for (topic, partition) in &partitions {
            clients.push(connection.partition(topic, *partition, self.timeout()).await.map_err(unavailable)?);
        }
        // Every partition at once: a pull takes one round trip, not one per
        // partition.
        let fetches = partitions.iter().zip(clients).map(|((topic, partition), client)| {
            let next = next_offsets.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
            self.fetch_partition(consumer, (topic, *partition), client, next, max.max(1))
        });
        let answers = futures_util::future::try_join_all(fetches).await?;
        let mut fetched = Vec::new();
        // (global position, partition index, record index, event)
        let mut decoded: Vec<(u64, usize, usize, RecordedEvent)> = Vec::new();
        for ((topic, partition), (next, records, caught_up)) in partitions.into_iter().zip(answers) {
            let index = fetched.len();
            let mut part =
                Fetched { topic: topic.clone(), partition, records: Vec::new(), start: next, end: next, caught_up };
            for record in records {
                let offset = record.offset;
                let message = Message::of_record(&topic, partition, offset, record.record);
                // The message's receipt, in the trace the relay put on it;
                // what the event causes here (its projection) follows it.
                let span = tracing::info_span!(
                    "kafka.consume",
                    otel.name = %format_args!("consume {topic}"),
                    otel.kind = "consumer",
                    messaging.system = "kafka",
                    consumer,
                    partition,
                    offset,
                );
                eventfold_platform::trace::set_parent(
                    &span,
                    message.header(eventfold_platform::trace::TRACEPARENT),
                    None,
                );
                match self.decoder.decode(&message).await {
                    Ok(mut event) => {
                        if let Some(parent) = eventfold_platform::trace::traceparent_of(&span) {
                            event.metadata.custom.insert(eventfold_platform::trace::TRACEPARENT.to_owned(), parent);
                        }
                        decoded.push((event.global_position, index, part.records.len(), event));
                        part.records.push((offset, Some(usize::MAX)));
                    }
                    Err(e) if e.retriable => return Err(unavailable(e.reason)),
                    Err(e) => {
                        send_dead_letter(kafka, &self.config.consumer, consumer, &message, &e.reason, 1)
                            .await
                            .map_err(unavailable)?;
                        part.records.push((offset, None));
                    }
                }
                part.end = offset + 1;
            }
            fetched.push(part);
        }
        // Drop what the consumer applied before (at-least-once delivery).
        let streams: Vec<String> = decoded.iter().map(|d| d.3.stream_id.clone()).collect();
        let mut applied = offsets::applied_versions(tx, consumer, &streams).await?;
        decoded.sort_by_key(|d| d.0);
        let mut events = Vec::new();
        for (_, part, record, event) in decoded {
            let seen = applied.get(&event.stream_id).copied().unwrap_or(-1);
            if bigint(event.version) <= seen {
                fetched[part].records[record].1 = None;
                continue;
            }
            applied.insert(event.stream_id.clone(), bigint(event.version));
            fetched[part].records[record].1 = Some(events.len());
            events.push(event);
        }
        let skipped = fetched.iter().map(|f| f.records.iter().filter(|(_, i)| i.is_none()).count()).sum();
        Ok(Pulled { events, skipped, progress: Box::new(Progress { fetched, relay_position }) })
    }
}

#[async_trait::async_trait]
impl EventSource for KafkaSource {
    async fn pull(&self, at: Cursor<'_>, max: usize) -> Result<Pulled, SourceError> {
        let mut kafka = self.kafka.lock().await;
        let result = self.pull_inner(at.tx, at.consumer, max, &mut kafka).await;
        if result.is_err() {
            // A fresh connection (and listing) next time.
            *kafka = None;
            *self.listing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        result
    }

    async fn ack(&self, at: Cursor<'_>, pulled: &Pulled, applied: usize) -> Result<u64, SourceError> {
        let Cursor { tx, consumer, position } = at;
        let Some(progress) = pulled.progress.downcast_ref::<Progress>() else {
            return Err(unavailable("a pull of another source"));
        };
        // The new checkpoint: every event up to it applied. Events up to the
        // relay's checkpoint were all on the broker before the fetches, so a
        // partition read to its end holds none unapplied. In a partition
        // that is not, first deliveries come in position order (the relay
        // reads gap-safely and sends in order; a re-send only repeats), so
        // every event up to the highest position applied from it is
        // applied; one that applied nothing here holds the checkpoint.
        let mut bound = Some(progress.relay_position);
        // (topic, partition, next offset) of the partitions that moved.
        let mut moved = Vec::new();
        for part in &progress.fetched {
            // Up to the first record whose event was not applied.
            let next = part
                .records
                .iter()
                .find(|(_, index)| index.is_some_and(|i| i >= applied))
                .map_or(part.end, |(offset, _)| *offset);
            if !(part.caught_up && next == part.end) {
                let highest = part
                    .records
                    .iter()
                    .filter_map(|(_, index)| index.filter(|i| *i < applied))
                    .map(|i| pulled.events[i].global_position)
                    .max();
                bound = match (bound, highest) {
                    (Some(b), Some(h)) => Some(b.min(h)),
                    _ => None,
                };
            }
            if next != part.start {
                moved.push((part.topic.as_str(), part.partition, next));
            }
        }
        if !moved.is_empty() {
            offsets::advance_all(tx, consumer, &moved).await?;
        }
        let mut versions: BTreeMap<&str, i64> = BTreeMap::new();
        for event in &pulled.events[..applied.min(pulled.events.len())] {
            let v = versions.entry(event.stream_id.as_str()).or_insert(-1);
            *v = (*v).max(bigint(event.version));
        }
        if !versions.is_empty() {
            let (streams, versions): (Vec<&str>, Vec<i64>) = versions.into_iter().unzip();
            offsets::raise_versions(tx, consumer, &streams, &versions).await?;
        }
        Ok(bound.map_or(position, |b| position.max(b)))
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.tick.clone()
    }
}
