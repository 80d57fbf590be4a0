//! An INTERNAL answer of the `SagaService` carries no internal text (issue
//! 14): when the saga store is not what the service expects — a column it
//! selects is gone (the database refuses the statement), or a saga's
//! stored state does not decode — the client gets only the generic message
//! and an error id, and the log line with the real error repeats that id.
//!
//! Its own test binary: the log is captured by a global subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::sagas::{self as pb, saga_service_client::SagaServiceClient};
use eventfold_saga::{
    SagaConfig, SagaState, SagaType,
    grpc::{Sagas, host},
    store::{self, SagaRecord},
};
use eventfold_store::Database;
use eventfold_tests::TestDatabase;
use tokio::net::TcpListener;
use tonic::Code;
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

/// Asserts `status` is INTERNAL with `reason`, only the generic message and
/// an error id, none of `leaks` (nor SQL or driver words) in what the
/// client sees, and a log line with that id that names `cause`.
fn assert_internal(status: &tonic::Status, reason: &str, logs: &Mutex<Vec<u8>>, leaks: &[&str], cause: &str) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, reason, "{status:?}");
    let id = info.metadata.get("error_id").expect("an error id to find the log line by").clone();
    assert!(!id.is_empty());
    assert_eq!(status.message(), format!("internal error (error id {id})"), "only the generic message and the id");
    let generic = ["sqlstate", "select", "from", "saga.", "saga_instances", "column", "db error", "postgres", "error:"];
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
    let admin = database.connect().await.expect("a connection");
    for id in ["s-1", "s-2"] {
        let (state, _) = SagaState::start(SagaType::OrderFulfilment);
        let saga = SagaRecord {
            saga_id: id.to_owned(),
            correlation_id: format!("c-{id}"),
            state,
            data: serde_json::json!({}),
            due_at: SystemTime::now() + Duration::from_secs(3600),
            deadline_at: None,
            version: 0,
        };
        assert!(store::start(&admin, &saga).await.unwrap());
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    host(&mut server, &SagaConfig::default(), Sagas::postgres(database));
    tokio::spawn(server.serve(listener, token, Duration::from_secs(5)));
    let mut api = SagaServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let get = |id: &str| pb::GetSagaRequest { saga_id: id.to_owned() };
    assert_eq!(api.get_saga(get("s-1")).await.expect("the intact store answers").into_inner().saga.unwrap().version, 0);

    // A saga whose stored state does not decode.
    admin.batch_execute("UPDATE saga.saga_instances SET state = '{\"nope\": 1}' WHERE saga_id = 's-2'").await.unwrap();
    let status = api.get_saga(get("s-2")).await.unwrap_err();
    assert_internal(&status, "CORRUPT_DATA", &logs, &["nope", "missing field", "unreadable", "s-2"], "unreadable");

    // A column the service selects is gone: the database refuses the
    // statement (42703, not the UNAVAILABLE of a schema not migrated).
    admin.batch_execute("ALTER TABLE saga.saga_instances RENAME COLUMN deadline_at TO gone").await.unwrap();
    let leaks = ["deadline_at", "does not exist", "42703"];
    let status = api.get_saga(get("s-1")).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "deadline_at");
    let status = api.list_sagas(pb::ListSagasRequest::default()).await.unwrap_err();
    assert_internal(&status, "INTERNAL", &logs, &leaks, "deadline_at");
}
