//! The [`Consumer`]: reads its partitions, applies each message once
//! through its [`MessageHandler`] in the transaction that moves its
//! offsets, and dead-letters a message that keeps failing.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use eventfold_store::{Backoff, Database};
use rskafka::{client::partition::PartitionClient, record::Record};
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Outage, Result,
    dead_letters::send_dead_letter,
    kafka::{Kafka, connected},
    offsets,
};

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
    /// TLS to the brokers (set at run time from `[tls]`).
    #[serde(skip)]
    pub tls: crate::BrokerTls,
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
            tls: crate::BrokerTls::default(),
        }
    }
}

impl ConsumerConfig {
    /// The pauses before a failed [`Consumer::run`] runs again (the
    /// supervisor's): from 50 ms up to `max_backoff_ms`.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_millis(self.max_backoff_ms.max(50)))
    }

    /// The pauses between the attempts of one message: from
    /// `retry_backoff_ms`, doubling, up to `max_backoff_ms`.
    fn retry_backoff(&self) -> Backoff {
        let first = Duration::from_millis(self.retry_backoff_ms);
        Backoff::new(first, Duration::from_millis(self.max_backoff_ms).max(first))
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
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
    /// The message of `record` at `offset` of `topic`/`partition`.
    pub(crate) fn of_record(topic: &str, partition: i32, offset: i64, record: Record) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            offset,
            key: record.key,
            value: record.value,
            headers: record.headers,
            timestamp: record.timestamp,
        }
    }

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

/// Reads its partitions and applies each message once (see the crate
/// documentation). Clones share the broker connection: the supervisor
/// runs a clone again after a failure.
#[derive(Clone)]
pub struct Consumer {
    name: String,
    assignments: Vec<(String, i32)>,
    config: ConsumerConfig,
    database: Database,
    handler: Arc<dyn MessageHandler>,
    kafka: Arc<tokio::sync::Mutex<Option<Kafka>>>,
    /// When the handled event ids past their retention were last deleted.
    pruned: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Since when the steps fail (for the log line of the recovery).
    outage: Outage,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("name", &self.name).field("assignments", &self.assignments).finish()
    }
}

impl Consumer {
    /// Consumer `name` of `assignments` (topic, partition), with offsets in
    /// `database` (which holds the migrations). Connections are made when
    /// needed.
    pub async fn new(
        name: impl Into<String>,
        assignments: Vec<(String, i32)>,
        database: Database,
        handler: Arc<dyn MessageHandler>,
        config: ConsumerConfig,
    ) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            assignments,
            config,
            database,
            handler,
            kafka: Arc::default(),
            pruned: Arc::default(),
            outage: Outage::default(),
        })
    }

    /// The next offset to read of `topic`/`partition`.
    pub async fn offset(&self, topic: &str, partition: i32) -> Result<i64> {
        let client = self.database.get().await?;
        Ok(offsets::next_offset(&*client, &self.name, topic, partition).await?)
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
        let client = self.database.get().await?;
        let hours = i32::try_from(self.config.dedupe_retention_hours).unwrap_or(i32::MAX);
        offsets::forget_events(&*client, &self.name, hours).await?;
        Ok(())
    }

    async fn client(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>> {
        let mut kafka = self.kafka.lock().await;
        connected(&mut kafka, &self.config).await?.partition(topic, partition, self.config.timeout()).await
    }

    async fn step_partition(&self, topic: &str, partition: i32) -> Result<usize> {
        let mut conn = self.database.get().await?;
        offsets::register(&*conn, &self.name, topic, partition).await?;
        let tx = conn.transaction().await?;
        // A second instance of this consumer keeps off the partition until
        // this batch commits.
        offsets::lock_offsets(&tx, &self.name, Some((topic, partition))).await?;
        let next = offsets::next_offset(&tx, &self.name, topic, partition).await?;
        let client = self.client(topic, partition).await?;
        let fetch = client.fetch_records(next, 1..self.config.fetch_max_bytes.max(1), self.config.fetch_wait_ms.max(1));
        let fetched = match tokio::time::timeout(self.config.timeout(), fetch).await {
            Ok(Ok(fetched)) => Ok(fetched),
            Ok(Err(e)) => Err(Error::Broker(format!("{topic}/{partition}: {e}"))),
            Err(_) => Err(Error::Broker(format!("{topic}/{partition}: fetch timed out"))),
        };
        if fetched.is_err() {
            metrics::counter!("eventfold_kafka_errors_total", "client" => "consumer", "operation" => "fetch")
                .increment(1);
        }
        let (records, high_watermark) = fetched?;
        // The broker may answer from the start of a batch.
        let messages: Vec<Message> = records
            .into_iter()
            .filter(|r| r.offset >= next)
            .map(|r| Message::of_record(topic, partition, r.offset, r.record))
            .collect();
        // The events handled before (a re-send of the relay) are dropped;
        // the rest are marked handled in this transaction.
        let ids: Vec<uuid::Uuid> = messages.iter().filter_map(Message::event_id).collect();
        let mut fresh = offsets::remember_events(&tx, &self.name, &ids).await?;
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
            offsets::advance(&tx, &self.name, topic, partition, last + 1).await?;
            // Failpoint `consumer::after_handle`: the handler applied the
            // messages, their event ids are remembered and the offset moved,
            // all inside this transaction, not yet committed (a crash here
            // must leave none of it, so that each message applies once).
            eventfold_store::failpoint!("consumer::after_handle");
            tx.commit().await?;
            metrics::counter!("eventfold_consumer_messages_total", "consumer" => self.name.clone())
                .increment(handled as u64);
        }
        // Messages on the partition not handled yet, as of this fetch.
        let behind = high_watermark.saturating_sub(last.map_or(next, |l| l.saturating_add(1))).max(0);
        let labels =
            [("consumer", self.name.clone()), ("topic", topic.to_owned()), ("partition", partition.to_string())];
        metrics::gauge!("eventfold_consumer_lag_messages", &labels).set(behind as f64);
        Ok(handled)
    }

    /// One message in a savepoint, retried; dead-lettered when every
    /// attempt fails (the dead letter is on the broker before the offset
    /// moves past it).
    async fn apply(&self, tx: &Transaction<'_>, message: &Message) -> Result<()> {
        let mut retries = self.config.retry_backoff().start();
        loop {
            tx.batch_execute("SAVEPOINT consume_message").await?;
            match self.handler.handle(tx, message).await {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT consume_message").await?;
                    return Ok(());
                }
                Err(error) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT consume_message").await?;
                    let attempts = retries.attempts() + 1;
                    if attempts >= self.config.max_attempts.max(1) {
                        return self.dead_letter(message, &error.to_string(), attempts).await;
                    }
                    retries.wait().await;
                }
            }
        }
    }

    async fn dead_letter(&self, message: &Message, error: &str, attempts: u32) -> Result<()> {
        let mut kafka = self.kafka.lock().await;
        send_dead_letter(&mut kafka, &self.config, &self.name, message, error, attempts).await
    }

    /// Consumes until `token` is cancelled (then `Ok`). A failed step (the
    /// broker or the database away) ends the run with its error: the
    /// supervisor runs the consumer again after a pause
    /// ([`ConsumerConfig::backoff`]), from the stored offsets. A step cut
    /// short by the cancellation commits nothing.
    pub async fn run(self, token: CancellationToken) -> Result<()> {
        while !token.is_cancelled() {
            let step = tokio::select! {
                step = self.step() => step,
                () = token.cancelled() => break,
            };
            let handled = step.inspect_err(|_| self.outage.failed())?;
            if let Some(after) = self.outage.recovered() {
                tracing::info!(consumer = %self.name, ?after, "consumer recovered");
            }
            if handled == 0 {
                // The fetches waited on the broker already; a short pause
                // keeps an idle consumer from spinning.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    () = token.cancelled() => {}
                }
            }
        }
        Ok(())
    }
}
