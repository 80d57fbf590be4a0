//! The gRPC surface of the event store, end to end: the real server
//! (`eventfold_eventstore::host` on a `GrpcServer`) on a loopback port, the generated tonic
//! clients, and the same cases over the in-memory log and PostgreSQL.

mod common;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use eventfold_eventstore::{Config, ERROR_DOMAIN, SERVICE_NAME};
use eventfold_platform::runtime::CancellationToken;
use eventfold_proto::eventstore::{self as pb, event_store_service_client::EventStoreServiceClient};
use eventfold_tests::store::{Backend, memory, postgres};
use prost_types::{Struct, Value, value::Kind};
use tokio::task::JoinHandle;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_types::StatusExt;
use uuid::Uuid;

type Client = EventStoreServiceClient<Channel>;

// --- harness -------------------------------------------------------------------

/// A running server and clients of it.
struct Server {
    addr: SocketAddr,
    client: Client,
    health: HealthClient<Channel>,
    token: CancellationToken,
    handle: JoinHandle<Result<(), eventfold_platform::Error>>,
    _backend: Backend,
}

impl Server {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Config::default()).await
    }

    async fn start_with(backend: Backend, config: Config) -> Self {
        let (addr, channel, token, handle) = common::serve(backend.log.clone(), &config).await;
        Server {
            addr,
            client: EventStoreServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            token,
            handle,
            _backend: backend,
        }
    }

    /// Signal shutdown; the server future must end within `within`.
    async fn stop(mut self, within: Duration) {
        self.token.cancel();
        let result = tokio::time::timeout(within, &mut self.handle)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop within {within:?} of the shutdown signal"));
        result.expect("server task").expect("server result");
    }

    async fn health(&mut self, service: &str) -> ServingStatus {
        let response = self
            .health
            .check(HealthCheckRequest { service: service.to_owned() })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
            .into_inner();
        ServingStatus::try_from(response.status).expect("known serving status")
    }

    /// Polls the health of `service` until it is `want` (at most ~5 s).
    async fn wait_health(&mut self, service: &str, want: ServingStatus) {
        let mut last = ServingStatus::Unknown;
        for _ in 0..50 {
            last = self.health(service).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("health of {service:?} stayed {last:?}, expected {want:?}");
    }
}

eventfold_tests::backends!(
    append_and_read_round_trip,
    read_all_filters,
    list_streams_pages,
    wrong_expected_version_is_aborted,
    bad_arguments_are_field_violations,
    missing_and_deleted_streams_are_not_found,
    request_id_retry_is_a_duplicate,
    verify_branch_temporal_and_snapshots,
    subscribe_then_shutdown,
    health_is_serving,
    edge_cases,
);

// --- helpers --------------------------------------------------------------------

fn num(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_owned())) }
}

fn object(fields: Vec<(&str, Value)>) -> Struct {
    Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
}

fn event(event_type: &str, n: f64) -> pb::ProposedEvent {
    pb::ProposedEvent {
        event_id: Uuid::new_v4().to_string(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        data: Some(object(vec![("n", num(n))])),
        metadata: None,
    }
}

fn append_request(stream: &str, events: Vec<pb::ProposedEvent>) -> pb::AppendRequest {
    pb::AppendRequest { stream_id: stream.to_owned(), expected: None, events, request_id: String::new() }
}

async fn append(client: &mut Client, stream: &str, events: Vec<pb::ProposedEvent>) -> pb::AppendResponse {
    client
        .append(append_request(stream, events))
        .await
        .unwrap_or_else(|s| panic!("append to {stream}: {s:?}"))
        .into_inner()
}

async fn append_n(client: &mut Client, stream: &str, n: usize) -> pb::AppendResponse {
    append(client, stream, (0..n).map(|i| event("Counted", i as f64)).collect()).await
}

async fn read_stream(client: &mut Client, stream: &str) -> Result<pb::ReadStreamResponse, Status> {
    client
        .read_stream(pb::ReadStreamRequest { stream_id: stream.to_owned(), ..Default::default() })
        .await
        .map(tonic::Response::into_inner)
}

async fn read_all(client: &mut Client) -> Vec<pb::RecordedEvent> {
    client.read_all(pb::ReadAllRequest::default()).await.expect("read all").into_inner().events
}

/// The `ErrorInfo` of a status, asserting its domain.
fn error_info(status: &Status) -> tonic_types::ErrorInfo {
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, ERROR_DOMAIN, "{status:?}");
    info
}

fn assert_reason(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info(status).reason, reason, "{status:?}");
}

/// Asserts INVALID_ARGUMENT with a `BadRequest` violation of `field`.
fn assert_violation(status: &Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status.get_details_bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let fields: Vec<&str> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&field), "violations {fields:?} do not name {field}: {status:?}");
    assert!(bad.field_violations.iter().all(|v| !v.description.is_empty()), "{bad:?}");
}

// --- cases -----------------------------------------------------------------------

async fn append_and_read_round_trip(mut server: Server) {
    let c = &mut server.client;
    let data = object(vec![
        ("name", string("Ada")),
        ("qty", num(3.0)),
        ("price", num(9.75)),
        (
            "tags",
            Value { kind: Some(Kind::ListValue(prost_types::ListValue { values: vec![string("a"), num(-1.0)] })) },
        ),
        (
            "nested",
            Value { kind: Some(Kind::StructValue(object(vec![("ok", Value { kind: Some(Kind::BoolValue(true)) })]))) },
        ),
        ("none", Value { kind: Some(Kind::NullValue(0)) }),
    ]);
    let metadata = pb::EventMetadata {
        correlation_id: "corr-1".to_owned(),
        causation_id: "cause-1".to_owned(),
        user_id: "user-1".to_owned(),
        custom: HashMap::from([("tenant".to_owned(), "acme".to_owned())]),
    };
    let event_id = Uuid::new_v4().to_string();
    let appended = append(
        c,
        "order-1",
        vec![
            pb::ProposedEvent {
                event_id: event_id.clone(),
                event_type: "OrderCreated".to_owned(),
                schema_version: 2,
                data: Some(data.clone()),
                metadata: Some(metadata.clone()),
            },
            event("OrderPaid", 1.0),
        ],
    )
    .await;
    assert_eq!(appended.stream_id, "order-1");
    assert_eq!(appended.first_version, 0);
    assert_eq!(appended.next_expected_version, 1);
    assert_eq!(appended.positions.len(), 2);
    assert!(appended.positions[0] >= 1 && appended.positions[1] > appended.positions[0], "{appended:?}");
    assert_eq!(appended.last_position, appended.positions[1]);
    assert!(!appended.duplicate);

    let read = read_stream(c, "order-1").await.expect("read stream");
    assert_eq!(read.stream_version, 1);
    assert!(read.end_of_stream);
    assert_eq!(read.events.len(), 2);
    let first = &read.events[0];
    assert_eq!(first.event_id, event_id);
    assert_eq!(first.stream_id, "order-1");
    assert_eq!(first.version, 0);
    assert_eq!(first.global_position, appended.positions[0]);
    assert_eq!(first.event_type, "OrderCreated");
    assert_eq!(first.schema_version, 2);
    assert_eq!(first.data.as_ref(), Some(&data));
    assert_eq!(first.metadata.as_ref(), Some(&metadata));
    assert!(first.create_time.is_some());
    assert_eq!(first.hash.len(), 64, "hex SHA-256: {}", first.hash);
    assert_eq!(read.events[1].version, 1);
    assert_eq!(read.events[1].event_type, "OrderPaid");

    // Backwards from the end.
    let back = c
        .read_stream(pb::ReadStreamRequest {
            stream_id: "order-1".to_owned(),
            direction: pb::ReadDirection::Backwards as i32,
            max_count: 1,
            ..Default::default()
        })
        .await
        .expect("read backwards")
        .into_inner();
    assert_eq!(back.events.iter().map(|e| e.version).collect::<Vec<_>>(), [1]);
    assert!(!back.end_of_stream);

    let info = c
        .get_stream(pb::GetStreamRequest { stream_id: "order-1".to_owned() })
        .await
        .expect("get stream")
        .into_inner()
        .stream
        .expect("stream");
    assert_eq!(info.version, Some(1));
    assert_eq!(info.head_hash, read.events[1].hash);
}

async fn read_all_filters(mut server: Server) {
    let c = &mut server.client;
    append(c, "order-1", vec![event("OrderCreated", 1.0), event("OrderPaid", 2.0)]).await;
    append(c, "pay-1", vec![event("PaymentTaken", 3.0)]).await;
    append(c, "order-2", vec![event("OrderCreated", 4.0)]).await;

    let all = read_all(c).await;
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].global_position < w[1].global_position));

    let orders = c
        .read_all(pb::ReadAllRequest {
            filter: Some(pb::EventFilter { stream_prefixes: vec!["order-".to_owned()], event_types: vec![] }),
            ..Default::default()
        })
        .await
        .expect("read all by prefix")
        .into_inner();
    assert_eq!(
        orders.events.iter().map(|e| e.stream_id.as_str()).collect::<Vec<_>>(),
        ["order-1", "order-1", "order-2"]
    );
    assert!(orders.end_of_log);
    assert_eq!(orders.next_position, all[3].global_position);

    let created = c
        .read_all(pb::ReadAllRequest {
            filter: Some(pb::EventFilter {
                stream_prefixes: vec!["order-".to_owned()],
                event_types: vec!["OrderCreated".to_owned()],
            }),
            ..Default::default()
        })
        .await
        .expect("read all by prefix and type")
        .into_inner();
    assert_eq!(created.events.iter().map(|e| e.stream_id.as_str()).collect::<Vec<_>>(), ["order-1", "order-2"]);

    // Paging by position.
    let page = c
        .read_all(pb::ReadAllRequest { from_position: all[1].global_position, max_count: 1, ..Default::default() })
        .await
        .expect("read all page")
        .into_inner();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].event_id, all[2].event_id);
    assert!(!page.end_of_log);

    let empty_prefix = c
        .read_all(pb::ReadAllRequest {
            filter: Some(pb::EventFilter { stream_prefixes: vec![String::new()], event_types: vec![] }),
            ..Default::default()
        })
        .await
        .expect_err("an empty prefix is invalid");
    assert_violation(&empty_prefix, "filter.stream_prefixes[0]");
}

async fn list_streams_pages(mut server: Server) {
    let c = &mut server.client;
    for id in ["order-3", "order-1", "pay-1", "order-5", "order-2", "order-4"] {
        append_n(c, id, 1).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_streams(pb::ListStreamsRequest {
                page_size: 2,
                page_token: token.clone(),
                prefix: "order-".to_owned(),
                show_deleted: false,
            })
            .await
            .expect("list streams")
            .into_inner();
        pages += 1;
        assert!(page.streams.len() <= 2, "{page:?}");
        seen.extend(page.streams.iter().map(|s| s.stream_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 10, "paging does not end");
        token = page.next_page_token;
    }
    assert_eq!(seen, ["order-1", "order-2", "order-3", "order-4", "order-5"]);
    assert_eq!(pages, 3);

    // Every stream without a prefix, default page size: one page.
    let all = c.list_streams(pb::ListStreamsRequest::default()).await.expect("list all").into_inner();
    assert_eq!(all.streams.len(), 6);
    assert!(all.next_page_token.is_empty());

    // A token of the `order-` listing reused with another prefix.
    let first = c
        .list_streams(pb::ListStreamsRequest { page_size: 2, prefix: "order-".to_owned(), ..Default::default() })
        .await
        .expect("first page")
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let reused = c
        .list_streams(pb::ListStreamsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            prefix: "pay-".to_owned(),
            show_deleted: false,
        })
        .await
        .expect_err("a token of another filter");
    assert_violation(&reused, "page_token");
    assert_reason(&reused, Code::InvalidArgument, "INVALID_ARGUMENT");

    let garbage = c
        .list_streams(pb::ListStreamsRequest { page_token: "%%%".to_owned(), ..Default::default() })
        .await
        .expect_err("not a token");
    assert_violation(&garbage, "page_token");

    let negative = c
        .list_streams(pb::ListStreamsRequest { page_size: -1, ..Default::default() })
        .await
        .expect_err("negative size");
    assert_violation(&negative, "page_size");
}

async fn wrong_expected_version_is_aborted(mut server: Server) {
    let c = &mut server.client;
    append_n(c, "order-1", 1).await;
    let mut request = append_request("order-1", vec![event("Late", 0.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedVersion(5));
    let status = c.append(request).await.expect_err("wrong expected version");
    assert_reason(&status, Code::Aborted, "WRONG_EXPECTED_VERSION");
    let info = error_info(&status);
    assert_eq!(info.metadata.get("stream").map(String::as_str), Some("order-1"), "{info:?}");
    assert_eq!(info.metadata.get("expected").map(String::as_str), Some("5"), "{info:?}");
    assert_eq!(info.metadata.get("actual").map(String::as_str), Some("0"), "{info:?}");

    // NO_STREAM on an existing stream.
    let mut request = append_request("order-1", vec![event("Late", 0.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedState(pb::ExpectedState::NoStream as i32));
    let status = c.append(request).await.expect_err("stream exists");
    assert_reason(&status, Code::Aborted, "WRONG_EXPECTED_VERSION");
    assert_eq!(error_info(&status).metadata.get("actual").map(String::as_str), Some("0"));

    // STREAM_EXISTS on a missing stream.
    let mut request = append_request("order-2", vec![event("Early", 0.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedState(pb::ExpectedState::StreamExists as i32));
    let status = c.append(request).await.expect_err("no stream");
    assert_reason(&status, Code::Aborted, "WRONG_EXPECTED_VERSION");
    assert_eq!(error_info(&status).metadata.get("actual").map(String::as_str), Some("no stream"));

    assert_eq!(read_all(c).await.len(), 1, "nothing appended by the failed appends");

    // The right version succeeds.
    let mut request = append_request("order-1", vec![event("OnTime", 0.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedVersion(0));
    let ok = c.append(request).await.expect("right expected version").into_inner();
    assert_eq!((ok.first_version, ok.next_expected_version), (1, 1));
}

async fn bad_arguments_are_field_violations(mut server: Server) {
    let c = &mut server.client;

    let status = c.append(append_request("", vec![event("E", 1.0)])).await.expect_err("empty stream id");
    assert_violation(&status, "stream_id");
    assert_reason(&status, Code::InvalidArgument, "INVALID_ARGUMENT");

    let status = c.append(append_request("s-1", vec![])).await.expect_err("no events");
    assert_violation(&status, "events");

    let mut bad_id = event("E", 1.0);
    bad_id.event_id = "not-a-uuid".to_owned();
    let status = c.append(append_request("s-1", vec![bad_id])).await.expect_err("bad event id");
    assert_violation(&status, "events[0].event_id");

    let mut nan = event("E", 1.0);
    nan.data = Some(object(vec![("x", num(f64::NAN))]));
    let status = c.append(append_request("s-1", vec![event("Fine", 1.0), nan])).await.expect_err("NaN");
    assert_violation(&status, "events[1].data.x");

    let mut empty_type = event("", 1.0);
    empty_type.event_type = String::new();
    let status = c.append(append_request("s-1", vec![empty_type])).await.expect_err("empty event type");
    assert_violation(&status, "events[0].event_type");

    // Several violations at once are all reported.
    let mut bad_id = event("E", 1.0);
    bad_id.event_id = "not-a-uuid".to_owned();
    let status = c.append(append_request("", vec![bad_id])).await.expect_err("two violations");
    assert_violation(&status, "stream_id");
    assert_violation(&status, "events[0].event_id");

    let status = read_stream(c, "").await.expect_err("read with empty stream id");
    assert_violation(&status, "stream_id");

    assert!(read_all(c).await.is_empty(), "nothing appended by invalid requests");
    let status = read_stream(c, "s-1").await.expect_err("s-1 was never created");
    assert_reason(&status, Code::NotFound, "STREAM_NOT_FOUND");
}

async fn missing_and_deleted_streams_are_not_found(mut server: Server) {
    let c = &mut server.client;
    let status = read_stream(c, "nobody").await.expect_err("unknown stream");
    assert_reason(&status, Code::NotFound, "STREAM_NOT_FOUND");
    assert_eq!(error_info(&status).metadata.get("stream").map(String::as_str), Some("nobody"));
    let status =
        c.get_stream(pb::GetStreamRequest { stream_id: "nobody".to_owned() }).await.expect_err("unknown stream");
    assert_reason(&status, Code::NotFound, "STREAM_NOT_FOUND");

    append_n(c, "doomed", 2).await;
    let status = c
        .delete_stream(pb::DeleteStreamRequest { stream_id: "doomed".to_owned(), expected_version: Some(0) })
        .await
        .expect_err("wrong expected version of the delete");
    assert_reason(&status, Code::Aborted, "WRONG_EXPECTED_VERSION");

    let deleted = c
        .delete_stream(pb::DeleteStreamRequest { stream_id: "doomed".to_owned(), expected_version: Some(1) })
        .await
        .expect("delete")
        .into_inner()
        .stream
        .expect("stream");
    assert_eq!(deleted.stream_id, "doomed");
    assert!(deleted.delete_time.is_some(), "{deleted:?}");

    let status = read_stream(c, "doomed").await.expect_err("deleted stream");
    assert_reason(&status, Code::NotFound, "STREAM_DELETED");
    assert_eq!(error_info(&status).metadata.get("stream").map(String::as_str), Some("doomed"));
    let status =
        c.get_stream(pb::GetStreamRequest { stream_id: "doomed".to_owned() }).await.expect_err("deleted stream");
    assert_reason(&status, Code::NotFound, "STREAM_DELETED");

    // Listed only with show_deleted.
    let listed = c.list_streams(pb::ListStreamsRequest::default()).await.expect("list").into_inner();
    assert!(listed.streams.is_empty(), "{listed:?}");
    let listed = c
        .list_streams(pb::ListStreamsRequest { show_deleted: true, ..Default::default() })
        .await
        .expect("list deleted")
        .into_inner();
    assert_eq!(listed.streams.iter().map(|s| s.stream_id.as_str()).collect::<Vec<_>>(), ["doomed"]);
}

async fn request_id_retry_is_a_duplicate(mut server: Server) {
    let c = &mut server.client;
    let mut request = append_request("order-1", vec![event("A", 1.0), event("B", 2.0)]);
    request.request_id = Uuid::new_v4().to_string();
    let first = c.append(request.clone()).await.expect("first append").into_inner();
    assert!(!first.duplicate);
    let retry = c.append(request.clone()).await.expect("retried append").into_inner();
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!(pb::AppendResponse { duplicate: false, ..retry.clone() }, first);

    let read = read_stream(c, "order-1").await.expect("read");
    assert_eq!(read.events.len(), 2, "appended once");
    assert_eq!(read_all(c).await.len(), 2);

    // The same request id with fresh event ids is still the same request.
    let mut again = request.clone();
    again.events = vec![event("A", 1.0), event("B", 2.0)];
    let third = c.append(again).await.expect("third append").into_inner();
    assert!(third.duplicate, "{third:?}");
    assert_eq!(read_all(c).await.len(), 2);

    // Concurrent retries of one request: one append, the same answer for all.
    let mut request = append_request("order-2", vec![event("C", 3.0)]);
    request.request_id = Uuid::new_v4().to_string();
    let calls = (0..16).map(|_| {
        let mut client = server.client.clone();
        let request = request.clone();
        tokio::spawn(async move { client.append(request).await.map(tonic::Response::into_inner) })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.expect("task").expect("concurrent retry"));
    }
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1, "{answers:?}");
    assert!(answers.iter().all(|a| a.positions == answers[0].positions), "{answers:?}");
    let c = &mut server.client;
    assert_eq!(read_stream(c, "order-2").await.expect("read").events.len(), 1);

    // Concurrent writers expecting the same version: exactly one wins.
    let calls = (0..16).map(|i| {
        let mut client = server.client.clone();
        let mut request = append_request("order-2", vec![event("Race", f64::from(i))]);
        request.expected = Some(pb::append_request::Expected::ExpectedVersion(0));
        tokio::spawn(async move { client.append(request).await })
    });
    let mut won = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.expect("task") {
            Ok(_) => won += 1,
            Err(status) => assert_reason(&status, Code::Aborted, "WRONG_EXPECTED_VERSION"),
        }
    }
    assert_eq!(won, 1);
    let c = &mut server.client;
    assert_eq!(read_stream(c, "order-2").await.expect("read").stream_version, 1);
}

async fn verify_branch_temporal_and_snapshots(mut server: Server) {
    let c = &mut server.client;
    append_n(c, "main", 10).await;

    let verified =
        c.verify_stream(pb::VerifyStreamRequest { stream_id: "main".to_owned() }).await.expect("verify").into_inner();
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.events_checked, 10);
    assert!(verified.first_broken.is_none());
    let events = read_stream(c, "main").await.expect("read").events;
    assert_eq!(verified.head_hash, events[9].hash);

    // Branch at version 5.
    let branch = c
        .branch_stream(pb::BranchStreamRequest {
            source_stream_id: "main".to_owned(),
            at_version: 5,
            branch_stream_id: "what-if".to_owned(),
        })
        .await
        .expect("branch")
        .into_inner()
        .stream
        .expect("stream");
    assert_eq!(branch.stream_id, "what-if");
    assert_eq!(branch.parent_stream_id, "main");
    assert_eq!(branch.parent_version, Some(5));
    assert_eq!(branch.version, Some(5));
    assert_eq!(branch.head_hash, events[5].hash);

    let mut request = append_request("what-if", vec![event("Diverged", 99.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedVersion(5));
    let appended = c.append(request).await.expect("append to the branch at its version").into_inner();
    assert_eq!((appended.first_version, appended.next_expected_version), (6, 6));

    let branch_events = read_stream(c, "what-if").await.expect("read branch").events;
    assert_eq!(branch_events.len(), 7);
    assert_eq!(
        branch_events[..6].iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
        events[..6].iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(branch_events[6].event_type, "Diverged");
    let verified = c
        .verify_stream(pb::VerifyStreamRequest { stream_id: "what-if".to_owned() })
        .await
        .expect("verify branch")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
    assert_eq!(verified.events_checked, 7);
    // The source is unchanged.
    assert_eq!(read_stream(c, "main").await.expect("read").stream_version, 9);

    let status = c
        .branch_stream(pb::BranchStreamRequest {
            source_stream_id: "main".to_owned(),
            at_version: 3,
            branch_stream_id: "what-if".to_owned(),
        })
        .await
        .expect_err("the branch exists");
    assert_reason(&status, Code::AlreadyExists, "STREAM_ALREADY_EXISTS");
    let status = c
        .branch_stream(pb::BranchStreamRequest {
            source_stream_id: "main".to_owned(),
            at_version: 10,
            branch_stream_id: "too-far".to_owned(),
        })
        .await
        .expect_err("no version 10");
    assert_violation(&status, "at_version");

    // Temporal read at version 3.
    let at = c
        .read_stream_at(pb::ReadStreamAtRequest {
            stream_id: "main".to_owned(),
            point: Some(pb::read_stream_at_request::Point::Version(3)),
            ..Default::default()
        })
        .await
        .expect("read at version")
        .into_inner();
    assert_eq!(at.events.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(at.version_at, Some(3));
    assert!(!at.has_more);

    // Temporal read at the creation time of event 3.
    let time = events[3].create_time.expect("create time");
    let at = c
        .read_stream_at(pb::ReadStreamAtRequest {
            stream_id: "main".to_owned(),
            point: Some(pb::read_stream_at_request::Point::Time(time)),
            ..Default::default()
        })
        .await
        .expect("read at time")
        .into_inner();
    // One append: every event shares the time, so all ten are "at" it.
    assert_eq!(at.events.len(), 10);
    assert_eq!(at.version_at, Some(9));

    // Snapshots.
    let state = object(vec![("total", num(45.0)), ("name", string("main"))]);
    let saved = c
        .save_snapshot(pb::SaveSnapshotRequest {
            stream_id: "main".to_owned(),
            version: 9,
            schema_version: 1,
            state: Some(state.clone()),
        })
        .await
        .expect("save snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!((saved.version, saved.schema_version), (9, 1));
    c.save_snapshot(pb::SaveSnapshotRequest {
        stream_id: "main".to_owned(),
        version: 4,
        schema_version: 1,
        state: Some(object(vec![("total", num(10.0))])),
    })
    .await
    .expect("save older snapshot");

    let loaded = c
        .load_snapshot(pb::LoadSnapshotRequest { stream_id: "main".to_owned(), ..Default::default() })
        .await
        .expect("load snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(loaded.stream_id, "main");
    assert_eq!(loaded.version, 9);
    assert_eq!(loaded.state.as_ref(), Some(&state));
    assert!(loaded.create_time.is_some());

    let older = c
        .load_snapshot(pb::LoadSnapshotRequest {
            stream_id: "main".to_owned(),
            max_version: Some(8),
            schema_version: 0,
        })
        .await
        .expect("load older snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(older.version, 4);

    let status = c
        .load_snapshot(pb::LoadSnapshotRequest { stream_id: "main".to_owned(), schema_version: 7, max_version: None })
        .await
        .expect_err("no snapshot of schema 7");
    assert_reason(&status, Code::NotFound, "SNAPSHOT_NOT_FOUND");
    let status = c
        .save_snapshot(pb::SaveSnapshotRequest { stream_id: "main".to_owned(), version: 9, ..Default::default() })
        .await
        .expect_err("no state");
    assert_violation(&status, "state");
}

async fn next_message(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> Option<pb::subscribe_response::Message> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a subscription message within 10 s")
        .expect("subscription error")
        .map(|m| m.message.expect("a message kind"))
}

async fn subscribe_then_shutdown(mut server: Server) {
    use pb::subscribe_response::Message;

    let first = append(&mut server.client, "order-1", vec![event("A", 1.0), event("B", 2.0)]).await;
    let mut stream = server
        .client
        .subscribe(pb::SubscribeRequest { from_position: 0, ..Default::default() })
        .await
        .expect("subscribe")
        .into_inner();

    let mut history = Vec::new();
    let caught_up = loop {
        match next_message(&mut stream).await.expect("the subscription ended early") {
            Message::Event(e) => history.push(e),
            Message::CaughtUp(c) => break c,
            Message::Checkpoint(_) => {}
            Message::FellBehind(f) => panic!("fell behind: {f:?}"),
        }
    };
    assert_eq!(history.iter().map(|e| e.global_position).collect::<Vec<_>>(), first.positions);
    assert_eq!(caught_up.position, first.last_position);

    let live = append(&mut server.client, "order-2", vec![event("C", 3.0)]).await;
    let event = loop {
        match next_message(&mut stream).await.expect("the subscription ended early") {
            Message::Event(e) => break e,
            Message::Checkpoint(_) => {}
            other => panic!("expected the live event, got {other:?}"),
        }
    };
    assert_eq!(event.stream_id, "order-2");
    assert_eq!(event.global_position, live.last_position);

    // A stream subscription from a version.
    let mut one = server
        .client
        .subscribe(pb::SubscribeRequest {
            stream_id: "order-1".to_owned(),
            from_version: Some(0),
            ..Default::default()
        })
        .await
        .expect("subscribe to a stream")
        .into_inner();
    match next_message(&mut one).await {
        Some(Message::Event(e)) => assert_eq!((e.stream_id.as_str(), e.version), ("order-1", 1)),
        other => panic!("expected event 1 of order-1, got {other:?}"),
    }

    // Shutdown ends the live subscriptions and the server.
    let stopped = tokio::spawn(server.stop(Duration::from_secs(5)));
    for s in [&mut stream, &mut one] {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.message().await {
                    Ok(Some(pb::SubscribeResponse {
                        message: Some(Message::CaughtUp(_) | Message::Checkpoint(_)),
                    })) => {}
                    Ok(Some(other)) => panic!("unexpected message after shutdown: {other:?}"),
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status),
                }
            }
        })
        .await
        .expect("the subscription ends within 5 s of shutdown");
        // Ended by the server with status OK, not cut off.
        if let Err(status) = end {
            panic!("the subscription ended with an error on shutdown: {status:?}");
        }
    }
    stopped.await.expect("the server stops within 5 s");
}

async fn health_is_serving(mut server: Server) {
    server.wait_health("", ServingStatus::Serving).await;
    server.wait_health(SERVICE_NAME, ServingStatus::Serving).await;
    let status = server
        .health
        .check(HealthCheckRequest { service: "no.such.Service".to_owned() })
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.stop(Duration::from_secs(5)).await;
}

async fn edge_cases(mut server: Server) {
    let c = &mut server.client;
    append_n(c, "order-1", 5).await;

    // An explicit nil event id.
    let mut nil = event("E", 1.0);
    nil.event_id = Uuid::nil().to_string();
    let status = c.append(append_request("order-1", vec![nil])).await.expect_err("nil event id");
    assert_violation(&status, "events[0].event_id");

    // The same event id twice in one request.
    let twice = event("E", 1.0);
    let status = c.append(append_request("order-1", vec![twice.clone(), twice])).await.expect_err("same id twice");
    assert_violation(&status, "events[1].event_id");

    // An event id that is already stored.
    let stored = read_stream(c, "order-1").await.expect("read").events[0].event_id.clone();
    let mut again = event("E", 1.0);
    again.event_id = stored;
    let status = c.append(append_request("order-2", vec![again])).await.expect_err("stored event id");
    assert_reason(&status, Code::AlreadyExists, "DUPLICATE_EVENT_ID");

    // An unknown expected state.
    let mut request = append_request("order-1", vec![event("E", 1.0)]);
    request.expected = Some(pb::append_request::Expected::ExpectedState(99));
    let status = c.append(request).await.expect_err("unknown expected state");
    assert_violation(&status, "expected_state");
    assert_eq!(read_all(c).await.len(), 5, "nothing appended");

    // A request id whose first attempt failed is free for the retry.
    let request_id = Uuid::new_v4().to_string();
    let mut request = append_request("order-1", vec![event("E", 1.0)]);
    request.request_id = request_id.clone();
    request.expected = Some(pb::append_request::Expected::ExpectedVersion(0));
    c.append(request.clone()).await.expect_err("wrong version");
    request.expected = Some(pb::append_request::Expected::ExpectedVersion(4));
    let ok = c.append(request).await.expect("retry with the right version").into_inner();
    assert!(!ok.duplicate);
    assert_eq!(ok.first_version, 5);

    // Read paging and validation.
    let page = c
        .read_stream(pb::ReadStreamRequest {
            stream_id: "order-1".to_owned(),
            from_version: Some(2),
            max_count: 3,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.events.iter().map(|e| e.version).collect::<Vec<_>>(), [2, 3, 4]);
    assert!(!page.end_of_stream);
    assert_eq!(page.stream_version, 5);
    let status = c
        .read_stream(pb::ReadStreamRequest { stream_id: "order-1".to_owned(), direction: 9, ..Default::default() })
        .await
        .expect_err("unknown direction");
    assert_violation(&status, "direction");
    let t = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 };
    let status = c
        .read_stream(pb::ReadStreamRequest {
            stream_id: "order-1".to_owned(),
            start_time: Some(t),
            end_time: Some(t),
            ..Default::default()
        })
        .await
        .expect_err("empty time range");
    assert_violation(&status, "end_time");

    // Temporal read between two appends.
    append_n(c, "timed", 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    append_n(c, "timed", 2).await;
    let events = read_stream(c, "timed").await.expect("read").events;
    let at = c
        .read_stream_at(pb::ReadStreamAtRequest {
            stream_id: "timed".to_owned(),
            point: Some(pb::read_stream_at_request::Point::Time(events[2].create_time.expect("time"))),
            ..Default::default()
        })
        .await
        .expect("read at time")
        .into_inner();
    assert_eq!(at.events.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(at.version_at, Some(2));
    assert!(!at.has_more, "{at:?}");
    let before = c
        .read_stream_at(pb::ReadStreamAtRequest {
            stream_id: "timed".to_owned(),
            point: Some(pb::read_stream_at_request::Point::Time(prost_types::Timestamp { seconds: 1, nanos: 0 })),
            ..Default::default()
        })
        .await
        .expect("read before the stream existed")
        .into_inner();
    assert!(before.events.is_empty());
    assert_eq!(before.version_at, None);
    let paged = c
        .read_stream_at(pb::ReadStreamAtRequest {
            stream_id: "timed".to_owned(),
            point: Some(pb::read_stream_at_request::Point::Version(3)),
            from_version: 1,
            max_count: 2,
        })
        .await
        .expect("paged read at version")
        .into_inner();
    assert_eq!(paged.events.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(paged.version_at, Some(3));
    assert!(paged.has_more, "{paged:?}");

    // A branch of a branch.
    c.branch_stream(pb::BranchStreamRequest {
        source_stream_id: "order-1".to_owned(),
        at_version: 2,
        branch_stream_id: "b1".to_owned(),
    })
    .await
    .expect("branch");
    append_n(c, "b1", 2).await;
    c.branch_stream(pb::BranchStreamRequest {
        source_stream_id: "b1".to_owned(),
        at_version: 3,
        branch_stream_id: "b2".to_owned(),
    })
    .await
    .expect("branch of a branch");
    append_n(c, "b2", 1).await;
    let b2 = read_stream(c, "b2").await.expect("read b2");
    assert_eq!(b2.events.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert_eq!(
        b2.events.iter().map(|e| e.stream_id.as_str()).collect::<Vec<_>>(),
        ["order-1", "order-1", "order-1", "b1", "b2"]
    );
    let verified =
        c.verify_stream(pb::VerifyStreamRequest { stream_id: "b2".to_owned() }).await.expect("verify").into_inner();
    assert!(verified.valid && verified.events_checked == 5, "{verified:?}");

    // Snapshots must name an existing version of an existing stream.
    let status = c
        .save_snapshot(pb::SaveSnapshotRequest {
            stream_id: "order-1".to_owned(),
            version: 100,
            schema_version: 1,
            state: Some(object(vec![])),
        })
        .await
        .expect_err("no version 100");
    assert_violation(&status, "version");
    let status = c
        .save_snapshot(pb::SaveSnapshotRequest {
            stream_id: "nobody".to_owned(),
            version: 0,
            schema_version: 1,
            state: Some(object(vec![])),
        })
        .await
        .expect_err("no stream");
    assert_reason(&status, Code::NotFound, "STREAM_NOT_FOUND");

    // LIKE wildcards in a prefix are literal.
    append_n(c, "a_1", 1).await;
    append_n(c, "ab1", 1).await;
    let listed = c
        .list_streams(pb::ListStreamsRequest { prefix: "a_".to_owned(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.streams.iter().map(|s| s.stream_id.as_str()).collect::<Vec<_>>(), ["a_1"]);

    // Subscribe validation.
    let status = c
        .subscribe(pb::SubscribeRequest { stream_id: "order-1".to_owned(), from_position: 3, ..Default::default() })
        .await
        .expect_err("a stream subscription from a position");
    assert_violation(&status, "from_position");
    let status = c
        .subscribe(pb::SubscribeRequest { from_version: Some(1), ..Default::default() })
        .await
        .expect_err("a global subscription from a version");
    assert_violation(&status, "from_version");

    // A deleted stream takes no appends.
    c.delete_stream(pb::DeleteStreamRequest { stream_id: "ab1".to_owned(), expected_version: None })
        .await
        .expect("delete");
    let status = c.append(append_request("ab1", vec![event("E", 1.0)])).await.expect_err("deleted");
    assert_reason(&status, Code::NotFound, "STREAM_DELETED");
    let status = c
        .delete_stream(pb::DeleteStreamRequest { stream_id: "ab1".to_owned(), expected_version: None })
        .await
        .expect_err("deleted twice");
    assert_reason(&status, Code::NotFound, "STREAM_DELETED");
}

// --- PostgreSQL down -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_is_not_serving_and_unavailable() {
    let url = eventfold_tests::unreachable_database_url();
    let log = eventfold_tests::store::unanswered(&url).await;
    let backend = Backend { log: Arc::new(log), db: None };
    let mut server = Server::start_with(backend, Config { health_interval_secs: 1, ..Default::default() }).await;

    // Let a few probes run: the status must stay NOT_SERVING.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(server.health("").await, ServingStatus::NotServing);
    assert_eq!(server.health(SERVICE_NAME).await, ServingStatus::NotServing);

    let status = tokio::time::timeout(
        Duration::from_secs(10),
        server.client.append(append_request("order-1", vec![event("A", 1.0)])),
    )
    .await
    .expect("append answers within 10 s")
    .expect_err("storage is down");
    assert_reason(&status, Code::Unavailable, "STORAGE_UNAVAILABLE");
    // An error id to find the log line by, and no driver text or address.
    if let Err(e) = eventfold_tests::hostile::check_no_internal_text(&status, &[]) {
        panic!("{e}");
    }

    let status = tokio::time::timeout(Duration::from_secs(10), read_stream(&mut server.client, "order-1"))
        .await
        .expect("read answers within 10 s")
        .expect_err("storage is down");
    assert_reason(&status, Code::Unavailable, "STORAGE_UNAVAILABLE");

    assert_eq!(server.health("").await, ServingStatus::NotServing);
    assert_eq!(server.health(SERVICE_NAME).await, ServingStatus::NotServing);
    let addr = server.addr;
    server.stop(Duration::from_secs(5)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed after shutdown");
}

/// PostgreSQL that accepts connections but never answers (a hung server, or
/// a path that drops packets after the handshake): every call must still
/// answer UNAVAILABLE in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_silent_is_unavailable_in_bounded_time() {
    // Accepts TCP connections (through the backlog) and never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgresql://postgres@{}/eventfold", silent.local_addr().unwrap());
    let log = eventfold_tests::store::unanswered(&url).await;
    let backend = Backend { log: Arc::new(log), db: None };
    let mut server = Server::start_with(backend, Config { health_interval_secs: 1, ..Default::default() }).await;
    assert_eq!(server.health(SERVICE_NAME).await, ServingStatus::NotServing);

    let status = tokio::time::timeout(Duration::from_secs(5), read_stream(&mut server.client, "order-1"))
        .await
        .expect("ReadStream answers within 5 s")
        .expect_err("storage is down");
    assert_reason(&status, Code::Unavailable, "STORAGE_UNAVAILABLE");

    let status = tokio::time::timeout(
        Duration::from_secs(5),
        server.client.append(append_request("order-1", vec![event("A", 1.0)])),
    )
    .await
    .expect("Append answers within 5 s")
    .expect_err("storage is down");
    assert_reason(&status, Code::Unavailable, "STORAGE_UNAVAILABLE");
    drop(silent);
}
