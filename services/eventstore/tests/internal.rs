//! An INTERNAL answer of the event store carries no internal text (issue
//! 14): when the database refuses a statement for a reason the store does
//! not expect (here a column of `eventstore.snapshots` is gone), the client
//! gets only the generic message and an error id, and the log line with the
//! real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::eventstore::{self as pb, event_store_service_client::EventStoreServiceClient};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog};
use eventfold_tests::TestDatabase;
use prost_types::{Struct, Value, value::Kind};
use tokio::net::TcpListener;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

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

fn state() -> Struct {
    let total = Value { kind: Some(Kind::NumberValue(1.0)) };
    Struct { fields: [("total".to_owned(), total)].into_iter().collect() }
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
    let generic = ["sqlstate", "select", "from", "eventstore.", "snapshots", "column", "db error", "postgres"];
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
    let leaks = ["head_hash", "does not exist", "42703"];
    let status = client.load_snapshot(load()).await.unwrap_err();
    assert_internal(&status, &logs, &leaks, "head_hash");
    let status = client.save_snapshot(save()).await.unwrap_err();
    assert_internal(&status, &logs, &leaks, "head_hash");
}
