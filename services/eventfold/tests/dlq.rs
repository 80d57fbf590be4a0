//! `eventfold dlq list|replay` on the binary: a record written with a schema
//! the registry does not know yet is dead-lettered by a Kafka-fed
//! projection; replay fails (and changes nothing) until the schema is
//! registered, then applies it once.

use std::{collections::BTreeMap, process::Output, sync::Arc, time::Duration};

use eventfold_bus::{ConsumerConfig, KafkaSource, KafkaSourceConfig, dead_letters};
use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
use eventfold_schemas::{Catalog, Registry, SchemaType};
use eventfold_store::{EventLog, PostgresConfig, PostgresEventLog};
use eventfold_tests::{TestDatabase, kafka::Broker, registry::RegistryStandIn};
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_eventfold");
const TOPIC: &str = "eventfold.orders.v1";

/// `eventfold dlq ARGS` against the test's database, broker and registry,
/// with no `EVENTFOLD_*` configuration from the test's environment.
async fn dlq(db: &TestDatabase, broker: &Broker, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EVENTFOLD_") {
            command.env_remove(key);
        }
    }
    command
        .env("EVENTFOLD_RELAY__BROKERS", format!("[\"{}\"]", broker.bootstrap()))
        .args(["dlq", "--database-url", db.url()])
        .args(args)
        .stdin(std::process::Stdio::null());
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("eventfold dlq finished within 60 s")
        .expect("eventfold runs")
}

async fn late_orders(client: &tokio_postgres::Client) -> i64 {
    let sql = "SELECT count(*) FROM read.order_views_v1 WHERE order_id = 'late-1'";
    client.query_one(sql, &[]).await.unwrap().get(0)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replays_once_after_its_schema_is_registered() {
    let db = TestDatabase::migrated().await;
    let store = PostgresEventLog::connect(
        eventfold_store::Database::from_url(db.url()).expect("a PostgreSQL URL"),
        PostgresConfig::default(),
    )
    .await
    .unwrap();
    let log: Arc<dyn EventLog> = Arc::new(store);
    let broker = Broker::start();
    let stand_in = RegistryStandIn::start().await;
    let registry = Registry::new(stand_in.url()).unwrap();
    let catalog = Catalog::load().unwrap();
    let ids = registry.register_catalog(&catalog, eventfold_proto::FILE_DESCRIPTOR_SET).await.unwrap();
    let highest = ids.events.values().chain(ids.protos.values()).map(|r| r.id).max().unwrap();

    // A newer producer's OrderCreated v2: one more field, with a default
    // (a compatible change), not registered yet.
    let mut newer: serde_json::Value = serde_json::from_str(catalog.text("OrderCreated", 2).unwrap()).unwrap();
    newer["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "channel", "type": "string", "default": "web"}));
    let newer = newer.to_string();
    let newer_catalog = Catalog::from_files([("eventfold.orders.v1/OrderCreated.v2.avsc", newer.as_str())]).unwrap();
    let body = serde_json::json!({
        "order_id": "late-1", "customer_id": "c-9", "currency": "EUR",
        "items": [{"product_id": "sku-1", "quantity": 3, "unit_price": {"minor": 700, "currency": "EUR"}}],
        "total": {"minor": 2100, "currency": "EUR"},
        "channel": "app",
    });
    let datum = newer_catalog.encode("OrderCreated", 2, &body).unwrap();
    // The id the registry will give that schema: ids are handed out in
    // order (checked below, where it is registered).
    let late_id = highest + 1;
    let record = Record {
        key: Some(b"order-late-1".to_vec()),
        value: Some(eventfold_schemas::wire(late_id, &datum)),
        headers: BTreeMap::from([
            ("event_id".to_owned(), b"0190a6a2-7c4e-7c1d-9a4b-0123456789ad".to_vec()),
            ("event_type".to_owned(), b"OrderCreated".to_vec()),
            ("schema_version".to_owned(), b"2".to_vec()),
            ("stream_version".to_owned(), b"0".to_vec()),
            ("global_position".to_owned(), b"1".to_vec()),
        ]),
        timestamp: chrono::Utc::now(),
    };
    let kafka = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    kafka.controller_client().unwrap().create_topic(TOPIC, 3, 1, 5_000).await.unwrap();
    let partition = kafka.partition_client(TOPIC, 1, UnknownTopicHandling::Retry).await.unwrap();
    let offset = partition.produce(vec![record], Compression::NoCompression).await.unwrap()[0];

    // The Kafka-fed order views dead-letter it (the registry answers 40403
    // for the id) and go on.
    let consumer = ConsumerConfig { brokers: vec![broker.bootstrap()], ..ConsumerConfig::default() };
    let source_config = KafkaSourceConfig { consumer: consumer.clone(), ..KafkaSourceConfig::default() };
    let source = KafkaSource::new(source_config, Catalog::load().unwrap(), Registry::new(stand_in.url()).unwrap());
    let database = eventfold_store::Database::from_url(db.url()).expect("a PostgreSQL URL");
    let projector = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, ProjectorOptions::default())
        .with_source(source);
    projector.prepare().await.unwrap();
    let mut letters = Vec::new();
    for _ in 0..100 {
        projector.step().await.unwrap();
        letters = dead_letters(&consumer, &database, TOPIC).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].origin(), (TOPIC.to_owned(), 1, offset));
    assert_eq!(letters[0].consumer(), "projection:order_views:v1");
    assert!(letters[0].error().contains(&format!("schema id {late_id}")), "{}", letters[0].error());

    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);

    // Before the fix: replay fails, says why, and applies nothing.
    let out = dlq(&db, &broker, &["replay", TOPIC, "--registry-url", &stand_in.url()]).await;
    assert!(!out.status.success(), "replay before the fix must fail:\n{}", text(&out));
    assert!(text(&out).contains("1 still failing"), "{}", text(&out));
    assert!(text(&out).contains(&format!("schema id {late_id}")), "{}", text(&out));
    assert_eq!(late_orders(&client).await, 0);

    // The fix: the newer producer's schema reaches the registry.
    let subject = catalog.subject("OrderCreated", 2).unwrap();
    let id = registry.register(&subject, &newer, SchemaType::Avro, &[]).await.unwrap();
    assert_eq!(id, late_id, "the stand-in hands out ids in order; the record was written with {late_id}");

    let out = dlq(&db, &broker, &["replay", TOPIC, "--registry-url", &stand_in.url()]).await;
    assert!(out.status.success(), "replay after the fix:\n{}", text(&out));
    assert!(
        text(&out).contains("projection:order_views:v1: 1 dead letters applied, 0 still failing"),
        "{}",
        text(&out)
    );
    let row = client
        .query_one(
            "SELECT customer_id, total_minor, stream_version FROM read.order_views_v1 WHERE order_id = 'late-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "c-9");
    assert_eq!(row.get::<_, i64>(1), 2100);
    assert_eq!(row.get::<_, i64>(2), 0);

    // Once: a second replay applies nothing, and the list says replayed.
    let out = dlq(&db, &broker, &["replay", TOPIC, "--registry-url", &stand_in.url()]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("applied,"), "nothing left to replay: {}", text(&out));
    assert_eq!(late_orders(&client).await, 1);
    let out = dlq(&db, &broker, &["list", TOPIC]).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed = text(&out);
    let line = listed.lines().find(|l| l.contains("projection:order_views:v1")).expect("the dead letter is listed");
    assert!(line.contains(" yes "), "replayed: {line}");
    assert!(listed.contains("1 dead letters"), "{listed}");
}
