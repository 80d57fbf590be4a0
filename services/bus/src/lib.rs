//! Kafka consumption for eventfold on rskafka, which has no consumer
//! groups: a [`Consumer`] owns a configured set of partitions and keeps its
//! offsets in PostgreSQL (`bus.consumer_offsets`), committed in the same
//! transaction as whatever its [`MessageHandler`] writes. A crash therefore
//! neither loses nor double-applies a message's effect. The relay delivers
//! at least once, so the same event may also come again at a later offset:
//! the consumer remembers the event ids it handled (`bus.consumer_events`,
//! in the same transaction, for `dedupe_retention_hours`) and drops those.
//!
//! A message that keeps failing is sent to the dead-letter topic
//! `<topic>.dlq`, with headers saying why and where it came from, and the
//! consumer moves on. [`dead_letters`] lists them and [`replay`] applies
//! them again through a handler, once each, after a fix.

mod source;

pub use crate::source::{DecodeError, Decoder, KafkaSource, KafkaSourceConfig};

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bb8::Pool;
use bb8_postgres::PostgresConnectionManager;
use rskafka::{
    client::{
        Client, ClientBuilder,
        partition::{Compression, PartitionClient, UnknownTopicHandling},
    },
    record::Record,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_postgres::{NoTls, Transaction};

/// The suffix of dead-letter topics.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Header names of a dead letter.
pub mod headers {
    pub const ERROR: &str = "dlq.error";
    pub const TOPIC: &str = "dlq.origin.topic";
    pub const PARTITION: &str = "dlq.origin.partition";
    pub const OFFSET: &str = "dlq.origin.offset";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const CONSUMER: &str = "dlq.consumer";
}

/// Settings of a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Attempts of a message before it is dead-lettered.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubled for each further one.
    pub retry_backoff_ms: u64,
    /// Most bytes per fetch.
    pub fetch_max_bytes: i32,
    /// How long the broker may hold a fetch that finds nothing (≥ 1).
    pub fetch_wait_ms: i32,
    /// Longest wait for one broker request before it counts as failed.
    pub request_timeout_ms: u64,
    /// Longest pause between retries while the broker or database is away.
    pub max_backoff_ms: u64,
    /// How long a generic consumer remembers the event ids it handled, to
    /// drop an event the relay sends again (at-least-once).
    pub dedupe_retention_hours: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            max_attempts: 3,
            retry_backoff_ms: 10,
            fetch_max_bytes: 1 << 20,
            fetch_wait_ms: 100,
            request_timeout_ms: 10_000,
            max_backoff_ms: 5_000,
            dedupe_retention_hours: 7 * 24,
        }
    }
}

/// One Kafka message as a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, Vec<u8>>,
    pub timestamp: chrono::DateTime<chrono::Utc>,
}

impl Message {
    /// A header as text, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The id of the event the message carries (its `event_id` header, as
    /// the relay writes it), if it has one.
    pub fn event_id(&self) -> Option<uuid::Uuid> {
        self.header("event_id").and_then(|id| id.parse().ok())
    }
}

/// Why a handler could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The message cannot be applied (undecodable, does not fit).
    #[error("{0}")]
    Message(String),
}

/// What a consumer does with each message, inside its transaction (the
/// consumer's offset is stored in the same one).
#[async_trait::async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    async fn handle(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError>;
}

/// Errors of consuming.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("broker: {0}")]
    Broker(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn broker(e: impl std::fmt::Display) -> Error {
    Error::Broker(e.to_string())
}

/// A connection to the brokers, with the partition clients and the topic
/// sizes it has looked up: what the relay and the consumers share.
pub struct Kafka {
    pub(crate) client: Client,
    partitions: BTreeMap<(String, i32), Arc<PartitionClient>>,
    topics: BTreeMap<String, i32>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka").field("topics", &self.topics).finish_non_exhaustive()
    }
}

pub(crate) async fn connect_kafka(config: &ConsumerConfig) -> Result<Kafka> {
    Kafka::connect(
        &config.brokers,
        Duration::from_millis(config.request_timeout_ms.max(1)),
        Duration::from_millis(config.max_backoff_ms),
    )
    .await
}

impl Kafka {
    /// Connects to `brokers`. Every broker call of rskafka retries with
    /// exponential backoff (up to `max_backoff`) until `timeout`.
    pub async fn connect(brokers: &[String], timeout: Duration, max_backoff: Duration) -> Result<Kafka> {
        let backoff = rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: max_backoff.max(Duration::from_millis(50)),
            base: 2.0,
            deadline: Some(timeout),
        };
        let build = ClientBuilder::new(brokers.to_vec()).backoff_config(backoff).build();
        let client = tokio::time::timeout(timeout, build)
            .await
            .map_err(|_| Error::Broker("no connection to the brokers".to_owned()))?
            .map_err(broker)?;
        Ok(Kafka { client, partitions: BTreeMap::new(), topics: BTreeMap::new() })
    }

    /// The client of `topic`/`partition` (looked up once).
    pub async fn partition(&mut self, topic: &str, partition: i32, timeout: Duration) -> Result<Arc<PartitionClient>> {
        let key = (topic.to_owned(), partition);
        if let Some(client) = self.partitions.get(&key) {
            return Ok(client.clone());
        }
        let client =
            tokio::time::timeout(timeout, self.client.partition_client(topic, partition, UnknownTopicHandling::Retry))
                .await
                .map_err(|_| Error::Broker(format!("no leader for {topic}/{partition}")))?
                .map_err(broker)?;
        let client = Arc::new(client);
        self.partitions.insert(key, client.clone());
        Ok(client)
    }

    /// Creates `topic` with `partitions` unless it exists (someone else
    /// creating it meanwhile is fine); its partition count, looked up once.
    pub async fn ensure_topic(
        &mut self,
        topic: &str,
        partitions: i32,
        replication_factor: i16,
        timeout: Duration,
    ) -> Result<i32> {
        if let Some(n) = self.topics.get(topic) {
            return Ok(*n);
        }
        let count_of = |listed: &[rskafka::topic::Topic]| {
            listed.iter().find(|t| t.name == topic).map(|t| t.partitions.len() as i32)
        };
        let listed = tokio::time::timeout(timeout, self.client.list_topics())
            .await
            .map_err(|_| Error::Broker("list_topics timed out".to_owned()))?
            .map_err(broker)?;
        let count = match count_of(&listed) {
            Some(count) => count,
            None => {
                let controller = self.client.controller_client().map_err(broker)?;
                let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
                let create = controller.create_topic(topic, partitions.max(1), replication_factor.max(1), ms);
                match tokio::time::timeout(timeout, create).await {
                    Ok(Ok(())) => tracing::info!(topic, partitions, "topic created"),
                    // Created meanwhile by someone else: counted below.
                    Ok(Err(e)) => tracing::debug!(topic, error = %e, "create_topic"),
                    Err(_) => return Err(Error::Broker(format!("creating {topic} timed out"))),
                }
                let listed = self.client.list_topics().await.map_err(broker)?;
                count_of(&listed)
                    .ok_or_else(|| Error::Broker(format!("topic {topic} does not exist after creating it")))?
            }
        };
        if count < 1 {
            return Err(Error::Broker(format!("topic {topic} has no partitions")));
        }
        self.topics.insert(topic.to_owned(), count);
        Ok(count)
    }
}

pub(crate) fn message(topic: &str, partition: i32, offset: i64, record: Record) -> Message {
    Message {
        topic: topic.to_owned(),
        partition,
        offset,
        key: record.key,
        value: record.value,
        headers: record.headers,
        timestamp: record.timestamp,
    }
}

/// Reads its partitions and applies each message once (see the crate
/// documentation).
pub struct Consumer {
    name: String,
    assignments: Vec<(String, i32)>,
    config: ConsumerConfig,
    pool: Pool<PostgresConnectionManager<NoTls>>,
    handler: Arc<dyn MessageHandler>,
    kafka: tokio::sync::Mutex<Option<Kafka>>,
    /// When the handled event ids past their retention were last deleted.
    pruned: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("name", &self.name).field("assignments", &self.assignments).finish()
    }
}

impl Consumer {
    /// Consumer `name` of `assignments` (topic, partition), with offsets in
    /// the database of `database_url` (which holds the migrations).
    pub async fn new(
        name: impl Into<String>,
        assignments: Vec<(String, i32)>,
        database_url: &str,
        handler: Arc<dyn MessageHandler>,
        config: ConsumerConfig,
    ) -> Result<Self> {
        let pg: tokio_postgres::Config = database_url.parse()?;
        let pool = Pool::builder()
            .max_size(2)
            .connection_timeout(Duration::from_secs(5))
            .build(PostgresConnectionManager::new(pg, NoTls))
            .await
            .map_err(|e| Error::Pool(e.to_string()))?;
        Ok(Self {
            name: name.into(),
            assignments,
            config,
            pool,
            handler,
            kafka: tokio::sync::Mutex::new(None),
            pruned: std::sync::Mutex::new(None),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms.max(1))
    }

    /// The next offset to read of `topic`/`partition`.
    pub async fn offset(&self, topic: &str, partition: i32) -> Result<i64> {
        let client = self.pool.get().await.map_err(|e| Error::Pool(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT next_offset FROM bus.consumer_offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
                &[&self.name, &topic, &partition],
            )
            .await?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// One fetch and its messages for every assigned partition. Returns
    /// how many messages it applied or dead-lettered.
    pub async fn step(&self) -> Result<usize> {
        self.prune().await?;
        let mut total = 0;
        for (topic, partition) in &self.assignments {
            match self.step_partition(topic, *partition).await {
                Ok(n) => total += n,
                Err(e) => {
                    // A fresh connection next time.
                    *self.kafka.lock().await = None;
                    return Err(e);
                }
            }
        }
        Ok(total)
    }

    /// Deletes the handled event ids past their retention, at most every
    /// ten minutes.
    async fn prune(&self) -> Result<()> {
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pruned.is_some_and(|at| at.elapsed() < Duration::from_secs(600)) {
                return Ok(());
            }
            *pruned = Some(Instant::now());
        }
        let client = self.pool.get().await.map_err(|e| Error::Pool(e.to_string()))?;
        let hours = i32::try_from(self.config.dedupe_retention_hours).unwrap_or(i32::MAX);
        client
            .execute(
                "DELETE FROM bus.consumer_events \
                  WHERE consumer = $1 AND seen_at < clock_timestamp() - make_interval(hours => $2)",
                &[&self.name, &hours],
            )
            .await?;
        Ok(())
    }

    async fn client(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>> {
        let mut kafka = self.kafka.lock().await;
        if kafka.is_none() {
            *kafka = Some(connect_kafka(&self.config).await?);
        }
        kafka.as_mut().expect("connected").partition(topic, partition, self.timeout()).await
    }

    async fn step_partition(&self, topic: &str, partition: i32) -> Result<usize> {
        let mut conn = self.pool.get().await.map_err(|e| Error::Pool(e.to_string()))?;
        // Before the transaction: an insert gives it a transaction id.
        conn.execute(
            "INSERT INTO bus.consumer_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, 0) \
             ON CONFLICT DO NOTHING",
            &[&self.name, &topic, &partition],
        )
        .await?;
        let tx = conn.transaction().await?;
        // A second instance of this consumer keeps off the partition until
        // this batch commits.
        lock_offsets(&tx, &self.name, Some((topic, partition))).await?;
        let next: i64 = tx
            .query_one(
                "SELECT next_offset FROM bus.consumer_offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
                &[&self.name, &topic, &partition],
            )
            .await?
            .get(0);
        let client = self.client(topic, partition).await?;
        let fetch = client.fetch_records(next, 1..self.config.fetch_max_bytes.max(1), self.config.fetch_wait_ms.max(1));
        let (records, _high_watermark) = tokio::time::timeout(self.timeout(), fetch)
            .await
            .map_err(|_| Error::Broker(format!("{topic}/{partition}: fetch timed out")))?
            .map_err(|e| Error::Broker(format!("{topic}/{partition}: {e}")))?;
        // The broker may answer from the start of a batch.
        let messages: Vec<Message> = records
            .into_iter()
            .filter(|r| r.offset >= next)
            .map(|r| message(topic, partition, r.offset, r.record))
            .collect();
        // The events handled before (a re-send of the relay) are dropped;
        // the rest are marked handled in this transaction.
        let ids: Vec<uuid::Uuid> = messages.iter().filter_map(Message::event_id).collect();
        let mut fresh: std::collections::HashSet<uuid::Uuid> = if ids.is_empty() {
            std::collections::HashSet::new()
        } else {
            tx.query(
                "INSERT INTO bus.consumer_events (consumer, event_id) SELECT $1, unnest($2::uuid[]) \
                 ON CONFLICT DO NOTHING RETURNING event_id",
                &[&self.name, &ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let mut last = None;
        let mut handled = 0;
        let mut duplicates = 0;
        for message in &messages {
            // Without an event id (another producer), offsets alone count.
            if message.event_id().is_none_or(|id| fresh.remove(&id)) {
                self.apply(&tx, message).await?;
            } else {
                duplicates += 1;
            }
            last = Some(message.offset);
            handled += 1;
        }
        if duplicates > 0 {
            metrics::counter!("eventfold_consumer_duplicates_total", "consumer" => self.name.clone())
                .increment(duplicates);
        }
        if let Some(last) = last {
            tx.execute(
                "UPDATE bus.consumer_offsets SET next_offset = $4, updated_at = clock_timestamp() \
                  WHERE consumer = $1 AND topic = $2 AND partition = $3",
                &[&self.name, &topic, &partition, &(last + 1)],
            )
            .await?;
            tx.commit().await?;
            metrics::counter!("eventfold_consumer_messages_total", "consumer" => self.name.clone())
                .increment(handled as u64);
        }
        Ok(handled)
    }

    /// One message in a savepoint, retried; dead-lettered when every
    /// attempt fails (the dead letter is on the broker before the offset
    /// moves past it).
    async fn apply(&self, tx: &Transaction<'_>, message: &Message) -> Result<()> {
        let mut pause = Duration::from_millis(self.config.retry_backoff_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            tx.batch_execute("SAVEPOINT consume_message").await?;
            match self.handler.handle(tx, message).await {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT consume_message").await?;
                    return Ok(());
                }
                Err(error) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT consume_message").await?;
                    if attempt >= self.config.max_attempts.max(1) {
                        return self.dead_letter(message, &error.to_string(), attempt).await;
                    }
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }

    async fn dead_letter(&self, message: &Message, error: &str, attempts: u32) -> Result<()> {
        let mut kafka = self.kafka.lock().await;
        send_dead_letter(&mut kafka, &self.config, &self.name, message, error, attempts).await
    }

    /// Consumes until `shutdown` turns true; failures (broker or database
    /// away) are logged and retried from the stored offsets with
    /// exponential backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let initial = Duration::from_millis(50);
        let max = Duration::from_millis(self.config.max_backoff_ms.max(50));
        let mut backoff = initial;
        let mut failing_since: Option<Instant> = None;
        while !*shutdown.borrow() {
            match self.step().await {
                Ok(n) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(consumer = %self.name, after = ?since.elapsed(), "consumer recovered");
                    }
                    backoff = initial;
                    if n == 0 {
                        // The fetches waited on the broker already; a short
                        // pause keeps an idle consumer from spinning.
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(10)) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                Err(error) => {
                    failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!(consumer = %self.name, %error, retry_in = ?backoff, "consumer failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}

/// Takes the offsets of consumer `consumer` on `partition` (a topic and
/// partition; `None`: all of the consumer's) for the transaction `tx`. An
/// advisory lock, not the rows': a row lock would give the transaction an
/// id while it waits on the broker, and the gap-safe reads of the event
/// log wait for older transaction ids to finish.
pub(crate) async fn lock_offsets(
    tx: &Transaction<'_>,
    consumer: &str,
    partition: Option<(&str, i32)>,
) -> Result<(), tokio_postgres::Error> {
    let key = partition.map_or_else(String::new, |(topic, partition)| format!("{topic}/{partition}"));
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", &[&consumer, &key]).await?;
    Ok(())
}

/// Sends `message` to its topic's dead-letter topic (created with one
/// partition if missing) with headers saying why and where it came from;
/// Ok once the broker acknowledged it.
pub(crate) async fn send_dead_letter(
    kafka: &mut Option<Kafka>,
    config: &ConsumerConfig,
    consumer: &str,
    message: &Message,
    error: &str,
    attempts: u32,
) -> Result<()> {
    tracing::warn!(
        consumer,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        %error,
        "message dead-lettered"
    );
    let timeout = Duration::from_millis(config.request_timeout_ms.max(1));
    let dlq = format!("{}{DLQ_SUFFIX}", message.topic);
    let mut headers = message.headers.clone();
    headers.insert(headers::ERROR.to_owned(), error.as_bytes().to_vec());
    headers.insert(headers::TOPIC.to_owned(), message.topic.clone().into_bytes());
    headers.insert(headers::PARTITION.to_owned(), message.partition.to_string().into_bytes());
    headers.insert(headers::OFFSET.to_owned(), message.offset.to_string().into_bytes());
    headers.insert(headers::ATTEMPTS.to_owned(), attempts.to_string().into_bytes());
    headers.insert(headers::CONSUMER.to_owned(), consumer.as_bytes().to_vec());
    let record =
        Record { key: message.key.clone(), value: message.value.clone(), headers, timestamp: chrono::Utc::now() };
    if kafka.is_none() {
        *kafka = Some(connect_kafka(config).await?);
    }
    let connected = kafka.as_mut().expect("connected");
    connected.ensure_topic(&dlq, 1, 1, timeout).await?;
    let client = connected.partition(&dlq, 0, timeout).await?;
    tokio::time::timeout(timeout, client.produce(vec![record], Compression::NoCompression))
        .await
        .map_err(|_| Error::Broker(format!("{dlq}: produce timed out")))?
        .map_err(|e| Error::Broker(format!("{dlq}: {e}")))?;
    metrics::counter!("eventfold_consumer_dead_letters_total", "consumer" => consumer.to_owned()).increment(1);
    Ok(())
}

/// A dead letter as [`dead_letters`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its offset in the dead-letter topic.
    pub offset: i64,
    pub message: Message,
    pub replayed: bool,
}

impl DeadLetter {
    pub fn error(&self) -> &str {
        self.message.header(headers::ERROR).unwrap_or_default()
    }

    pub fn origin(&self) -> (String, i32, i64) {
        let m = &self.message;
        (
            m.header(headers::TOPIC).unwrap_or_default().to_owned(),
            m.header(headers::PARTITION).and_then(|p| p.parse().ok()).unwrap_or(-1),
            m.header(headers::OFFSET).and_then(|o| o.parse().ok()).unwrap_or(-1),
        )
    }

    pub fn consumer(&self) -> &str {
        self.message.header(headers::CONSUMER).unwrap_or_default()
    }
}

/// Every dead letter of `topic` (its `.dlq` topic), once per consumer and
/// origin, with whether it was replayed, read from the start.
pub async fn dead_letters(config: &ConsumerConfig, database_url: &str, topic: &str) -> Result<Vec<DeadLetter>> {
    let dlq = if topic.ends_with(DLQ_SUFFIX) { topic.to_owned() } else { format!("{topic}{DLQ_SUFFIX}") };
    let timeout = Duration::from_millis(config.request_timeout_ms.max(1));
    let mut kafka = connect_kafka(config).await?;
    let listed = tokio::time::timeout(timeout, kafka.client.list_topics())
        .await
        .map_err(|_| Error::Broker("list_topics timed out".to_owned()))?
        .map_err(broker)?;
    if !listed.iter().any(|t| t.name == dlq) {
        return Ok(Vec::new());
    }
    let client = kafka.partition(&dlq, 0, timeout).await?;
    let (pg, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    let driver = tokio::spawn(connection);
    let origin = topic.strip_suffix(DLQ_SUFFIX).unwrap_or(topic);
    let replayed: std::collections::HashSet<(String, i32, i64)> = pg
        .query("SELECT consumer, partition, msg_offset FROM bus.dead_letters_replayed WHERE topic = $1", &[&origin])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    drop(pg);
    let _ = driver.await;
    let mut letters = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0;
    loop {
        let fetch = client.fetch_records(offset, 1..config.fetch_max_bytes.max(1), 1);
        let (records, high_watermark) = tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| Error::Broker(format!("{dlq}: fetch timed out")))?
            .map_err(broker)?;
        let mut progressed = false;
        for r in records {
            if r.offset < offset {
                continue;
            }
            offset = r.offset + 1;
            progressed = true;
            let mut letter =
                DeadLetter { offset: r.offset, replayed: false, message: message(&dlq, 0, r.offset, r.record) };
            let (_, partition, origin_offset) = letter.origin();
            let key = (letter.consumer().to_owned(), partition, origin_offset);
            // Sent twice (a crash before the offset commit): listed once.
            if seen.insert(key.clone()) {
                letter.replayed = replayed.contains(&key);
                letters.push(letter);
            }
        }
        if offset >= high_watermark || !progressed {
            break;
        }
    }
    Ok(letters)
}

/// Applies the dead letters of `topic` that consumer `consumer` sent there
/// and that were not replayed yet, through `handler`, each in its own
/// transaction with its replayed mark. Returns (applied, still failing).
pub async fn replay(
    config: &ConsumerConfig,
    database_url: &str,
    topic: &str,
    consumer: &str,
    handler: &dyn MessageHandler,
) -> Result<(usize, usize)> {
    let letters = dead_letters(config, database_url, topic).await?;
    let (mut pg, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    let driver = tokio::spawn(connection);
    let (mut applied, mut failing) = (0, 0);
    for letter in letters.iter().filter(|l| !l.replayed && l.consumer() == consumer) {
        let (origin_topic, origin_partition, origin_offset) = letter.origin();
        let original = Message {
            topic: origin_topic,
            partition: origin_partition,
            offset: origin_offset,
            ..letter.message.clone()
        };
        let tx = pg.transaction().await?;
        match handler.handle(&tx, &original).await {
            Ok(()) => {
                tx.execute(
                    "INSERT INTO bus.dead_letters_replayed (consumer, topic, partition, msg_offset) \
                     VALUES ($1, $2, $3, $4)",
                    &[&consumer, &original.topic, &original.partition, &original.offset],
                )
                .await?;
                tx.commit().await?;
                applied += 1;
            }
            Err(error) => {
                tracing::warn!(offset = letter.offset, %error, "dead letter still fails");
                failing += 1;
            }
        }
    }
    drop(pg);
    let _ = driver.await;
    Ok((applied, failing))
}
