//! An INTERNAL answer carries no internal text (issue 14): when a read
//! model is not what the query expects — a column it selects is gone (the
//! database refuses the statement), or a column holds another type (the row
//! does not decode) — the client gets only the generic message and an error
//! id, and the log line with the real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

use std::{sync::Arc, time::Duration};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
use eventfold_proto::query::{self as query_pb, order_query_service_client::OrderQueryServiceClient};
use eventfold_query::Query;
use eventfold_store::EventLog;
use eventfold_tests::logs::{self, assert_internal};
use tokio::net::TcpListener;
use tonic::transport::Channel;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_answer_carries_only_a_generic_message_and_an_error_id_that_the_log_repeats() {
    let logs = logs::capture();
    let (_db, database, log) = eventfold_tests::store::migrated().await;
    let log: Arc<dyn EventLog> = Arc::new(log);
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
    let query = Query::connect(&config, database, None, log).await.expect("query side");
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
    // Nor the read model's names, the column or the SQL error.
    let leaks = ["read.", "order_views", "error:", "tracking_number", "does not exist", "42703"];
    let status = orders.get_order(get()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "tracking_number");
    let status = orders.list_orders(query_pb::ListOrdersRequest::default()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "tracking_number");

    // A column of another type: the statement runs, the row does not
    // decode (this used to panic in the handler).
    admin.batch_execute(&order_views_sql(&[("carrier", Some("42"))])).await.unwrap();
    let status = orders.get_order(get()).await.unwrap_err();
    let leaks = ["read.", "order_views", "error:", "carrier", "int4", "deserializ", "convert"];
    assert_internal(&status, "INTERNAL", &logs, &leaks, "int4");
}
