//! An INTERNAL answer carries no internal text (issue 14): when a read
//! model is not what the query expects — a column it selects is gone (the
//! database refuses the statement), or a column holds another type (the row
//! does not decode) — the client gets only the generic message and an error
//! id, and the log line with the real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
use eventfold_proto::query::{self as query_pb, order_query_service_client::OrderQueryServiceClient};
use eventfold_query::Query;
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog};
use eventfold_tests::TestDatabase;
use tokio::net::TcpListener;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

/// Everything logged by this test binary.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || Capture(writer.clone())).finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this binary");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The order views' columns, `replace`d by other expressions, as the view
/// `read.order_views` the query reads (None drops the column).
fn order_views_sql(replace: &[(&str, Option<&str>)]) -> String {
    let columns = [
        "order_id",
        "customer_id",
        "status",
        "currency",
        "total_minor",
        "items",
        "payment_id",
        "carrier",
        "tracking_number",
        "cancel_reason",
        "created_at",
        "updated_at",
        "stream_version",
        "last_position",
    ];
    let select: Vec<String> = columns
        .iter()
        .filter_map(|column| match replace.iter().find(|(c, _)| c == column) {
            Some((_, Some(expression))) => Some(format!("{expression} AS {column}")),
            Some((_, None)) => None,
            None => Some((*column).to_owned()),
        })
        .collect();
    format!(
        "DROP VIEW read.order_views; CREATE VIEW read.order_views AS SELECT {} FROM read.order_views_v1",
        select.join(", ")
    )
}

/// Asserts `status` is INTERNAL with only the generic message and an error
/// id, none of `leaks` (nor SQL or driver words) in what the client sees,
/// and a log line with that id that names `cause`.
fn assert_internal(status: &tonic::Status, logs: &Mutex<Vec<u8>>, leaks: &[&str], cause: &str) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "INTERNAL", "{status:?}");
    let id = info.metadata.get("error_id").expect("an error id to find the log line by").clone();
    assert!(!id.is_empty());
    assert_eq!(status.message(), format!("internal error (error id {id})"), "only the generic message and the id");
    let generic = ["sqlstate", "select", "from", "read.", "order_views", "column", "db error", "postgres", "error:"];
    for text in std::iter::once(status.message()).chain(info.metadata.values().map(String::as_str)) {
        let text = text.to_lowercase();
        for leak in generic.iter().chain(leaks) {
            assert!(!text.contains(&leak.to_lowercase()), "{leak:?} reached the client: {status:?}");
        }
    }
    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = logged.lines().find(|line| line.contains(&id)).unwrap_or_else(|| panic!("error id {id} not logged"));
    assert!(line.contains(cause), "the log line of {id} says what failed ({cause:?}): {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_answer_carries_only_a_generic_message_and_an_error_id_that_the_log_repeats() {
    let logs = logs();
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let log: Arc<dyn EventLog> = Arc::new(
        PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await.expect("connect the log"),
    );
    // The order views as their projector creates them, with one order.
    let projector = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, ProjectorOptions::default());
    projector.prepare().await.expect("the order views");
    let admin = database.connect().await.expect("a connection");
    admin
        .batch_execute(
            "INSERT INTO read.order_views_v1 (order_id, customer_id, status, currency, total_minor, items, \
                 created_at, updated_at, stream_version, last_position) \
             VALUES ('o-1', 'c-1', 'created', 'EUR', 200, '[]', now(), now(), 0, 1)",
        )
        .await
        .expect("an order");

    let config = eventfold_query::Config::default();
    let query = Query::connect(&config, database, log).await.expect("query side");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    eventfold_query::host(&mut server, &config, query, token.clone());
    tokio::spawn(server.serve(listener, token, Duration::from_secs(5)));
    let mut orders =
        OrderQueryServiceClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy());
    let get = || query_pb::GetOrderRequest { order_id: "o-1".to_owned(), min_position: 0 };
    let order = orders.get_order(get()).await.expect("the intact read model answers").into_inner().order.unwrap();
    assert_eq!(order.customer_id, "c-1");

    // A column the query selects is gone: the database refuses the
    // statement (42703, not the UNAVAILABLE of a table not built yet).
    admin.batch_execute(&order_views_sql(&[("tracking_number", None)])).await.unwrap();
    let leaks = ["tracking_number", "does not exist", "42703"];
    let status = orders.get_order(get()).await.unwrap_err();
    assert_internal(&status, &logs, &leaks, "tracking_number");
    let status = orders.list_orders(query_pb::ListOrdersRequest::default()).await.unwrap_err();
    assert_internal(&status, &logs, &leaks, "tracking_number");

    // A column of another type: the statement runs, the row does not
    // decode (this used to panic in the handler).
    admin.batch_execute(&order_views_sql(&[("carrier", Some("42"))])).await.unwrap();
    let status = orders.get_order(get()).await.unwrap_err();
    assert_internal(&status, &logs, &["carrier", "int4", "deserializ", "convert"], "int4");
}
