//! The order fulfilment saga end to end on a real PostgreSQL: CreateOrder
//! through the command bus, the intake projection starting the saga, the
//! orchestrator running it against the sandbox payment provider and
//! carrier, and the read models showing the result. Every test runs twice:
//! with the intake on the store's log (`log::`) and on Kafka (`kafka::`:
//! the relay to a tansu broker, Avro with the Schema Registry stand-in's
//! ids, the intake on the Kafka source). The money transfer saga is here
//! too.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    inventory::{RegisterProduct, ReplenishStock},
    order::{CreateOrder, OrderItem},
};
use eventfold_platform::runtime::{Backoff, CancellationToken, supervise};
use eventfold_projector::{InventoryViews, OrderViews, Projection, Projector, ProjectorOptions};
use eventfold_saga::{
    Fulfilment, Orchestrator, OrchestratorConfig, RetryPolicy, SagaIntake, SandboxCarrier, SandboxConfig,
    SandboxPayments, Status, Step,
    intake::fulfilment_saga_id,
    store::{self, SagaRecord},
};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::TestDatabase;
use tower::ServiceExt;

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Log,
    Kafka,
}

/// The relay, the broker and the registry of a Kafka bed.
struct Bus {
    source: Arc<dyn eventfold_store::EventSource>,
    _broker: eventfold_tests::kafka::Broker,
    _registry: eventfold_tests::registry::RegistryStandIn,
    /// Stops the relay, with the bed.
    relay: CancellationToken,
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.relay.cancel();
    }
}

async fn kafka_bus(database: &Database, log: &Arc<dyn EventLog>) -> Bus {
    use eventfold_schemas::{Catalog, Registry};
    let broker = eventfold_tests::kafka::Broker::start();
    let registry = eventfold_tests::registry::RegistryStandIn::start().await;
    Registry::new(registry.url())
        .unwrap()
        .register_catalog(&Catalog::load().unwrap(), eventfold_proto::FILE_DESCRIPTOR_SET)
        .await
        .unwrap();
    let relay_config = eventfold_relay::Config {
        brokers: vec![broker.bootstrap()],
        idle_poll_ms: 5,
        linger_ms: 1,
        ..eventfold_relay::Config::default()
    };
    let encoder = eventfold_relay::AvroEncoder::new(Catalog::load().unwrap(), Registry::new(registry.url()).unwrap());
    let backoff = relay_config.backoff();
    let relay =
        eventfold_relay::Relay::new(database.clone(), log.clone(), Arc::new(encoder), relay_config).await.unwrap();
    let token = CancellationToken::new();
    tokio::spawn(supervise("relay", token.clone(), backoff, move |token| relay.clone().run(token)));
    let source_config = eventfold_bus::KafkaSourceConfig {
        consumer: eventfold_bus::ConsumerConfig {
            brokers: vec![broker.bootstrap()],
            fetch_wait_ms: 1,
            ..Default::default()
        },
        poll_ms: 5,
        ..Default::default()
    };
    let source = eventfold_bus::KafkaSource::new(
        source_config,
        Catalog::load().unwrap(),
        Registry::new(registry.url()).unwrap(),
    );
    Bus { source, _broker: broker, _registry: registry, relay: token }
}

struct Bed {
    kafka: Option<Bus>,
    db: TestDatabase,
    database: Database,
    log: Arc<dyn EventLog>,
    bus: eventfold_command::Bus,
    payments: Arc<SandboxPayments>,
    carrier: Arc<SandboxCarrier>,
    intake: Projector,
    views: Vec<Projector>,
    orchestrator: Orchestrator,
    client: tokio_postgres::Client,
}

/// Steps time out after 1.5 s: far beyond a step's time here, even on a
/// loaded machine (the timeout test waits for it once).
fn config() -> OrchestratorConfig {
    OrchestratorConfig {
        step_timeout_ms: 1_500,
        concurrency: 4,
        poll_ms: 5,
        retry: RetryPolicy { max_attempts: 4, base_ms: 10, max_delay_ms: 50 },
    }
}

async fn bed(source: Source) -> Bed {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let kafka = match source {
        Source::Log => None,
        Source::Kafka => Some(kafka_bus(&database, &log).await),
    };
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    let payments = Arc::new(SandboxPayments::new(SandboxConfig { latency_ms: 1 }));
    let carrier = Arc::new(SandboxCarrier::new(SandboxConfig { latency_ms: 1 }));
    let options = ProjectorOptions { idle_poll: Duration::from_millis(5), ..ProjectorOptions::default() };
    let mut intake = Projector::new(database.clone(), log.clone(), Arc::new(SagaIntake), 1, options.clone());
    if let Some(bus) = &kafka {
        intake = intake.with_source(bus.source.clone());
    }
    intake.prepare().await.unwrap();
    let mut views = Vec::new();
    for projection in [Arc::new(OrderViews) as Arc<dyn Projection>, Arc::new(InventoryViews::default())] {
        let projector = Projector::new(database.clone(), log.clone(), projection, 1, options.clone());
        projector.prepare().await.unwrap();
        projector.activate().await.unwrap();
        views.push(projector);
    }
    let fulfilment =
        Fulfilment { commands: Arc::new(bus.clone()), payments: payments.clone(), carrier: carrier.clone() };
    let orchestrator = Orchestrator::new(database.clone(), fulfilment, config());
    let client = database.connect().await.unwrap();
    let bed = Bed { kafka, db, database, log, bus, payments, carrier, intake, views, orchestrator, client };
    for product in ["sku-a", "sku-b"] {
        bed.send(Command::Inventory {
            product_id: product.into(),
            command: RegisterProduct { product_id: product.into(), name: product.into() }.into(),
        })
        .await;
        bed.send(Command::Inventory { product_id: product.into(), command: ReplenishStock { quantity: 10 }.into() })
            .await;
    }
    bed
}

/// Counts of `event_type` per `key` (a JSON field of the body).
async fn per(client: &tokio_postgres::Client, event_type: &str, key: &str) -> BTreeMap<String, i64> {
    client
        .query(
            "SELECT data->>$2, count(*) FROM eventstore.events WHERE event_type = $1 GROUP BY 1",
            &[&event_type, &key],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

impl Bed {
    async fn send(&self, command: Command) {
        self.bus.clone().oneshot(Envelope::new(command, test_meta())).await.unwrap();
    }

    async fn order(&self, order_id: &str, token: &str, carrier: &str) {
        let items = vec![
            OrderItem { product_id: "sku-a".into(), quantity: 2, unit_price: Money::new(500, eur()) },
            OrderItem { product_id: "sku-b".into(), quantity: 1, unit_price: Money::new(250, eur()) },
        ];
        self.order_of(order_id, token, carrier, items).await;
    }

    async fn order_of(&self, order_id: &str, token: &str, carrier: &str, items: Vec<OrderItem>) {
        let create = CreateOrder {
            order_id: order_id.into(),
            customer_id: "c-1".into(),
            currency: eur(),
            items,
            payment_token: Some(token.into()),
            carrier: Some(carrier.into()),
        };
        self.send(Command::Order { order_id: order_id.into(), command: create.into() }).await;
    }

    /// Intake, orchestrator and read models in turn until the saga of
    /// `order_id` finished and the read models caught up.
    async fn finish(&self, order_id: &str) -> SagaRecord {
        self.finish_saga(&fulfilment_saga_id(order_id)).await
    }

    async fn finish_saga(&self, saga_id: &str) -> SagaRecord {
        for _ in 0..1_000 {
            while self.intake.step().await.unwrap() > 0 {}
            self.orchestrator.tick().await.unwrap();
            for view in &self.views {
                while view.step().await.unwrap() > 0 {}
            }
            if let Some(record) = store::load(&self.client, saga_id).await.unwrap()
                && record.state.status.is_final()
            {
                for view in &self.views {
                    while view.step().await.unwrap() > 0 {}
                }
                return record;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("saga {saga_id} did not finish");
    }

    async fn order_view(&self, order_id: &str) -> (String, Option<String>) {
        let row = self
            .client
            .query_one("SELECT status, cancel_reason FROM read.order_views WHERE order_id = $1", &[&order_id])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// (available, reserved) per product, from the inventory views.
    async fn stock(&self) -> BTreeMap<String, (i64, i64)> {
        self.client
            .query("SELECT product_id, available, reserved FROM read.inventory_views", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    }

    /// The lifecycle events of saga `saga_id` in the event store, by type;
    /// on a Kafka bed, once the relay has put all of them on the broker.
    async fn lifecycle(&self, saga_id: &str) -> Vec<String> {
        let read = eventfold_store::StreamRead::forwards(format!("saga-{saga_id}"), 1_000);
        let events = self.log.read_stream(read).await.unwrap().events;
        if self.kafka.is_some() {
            let last = events.last().expect("a saga has lifecycle events").global_position as i64;
            let mut relayed = 0;
            for _ in 0..2_000 {
                relayed = self
                    .client
                    .query_opt("SELECT position FROM bus.relay_checkpoints WHERE name = 'relay'", &[])
                    .await
                    .unwrap()
                    .map_or(0, |r| r.get::<_, i64>(0));
                if relayed >= last {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(relayed >= last, "the relay put the saga's events on eventfold.sagas.v1 ({relayed} < {last})");
        }
        events.into_iter().map(|e| e.event_type).collect()
    }

    /// Both products back at their full stock, nothing reserved.
    async fn assert_nothing_reserved(&self) {
        let stock = self.stock().await;
        assert_eq!((stock["sku-a"], stock["sku-b"]), ((10, 0), (10, 0)), "no reservation left");
    }

    async fn steps(&self, order_id: &str) -> Vec<(Step, String)> {
        store::steps(&self.client, &fulfilment_saga_id(order_id))
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.step, s.outcome))
            .collect()
    }
}

async fn the_happy_path_reserves_authorizes_labels_and_confirms(source: Source) {
    let bed = bed(source).await;
    bed.order("o-1", "tok_visa", "DHL").await;
    let saga = bed.finish("o-1").await;
    assert_eq!(saga.state.status, Status::Completed);
    let done: Vec<Step> = bed.steps("o-1").await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(done, [Step::ReserveInventory, Step::AuthorizePayment, Step::CreateShippingLabel, Step::ConfirmOrder]);
    assert_eq!(bed.order_view("o-1").await, ("confirmed".to_owned(), None));
    let stock = bed.stock().await;
    assert_eq!(stock["sku-a"], (8, 2));
    assert_eq!(stock["sku-b"], (9, 1));
    let authorizations = bed.payments.authorizations();
    assert_eq!(authorizations.len(), 1);
    assert_eq!(authorizations[0].authorization.amount, Money::new(1_250, eur()), "the order's total");
    assert!(!authorizations[0].voided);
    assert_eq!(bed.carrier.labels().len(), 1);
    assert_eq!(saga.data["authorization_id"], authorizations[0].authorization.id.as_str());
    let ended = "SagaStepEnded";
    assert_eq!(bed.lifecycle(&saga.saga_id).await, ["SagaStarted", ended, ended, ended, ended, "SagaCompleted"]);
}

async fn a_declined_payment_releases_the_inventory_and_cancels_the_order(source: Source) {
    let bed = bed(source).await;
    bed.order("o-2", "tok_decline", "DHL").await;
    let saga = bed.finish("o-2").await;
    assert_eq!(saga.state.status, Status::Failed);
    assert!(saga.state.compensated(), "{:?}", saga.state);
    assert_eq!(saga.state.reason.as_deref(), Some("PAYMENT_DECLINED"));
    assert_eq!(bed.order_view("o-2").await, ("cancelled".to_owned(), Some("PAYMENT_DECLINED".to_owned())));
    bed.assert_nothing_reserved().await;
    assert!(bed.payments.authorizations().is_empty());
    assert!(bed.carrier.labels().is_empty());
    let ended = "SagaStepEnded";
    assert_eq!(
        bed.lifecycle(&saga.saga_id).await,
        ["SagaStarted", ended, ended, "SagaCompensating", ended, ended, "SagaFailed"],
        "reserve, declined authorization; release, cancel"
    );
    let read = eventfold_store::StreamRead::forwards(format!("saga-{}", saga.saga_id), 100);
    let failed = bed.log.read_stream(read).await.unwrap().events.pop().unwrap();
    assert_eq!(failed.data["reason"], "PAYMENT_DECLINED");
    assert_eq!(failed.data["compensated"], true);
}

async fn a_carrier_failure_voids_the_authorization_releases_and_cancels(source: Source) {
    let bed = bed(source).await;
    bed.order("o-3", "tok_visa", "fail_label").await;
    let saga = bed.finish("o-3").await;
    assert!(saga.state.compensated(), "{:?}", saga.state);
    assert_eq!(saga.state.reason.as_deref(), Some("LABEL_REJECTED"));
    let steps: Vec<Step> = bed.steps("o-3").await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        steps,
        [
            Step::ReserveInventory,
            Step::AuthorizePayment,
            Step::CreateShippingLabel,
            Step::VoidAuthorization,
            Step::ReleaseInventory,
            Step::CancelOrder
        ]
    );
    let authorizations = bed.payments.authorizations();
    assert_eq!(authorizations.len(), 1);
    assert!(authorizations[0].voided, "the authorization is voided");
    assert_eq!(bed.order_view("o-3").await.0, "cancelled");
    bed.assert_nothing_reserved().await;
}

async fn a_provider_that_never_answers_times_out_and_the_saga_compensates(source: Source) {
    let bed = bed(source).await;
    bed.order("o-4", "tok_timeout", "DHL").await;
    let saga = bed.finish("o-4").await;
    assert_eq!(saga.state.status, Status::Failed);
    assert!(saga.state.compensated());
    assert_eq!(saga.state.reason.as_deref(), Some("AUTHORIZE_PAYMENT_TIMED_OUT"));
    let steps = bed.steps("o-4").await;
    assert_eq!(steps[1], (Step::AuthorizePayment, "TIMED_OUT".to_owned()));
    assert!(steps.contains(&(Step::VoidAuthorization, "DONE".to_owned())), "a timed-out step is undone: {steps:?}");
    assert_eq!(bed.order_view("o-4").await, ("cancelled".to_owned(), Some("AUTHORIZE_PAYMENT_TIMED_OUT".to_owned())));
    bed.assert_nothing_reserved().await;
}

async fn a_flaky_provider_is_retried_and_authorizes_once(source: Source) {
    let bed = bed(source).await;
    bed.order("o-5", "tok_flaky", "flaky_label").await;
    let saga = bed.finish("o-5").await;
    assert_eq!(saga.state.status, Status::Completed, "{:?}", saga.state);
    let steps = bed.steps("o-5").await;
    let transient = |step| steps.iter().filter(|(s, o)| *s == step && o == "TRANSIENT").count();
    assert_eq!(transient(Step::AuthorizePayment), 2, "{steps:?}");
    assert_eq!(transient(Step::CreateShippingLabel), 2, "{steps:?}");
    assert_eq!(bed.payments.authorizations().len(), 1, "exactly one authorization");
    assert_eq!(bed.carrier.labels().len(), 1);
    assert_eq!(bed.order_view("o-5").await.0, "confirmed");
    let payments: i64 = bed
        .client
        .query_one("SELECT count(*) FROM eventstore.events WHERE event_type = 'PaymentAuthorized'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payments, 1, "one PaymentAuthorized event");
    drop(bed.db);
}

/// Statuses of every saga.
async fn statuses(client: &tokio_postgres::Client) -> BTreeMap<String, String> {
    client
        .query("SELECT correlation_id, status FROM saga.saga_instances", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The intake and the read models running in the background, each under
/// a supervisor (as in a process).
struct Background {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    async fn start(bed: &Bed) -> Background {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let projections: [Arc<dyn Projection>; 3] =
            [Arc::new(SagaIntake), Arc::new(OrderViews), Arc::new(InventoryViews::default())];
        for projection in projections {
            let projector = projector(bed, projection);
            let run =
                supervise("projector", stop.clone(), Backoff::default(), move |token| projector.clone().run(token));
            tasks.push(tokio::spawn(run));
        }
        Background { stop, tasks }
    }

    /// Lets the read models catch up, then stops them.
    async fn stop(self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// Waits until there are `orders` sagas and all finished; their statuses
/// by order.
async fn all_finished(bed: &Bed, orders: usize) -> BTreeMap<String, String> {
    let mut finished = BTreeMap::new();
    for _ in 0..3_000 {
        finished = statuses(&bed.client).await;
        if finished.len() == orders && finished.values().all(|s| s == "COMPLETED" || s == "FAILED") {
            return finished;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not every one of {orders} sagas finished: {finished:?}");
}

/// The orchestrator as a background task, and its stop switch. A failed
/// run is started again after a pause, as its supervisor does in a
/// process, but in this task: aborting the task kills the orchestrator
/// (a crash).
fn spawn_orchestrator(orchestrator: Orchestrator) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let stop = CancellationToken::new();
    // Nothing wakes it early: it polls.
    let (_wake, wake) = tokio::sync::watch::channel(0u64);
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut retries = Backoff::default().start();
        while let Err(error) = orchestrator.clone().run(wake.clone(), token.clone()).await {
            eprintln!("orchestrator failed, restarting: {error}");
            retries.wait().await;
        }
    });
    (task, stop)
}

/// A projector of `projection`; the intake reads the bed's source.
fn projector(bed: &Bed, projection: Arc<dyn Projection>) -> Projector {
    let options = ProjectorOptions { idle_poll: Duration::from_millis(5), ..ProjectorOptions::default() };
    let intake = projection.name() == SagaIntake.name();
    let projector = Projector::new(bed.database.clone(), bed.log.clone(), projection, 1, options);
    match &bed.kafka {
        Some(bus) if intake => projector.with_source(bus.source.clone()),
        _ => projector,
    }
}

/// The orchestrator is killed at random points, repeatedly, while orders
/// come in, and started again: every saga finishes exactly once, with no
/// double reservation, authorization or label.
async fn sagas_finish_exactly_once_across_orchestrator_crashes(source: Source) {
    let bed = bed(source).await;
    bed.send(Command::Inventory { product_id: "sku-a".into(), command: ReplenishStock { quantity: 100 }.into() }).await;
    let background = Background::start(&bed).await;
    let tokens = ["tok_visa", "tok_flaky", "tok_decline", "tok_visa", "tok_visa"];
    let carriers = ["DHL", "flaky_label", "DHL", "fail_label", "DHL"];
    let orders = 30;
    let writer = {
        let bus = bed.bus.clone();
        tokio::spawn(async move {
            for o in 0..orders {
                let items =
                    vec![OrderItem { product_id: "sku-a".into(), quantity: 1, unit_price: Money::new(100, eur()) }];
                let create = CreateOrder {
                    order_id: format!("k-{o}"),
                    customer_id: "c".into(),
                    currency: eur(),
                    items,
                    payment_token: Some(tokens[o % 5].into()),
                    carrier: Some(carriers[o % 5].into()),
                };
                let command = Command::Order { order_id: format!("k-{o}"), command: create.into() };
                bus.clone().oneshot(Envelope::new(command, test_meta())).await.unwrap();
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        })
    };
    let fulfilment = || Fulfilment {
        commands: Arc::new(bed.bus.clone()),
        payments: bed.payments.clone(),
        carrier: bed.carrier.clone(),
    };
    // The kills, not the steps, are what is slow here: no step is to time
    // out because its orchestrators keep dying.
    let config = || OrchestratorConfig { step_timeout_ms: 60_000, ..config() };
    // At least ten kills, and on until the orders are all written and the
    // killed orchestrators have run a step per order. The orchestrators
    // live a little longer each round, so that a loaded machine (where a
    // claim and its save take longer) still sees steps end between kills.
    let mut round = 0u64;
    loop {
        let orchestrator = Orchestrator::new(bed.database.clone(), fulfilment(), config());
        let (task, _stop) = spawn_orchestrator(orchestrator);
        tokio::time::sleep(Duration::from_millis(20 + (round * 37) % 90 + 2 * round)).await;
        task.abort();
        let _ = task.await;
        round += 1;
        let ran: i64 = bed.client.query_one("SELECT count(*) FROM saga.saga_steps", &[]).await.unwrap().get(0);
        if round >= 10 && writer.is_finished() && ran >= orders as i64 {
            break;
        }
        assert!(round < 300, "the killed orchestrators ran only {ran} steps in {round} rounds");
    }
    writer.await.unwrap();
    // Then it runs to the end.
    let orchestrator = Orchestrator::new(bed.database.clone(), fulfilment(), config());
    let (task, stop_orchestrator) = spawn_orchestrator(orchestrator);
    let finished = all_finished(&bed, orders).await;
    stop_orchestrator.cancel();
    task.await.unwrap();
    background.stop().await;

    for (o, status) in (0..orders).map(|o| (o, &finished[&format!("k-{o}")])) {
        let expected =
            if tokens[o % 5] == "tok_decline" || carriers[o % 5] == "fail_label" { "FAILED" } else { "COMPLETED" };
        if status != expected {
            let saga = store::load(&bed.client, &fulfilment_saga_id(&format!("k-{o}"))).await.unwrap();
            panic!("order k-{o}: {status}, expected {expected}: {saga:?}");
        }
    }
    let at_most_once = |counts: BTreeMap<String, i64>, what: &str| {
        assert!(counts.values().all(|n| *n == 1), "{what} more than once: {counts:?}");
        counts.len()
    };
    let reserved = at_most_once(per(&bed.client, "InventoryReserved", "order_id").await, "reserved");
    let authorized = at_most_once(per(&bed.client, "PaymentAuthorized", "order_id").await, "authorized");
    let labelled = at_most_once(per(&bed.client, "ShipmentCreated", "order_id").await, "labelled");
    at_most_once(per(&bed.client, "OrderConfirmed", "order_id").await, "confirmed");
    at_most_once(per(&bed.client, "OrderCancelled", "order_id").await, "cancelled");
    assert_eq!(reserved, orders, "every order reserved once");
    assert_eq!(authorized, orders - orders / 5, "all but the declined ones authorized once");
    assert_eq!(labelled, orders - 2 * (orders / 5), "labels for all but the declined and the carrier failures");
    let mut by_key = BTreeMap::new();
    for a in bed.payments.authorizations() {
        *by_key.entry(a.key).or_insert(0) += 1;
    }
    assert_eq!(by_key.len(), authorized, "one provider authorization per authorized order");
    // The completed orders hold their unit; the failed ones hold nothing.
    let completed = finished.values().filter(|s| *s == "COMPLETED").count() as i64;
    assert_eq!(bed.stock().await["sku-a"], (110 - completed, completed));
    // A lifecycle event is saved with its state or not at all, kills or
    // not: each saga recorded one start, one end, and one SagaStepEnded
    // per saved attempt.
    let lifecycle = bed
        .client
        .query(
            "SELECT i.saga_id, \
                    count(*) FILTER (WHERE e.event_type = 'SagaStarted'), \
                    count(*) FILTER (WHERE e.event_type IN ('SagaCompleted', 'SagaFailed')), \
                    count(*) FILTER (WHERE e.event_type = 'SagaStepEnded'), \
                    (SELECT count(*) FROM saga.saga_steps s WHERE s.saga_id = i.saga_id) \
               FROM saga.saga_instances i LEFT JOIN eventstore.events e ON e.stream_id = 'saga-' || i.saga_id \
              GROUP BY i.saga_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(lifecycle.len(), orders);
    for row in lifecycle {
        let counts: [i64; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
        assert_eq!(counts[..2], [1, 1], "saga {}: starts and ends", row.get::<_, String>(0));
        assert_eq!(counts[2], counts[3], "saga {}: one SagaStepEnded per saved attempt", row.get::<_, String>(0));
    }
}

/// 200 orders at once on 5 products with scarce stock: afterwards, for
/// every product, stock = available + reserved + shipped, the confirmed
/// orders hold exactly their lines and every cancelled order holds nothing.
async fn concurrent_sagas_on_scarce_stock_keep_the_stock_whole(source: Source) {
    let bed = bed(source).await;
    let products = ["p-0", "p-1", "p-2", "p-3", "p-4"];
    for product in products {
        bed.send(Command::Inventory {
            product_id: product.into(),
            command: RegisterProduct { product_id: product.into(), name: product.into() }.into(),
        })
        .await;
        bed.send(Command::Inventory { product_id: product.into(), command: ReplenishStock { quantity: 60 }.into() })
            .await;
    }
    let background = Background::start(&bed).await;
    let config = OrchestratorConfig { concurrency: 8, ..config() };
    let fulfilment = Fulfilment {
        commands: Arc::new(bed.bus.clone()),
        payments: bed.payments.clone(),
        carrier: bed.carrier.clone(),
    };
    let (task, stop_orchestrator) = spawn_orchestrator(Orchestrator::new(bed.database.clone(), fulfilment, config));

    // Each order: two products, 1 to 3 units each (about 400 units asked of
    // 300); one in ten is declined.
    let orders = 200;
    let lines = |o: usize| {
        vec![
            OrderItem {
                product_id: products[o % 5].into(),
                quantity: 1 + (o % 3) as u32,
                unit_price: Money::new(100, eur()),
            },
            OrderItem {
                product_id: products[(o + 2) % 5].into(),
                quantity: 1 + (o / 5 % 2) as u32,
                unit_price: Money::new(100, eur()),
            },
        ]
    };
    let creates = (0..orders).map(|o| {
        let bus = bed.bus.clone();
        let create = CreateOrder {
            order_id: format!("c-{o}"),
            customer_id: "c".into(),
            currency: eur(),
            items: lines(o),
            payment_token: Some(if o % 10 == 7 { "tok_decline" } else { "tok_visa" }.into()),
            carrier: Some("DHL".into()),
        };
        async move {
            let command = Command::Order { order_id: format!("c-{o}"), command: create.into() };
            bus.oneshot(Envelope::new(command, test_meta())).await.unwrap();
        }
    });
    futures_util::future::join_all(creates).await;

    let finished = all_finished(&bed, orders).await;
    stop_orchestrator.cancel();
    task.await.unwrap();
    background.stop().await;

    let completed: Vec<usize> = (0..orders).filter(|o| finished[&format!("c-{o}")] == "COMPLETED").collect();
    assert!(completed.len() > 50 && completed.len() < orders - 20, "scarce stock failed some: {}", completed.len());
    // What the confirmed orders hold, per product.
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    for o in &completed {
        for line in lines(*o) {
            *held.entry(line.product_id).or_default() += i64::from(line.quantity);
        }
    }
    let rows = bed
        .client
        .query(
            "SELECT product_id, available, reserved, shipped FROM read.inventory_views WHERE product_id LIKE 'p-%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    for row in rows {
        let (product, available, reserved, shipped): (String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(available + reserved + shipped, 60, "{product}: stock = available + reserved + shipped");
        assert_eq!(
            reserved,
            held.get(&product).copied().unwrap_or(0),
            "{product}: reserved = what confirmed orders hold"
        );
    }
    let holding_cancelled: i64 = bed
        .client
        .query_one(
            "SELECT count(*) FROM read.inventory_reservations r JOIN read.order_views o USING (order_id) \
              WHERE o.status = 'cancelled'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holding_cancelled, 0, "every cancelled order holds nothing");
    let cancelled: i64 = bed
        .client
        .query_one("SELECT count(*) FROM read.order_views WHERE status = 'cancelled' AND order_id LIKE 'c-%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled as usize, orders - completed.len(), "every failed saga cancelled its order");
}

async fn balance(bed: &Bed, account: &str) -> i64 {
    bed.client
        .query_one("SELECT balance_minor FROM read.accounts WHERE account_id = $1", &[&account])
        .await
        .unwrap()
        .get(0)
}

/// Accounts a (1,000) and b (empty), then a transfer of `amount` from a to
/// b; the finished saga.
async fn transfer(bed: &Bed, close_target: bool, amount: i64) -> SagaRecord {
    use eventfold_domain::account::{CloseAccount, DepositMoney, OpenAccount, RequestTransfer};
    for id in ["a", "b"] {
        let open = OpenAccount { account_id: id.into(), owner_id: "u".into(), currency: eur() };
        bed.send(Command::Account { account_id: id.into(), command: open.into() }).await;
    }
    let deposit = DepositMoney { transaction_id: "d-1".into(), amount: Money::new(1_000, eur()) };
    bed.send(Command::Account { account_id: "a".into(), command: deposit.into() }).await;
    if close_target {
        bed.send(Command::Account { account_id: "b".into(), command: CloseAccount.into() }).await;
    }
    let request =
        RequestTransfer { transfer_id: "t-1".into(), to_account_id: "b".into(), amount: Money::new(amount, eur()) };
    bed.send(Command::Account { account_id: "a".into(), command: request.into() }).await;
    bed.finish_saga(&eventfold_saga::intake::transfer_saga_id("t-1")).await
}

async fn a_transfer_withdraws_then_deposits(source: Source) {
    let bed = bed_with_accounts(source).await;
    let saga = transfer(&bed, false, 300).await;
    assert_eq!(saga.state.status, Status::Completed, "{:?}", saga.state);
    let steps: Vec<Step> = store::steps(&bed.client, &saga.saga_id).await.unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [Step::Withdraw, Step::Deposit]);
    assert_eq!((balance(&bed, "a").await, balance(&bed, "b").await), (700, 300));
    let ended = "SagaStepEnded";
    assert_eq!(bed.lifecycle(&saga.saga_id).await, ["SagaStarted", ended, ended, "SagaCompleted"]);
}

async fn a_transfer_without_the_funds_fails_and_moves_nothing(source: Source) {
    let bed = bed_with_accounts(source).await;
    let saga = transfer(&bed, false, 5_000).await;
    assert_eq!(saga.state.status, Status::Failed);
    assert_eq!(saga.state.reason.as_deref(), Some("INSUFFICIENT_FUNDS"));
    let steps: Vec<Step> = store::steps(&bed.client, &saga.saga_id).await.unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [Step::Withdraw], "nothing withdrawn, nothing to refund");
    assert_eq!((balance(&bed, "a").await, balance(&bed, "b").await), (1_000, 0));
}

async fn a_transfer_the_target_refuses_is_refunded(source: Source) {
    let bed = bed_with_accounts(source).await;
    let saga = transfer(&bed, true, 300).await;
    assert!(saga.state.compensated(), "{:?}", saga.state);
    assert_eq!(saga.state.reason.as_deref(), Some("ACCOUNT_CLOSED"));
    let steps: Vec<Step> = store::steps(&bed.client, &saga.saga_id).await.unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [Step::Withdraw, Step::Deposit, Step::RefundSource]);
    assert_eq!(balance(&bed, "a").await, 1_000, "refunded");
    let refunds: i64 = bed
        .client
        .query_one("SELECT count(*) FROM eventstore.events WHERE event_type = 'TransferRefunded'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(refunds, 1);
}

/// A bed whose read models include the account views.
async fn bed_with_accounts(source: Source) -> Bed {
    let mut bed = bed(source).await;
    let accounts = projector(&bed, Arc::new(eventfold_projector::AccountViews));
    accounts.prepare().await.unwrap();
    accounts.activate().await.unwrap();
    bed.views.push(accounts);
    bed
}

/// Each scenario on the store's log and on Kafka.
macro_rules! on_both_sources {
    ($($name:ident),* $(,)?) => {
        mod log {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Source::Log).await;
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Source::Kafka).await;
                }
            )*
        }
    };
}

on_both_sources!(
    the_happy_path_reserves_authorizes_labels_and_confirms,
    a_declined_payment_releases_the_inventory_and_cancels_the_order,
    a_carrier_failure_voids_the_authorization_releases_and_cancels,
    a_provider_that_never_answers_times_out_and_the_saga_compensates,
    a_flaky_provider_is_retried_and_authorizes_once,
    sagas_finish_exactly_once_across_orchestrator_crashes,
    concurrent_sagas_on_scarce_stock_keep_the_stock_whole,
    a_transfer_withdraws_then_deposits,
    a_transfer_without_the_funds_fails_and_moves_nothing,
    a_transfer_the_target_refuses_is_refunded,
);

/// A saga whose data cannot be read is put aside for an hour, with a
/// PARKED entry in its history; the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_with_unreadable_data_is_parked_and_holds_up_no_other() {
    let bed = bed(Source::Log).await;
    let (state, _) = eventfold_saga::SagaState::start(eventfold_saga::SagaType::OrderFulfilment);
    let now = std::time::SystemTime::now();
    let broken = SagaRecord {
        saga_id: "broken".into(),
        correlation_id: "o-broken".into(),
        state,
        data: serde_json::json!({"not": "fulfilment data"}),
        due_at: now,
        deadline_at: None,
        version: 0,
    };
    assert!(store::start(&bed.client, &broken).await.unwrap());
    bed.order("o-6", "tok_visa", "DHL").await;
    assert_eq!(bed.finish("o-6").await.state.status, Status::Completed);
    let parked = store::load(&bed.client, "broken").await.unwrap().unwrap();
    assert!(parked.due_at > now + Duration::from_secs(3000), "due again in an hour");
    let history = store::steps(&bed.client, "broken").await.unwrap();
    assert_eq!(history.last().map(|s| s.outcome.as_str()), Some("PARKED"));
}

/// The embedded `eventfold dev`: the intake and the orchestrator on the
/// in-memory log and sagas fulfil an order, then end (`Ok`) when their
/// token is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_sagas_fulfil_an_order_and_stop_with_their_token() {
    let memory_log = Arc::new(eventfold_store::MemoryEventLog::new());
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(memory_log, eventfold_command::upcasters()));
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    let send = |command: Command| {
        let bus = bus.clone();
        async move {
            bus.oneshot(Envelope::new(command, test_meta())).await.unwrap();
        }
    };
    let register = RegisterProduct { product_id: "sku-a".into(), name: "sku-a".into() };
    send(Command::Inventory { product_id: "sku-a".into(), command: register.into() }).await;
    send(Command::Inventory { product_id: "sku-a".into(), command: ReplenishStock { quantity: 10 }.into() }).await;

    let memory = eventfold_saga::MemorySagas::new(log.clone());
    let sagas = eventfold_saga::Repository::Memory(memory.clone());
    let payments = Arc::new(SandboxPayments::new(SandboxConfig { latency_ms: 1 }));
    let fulfilment = Fulfilment {
        commands: Arc::new(bus.clone()),
        payments: payments.clone(),
        carrier: Arc::new(SandboxCarrier::new(SandboxConfig { latency_ms: 1 })),
    };
    let token = CancellationToken::new();
    let intake = tokio::spawn(eventfold_saga::intake::run_in_memory(log.clone(), memory.clone(), token.clone()));
    let orchestrator = Orchestrator::over(sagas.clone(), fulfilment, config());
    let orchestrator = tokio::spawn(orchestrator.run(memory.started(), token.clone()));

    let items = vec![OrderItem { product_id: "sku-a".into(), quantity: 2, unit_price: Money::new(500, eur()) }];
    let create = CreateOrder {
        order_id: "m-1".into(),
        customer_id: "c-1".into(),
        currency: eur(),
        items,
        payment_token: Some("tok_visa".into()),
        carrier: Some("DHL".into()),
    };
    send(Command::Order { order_id: "m-1".into(), command: create.into() }).await;
    let saga_id = fulfilment_saga_id("m-1");
    let mut saga = None;
    for _ in 0..1_000 {
        saga = sagas.load(&saga_id).await.unwrap().filter(|s| s.state.status.is_final());
        if saga.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let saga = saga.expect("the saga finished");
    assert_eq!(saga.state.status, Status::Completed, "{:?}", saga.state);
    assert_eq!(sagas.steps(&saga_id).await.unwrap().len(), 4, "one attempt per step");
    assert_eq!(payments.authorizations().len(), 1);

    token.cancel();
    let stopped = Duration::from_secs(5);
    tokio::time::timeout(stopped, intake).await.expect("the intake stops").unwrap().unwrap();
    tokio::time::timeout(stopped, orchestrator).await.expect("the orchestrator stops").unwrap().unwrap();
}

/// Metadata of a command sent straight to the bus: a correlation id is
/// required (1 to 128 bytes of visible ASCII), like any caller's.
fn test_meta() -> Meta {
    Meta { correlation_id: "test".to_owned(), ..Meta::default() }
}
