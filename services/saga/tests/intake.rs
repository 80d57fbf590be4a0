//! The sagas' intake applied set-based (one statement per batch) starts
//! exactly the sagas it starts event by event, with the same rows, tells
//! the sagas' channel once per saga started, and starts nothing again when
//! the log is read once more.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    account::{DepositMoney, OpenAccount, RequestTransfer},
    order::OrderItem,
};
use eventfold_projector::{ApplyError, Projection, Projector, ProjectorOptions};
use eventfold_saga::{SagaIntake, intake::SAGA_CHANNEL};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, RecordedEvent, Upcasting};
use eventfold_tests::{
    TestDatabase,
    orders::{self, eur},
};
use futures_util::StreamExt;
use tokio_postgres::{NoTls, Transaction};
use tower::ServiceExt;

/// The intake applied one event at a time, under its own name (its own
/// checkpoint).
struct EventByEvent;

#[async_trait]
impl Projection for EventByEvent {
    fn name(&self) -> &'static str {
        "saga_intake_by_event"
    }

    fn create_sql(&self, version: u32) -> String {
        SagaIntake.create_sql(version)
    }

    fn tables(&self, version: u32) -> Vec<String> {
        SagaIntake.tables(version)
    }

    fn activate_sql(&self, version: u32) -> String {
        SagaIntake.activate_sql(version)
    }

    async fn apply(&self, tx: &Transaction<'_>, version: u32, event: &RecordedEvent) -> Result<(), ApplyError> {
        SagaIntake.apply(tx, version, event).await
    }
}

async fn run(database: &Database, log: &Arc<dyn EventLog>, projection: Arc<dyn Projection>, version: u32) {
    let options = ProjectorOptions { batch_size: 1000, ..ProjectorOptions::default() };
    let projector = Projector::new(database.clone(), log.clone(), projection, version, options);
    projector.prepare().await.unwrap();
    while projector.step().await.unwrap() > 0 {}
}

/// The sagas as rows (what both paths write; `due_at` is the time of the
/// start, so it is left out).
async fn sagas(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT row_to_json(s)::text FROM (SELECT saga_id, saga_type, correlation_id, status, current_step, \
                    state, data, deadline_at, version FROM saga.saga_instances ORDER BY saga_id) s",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_applied_set_based_starts_what_it_starts_event_by_event_once() {
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).unwrap();
    let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    let send = |command: Command| {
        let bus = bus.clone();
        async move { bus.oneshot(Envelope::new(command, Meta::default())).await.expect("command") }
    };
    // 40 orders, every third with a payment token (and so a saga), lines
    // of two products (one twice); 4 transfers requested.
    for o in 0..40 {
        let order_id = format!("o-{o}");
        let item = |product: &str, quantity| OrderItem {
            product_id: product.into(),
            quantity,
            unit_price: Money::new(250, eur()),
        };
        let mut create = orders::created(&order_id, "c-1", vec![item("sku-b", 1), item("sku-a", 2), item("sku-b", 3)]);
        if o % 3 == 0 {
            create.payment_token = Some("tok_visa".into());
            create.carrier = (o % 2 == 0).then(|| "DHL".to_owned());
        }
        send(Command::Order { order_id, command: create.into() }).await;
    }
    for a in 0..2 {
        let account_id = format!("a-{a}");
        let open = OpenAccount { account_id: account_id.clone(), owner_id: "u-1".into(), currency: eur() };
        send(Command::Account { account_id: account_id.clone(), command: open.into() }).await;
        let deposit = DepositMoney { transaction_id: format!("d-{a}"), amount: Money::new(10_000, eur()) };
        send(Command::Account { account_id, command: deposit.into() }).await;
    }
    for t in 0..4 {
        let request = RequestTransfer {
            transfer_id: format!("t-{t}"),
            to_account_id: "a-1".into(),
            amount: Money::new(100, eur()),
        };
        send(Command::Account { account_id: "a-0".into(), command: request.into() }).await;
    }

    let (client, mut connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    let (told, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = told.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute(&format!("LISTEN {SAGA_CHANNEL}")).await.unwrap();

    run(&database, &log, Arc::new(EventByEvent), 1).await;
    let by_event = sagas(&client).await;
    assert_eq!(by_event.len(), 14 + 4, "one saga per order with a token and per transfer: {by_event:#?}");
    client.batch_execute("DELETE FROM saga.saga_instances").await.unwrap();
    // Drain what the first run told.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while notifications.try_recv().is_ok() {}

    run(&database, &log, Arc::new(SagaIntake), 1).await;
    assert_eq!(sagas(&client).await, by_event, "the same sagas, row for row");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut told = Vec::new();
    while let Ok(saga_id) = notifications.try_recv() {
        told.push(saga_id);
    }
    told.sort();
    let mut started: Vec<String> =
        client.query("SELECT saga_id FROM saga.saga_instances", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    started.sort();
    assert_eq!(told, started, "the channel is told of each saga started");

    // The log read again from the start (another version): nothing starts twice.
    run(&database, &log, Arc::new(SagaIntake), 2).await;
    assert_eq!(sagas(&client).await, by_event, "nothing started again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(notifications.try_recv().is_err(), "no saga started, none told");
}
