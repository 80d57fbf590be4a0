//! The order fulfilment saga end to end on a real PostgreSQL: CreateOrder
//! through the command bus, the intake projection starting the saga, the
//! orchestrator running it against the sandbox payment provider and
//! carrier, and the read models showing the result.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    inventory::{RegisterProduct, ReplenishStock},
    order::{CreateOrder, OrderItem},
};
use eventfold_projector::{InventoryViews, OrderViews, Projection, Projector, ProjectorOptions};
use eventfold_saga::{
    Fulfilment, Orchestrator, OrchestratorConfig, RetryPolicy, SagaIntake, SandboxCarrier, SandboxConfig,
    SandboxPayments, Status, Step,
    intake::fulfilment_saga_id,
    store::{self, SagaRecord},
};
use eventfold_store::{EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;
use tower::ServiceExt;

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

struct Bed {
    db: TestDatabase,
    bus: eventfold_command::Bus,
    payments: Arc<SandboxPayments>,
    carrier: Arc<SandboxCarrier>,
    intake: Projector,
    views: Vec<Projector>,
    orchestrator: Orchestrator,
    client: tokio_postgres::Client,
}

async fn bed() -> Bed {
    let db = TestDatabase::migrated().await;
    let store = PostgresEventLog::connect(PostgresConfig::new(db.url())).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    let payments = Arc::new(SandboxPayments::new(SandboxConfig { latency_ms: 1 }));
    let carrier = Arc::new(SandboxCarrier::new(SandboxConfig { latency_ms: 1 }));
    let options = ProjectorOptions { idle_poll: Duration::from_millis(5), ..ProjectorOptions::default() };
    let intake = Projector::new(db.url(), log.clone(), Arc::new(SagaIntake), 1, options.clone()).await.unwrap();
    intake.prepare().await.unwrap();
    let mut views = Vec::new();
    for projection in [Arc::new(OrderViews) as Arc<dyn Projection>, Arc::new(InventoryViews::default())] {
        let projector = Projector::new(db.url(), log.clone(), projection, 1, options.clone()).await.unwrap();
        projector.prepare().await.unwrap();
        projector.activate().await.unwrap();
        views.push(projector);
    }
    let fulfilment =
        Fulfilment { commands: Arc::new(bus.clone()), payments: payments.clone(), carrier: carrier.clone() };
    let config = OrchestratorConfig {
        step_timeout_ms: 400,
        concurrency: 4,
        poll_ms: 5,
        retry: RetryPolicy { max_attempts: 4, base_ms: 10, max_delay_ms: 50 },
    };
    let orchestrator = Orchestrator::new(db.url(), fulfilment, config).await.unwrap();
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    let bed = Bed { db, bus, payments, carrier, intake, views, orchestrator, client };
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

impl Bed {
    async fn send(&self, command: Command) {
        self.bus.clone().oneshot(Envelope::new(command, Meta::default())).await.unwrap();
    }

    async fn order(&self, order_id: &str, token: &str, carrier: &str) {
        let items = vec![
            OrderItem { product_id: "sku-a".into(), quantity: 2, unit_price: Money::new(500, eur()) },
            OrderItem { product_id: "sku-b".into(), quantity: 1, unit_price: Money::new(250, eur()) },
        ];
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
        let saga_id = fulfilment_saga_id(order_id);
        for _ in 0..1_000 {
            while self.intake.step().await.unwrap() > 0 {}
            self.orchestrator.tick().await.unwrap();
            for view in &self.views {
                while view.step().await.unwrap() > 0 {}
            }
            if let Some(record) = store::load(&self.client, &saga_id).await.unwrap()
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

    async fn steps(&self, order_id: &str) -> Vec<(Step, String)> {
        store::steps(&self.client, &fulfilment_saga_id(order_id))
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.step, s.outcome))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_happy_path_reserves_authorizes_labels_and_confirms() {
    let bed = bed().await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_releases_the_inventory_and_cancels_the_order() {
    let bed = bed().await;
    bed.order("o-2", "tok_decline", "DHL").await;
    let saga = bed.finish("o-2").await;
    assert_eq!(saga.state.status, Status::Failed);
    assert!(saga.state.compensated(), "{:?}", saga.state);
    assert_eq!(saga.state.reason.as_deref(), Some("PAYMENT_DECLINED"));
    assert_eq!(bed.order_view("o-2").await, ("cancelled".to_owned(), Some("PAYMENT_DECLINED".to_owned())));
    let stock = bed.stock().await;
    assert_eq!((stock["sku-a"], stock["sku-b"]), ((10, 0), (10, 0)), "no reservation left");
    assert!(bed.payments.authorizations().is_empty());
    assert!(bed.carrier.labels().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_failure_voids_the_authorization_releases_and_cancels() {
    let bed = bed().await;
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
    let stock = bed.stock().await;
    assert_eq!((stock["sku-a"], stock["sku-b"]), ((10, 0), (10, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_times_out_and_the_saga_compensates() {
    let bed = bed().await;
    bed.order("o-4", "tok_timeout", "DHL").await;
    let saga = bed.finish("o-4").await;
    assert_eq!(saga.state.status, Status::Failed);
    assert!(saga.state.compensated());
    assert_eq!(saga.state.reason.as_deref(), Some("AUTHORIZE_PAYMENT_TIMED_OUT"));
    let steps = bed.steps("o-4").await;
    assert_eq!(steps[1], (Step::AuthorizePayment, "TIMED_OUT".to_owned()));
    assert!(steps.contains(&(Step::VoidAuthorization, "DONE".to_owned())), "a timed-out step is undone: {steps:?}");
    assert_eq!(bed.order_view("o-4").await, ("cancelled".to_owned(), Some("AUTHORIZE_PAYMENT_TIMED_OUT".to_owned())));
    let stock = bed.stock().await;
    assert_eq!((stock["sku-a"], stock["sku-b"]), ((10, 0), (10, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_provider_is_retried_and_authorizes_once() {
    let bed = bed().await;
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
