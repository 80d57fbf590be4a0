//! The saga orchestrator crashes at `saga::after_call` (a step's calls
//! returned, their result not saved) while orders are fulfilled: each
//! crash loses an answer the provider, the carrier or the command side
//! already gave, and the step runs again after the restart. Every saga
//! still finishes once, each effect happens once (the idempotency key of
//! the step) and the stock stays whole. Its own test binary: it arms the
//! failpoint, which every step passes through.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    inventory::{RegisterProduct, ReplenishStock},
    order::{CreateOrder, OrderItem},
};
use eventfold_platform::runtime::{CancellationToken, supervise};
use eventfold_projector::{InventoryViews, OrderViews, Projection, Projector, ProjectorOptions};
use eventfold_saga::{
    Authorization, Carrier, CommandSender, Error, Fulfilment, Label, Orchestrator, OrchestratorConfig, PaymentProvider,
    RetryPolicy, SagaIntake, SandboxCarrier, SandboxConfig, SandboxPayments, Step,
};
use eventfold_store::{
    Backoff, Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting,
    failpoint::{self, Armed},
};
use eventfold_tests::TestDatabase;
use tower::ServiceExt;

const AFTER_CALL: &str = "saga::after_call";

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

fn meta() -> Meta {
    Meta { correlation_id: "test".to_owned(), ..Meta::default() }
}

/// Crashes the orchestrator right after the first call with each of the
/// first `budget` keys it sees: the call arms `saga::after_call` once, so
/// the step's own failpoint (or that of a step running beside it in the
/// same tick, which then drops this one) panics before the answer is
/// saved. Counts every call that returned, by key.
struct Crasher {
    budget: Mutex<usize>,
    seen: Mutex<BTreeSet<String>>,
    returned: Mutex<BTreeMap<String, u32>>,
    armed: Mutex<Vec<Armed>>,
}

impl Crasher {
    fn new(budget: usize) -> Crasher {
        Crasher {
            budget: Mutex::new(budget),
            seen: Mutex::default(),
            returned: Mutex::default(),
            armed: Mutex::default(),
        }
    }

    /// A call with `key` returned.
    fn returned(&self, key: &str) {
        *self.returned.lock().unwrap().entry(key.to_owned()).or_default() += 1;
        let first = self.seen.lock().unwrap().insert(key.to_owned());
        let mut budget = self.budget.lock().unwrap();
        if first && *budget > 0 {
            *budget -= 1;
            self.armed.lock().unwrap().push(failpoint::arm(AFTER_CALL, "1*panic"));
        }
    }

    /// Calls that returned.
    fn calls(&self) -> u32 {
        self.returned.lock().unwrap().values().sum()
    }
}

struct CrashingPayments {
    inner: Arc<SandboxPayments>,
    crasher: Crasher,
}

#[async_trait::async_trait]
impl PaymentProvider for CrashingPayments {
    async fn authorize(&self, key: &str, token: &str, amount: Money) -> Result<Authorization, Error> {
        let answer = self.inner.authorize(key, token, amount).await;
        self.crasher.returned(key);
        answer
    }

    async fn void(&self, key: &str) -> Result<(), Error> {
        self.inner.void(key).await
    }
}

struct CrashingCarrier {
    inner: Arc<SandboxCarrier>,
    crasher: Crasher,
}

#[async_trait::async_trait]
impl Carrier for CrashingCarrier {
    async fn create_label(&self, key: &str, order_id: &str, carrier: &str) -> Result<Label, Error> {
        let answer = self.inner.create_label(key, order_id, carrier).await;
        self.crasher.returned(key);
        answer
    }

    async fn cancel_label(&self, key: &str) -> Result<(), Error> {
        self.inner.cancel_label(key).await
    }
}

struct CrashingCommands {
    inner: eventfold_command::Bus,
    crasher: Crasher,
}

#[async_trait::async_trait]
impl CommandSender for CrashingCommands {
    async fn send(&self, command: Command, request_id: String, correlation_id: &str) -> Result<(), Error> {
        let answer = self.inner.send(command, request_id.clone(), correlation_id).await;
        self.crasher.returned(&request_id);
        answer
    }
}

/// Counts of `event_type` per order.
async fn per_order(client: &tokio_postgres::Client, event_type: &str) -> BTreeMap<String, i64> {
    client
        .query(
            "SELECT data->>'order_id', count(*) FROM eventstore.events WHERE event_type = $1 GROUP BY 1",
            &[&event_type],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Saved attempts of `step`, over all sagas.
async fn attempts(client: &tokio_postgres::Client, step: Step) -> i64 {
    client.query_one("SELECT count(*) FROM saga.saga_steps WHERE step = $1", &[&step.as_str()]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_finish_once_with_each_effect_once_across_crashes_after_a_call() {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).unwrap();
    let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    let client = database.connect().await.unwrap();
    let send = |command: Command| {
        let bus = bus.clone();
        async move {
            bus.oneshot(Envelope::new(command, meta())).await.unwrap();
        }
    };
    let register = RegisterProduct { product_id: "sku-a".into(), name: "sku-a".into() };
    send(Command::Inventory { product_id: "sku-a".into(), command: register.into() }).await;
    send(Command::Inventory { product_id: "sku-a".into(), command: ReplenishStock { quantity: 100 }.into() }).await;

    // The intake and the read models, each under its supervisor.
    let stop = CancellationToken::new();
    let mut background = Vec::new();
    let options = ProjectorOptions { idle_poll: Duration::from_millis(5), ..ProjectorOptions::default() };
    let projections: [Arc<dyn Projection>; 3] =
        [Arc::new(SagaIntake), Arc::new(OrderViews), Arc::new(InventoryViews::default())];
    for projection in projections {
        let projector = Projector::new(database.clone(), log.clone(), projection, 1, options.clone());
        projector.prepare().await.unwrap();
        projector.activate().await.unwrap();
        let run = supervise("projector", stop.clone(), Backoff::default(), move |token| projector.clone().run(token));
        background.push(tokio::spawn(run));
    }

    // 20 orders: declined payments, flaky payments and labels (retried),
    // rejected labels (compensated). Each order has a total of its own
    // (100 + o cents), by which its provider authorizations are told apart.
    let tokens = ["tok_visa", "tok_flaky", "tok_decline", "tok_visa", "tok_visa"];
    let carriers = ["DHL", "flaky_label", "DHL", "fail_label", "DHL"];
    let orders = 20;
    for o in 0..orders {
        let items =
            vec![OrderItem { product_id: "sku-a".into(), quantity: 1, unit_price: Money::new(100 + o as i64, eur()) }];
        let create = CreateOrder {
            order_id: format!("k-{o}"),
            customer_id: "c".into(),
            currency: eur(),
            items,
            payment_token: Some(tokens[o % 5].into()),
            carrier: Some(carriers[o % 5].into()),
        };
        send(Command::Order { order_id: format!("k-{o}"), command: create.into() }).await;
    }

    // The orchestrator under its supervisor, which restarts it after each
    // panic (a crash of the component), as in a process.
    let payments = Arc::new(SandboxPayments::new(SandboxConfig { latency_ms: 1 }));
    let carrier = Arc::new(SandboxCarrier::new(SandboxConfig { latency_ms: 1 }));
    let crashing_payments = Arc::new(CrashingPayments { inner: payments.clone(), crasher: Crasher::new(6) });
    let crashing_carrier = Arc::new(CrashingCarrier { inner: carrier.clone(), crasher: Crasher::new(4) });
    let crashing_commands = Arc::new(CrashingCommands { inner: bus.clone(), crasher: Crasher::new(6) });
    let fulfilment = Fulfilment {
        commands: crashing_commands.clone(),
        payments: crashing_payments.clone(),
        carrier: crashing_carrier.clone(),
    };
    // No step is to time out: the crashes, not the steps, are slow here.
    let config = OrchestratorConfig {
        step_timeout_ms: 60_000,
        concurrency: 4,
        poll_ms: 5,
        retry: RetryPolicy { max_attempts: 4, base_ms: 10, max_delay_ms: 50 },
    };
    let orchestrator = Orchestrator::new(database.clone(), fulfilment, config);
    let (_wake, wake) = tokio::sync::watch::channel(0u64);
    let restarts = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
    let orchestrating = tokio::spawn(supervise("orchestrator", stop.clone(), restarts, move |token| {
        orchestrator.clone().run(wake.clone(), token)
    }));

    let mut finished = BTreeMap::new();
    for _ in 0..3_000 {
        finished = client
            .query("SELECT correlation_id, status FROM saga.saga_instances", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<BTreeMap<_, _>>();
        if finished.len() == orders && finished.values().all(|s| s == "COMPLETED" || s == "FAILED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The read models catch up, then everything stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    orchestrating.await.unwrap();
    for task in background {
        task.await.unwrap();
    }

    // The window was hit: the failpoint fired, and calls returned whose
    // answer was never saved (the step ran again after the crash).
    let fired = failpoint::fired(AFTER_CALL);
    assert!(fired >= 1, "saga::after_call fired {fired} times");
    let provider_calls = crashing_payments.crasher.calls() + crashing_carrier.crasher.calls();
    let provider_attempts =
        attempts(&client, Step::AuthorizePayment).await + attempts(&client, Step::CreateShippingLabel).await;
    assert!(
        i64::from(provider_calls) > provider_attempts,
        "a provider call was repeated after a crash: {provider_calls} calls, {provider_attempts} saved attempts"
    );
    let command_calls = crashing_commands.crasher.calls();
    eprintln!(
        "saga::after_call: {} hits, {fired} crashes; provider calls {provider_calls} for {provider_attempts} saved \
         attempts; {command_calls} commands sent",
        failpoint::hits(AFTER_CALL)
    );

    // Each provider effect once: one authorization per authorized order,
    // one label per labelled order, whatever was called again.
    let expected = |o: usize| {
        if tokens[o % 5] == "tok_decline" || carriers[o % 5] == "fail_label" { "FAILED" } else { "COMPLETED" }
    };
    let authorized = (0..orders).filter(|o| tokens[o % 5] != "tok_decline").count();
    let labelled = (0..orders).filter(|o| tokens[o % 5] != "tok_decline" && carriers[o % 5] != "fail_label").count();
    let mut by_order: BTreeMap<i64, usize> = BTreeMap::new();
    for made in payments.authorizations() {
        *by_order.entry(made.authorization.amount.minor - 100).or_default() += 1;
    }
    assert!(by_order.values().all(|n| *n == 1), "an order authorized more than once (order: count): {by_order:?}");
    assert_eq!(payments.authorizations().len(), authorized, "one provider authorization per authorized order");
    assert_eq!(carrier.labels().len(), labelled, "one carrier label per labelled order");
    let voided = payments.authorizations().iter().filter(|a| a.voided).count();
    assert_eq!(voided, authorized - labelled, "the authorizations of the rejected labels voided");

    // Every saga finished once, as its inputs say.
    assert_eq!(finished.len(), orders, "every order has its saga: {finished:?}");
    for o in 0..orders {
        assert_eq!(finished[&format!("k-{o}")], expected(o), "order k-{o}");
    }
    let lifecycle = client
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
    for row in lifecycle {
        let counts: [i64; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
        let saga: String = row.get(0);
        assert_eq!(counts[..2], [1, 1], "saga {saga}: one start, one end");
        assert_eq!(counts[2], counts[3], "saga {saga}: one SagaStepEnded per saved attempt");
    }

    // The command side's effects once each (its request ids).
    let once = |counts: BTreeMap<String, i64>, what: &str| {
        assert!(counts.values().all(|n| *n == 1), "{what} more than once: {counts:?}");
        counts.len()
    };
    assert_eq!(once(per_order(&client, "InventoryReserved").await, "reserved"), orders);
    assert_eq!(once(per_order(&client, "PaymentAuthorized").await, "authorized"), authorized);
    assert_eq!(once(per_order(&client, "ShipmentCreated").await, "labelled"), labelled);
    let completed = (0..orders).filter(|o| expected(*o) == "COMPLETED").count();
    assert_eq!(once(per_order(&client, "OrderConfirmed").await, "confirmed"), completed);
    assert_eq!(once(per_order(&client, "OrderCancelled").await, "cancelled"), orders - completed);

    // The stock is whole: the completed orders hold their unit, the failed
    // ones nothing.
    let row = client
        .query_one("SELECT available, reserved FROM read.inventory_views WHERE product_id = 'sku-a'", &[])
        .await
        .unwrap();
    let completed = completed as i64;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (100 - completed, completed), "available, reserved");
}
