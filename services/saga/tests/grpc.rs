//! SagaService over gRPC on a real PostgreSQL: pages, filters and their
//! tokens, the operators' abort and retry, shared and capped watches, and
//! what an outage answers.

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
use eventfold_tests::TestDatabase;
use tonic::Code;

use crate::common::saga;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sagas_pages_by_filters_and_operators_abort_and_retry() {
    let db = TestDatabase::migrated().await;
    let client = Database::from_url(db.url()).unwrap().connect().await.unwrap();
    for i in 0..5 {
        store::start(&client, &saga(&format!("f-{i}"), SagaType::OrderFulfilment)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    store::start(&client, &saga("t-0", SagaType::MoneyTransfer)).await.unwrap();

    let mut api = serve(sagas(db.url()), &SagaConfig::default()).await;

    // Fulfilment sagas, newest first, two a page.
    let fulfilment = pb::SagaType::OrderFulfilment as i32;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list_sagas(pb::ListSagasRequest {
                r#type: fulfilment,
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sagas.len() <= 2);
        seen.extend(page.sagas.iter().map(|s| s.saga_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // A token used with other filters is refused.
        let other = api
            .list_sagas(pb::ListSagasRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::InvalidArgument);
    }
    assert_eq!(seen, ["f-4", "f-3", "f-2", "f-1", "f-0"]);
    let all = api.list_sagas(pb::ListSagasRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.sagas.len(), 6);
    let large = api.list_sagas(pb::ListSagasRequest { page_size: 10_000, ..Default::default() }).await.unwrap();
    assert_eq!(large.into_inner().sagas.len(), 6, "a page size above 500 is lowered, not refused (AIP-158)");

    // Nothing to retry on a running saga; an abort compensates it.
    let retry = api.retry_saga(pb::RetrySagaRequest { saga_id: "f-1".into() }).await.unwrap_err();
    assert_eq!(retry.code(), Code::FailedPrecondition);
    let aborted = api.abort_saga(pb::AbortSagaRequest { saga_id: "f-1".into() }).await.unwrap().into_inner();
    let aborted = aborted.saga.unwrap();
    assert_eq!(aborted.status, pb::SagaStatus::Compensating as i32);
    assert_eq!(aborted.reason, "ABORTED");
    assert_eq!(aborted.current_step, "CANCEL_ORDER", "nothing was done: only the order is cancelled");
    let again = api.abort_saga(pb::AbortSagaRequest { saga_id: "f-1".into() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let missing = api.get_saga(pb::GetSagaRequest { saga_id: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let stored = store::load(&client, "f-1").await.unwrap().unwrap();
    assert_eq!(stored.version, 1, "saved once");
}

/// What the `google.rpc.Status` details of a status say, decoded by hand
/// (this crate does not depend on tonic-types): the ErrorInfo's reason and
/// metadata, the BadRequest's fields.
#[derive(Debug, Default)]
struct Details {
    reason: Option<String>,
    metadata: std::collections::BTreeMap<String, String>,
    bad_fields: Vec<String>,
}

fn varint(bytes: &mut &[u8]) -> u64 {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let (byte, rest) = bytes.split_first().expect("a complete varint");
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if *byte < 0x80 {
            break;
        }
    }
    value
}

/// The length-delimited fields of a protobuf message, by number.
fn fields(mut bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut found = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        match key & 7 {
            0 => drop(varint(&mut bytes)),
            1 => bytes = &bytes[8..],
            2 => {
                let len = usize::try_from(varint(&mut bytes)).unwrap();
                let (value, rest) = bytes.split_at(len);
                found.push((key >> 3, value));
                bytes = rest;
            }
            5 => bytes = &bytes[4..],
            other => panic!("wire type {other}"),
        }
    }
    found
}

fn details(status: &tonic::Status) -> Details {
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
    let field = |message: &[u8], n: u64| fields(message).into_iter().find(|(m, _)| *m == n).map(|(_, v)| v.to_vec());
    let mut found = Details::default();
    for (n, any) in fields(status.details()) {
        // google.rpc.Status.details: Any { type_url = 1, value = 2 }.
        if n != 3 {
            continue;
        }
        let type_url = field(any, 1).map(|t| text(&t)).unwrap_or_default();
        let value = field(any, 2).unwrap_or_default();
        for (n, part) in fields(&value) {
            match (type_url.rsplit('/').next(), n) {
                (Some("google.rpc.ErrorInfo"), 1) => found.reason = Some(text(part)),
                (Some("google.rpc.ErrorInfo"), 3) => {
                    let key = field(part, 1).map(|k| text(&k)).unwrap_or_default();
                    found.metadata.insert(key, field(part, 2).map(|v| text(&v)).unwrap_or_default());
                }
                (Some("google.rpc.BadRequest"), 1) => found.bad_fields.extend(field(part, 1).map(|f| text(&f))),
                _ => {}
            }
        }
    }
    found
}

/// The next message of a watch, within 10 s.
async fn message(stream: &mut tonic::Streaming<pb::WatchSagaResponse>) -> pb::Saga {
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    next.expect("a message within 10 s").unwrap().unwrap().saga.unwrap()
}

/// The service over the sagas of the database at `url` (its pool
/// connects lazily).
fn sagas(url: &str) -> Sagas {
    Sagas::postgres(Database::from_url(url).unwrap())
}

/// The saga service hosted with `config` on a loopback port, served until
/// the test ends: its client.
async fn serve(sagas: Sagas, config: &SagaConfig) -> SagaServiceClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = GrpcServer::new();
    let token = CancellationToken::new();
    host(&mut server, config, sagas, token.clone());
    tokio::spawn(server.serve(listener, token, Duration::from_secs(1)));
    SagaServiceClient::connect(format!("http://{addr}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_saga_is_shared_by_its_watchers_capped_per_peer_and_saga_ids_are_bounded() {
    let db = TestDatabase::migrated().await;
    let client = Database::from_url(db.url()).unwrap().connect().await.unwrap();
    for id in ["f-0", "f-1", "f-2"] {
        store::start(&client, &saga(id, SagaType::OrderFulfilment)).await.unwrap();
    }
    let api = serve(sagas(db.url()), &SagaConfig { max_watchers_per_peer: 2, ..SagaConfig::default() }).await;
    let watch = |id: &str| {
        let mut api = api.clone();
        let request = pb::WatchSagaRequest { saga_id: id.to_owned() };
        async move { api.watch_saga(request).await.map(tonic::Response::into_inner) }
    };
    let mut first = watch("f-0").await.unwrap();
    let mut second = watch("f-0").await.unwrap();
    for stream in [&mut first, &mut second] {
        assert_eq!(message(stream).await.version, 0, "the saga now, first");
    }
    let refused = watch("f-1").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(details(&refused).reason.as_deref(), Some("TOO_MANY_WATCHERS"));

    // Both watchers of f-0 see its change.
    api.clone().abort_saga(pb::AbortSagaRequest { saga_id: "f-0".into() }).await.unwrap();
    for stream in [&mut first, &mut second] {
        let saga = message(stream).await;
        assert_eq!((saga.version, saga.status), (1, pb::SagaStatus::Compensating as i32));
    }

    // A closed watch frees its slot.
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut other = loop {
        match watch("f-1").await {
            Ok(stream) => break stream,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "the closed watch was let go");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(message(&mut other).await.saga_id, "f-1");

    // Saga ids: visible ASCII, at most 137 bytes (a 128-byte order id and
    // its prefix).
    for id in ["f 0".to_owned(), "f\u{7f}".to_owned(), "é".to_owned(), "x".repeat(138)] {
        let status = api.clone().get_saga(pb::GetSagaRequest { saga_id: id.clone() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{id:?}: {status:?}");
        assert_eq!(details(&status).bad_fields, ["saga_id"]);
    }
    let status = api.clone().get_saga(pb::GetSagaRequest { saga_id: format!("fulfil-{}", "x".repeat(128)) }).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound, "the longest order id's saga is a valid id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_ends_watch_saga_streams_before_the_grace_period() {
    let db = TestDatabase::migrated().await;
    let client = Database::from_url(db.url()).unwrap().connect().await.unwrap();
    store::start(&client, &saga("w-0", SagaType::OrderFulfilment)).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let mut server = GrpcServer::new();
    host(&mut server, &SagaConfig::default(), sagas(db.url()), token.clone());
    // A grace period far longer than the test may take: only the token can
    // end the stream in time.
    let serving = tokio::spawn(server.serve(listener, token.clone(), Duration::from_secs(60)));
    let mut api = SagaServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut stream = api.watch_saga(pb::WatchSagaRequest { saga_id: "w-0".into() }).await.unwrap().into_inner();
    assert_eq!(message(&mut stream).await.version, 0, "the saga now, first");

    token.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the running saga's watch ends within 5 s of the stop, not at the 60 s grace");
    assert!(matches!(end, Ok(None)), "ended with OK, not cut off: {end:?}");
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the server drains once its streams ended")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_saga_store_answers_unavailable_with_an_error_id_and_no_driver_text() {
    let url = eventfold_tests::unreachable_database_url();
    let port = url.rsplit(':').next().and_then(|p| p.split('/').next()).unwrap().to_owned();
    let api = serve(sagas(&url), &SagaConfig::default()).await;
    let (mut a, mut b, mut c) = (api.clone(), api.clone(), api.clone());
    let (got, listed, watched) = tokio::join!(
        a.get_saga(pb::GetSagaRequest { saga_id: "f-0".into() }),
        b.list_sagas(pb::ListSagasRequest::default()),
        c.watch_saga(pb::WatchSagaRequest { saga_id: "f-0".into() }),
    );
    let statuses = [got.unwrap_err(), listed.unwrap_err(), watched.map(drop).unwrap_err()];
    for status in &statuses {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let info = details(status);
        assert!(info.reason.is_some(), "an ErrorInfo: {status:?}");
        if let Err(e) = eventfold_tests::hostile::check_no_internal_text(status, &[&port]) {
            panic!("{e}");
        }
    }
}
