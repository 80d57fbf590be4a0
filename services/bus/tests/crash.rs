//! Crashes at the instant that matters: the failpoint
//! `consumer::after_handle` panics a supervised consumer after its handler
//! applied a fetch's messages, their event ids were remembered and the
//! offset moved, all inside the transaction, before the commit. The
//! supervisor starts it again from the committed offsets; in the end each
//! message's effect is there exactly once.
//!
//! The failpoint registry is process-wide: this binary's only test is the
//! one that passes through the failpoint.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use eventfold_bus::{Consumer, ConsumerConfig, HandleError, Message, MessageHandler};
use eventfold_platform::runtime::{CancellationToken, supervise};
use eventfold_store::{Database, failpoint};
use eventfold_tests::{TestDatabase, kafka::Broker};
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use tokio_postgres::{NoTls, Transaction};

const AFTER_HANDLE: &str = "consumer::after_handle";
const TOPIC: &str = "crash";

/// One row per handling, in a table without a key: a message applied
/// twice shows as two rows.
struct Counter;

#[async_trait]
impl MessageHandler for Counter {
    async fn handle(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        let value = String::from_utf8(message.value.clone().unwrap_or_default())
            .map_err(|e| HandleError::Message(e.to_string()))?;
        tx.execute(
            "INSERT INTO applied (partition, msg_offset, value) VALUES ($1, $2, $3)",
            &[&message.partition, &message.offset, &value],
        )
        .await?;
        Ok(())
    }
}

/// Message `i`: value `m-{i}` on partition `i % 2`; on each partition every
/// other one carries an event id (as the relay sends them: a re-sent one is
/// dropped by the consumer's dedupe), the rest none (their offsets alone
/// count).
fn message(i: usize) -> Record {
    let mut headers = BTreeMap::new();
    if i % 4 < 2 {
        let id = uuid::Uuid::from_u128(u128::try_from(i).unwrap() + 1);
        headers.insert("event_id".to_owned(), id.to_string().into_bytes());
    }
    Record { key: None, value: Some(format!("m-{i}").into_bytes()), headers, timestamp: chrono::Utc::now() }
}

/// Produces 20 messages at a time until at least `at_least` are on the
/// topic and `enough` is cancelled. Returns how many it produced.
fn keep_producing(broker: &Broker, at_least: usize, enough: CancellationToken) -> tokio::task::JoinHandle<usize> {
    let bootstrap = broker.bootstrap();
    tokio::spawn(async move {
        let client = ClientBuilder::new(vec![bootstrap]).build().await.unwrap();
        let mut partitions = Vec::new();
        for partition in 0..2 {
            partitions.push(client.partition_client(TOPIC, partition, UnknownTopicHandling::Retry).await.unwrap());
        }
        let mut produced = 0;
        while produced < at_least || !enough.is_cancelled() {
            for (partition, pc) in partitions.iter().enumerate() {
                let records: Vec<Record> =
                    (produced..produced + 20).filter(|i| i % 2 == partition).map(message).collect();
                pc.produce(records, Compression::NoCompression).await.unwrap();
            }
            produced += 20;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        produced
    })
}

/// Arms `consumer::after_handle` for one panic at a time, again and again,
/// until it fired `crashes` times; between two crashes the consumer
/// commits a few fetches. Returns how often it fired.
async fn crash_after_handle(crashes: u64) -> u64 {
    let start = failpoint::fired(AFTER_HANDLE);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fired = failpoint::fired(AFTER_HANDLE) - start;
        if fired >= crashes {
            return fired;
        }
        assert!(Instant::now() < deadline, "the failpoint fired only {fired} of {crashes} times within 60 s");
        let armed = failpoint::arm(AFTER_HANDLE, "1*panic");
        while failpoint::fired(AFTER_HANDLE) - start == fired && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(armed);
        // Some fetches commit before the next crash.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_handle_before_commit_applies_each_message_exactly_once() {
    const CRASHES: u64 = 6;
    let broker = Broker::start();
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("CREATE TABLE applied (partition int, msg_offset bigint, value text)").await.unwrap();
    let kafka = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    kafka.controller_client().unwrap().create_topic(TOPIC, 2, 1, 5_000).await.unwrap();

    let config = ConsumerConfig {
        brokers: vec![broker.bootstrap()],
        request_timeout_ms: 2_000,
        max_backoff_ms: 200,
        ..Default::default()
    };
    let assignments = vec![(TOPIC.to_owned(), 0), (TOPIC.to_owned(), 1)];
    let consumer = Consumer::new("counter", assignments, database, Arc::new(Counter), config.clone()).await.unwrap();
    // As the process runs it: under the supervisor, which runs it again
    // after a failure or a panic.
    let stop = CancellationToken::new();
    let runs = Arc::new(AtomicU32::new(0));
    let supervisor = tokio::spawn({
        let (consumer, runs) = (consumer.clone(), runs.clone());
        supervise("consumer", stop.clone(), config.backoff(), move |token| {
            runs.fetch_add(1, Ordering::SeqCst);
            consumer.clone().run(token)
        })
    });
    let enough = CancellationToken::new();
    let producer = keep_producing(&broker, 200, enough.clone());

    let hits_before = failpoint::hits(AFTER_HANDLE);
    let fired = crash_after_handle(CRASHES).await;
    enough.cancel();
    let produced = producer.await.unwrap();
    assert!(fired >= CRASHES, "the window was hit {fired} times");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut consumed = 0;
    while Instant::now() < deadline {
        consumed = consumer.offset(TOPIC, 0).await.unwrap() + consumer.offset(TOPIC, 1).await.unwrap();
        if consumed >= produced as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(consumed, produced as i64, "the offsets moved past every message");
    // What a crash rolled back was consumed by a later run.
    let started = runs.load(Ordering::SeqCst);
    assert!(
        u64::from(started) > fired,
        "each crash failed the run and the supervisor started it again ({started} runs, {fired} crashes)"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), supervisor).await.expect("stops").unwrap();
    assert!(
        failpoint::hits(AFTER_HANDLE) - hits_before > fired,
        "fetches also went through the failpoint without a crash and committed"
    );

    let twice: Vec<(String, i64)> = client
        .query("SELECT value, count(*) FROM applied GROUP BY value HAVING count(*) > 1 ORDER BY value", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        twice.is_empty(),
        "{} messages applied more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let mut applied: Vec<String> =
        client.query("SELECT value FROM applied", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    applied.sort_unstable();
    let mut expected: Vec<String> = (0..produced).map(|i| format!("m-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(applied.len(), produced, "as many applications as messages (none twice, none lost)");
    assert_eq!(applied, expected, "each message's effect exactly once, with and without an event id");
}
