//! An INTERNAL answer of the event store carries no internal text (issue
//! 14): when the database refuses a statement for a reason the store does
//! not expect (here a column of `eventstore.snapshots` is gone), the client
//! gets only the generic message and an error id, and the log line with the
//! real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

use std::{sync::Arc, time::Duration};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::eventstore::{self as pb, event_store_service_client::EventStoreServiceClient};
use eventfold_store::EventLog;
use eventfold_tests::logs::{self, assert_internal};
use prost_types::{Struct, Value, value::Kind};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use uuid::Uuid;

fn state() -> Struct {
    let total = Value { kind: Some(Kind::NumberValue(1.0)) };
    Struct { fields: [("total".to_owned(), total)].into_iter().collect() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_answer_carries_only_a_generic_message_and_an_error_id_that_the_log_repeats() {
    let logs = logs::capture();
    let (_db, database, log) = eventfold_tests::store::migrated().await;
    let log: Arc<dyn EventLog> = Arc::new(log);
    let config = eventfold_eventstore::Config::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    eventfold_eventstore::host(&mut server, &config, log, token.clone());
    tokio::spawn(server.serve(listener, token, Duration::from_secs(5)));
    let mut client =
        EventStoreServiceClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy());

    let event = pb::ProposedEvent {
        event_id: Uuid::new_v4().to_string(),
        event_type: "Created".to_owned(),
        schema_version: 1,
        data: Some(state()),
        metadata: None,
    };
    client
        .append(pb::AppendRequest {
            stream_id: "order-1".to_owned(),
            expected: None,
            events: vec![event],
            request_id: String::new(),
        })
        .await
        .expect("append");
    let save = || pb::SaveSnapshotRequest {
        stream_id: "order-1".to_owned(),
        version: 0,
        schema_version: 1,
        state: Some(state()),
    };
    client.save_snapshot(save()).await.expect("the intact store saves a snapshot");
    let load = || pb::LoadSnapshotRequest { stream_id: "order-1".to_owned(), ..Default::default() };
    client.load_snapshot(load()).await.expect("and loads it");

    // A column the store reads and writes is gone: the database refuses the
    // statements (42703, not the UNAVAILABLE of a schema not migrated yet).
    let admin = database.connect().await.expect("a connection");
    admin.batch_execute("ALTER TABLE eventstore.snapshots DROP COLUMN head_hash").await.expect("drop the column");
    // Nor the store's names, the column or the SQL error.
    let leaks = ["eventstore.", "snapshots", "head_hash", "does not exist", "42703"];
    let status = client.load_snapshot(load()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "head_hash");
    let status = client.save_snapshot(save()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "head_hash");
}
