//! Dead letters: a message that keeps failing goes to `<topic>.dlq` with
//! headers saying why and where it came from; [`dead_letters`] lists them
//! (once per consumer and origin, with whether they were replayed) and
//! [`replay`] applies them again through a handler, each once, marking
//! them in `bus.dead_letters_replayed`.

use std::collections::HashSet;

use eventfold_store::Database;
use rskafka::{client::partition::Compression, record::Record};
use tokio_postgres::GenericClient;

use crate::{
    ConsumerConfig, Error, Message, MessageHandler, Result, broker,
    kafka::{Kafka, connect_kafka, connected},
};

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
    let timeout = config.timeout();
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
    let kafka = connected(kafka, config).await?;
    kafka.ensure_topic(&dlq, 1, 1, timeout).await?;
    let client = kafka.partition(&dlq, 0, timeout).await?;
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

    /// The message as it was on its origin topic.
    fn original(&self) -> Message {
        let (topic, partition, offset) = self.origin();
        Message { topic, partition, offset, ..self.message.clone() }
    }
}

/// Every dead letter of `topic` (its `.dlq` topic), once per consumer and
/// origin, with whether it was replayed, read from the start.
pub async fn dead_letters(config: &ConsumerConfig, database: &Database, topic: &str) -> Result<Vec<DeadLetter>> {
    let dlq = if topic.ends_with(DLQ_SUFFIX) { topic.to_owned() } else { format!("{topic}{DLQ_SUFFIX}") };
    let timeout = config.timeout();
    let mut kafka = connect_kafka(config).await?;
    if !kafka.list_topics(timeout).await?.iter().any(|t| t.name == dlq) {
        return Ok(Vec::new());
    }
    let client = kafka.partition(&dlq, 0, timeout).await?;
    let origin = topic.strip_suffix(DLQ_SUFFIX).unwrap_or(topic);
    let replayed = replayed(&*database.get().await?, origin).await?;
    let mut letters = Vec::new();
    let mut seen = HashSet::new();
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
            let message = Message::of_record(&dlq, 0, r.offset, r.record);
            let mut letter = DeadLetter { offset: r.offset, replayed: false, message };
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

/// The consumers with dead letters of `topic` not replayed yet, sorted.
pub async fn pending_consumers(config: &ConsumerConfig, database: &Database, topic: &str) -> Result<Vec<String>> {
    let mut pending: Vec<String> = dead_letters(config, database, topic)
        .await?
        .iter()
        .filter(|l| !l.replayed)
        .map(|l| l.consumer().to_owned())
        .collect();
    pending.sort();
    pending.dedup();
    Ok(pending)
}

/// A dead letter that failed again when replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StillFailing {
    /// Where it came from: topic, partition, offset.
    pub origin: (String, i32, i64),
    pub error: String,
}

/// What a replay of a consumer's dead letters did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Dead letters applied (and marked replayed).
    pub applied: usize,
    /// Dead letters that failed again (left for another replay).
    pub failing: Vec<StillFailing>,
}

/// Applies the dead letters of `topic` that consumer `consumer` sent there
/// and that were not replayed yet, through `handler`, each in its own
/// transaction with its replayed mark. Returns (applied, still failing).
pub async fn replay(
    config: &ConsumerConfig,
    database: &Database,
    topic: &str,
    consumer: &str,
    handler: &dyn MessageHandler,
) -> Result<(usize, usize)> {
    let replayed = replay_letters(config, database, topic, consumer, handler).await?;
    Ok((replayed.applied, replayed.failing.len()))
}

/// [`replay`], saying which dead letters still fail and why.
pub(crate) async fn replay_letters(
    config: &ConsumerConfig,
    database: &Database,
    topic: &str,
    consumer: &str,
    handler: &dyn MessageHandler,
) -> Result<Replayed> {
    let letters = dead_letters(config, database, topic).await?;
    let mut pg = database.get().await?;
    let mut outcome = Replayed::default();
    for letter in letters.iter().filter(|l| !l.replayed && l.consumer() == consumer) {
        let original = letter.original();
        let tx = pg.transaction().await?;
        match handler.handle(&tx, &original).await {
            Ok(()) => {
                mark_replayed(&tx, consumer, &original).await?;
                tx.commit().await?;
                outcome.applied += 1;
            }
            Err(error) => {
                tracing::warn!(offset = letter.offset, %error, "dead letter still fails");
                outcome.failing.push(StillFailing {
                    origin: (original.topic, original.partition, original.offset),
                    error: error.to_string(),
                });
            }
        }
    }
    Ok(outcome)
}

/// (consumer, partition, offset) of the replayed dead letters from `topic`.
async fn replayed(client: &impl GenericClient, topic: &str) -> Result<HashSet<(String, i32, i64)>> {
    Ok(client
        .query("SELECT consumer, partition, msg_offset FROM bus.dead_letters_replayed WHERE topic = $1", &[&topic])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

async fn mark_replayed(client: &impl GenericClient, consumer: &str, original: &Message) -> Result<()> {
    client
        .execute(
            "INSERT INTO bus.dead_letters_replayed (consumer, topic, partition, msg_offset) VALUES ($1, $2, $3, $4)",
            &[&consumer, &original.topic, &original.partition, &original.offset],
        )
        .await?;
    Ok(())
}
