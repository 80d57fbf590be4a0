//! What the relay's test binaries share: a store, a broker and the Schema
//! Registry stand-in of their own, orders written through the real command
//! bus, and the check that every stored event is on Kafka in per-stream
//! order.

#![allow(dead_code)] // each test binary uses its own part

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    order::{CancelOrder, ConfirmOrder, OrderCommand, OrderItem},
};
use eventfold_relay::{AvroEncoder, Config, Relay};
use eventfold_schemas::{Catalog, Registry, SchemaType};
use eventfold_store::{
    AllRead, Database, EventFilter, EventLog, PostgresConfig, PostgresEventLog, RecordedEvent, Upcasting,
};
use eventfold_tests::{
    TestDatabase,
    kafka::Broker,
    orders::{self, eur},
    registry::RegistryStandIn,
};
use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};
use tower::ServiceExt;

pub(crate) struct Setup {
    _db: TestDatabase,
    pub(crate) database: Database,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) broker: Broker,
    pub(crate) registry: RegistryStandIn,
}

pub(crate) async fn setup() -> Setup {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.expect("connect the log");
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let registry = RegistryStandIn::start().await;
    let client = Registry::new(registry.url()).unwrap();
    client.register_catalog(&Catalog::load().unwrap(), eventfold_proto::FILE_DESCRIPTOR_SET).await.unwrap();
    Setup { _db: db, database, log, broker: Broker::start(), registry }
}

impl Setup {
    pub(crate) fn config(&self) -> Config {
        Config {
            brokers: vec![self.broker.bootstrap()],
            batch_size: 50,
            request_timeout_ms: 2_000,
            max_backoff_ms: 500,
            ..Config::default()
        }
    }

    pub(crate) async fn relay(&self) -> Relay {
        let encoder = AvroEncoder::new(Catalog::load().unwrap(), Registry::new(self.registry.url()).unwrap());
        Relay::new(self.database.clone(), self.log.clone(), Arc::new(encoder), self.config()).await.unwrap()
    }

    /// Waits (up to `within`) until the relay's checkpoint reaches the head
    /// of the log; the checkpoint and the head then.
    pub(crate) async fn wait_caught_up(&self, within: Duration) -> (u64, u64) {
        let probe = self.relay().await;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let head = self.log.last_position().await.unwrap();
            let position = probe.position().await.unwrap();
            if position >= head || tokio::time::Instant::now() > deadline {
                return (position, head);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Order `o` through the real command bus: created, then confirmed or
/// cancelled (two events on stream `order-o-{o}`).
pub(crate) async fn write_order(log: Arc<dyn EventLog>, o: usize) {
    let bus = eventfold_command::bus(log, eventfold_command::BusOptions::default());
    let order_id = format!("o-{o}");
    let send = |command: OrderCommand| {
        let envelope = Envelope::new(Command::Order { order_id: order_id.clone(), command }, Meta::default());
        bus.clone().oneshot(envelope)
    };
    let items =
        vec![OrderItem { product_id: format!("sku-{}", o % 5), quantity: 1, unit_price: Money::new(250, eur()) }];
    send(orders::created(&order_id, &format!("c-{}", o % 3), items).into()).await.unwrap();
    let next: OrderCommand =
        if o.is_multiple_of(3) { CancelOrder { reason: "changed mind".into() }.into() } else { ConfirmOrder.into() };
    send(next).await.unwrap();
}

/// Orders `from..from + count`, `pause` after each.
pub(crate) async fn write_orders(log: Arc<dyn EventLog>, from: usize, count: usize, pause: Duration) {
    for o in from..from + count {
        write_order(log.clone(), o).await;
        tokio::time::sleep(pause).await;
    }
}

pub(crate) async fn stored(log: &Arc<dyn EventLog>) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let slice = log.read_all(AllRead { after, max_count: 1000, filter: EventFilter::default() }).await.unwrap();
        if slice.events.is_empty() {
            return all;
        }
        after = slice.next_position;
        all.extend(slice.events);
    }
}

/// One record as read back: (event id, stream id, stream version, value).
type Fetched = (String, String, u64, Vec<u8>);

/// Every record of `topic`, partition by partition, in offset order.
async fn fetch_all(broker: &Broker, topic: &str) -> Vec<Vec<Fetched>> {
    let client = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    let partitions = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == topic)
        .unwrap_or_else(|| panic!("topic {topic} exists"))
        .partitions;
    let mut out = Vec::new();
    for partition in partitions {
        let pc = client.partition_client(topic, partition, UnknownTopicHandling::Retry).await.unwrap();
        let mut records = Vec::new();
        let mut offset = 0;
        loop {
            let (batch, high_watermark) = pc.fetch_records(offset, 1..1_000_000, 1).await.unwrap();
            let from = offset;
            for r in batch.into_iter().filter(|r| r.offset >= from) {
                offset = r.offset + 1;
                let header = |name: &str| String::from_utf8(r.record.headers[name].clone()).unwrap();
                records.push((
                    header("event_id"),
                    String::from_utf8(r.record.key.clone().unwrap()).unwrap(),
                    header("stream_version").parse().unwrap(),
                    r.record.value.clone().unwrap(),
                ));
            }
            if offset >= high_watermark {
                break;
            }
        }
        out.push(records);
    }
    out
}

/// Every stored event is on its topic at least once; per stream, the
/// first deliveries come in version order (a consumer reading in offset
/// order never meets version n + 1 before n); every value is framed with
/// the registry's id for its subject and decodes to the stored body.
/// Returns how many records were duplicates (a batch sent again).
pub(crate) async fn assert_delivered(setup: &Setup) -> usize {
    let events = stored(&setup.log).await;
    assert!(!events.is_empty());
    let partitions = fetch_all(&setup.broker, "eventfold.orders.v1").await;
    let catalog = Catalog::load().unwrap();
    let registry = Registry::new(setup.registry.url()).unwrap();
    let by_id: HashMap<String, &RecordedEvent> = events.iter().map(|e| (e.event_id.to_string(), e)).collect();
    let mut delivered = HashSet::new();
    let mut next_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut duplicates = 0;
    for records in &partitions {
        for (event_id, stream, version, value) in records {
            let event = by_id.get(event_id).unwrap_or_else(|| panic!("{event_id} was stored"));
            assert_eq!((&event.stream_id, event.version), (stream, *version));
            if !delivered.insert(event_id.clone()) {
                duplicates += 1;
                continue;
            }
            let expected = next_version.entry(stream.clone()).or_insert(0);
            assert_eq!(*version, *expected, "{stream}: first deliveries in version order");
            *expected += 1;
            let (id, body) = eventfold_schemas::unwire(value).unwrap();
            assert_eq!(value[0], 0, "magic byte");
            let full = catalog.full_name(&event.event_type, event.schema_version).unwrap();
            let text = catalog.text(&event.event_type, event.schema_version).unwrap();
            let subject = eventfold_schemas::subject("eventfold.orders.v1", &full);
            assert_eq!(registry.id_of(&subject, text, SchemaType::Avro, &[]).await.unwrap(), id, "{subject}");
            let decoded = catalog.decode(&event.event_type, event.schema_version, body).unwrap();
            assert_eq!(decoded, event.data, "the Avro body decodes to the stored body");
        }
    }
    let missing = events.iter().filter(|e| !delivered.contains(&e.event_id.to_string())).count();
    assert_eq!(
        delivered.len(),
        events.len(),
        "every stored event is on Kafka: {missing} of {} missing ({duplicates} duplicates)",
        events.len()
    );
    duplicates
}
