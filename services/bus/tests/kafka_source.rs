//! Read models fed from Kafka equal the ones fed from the store: the relay
//! and the Kafka-fed projector are both killed at random points while
//! orders stream in (the relay re-sends, the projector re-reads), against
//! tansu, PostgreSQL and the Schema Registry stand-in.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use eventfold_bus::{ConsumerConfig, KafkaSource, KafkaSourceConfig, dead_letters};
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    order::{CancelOrder, ConfirmOrder, OrderCommand, OrderItem, ProcessPayment},
};
use eventfold_platform::runtime::{CancellationToken, supervise};
use eventfold_projector::{OrderViews, Projection, Projector, ProjectorOptions};
use eventfold_relay::{AvroEncoder, Relay};
use eventfold_schemas::{Catalog, Registry};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::{
    TestDatabase,
    kafka::Broker,
    orders::{self, eur},
    registry::RegistryStandIn,
};
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};
use tokio_postgres::NoTls;
use tower::ServiceExt;

async fn write_orders(log: Arc<dyn EventLog>, count: usize) {
    let bus = eventfold_command::bus(log, eventfold_command::BusOptions::default());
    for o in 0..count {
        let order_id = format!("o-{o}");
        let send = |command: OrderCommand| {
            let envelope = Envelope::new(Command::Order { order_id: order_id.clone(), command }, Meta::default());
            bus.clone().oneshot(envelope)
        };
        let price = Money::new(100 + o as i64, eur());
        let items = vec![OrderItem { product_id: format!("sku-{}", o % 4), quantity: 2, unit_price: price }];
        send(orders::created(&order_id, &format!("c-{}", o % 3), items).into()).await.unwrap();
        match o % 3 {
            0 => {
                send(CancelOrder { reason: "changed mind".into() }.into()).await.unwrap();
            }
            1 => {
                send(ConfirmOrder.into()).await.unwrap();
                let payment =
                    ProcessPayment { payment_id: format!("p-{o}"), amount: Money::new(price.minor * 2, eur()) };
                send(payment.into()).await.unwrap();
            }
            _ => {
                send(ConfirmOrder.into()).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// PostgreSQL with the migrations and the log, a broker, and the registry
/// stand-in holding the whole catalog.
struct Bed {
    _db: TestDatabase,
    database: Database,
    log: Arc<dyn EventLog>,
    broker: Broker,
    registry: RegistryStandIn,
    client: tokio_postgres::Client,
}

async fn bed() -> Bed {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let broker = Broker::start();
    let registry = RegistryStandIn::start().await;
    Registry::new(registry.url())
        .unwrap()
        .register_catalog(&Catalog::load().unwrap(), eventfold_proto::FILE_DESCRIPTOR_SET)
        .await
        .unwrap();
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    Bed { _db: db, database, log, broker, registry, client }
}

/// `worker` run as the process runs it: under the supervisor, which runs
/// a clone again after a failure, until `stop` is cancelled.
fn supervised<W, E, Fut>(
    name: &'static str,
    stop: &CancellationToken,
    backoff: eventfold_store::Backoff,
    worker: W,
    run: fn(W, CancellationToken) -> Fut,
) -> tokio::task::JoinHandle<()>
where
    W: Clone + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
{
    tokio::spawn(supervise(name, stop.clone(), backoff, move |token| run(worker.clone(), token)))
}

async fn rows(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    eventfold_tests::table_rows(client, table, "order_id").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_fed_from_kafka_equal_those_fed_from_the_store_across_crashes() {
    let Bed { _db, database, log, broker, registry, client } = bed().await;

    let relay_config = eventfold_relay::Config {
        brokers: vec![broker.bootstrap()],
        batch_size: 40,
        request_timeout_ms: 2_000,
        max_backoff_ms: 300,
        ..eventfold_relay::Config::default()
    };
    let relay = || async {
        let encoder = AvroEncoder::new(Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
        Relay::new(database.clone(), log.clone(), Arc::new(encoder), relay_config.clone()).await.unwrap()
    };
    let source_config = KafkaSourceConfig {
        consumer: ConsumerConfig {
            brokers: vec![broker.bootstrap()],
            fetch_wait_ms: 1,
            request_timeout_ms: 2_000,
            ..ConsumerConfig::default()
        },
        ..KafkaSourceConfig::default()
    };
    let source =
        KafkaSource::new(source_config.clone(), Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    let options =
        ProjectorOptions { batch_size: 30, idle_poll: Duration::from_millis(20), ..ProjectorOptions::default() };
    let kafka_fed = || async {
        Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options.clone())
            .with_source(source.clone())
    };

    // Orders stream in while the relay and the Kafka-fed projector are
    // killed at random points.
    let writer = tokio::spawn(write_orders(log.clone(), 90));
    for round in 0..8u64 {
        let stop = CancellationToken::new();
        let relaying = tokio::spawn(relay().await.run(stop.clone()));
        let projecting = tokio::spawn(kafka_fed().await.run(stop));
        tokio::time::sleep(Duration::from_millis(60 + (round * 41) % 170)).await;
        relaying.abort();
        tokio::time::sleep(Duration::from_millis((round * 13) % 40)).await;
        projecting.abort();
        let _ = relaying.await;
        let _ = projecting.await;
    }
    writer.await.unwrap();

    // Then both run to the end; beside them, the same projection from the
    // store.
    let stop = CancellationToken::new();
    let relaying = supervised("relay", &stop, relay_config.backoff(), relay().await, Relay::run);
    let projecting = supervised("projector", &stop, relay_config.backoff(), kafka_fed().await, Projector::run);
    let from_store = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, options.clone());
    from_store.prepare().await.unwrap();
    while from_store.step().await.unwrap() > 0 {}
    let head = log.last_position().await.unwrap();
    let probe = kafka_fed().await;
    for _ in 0..600 {
        if probe.position().await.unwrap() >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(probe.position().await.unwrap(), head, "the Kafka-fed checkpoint reached the head");
    stop.cancel();
    relaying.await.unwrap();
    projecting.await.unwrap();

    let via_store = rows(&client, &OrderViews.tables(1)[0]).await;
    let via_kafka = rows(&client, &OrderViews.tables(2)[0]).await;
    assert_eq!(via_store.len(), 90);
    assert_eq!(via_kafka, via_store, "row for row");
    let parked: i64 = client.query_one("SELECT count(*) FROM projections.parked", &[]).await.unwrap().get(0);
    assert_eq!(parked, 0, "no event was applied twice (a duplicate would have been parked)");

    // The relay loses its checkpoint and sends the whole log again: every
    // event arrives a second time, and the projection drops all of them.
    client.execute("UPDATE bus.relay_checkpoints SET position = 0", &[]).await.unwrap();
    let again = relay().await;
    while again.position().await.unwrap() < head {
        again.step().await.unwrap();
    }
    let projector = kafka_fed().await;
    while projector.step().await.unwrap() > 0 {}
    assert_eq!(rows(&client, &OrderViews.tables(2)[0]).await, via_store, "the second delivery changed nothing");
    let parked: i64 = client.query_one("SELECT count(*) FROM projections.parked", &[]).await.unwrap().get(0);
    assert_eq!(parked, 0, "and applied nothing twice");

    // A record that cannot be decoded goes to the dead-letter topic with
    // its origin; the projection goes on.
    let kafka = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    let topic = "eventfold.orders.v1";
    let partition = kafka.partition_client(topic, 0, UnknownTopicHandling::Retry).await.unwrap();
    let headers = BTreeMap::from([
        ("event_id".to_owned(), b"0190a6a2-7c4e-7c1d-9a4b-0123456789ab".to_vec()),
        ("event_type".to_owned(), b"OrderCreated".to_vec()),
        ("schema_version".to_owned(), b"2".to_vec()),
        ("stream_version".to_owned(), b"0".to_vec()),
        ("global_position".to_owned(), b"999999".to_vec()),
    ]);
    let garbage = Record {
        key: Some(b"order-garbage".to_vec()),
        value: Some(b"\x07not avro".to_vec()),
        headers,
        timestamp: chrono::Utc::now(),
    };
    // And one in the wire format whose schema id the registry never gave.
    let mut unknown_id = garbage.clone();
    unknown_id.value = Some(eventfold_schemas::wire(424_242, b"\x00"));
    unknown_id.headers.insert("event_id".to_owned(), b"0190a6a2-7c4e-7c1d-9a4b-0123456789ac".to_vec());
    let offsets = partition.produce(vec![garbage, unknown_id], Compression::NoCompression).await.unwrap();
    create_orders(&log, "late", 1, Duration::ZERO).await;
    let after = log.last_position().await.unwrap();
    let relay = relay().await;
    while relay.position().await.unwrap() < after {
        relay.step().await.unwrap();
    }
    let projector = kafka_fed().await;
    for _ in 0..200 {
        projector.step().await.unwrap();
        if projector.position().await.unwrap() >= after {
            break;
        }
    }
    assert_eq!(projector.position().await.unwrap(), after, "the projection went past the poison record");
    let letters = dead_letters(&source_config.consumer, &database, topic).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].origin(), (topic.to_owned(), 0, offsets[0]));
    assert_eq!(letters[1].origin(), (topic.to_owned(), 0, offsets[1]));
    assert!(letters[1].error().contains("424242"), "an unknown schema id: {}", letters[1].error());
    assert_eq!(letters[0].consumer(), "projection:order_views:v2");
    assert!(
        letters[0].error().contains("wire format") || letters[0].error().contains("magic"),
        "{}",
        letters[0].error()
    );
    assert_eq!(rows(&client, &OrderViews.tables(2)[0]).await.len(), 91);
}

/// Under load, the broker is unreachable for 10 s (SIGSTOP, then SIGCONT:
/// memory storage keeps its data): the relay and the Kafka-fed projector
/// recover by themselves, and afterwards the read model equals the one fed
/// from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_kafka_fed_projection_recover_from_a_broker_outage() {
    let Bed { _db, database, log, broker, registry, client } = bed().await;
    let relay_config = eventfold_relay::Config {
        brokers: vec![broker.bootstrap()],
        request_timeout_ms: 1_000,
        max_backoff_ms: 500,
        ..eventfold_relay::Config::default()
    };
    let encoder = AvroEncoder::new(Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    let relay = Relay::new(database.clone(), log.clone(), Arc::new(encoder), relay_config.clone()).await.unwrap();
    let source_config = KafkaSourceConfig {
        consumer: ConsumerConfig {
            brokers: vec![broker.bootstrap()],
            request_timeout_ms: 1_000,
            max_backoff_ms: 500,
            ..ConsumerConfig::default()
        },
        ..KafkaSourceConfig::default()
    };
    let source = KafkaSource::new(source_config, Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    let options =
        ProjectorOptions { batch_size: 100, idle_poll: Duration::from_millis(20), ..ProjectorOptions::default() };
    let projector =
        Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options.clone()).with_source(source);
    let stop = CancellationToken::new();
    let relaying = supervised("relay", &stop, relay_config.backoff(), relay, Relay::run);
    let projecting = supervised("projector", &stop, relay_config.backoff(), projector, Projector::run);

    // ~15 s of orders; the broker is frozen for 10 s of them.
    let writer = {
        let log = log.clone();
        tokio::spawn(async move { create_orders(&log, "p", 150, Duration::from_millis(100)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.pause();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.resume();
    writer.await.unwrap();

    let head = log.last_position().await.unwrap();
    let probe = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options.clone());
    for _ in 0..600 {
        if probe.position().await.unwrap() >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(probe.position().await.unwrap(), head, "caught up without help; broker log:\n{}", broker.log());
    stop.cancel();
    relaying.await.unwrap();
    projecting.await.unwrap();

    let from_store = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, options);
    from_store.prepare().await.unwrap();
    while from_store.step().await.unwrap() > 0 {}
    let via_store = rows(&client, &OrderViews.tables(1)[0]).await;
    assert_eq!(via_store.len(), 150);
    assert_eq!(rows(&client, &OrderViews.tables(2)[0]).await, via_store, "nothing missing, nothing applied twice");
    let parked: i64 = client.query_one("SELECT count(*) FROM projections.parked", &[]).await.unwrap().get(0);
    assert_eq!(parked, 0);
}

/// Orders `{prefix}-{n}` of one item each, `pause` apart.
async fn create_orders(log: &Arc<dyn EventLog>, prefix: &str, count: usize, pause: Duration) {
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    for o in 0..count {
        let order_id = format!("{prefix}-{o}");
        let items = vec![OrderItem { product_id: "sku".into(), quantity: 1, unit_price: Money::new(100, eur()) }];
        let create = orders::created(&order_id, "c", items);
        let envelope = Envelope::new(Command::Order { order_id, command: create.into() }, Meta::default());
        bus.clone().oneshot(envelope).await.unwrap();
        tokio::time::sleep(pause).await;
    }
}

/// The Kafka-fed checkpoint moves while partitions still lag, and never
/// past an event that is not applied: after every small batch, every event
/// up to the checkpoint is in the read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_fed_checkpoint_never_passes_an_unapplied_event() {
    let Bed { _db, database, log, broker, registry, client } = bed().await;
    write_orders(log.clone(), 45).await;
    let relay_config = eventfold_relay::Config {
        brokers: vec![broker.bootstrap()],
        batch_size: 7,
        ..eventfold_relay::Config::default()
    };
    let encoder = AvroEncoder::new(Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    let relay = Relay::new(database.clone(), log.clone(), Arc::new(encoder), relay_config).await.unwrap();
    let head = log.last_position().await.unwrap();
    while relay.position().await.unwrap() < head {
        relay.step().await.unwrap();
    }
    let source_config = KafkaSourceConfig {
        consumer: ConsumerConfig { brokers: vec![broker.bootstrap()], ..ConsumerConfig::default() },
        ..KafkaSourceConfig::default()
    };
    let source = KafkaSource::new(source_config, Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    // At most 2 records per partition and pull: partitions lag for many
    // pulls.
    let options = ProjectorOptions { batch_size: 2, ..ProjectorOptions::default() };
    let projector = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options).with_source(source);
    projector.prepare().await.unwrap();
    let events: Vec<(u64, String, i64)> = client
        .query("SELECT global_position, stream_id, version FROM eventstore.events ORDER BY global_position", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get(2)))
        .collect();
    let mut moves_before_the_end = 0;
    let mut last = 0;
    for _ in 0..500 {
        projector.step().await.unwrap();
        let position = projector.position().await.unwrap();
        let applied: std::collections::HashMap<String, i64> = client
            .query("SELECT order_id, stream_version FROM read.order_views_v2", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (format!("order-{}", r.get::<_, String>(0)), r.get(1)))
            .collect();
        for (event_position, stream, version) in events.iter().filter(|(p, _, _)| *p <= position) {
            assert!(
                applied.get(stream).is_some_and(|v| v >= version),
                "checkpoint {position} passed {stream} v{version} (position {event_position}), not applied"
            );
        }
        if position > last && position < head {
            moves_before_the_end += 1;
        }
        last = position;
        if position >= head {
            break;
        }
    }
    assert_eq!(last, head, "the checkpoint reached the head");
    assert!(moves_before_the_end >= 3, "it moved while partitions lagged ({moves_before_the_end} times)");
}
