//! SagaService over gRPC on a real PostgreSQL: pages, filters and their
//! tokens, and the operators' abort and retry.

use std::time::{Duration, SystemTime};

use eventfold_proto::sagas::{self as pb, saga_service_client::SagaServiceClient};
use eventfold_saga::{
    SagaState, SagaType,
    grpc::{Sagas, add_services},
    store::{self, SagaRecord},
};
use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;
use tonic::Code;

fn saga(id: &str, saga_type: SagaType) -> SagaRecord {
    let (state, _) = SagaState::start(saga_type);
    SagaRecord {
        saga_id: id.to_owned(),
        correlation_id: format!("c-{id}"),
        state,
        data: serde_json::json!({}),
        // Never due: no orchestrator runs here anyway.
        due_at: SystemTime::now() + Duration::from_secs(3600),
        deadline_at: None,
        version: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_sagas_pages_by_filters_and_operators_abort_and_retry() {
    let db = TestDatabase::migrated().await;
    let (client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    for i in 0..5 {
        store::start(&client, &saga(&format!("f-{i}"), SagaType::OrderFulfilment)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    store::start(&client, &saga("t-0", SagaType::MoneyTransfer)).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sagas = Sagas::connect(db.url()).await.unwrap();
    let (_health, router) = eventfold_platform::server::router(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
    let router = add_services(router, sagas);
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    let mut api = SagaServiceClient::connect(format!("http://{addr}")).await.unwrap();

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
