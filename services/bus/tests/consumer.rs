//! Consumers against a real Kafka-protocol broker (tansu) and PostgreSQL:
//! exactly-once effect across crashes, dead letters with their headers,
//! replay after a fix, and recovery from a broker outage.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use eventfold_bus::{Consumer, ConsumerConfig, HandleError, Message, MessageHandler, dead_letters, headers, replay};
use eventfold_platform::runtime::{CancellationToken, supervise};
use eventfold_store::Database;
use eventfold_tests::{TestDatabase, kafka::Broker};
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use tokio_postgres::{NoTls, Transaction};

/// Copies each message into `copies`; fails on the value `poison` until
/// fixed.
struct Copier {
    fixed: AtomicBool,
}

#[async_trait]
impl MessageHandler for Copier {
    async fn handle(&self, tx: &Transaction<'_>, message: &Message) -> Result<(), HandleError> {
        let value = String::from_utf8(message.value.clone().unwrap_or_default())
            .map_err(|e| HandleError::Message(e.to_string()))?;
        // Some work before the failure: the savepoint must undo it.
        tx.execute(
            "INSERT INTO copies (topic, partition, msg_offset, value) VALUES ($1, $2, $3, $4)",
            &[&message.topic, &message.partition, &message.offset, &value],
        )
        .await?;
        if value == "poison" && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandleError::Message("cannot digest poison".into()));
        }
        Ok(())
    }
}

async fn setup() -> (TestDatabase, Database, tokio_postgres::Client) {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE copies (topic text, partition int, msg_offset bigint, value text, \
             PRIMARY KEY (topic, partition, msg_offset))",
        )
        .await
        .unwrap();
    (db, database, client)
}

fn config(broker: &Broker) -> ConsumerConfig {
    ConsumerConfig {
        brokers: vec![broker.bootstrap()],
        request_timeout_ms: 2_000,
        max_backoff_ms: 500,
        ..Default::default()
    }
}

/// Creates `topic` with 2 partitions and produces `values`, alternating
/// partitions.
async fn produce(broker: &Broker, topic: &str, values: &[String]) {
    let client = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    let controller = client.controller_client().unwrap();
    let _ = controller.create_topic(topic, 2, 1, 5_000).await;
    for partition in 0..2 {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as i32 % 2 == partition)
            .map(|(_, v)| Record {
                key: Some(v.clone().into_bytes()),
                value: Some(v.clone().into_bytes()),
                headers: BTreeMap::from([("origin".to_owned(), b"test".to_vec())]),
                timestamp: chrono::Utc::now(),
            })
            .collect();
        let pc = client.partition_client(topic, partition, UnknownTopicHandling::Retry).await.unwrap();
        for chunk in records.chunks(7) {
            pc.produce(chunk.to_vec(), Compression::NoCompression).await.unwrap();
        }
    }
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM copies", &[]).await.unwrap().get(0)
}

async fn until_consumed(consumer: &Consumer, client: &tokio_postgres::Client, expected: i64) {
    for _ in 0..200 {
        consumer.step().await.ok();
        if count(client).await >= expected {
            return;
        }
    }
    panic!("only {} of {expected} messages consumed", count(client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_apply_each_message_once_and_a_poison_message_is_dead_lettered_then_replayed() {
    let broker = Broker::start();
    let (_db, database, client) = setup().await;
    let assignments = vec![("t".to_owned(), 0), ("t".to_owned(), 1)];
    let copier = Arc::new(Copier { fixed: AtomicBool::new(false) });
    let mut values: Vec<String> = (0..200).map(|i| format!("m-{i}")).collect();
    values[77] = "poison".into();

    // Produce while consumers are killed at random points, several times.
    let producing = {
        let values = values.clone();
        let bootstrap = broker.bootstrap();
        tokio::spawn(async move {
            let client = ClientBuilder::new(vec![bootstrap]).build().await.unwrap();
            let _ = client.controller_client().unwrap().create_topic("t", 2, 1, 5_000).await;
            for (i, chunk) in values.chunks(20).enumerate() {
                for partition in 0..2 {
                    let pc = client.partition_client("t", partition, UnknownTopicHandling::Retry).await.unwrap();
                    let records: Vec<Record> = chunk
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| (i * 20 + j) as i32 % 2 == partition)
                        .map(|(_, v)| Record {
                            key: None,
                            value: Some(v.clone().into_bytes()),
                            headers: BTreeMap::new(),
                            timestamp: chrono::Utc::now(),
                        })
                        .collect();
                    pc.produce(records, Compression::NoCompression).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    // Two instances at a time: the offsets' lock lets one consume a
    // partition's batch (a second copy would break the primary key, fail
    // and end as a dead letter).
    for round in 0..6u64 {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let consumer =
                Consumer::new("copier", assignments.clone(), database.clone(), copier.clone(), config(&broker))
                    .await
                    .unwrap();
            tasks.push(tokio::spawn(consumer.run(stop.clone())));
        }
        tokio::time::sleep(Duration::from_millis(30 + round * 17)).await;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
    producing.await.unwrap();
    let consumer =
        Consumer::new("copier", assignments.clone(), database.clone(), copier.clone(), config(&broker)).await.unwrap();
    until_consumed(&consumer, &client, 199).await;
    while consumer.step().await.unwrap() > 0 {}

    let stored: Vec<String> =
        client.query("SELECT value FROM copies", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(stored.len(), 199, "every message but the poison one, once (the primary key forbids twice)");
    assert!(!stored.contains(&"poison".to_owned()), "the failed attempts left nothing");
    let offsets = consumer.offset("t", 0).await.unwrap() + consumer.offset("t", 1).await.unwrap();
    assert_eq!(offsets, 200, "the offsets moved past every message, the poison one included");

    let letters = dead_letters(&config(&broker), &database, "t").await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.message.value.as_deref(), Some(&b"poison"[..]));
    assert_eq!(letter.error(), "cannot digest poison");
    assert_eq!(letter.message.header(headers::ATTEMPTS), Some("3"));
    assert_eq!(letter.consumer(), "copier");
    let (topic, partition, offset) = letter.origin();
    assert_eq!((topic.as_str(), partition), ("t", 77 % 2));
    assert!(offset >= 0);
    assert!(!letter.replayed);

    copier.fixed.store(true, Ordering::SeqCst);
    assert_eq!(replay(&config(&broker), &database, "t", "copier", copier.as_ref()).await.unwrap(), (1, 0));
    assert_eq!(count(&client).await, 200, "the replay applied it");
    let row = client.query_one("SELECT partition, msg_offset FROM copies WHERE value = 'poison'", &[]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i64>(1)), (partition, offset), "with its origin");
    assert_eq!(replay(&config(&broker), &database, "t", "copier", copier.as_ref()).await.unwrap(), (0, 0), "once");
    assert!(dead_letters(&config(&broker), &database, "t").await.unwrap()[0].replayed);
}

/// The relay sends events again after a crash (at-least-once): the same
/// event id at a later offset, even in the same fetch, is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_again_at_a_later_offset_is_handled_once() {
    let broker = Broker::start();
    let (_db, database, client) = setup().await;
    let kafka = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    kafka.controller_client().unwrap().create_topic("r", 1, 1, 5_000).await.unwrap();
    let partition = kafka.partition_client("r", 0, UnknownTopicHandling::Retry).await.unwrap();
    let event = |n: u32| Record {
        key: Some(b"order-1".to_vec()),
        value: Some(format!("e-{n}").into_bytes()),
        headers: BTreeMap::from([("event_id".to_owned(), format!("0190a6a2-7c4e-7c1d-9a4b-{n:012}").into_bytes())]),
        timestamp: chrono::Utc::now(),
    };
    // 0, 1, 2, then 1 and 2 again (a re-sent batch), in one request.
    let first: Vec<Record> = [0, 1, 2, 1, 2].into_iter().map(event).collect();
    partition.produce(first, Compression::NoCompression).await.unwrap();
    let copier = Arc::new(Copier { fixed: AtomicBool::new(true) });
    let consumer =
        Consumer::new("once", vec![("r".to_owned(), 0)], database, copier.clone(), config(&broker)).await.unwrap();
    assert_eq!(consumer.step().await.unwrap(), 5, "all five messages go past");
    // Later fetches: 2 once more, then a new one.
    partition.produce(vec![event(2)], Compression::NoCompression).await.unwrap();
    partition.produce(vec![event(3)], Compression::NoCompression).await.unwrap();
    for _ in 0..50 {
        consumer.step().await.unwrap();
        if consumer.offset("r", 0).await.unwrap() == 7 {
            break;
        }
    }
    assert_eq!(consumer.offset("r", 0).await.unwrap(), 7);
    let values: Vec<String> = client
        .query("SELECT value FROM copies ORDER BY msg_offset", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(values, ["e-0", "e-1", "e-2", "e-3"], "each event once, at its first offset");
    let remembered: i64 =
        client.query_one("SELECT count(*) FROM bus.consumer_events WHERE consumer = 'once'", &[]).await.unwrap().get(0);
    assert_eq!(remembered, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_recovers_from_a_broker_outage_by_itself() {
    let broker = Broker::start();
    let (_db, database, client) = setup().await;
    let first: Vec<String> = (0..50).map(|i| format!("a-{i}")).collect();
    produce(&broker, "u", &first).await;
    let copier = Arc::new(Copier { fixed: AtomicBool::new(true) });
    let assignments = vec![("u".to_owned(), 0), ("u".to_owned(), 1)];
    let consumer = Consumer::new("outage", assignments, database, copier, config(&broker)).await.unwrap();
    // As the process runs it: under the supervisor, which runs it again
    // after a failure.
    let stop = CancellationToken::new();
    let backoff = config(&broker).backoff();
    let task = tokio::spawn(supervise("consumer", stop.clone(), backoff, move |token| consumer.clone().run(token)));
    for _ in 0..200 {
        if count(&client).await == 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(count(&client).await, 50);

    broker.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.resume();
    let second: Vec<String> = (0..50).map(|i| format!("b-{i}")).collect();
    produce(&broker, "u", &second).await;
    for _ in 0..400 {
        if count(&client).await == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&client).await, 100, "consumed after the outage without help; broker log:\n{}", broker.log());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task).await.expect("stops").unwrap();
}
