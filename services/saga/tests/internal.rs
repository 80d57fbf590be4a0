//! An INTERNAL answer of the `SagaService` carries no internal text (issue
//! 14): when the saga store is not what the service expects — a column it
//! selects is gone (the database refuses the statement), or a saga's
//! stored state does not decode — the client gets only the generic message
//! and an error id, and the log line with the real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

mod common;

use std::time::Duration;

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::sagas::{self as pb, saga_service_client::SagaServiceClient};
use eventfold_saga::{
    SagaConfig, SagaType,
    grpc::{Sagas, host},
    store,
};
use eventfold_store::Database;
use eventfold_tests::{
    TestDatabase,
    logs::{self, assert_internal},
};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_answer_carries_only_a_generic_message_and_an_error_id_that_the_log_repeats() {
    let logs = logs::capture();
    let db = TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let admin = database.connect().await.expect("a connection");
    for id in ["s-1", "s-2"] {
        assert!(store::start(&admin, &common::saga(id, SagaType::OrderFulfilment)).await.unwrap());
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    host(&mut server, &SagaConfig::default(), Sagas::postgres(database), token.clone());
    tokio::spawn(server.serve(listener, token, Duration::from_secs(5)));
    let mut api = SagaServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let get = |id: &str| pb::GetSagaRequest { saga_id: id.to_owned() };
    assert_eq!(api.get_saga(get("s-1")).await.expect("the intact store answers").into_inner().saga.unwrap().version, 0);

    // A saga whose stored state does not decode.
    admin.batch_execute("UPDATE saga.saga_instances SET state = '{\"nope\": 1}' WHERE saga_id = 's-2'").await.unwrap();
    let status = api.get_saga(get("s-2")).await.unwrap_err();
    // Nor the saga store's names, the state or the decoder's words.
    let leaks = ["saga.", "saga_instances", "error:", "nope", "missing field", "unreadable", "s-2"];
    assert_internal(&status, "CORRUPT_DATA", &logs, &leaks, "unreadable");

    // A column the service selects is gone: the database refuses the
    // statement (42703, not the UNAVAILABLE of a schema not migrated).
    admin.batch_execute("ALTER TABLE saga.saga_instances RENAME COLUMN deadline_at TO gone").await.unwrap();
    let leaks = ["saga.", "saga_instances", "error:", "deadline_at", "does not exist", "42703"];
    let status = api.get_saga(get("s-1")).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "deadline_at");
    let status = api.list_sagas(pb::ListSagasRequest::default()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "deadline_at");
}
