//! The conformance suite every `EventLog` adapter passes: the same test
//! functions, run against each adapter by `conformance!` (in
//! tests/conformance.rs for the memory and PostgreSQL adapters, in
//! tests/tls.rs for PostgreSQL over TLS).

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use eventfold_store::{
    AllRead, AppendRequest, Direction, Error, EventFilter, EventLog, EventMetadata, ExpectedVersion, ListStreams,
    MAX_PAGE_BYTES, NewEvent, RequestKey, Snapshot, SnapshotNamespace, SnapshotQuery, StreamRead, SubscriptionMessage,
    SubscriptionOptions, Subscriptions, Target, now_micros,
};
use serde_json::json;

pub fn event(kind: &str, n: u64) -> NewEvent {
    NewEvent::new(kind, json!({ "n": n, "nested": { "b": [1, 2.5, "x"], "a": null } }))
}

pub fn append(stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream, expected, events)
}

async fn fill(log: &dyn EventLog, stream: &str, count: u64) {
    let events = (0..count).map(|n| event("Filled", n)).collect();
    log.append(append(stream, ExpectedVersion::Any, events)).await.expect("fill");
}

pub async fn append_and_read_back(log: Arc<dyn EventLog>) {
    let mut first = event("OrderCreated", 0);
    first.metadata = EventMetadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cmd-1".into()),
        user_id: Some("alice".into()),
        custom: [("tenant".to_owned(), "t1".to_owned())].into(),
    };
    first.schema_version = 2;
    let outcome = log
        .append(append("order-1", ExpectedVersion::NoStream, vec![first.clone(), event("OrderConfirmed", 1)]))
        .await
        .unwrap();
    assert_eq!((outcome.first_version, outcome.last_version), (0, 1));
    assert_eq!(outcome.positions.len(), 2);
    assert!(outcome.positions[0] < outcome.positions[1]);
    assert!(!outcome.duplicate);

    let slice = log.read_stream(StreamRead::forwards("order-1", 100)).await.unwrap();
    assert!(slice.end_of_stream);
    assert_eq!(slice.stream_version, Some(1));
    assert_eq!(slice.events.len(), 2);
    let stored = &slice.events[0];
    assert_eq!(stored.event_id, first.event_id);
    assert_eq!(stored.stream_id, "order-1");
    assert_eq!(stored.version, 0);
    assert_eq!(stored.global_position, outcome.positions[0]);
    assert_eq!(stored.event_type, "OrderCreated");
    assert_eq!(stored.schema_version, 2);
    assert_eq!(stored.data, first.data);
    assert_eq!(stored.metadata, first.metadata);
    assert_eq!(slice.events[1].version, 1);
    assert_eq!(slice.events[1].event_type, "OrderConfirmed");

    let info = log.stream_info("order-1").await.unwrap();
    assert_eq!(info.version, Some(1));
    assert_eq!(info.first_position, Some(outcome.positions[0]));
    assert_eq!(info.last_position, Some(outcome.positions[1]));
    assert_eq!(info.head_hash, Some(slice.events[1].hash));
    assert!(log.last_position().await.unwrap() >= outcome.positions[1]);
}

pub async fn expected_versions_are_enforced(log: Arc<dyn EventLog>) {
    let wrong = |r: Result<_, Error>, want_actual: Option<u64>| match r {
        Err(Error::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, want_actual),
        other => panic!("expected a wrong-version error, got {other:?}"),
    };
    wrong(log.append(append("s", ExpectedVersion::StreamExists, vec![event("E", 0)])).await, None);
    wrong(log.append(append("s", ExpectedVersion::Exact(0), vec![event("E", 0)])).await, None);
    assert!(matches!(log.stream_info("s").await, Err(Error::StreamNotFound(_))), "a failed append creates nothing");
    log.append(append("s", ExpectedVersion::NoStream, vec![event("E", 0)])).await.unwrap();
    wrong(log.append(append("s", ExpectedVersion::NoStream, vec![event("E", 1)])).await, Some(0));
    wrong(log.append(append("s", ExpectedVersion::Exact(5), vec![event("E", 1)])).await, Some(0));
    let ok = log.append(append("s", ExpectedVersion::Exact(0), vec![event("E", 1)])).await.unwrap();
    assert_eq!(ok.first_version, 1);
    log.append(append("s", ExpectedVersion::StreamExists, vec![event("E", 2)])).await.unwrap();
    let any = log.append(append("s", ExpectedVersion::Any, vec![event("E", 3)])).await.unwrap();
    assert_eq!(any.last_version, 3);
    let slice = log.read_stream(StreamRead::forwards("s", 100)).await.unwrap();
    let versions: Vec<u64> = slice.events.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![0, 1, 2, 3]);
}

pub async fn request_ids_make_appends_idempotent(log: Arc<dyn EventLog>) {
    let mut request = append("idem", ExpectedVersion::NoStream, vec![event("E", 0), event("E", 1)]);
    request.request_id = Some("req-1".into());
    let first = log.append(request.clone()).await.unwrap();
    assert!(!first.duplicate);
    // The retry carries fresh event ids (a client regenerating them) and an
    // expected version that would now fail: the first answer still wins.
    let mut retry = request.clone();
    retry.events = vec![event("E", 0), event("E", 1)];
    let second = log.append(retry).await.unwrap();
    assert!(second.duplicate);
    assert_eq!((second.first_version, second.last_version, &second.positions), (0, 1, &first.positions));
    let slice = log.read_stream(StreamRead::forwards("idem", 100)).await.unwrap();
    assert_eq!(slice.events.len(), 2, "the retry appended nothing");
    // The first answer can be looked up without appending.
    let key = request.request_key().unwrap();
    let found = log.find_request(&key).await.unwrap().expect("the request is remembered");
    assert_eq!(found, second);
    assert_eq!(found.stream_id, "idem");
    let never = RequestKey { request_id: "req-never".into(), ..key };
    assert_eq!(log.find_request(&never).await.unwrap(), None);
}

pub async fn failed_requests_are_not_remembered(log: Arc<dyn EventLog>) {
    let mut request = append("idem2", ExpectedVersion::StreamExists, vec![event("E", 0)]);
    request.request_id = Some("req-2".into());
    assert!(log.append(request.clone()).await.is_err());
    let key = request.request_key().unwrap();
    assert_eq!(log.find_request(&key).await.unwrap(), None, "a failed append leaves no answer");
    request.expected = ExpectedVersion::Any;
    let outcome = log.append(request).await.unwrap();
    assert!(!outcome.duplicate);
}

pub async fn reads_have_direction_bounds_and_limits(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "r", 10).await;
    let mut read = StreamRead::forwards("r", 3);
    read.from_version = Some(4);
    let slice = log.read_stream(read).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert!(!slice.end_of_stream);

    let mut read = StreamRead::forwards("r", 100);
    read.direction = Direction::Backwards;
    read.from_version = Some(2);
    let slice = log.read_stream(read).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2, 1, 0]);
    assert!(slice.end_of_stream);

    let mut read = StreamRead::forwards("r", 100);
    read.direction = Direction::Backwards;
    read.max_count = 2;
    let slice = log.read_stream(read).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![9, 8]);

    let mut read = StreamRead::forwards("r", 100);
    read.max_version = Some(3);
    let slice = log.read_stream(read).await.unwrap();
    assert_eq!(slice.events.len(), 4);
    assert!(slice.end_of_stream);

    assert!(matches!(log.read_stream(StreamRead::forwards("missing", 10)).await, Err(Error::StreamNotFound(_))));
}

pub async fn reads_filter_by_time(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "t", 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = now_micros();
    tokio::time::sleep(Duration::from_millis(20)).await;
    fill(log.as_ref(), "t", 2).await;

    let mut before = StreamRead::forwards("t", 100);
    before.end_time = Some(middle);
    let slice = log.read_stream(before).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2]);

    let mut after = StreamRead::forwards("t", 100);
    after.start_time = Some(middle);
    let slice = log.read_stream(after).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
}

pub async fn read_all_filters_and_continues(log: Arc<dyn EventLog>) {
    log.append(append("order-1", ExpectedVersion::Any, vec![event("OrderCreated", 0)])).await.unwrap();
    log.append(append("payment-1", ExpectedVersion::Any, vec![event("PaymentAuthorized", 0)])).await.unwrap();
    log.append(append("order-2", ExpectedVersion::Any, vec![event("OrderCreated", 0), event("OrderShipped", 1)]))
        .await
        .unwrap();

    let all = log.read_all(AllRead { after: 0, max_count: 100, filter: EventFilter::default() }).await.unwrap();
    assert_eq!(all.events.len(), 4);
    assert!(all.end_of_log);
    let positions: Vec<u64> = all.events.iter().map(|e| e.global_position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(all.next_position, *positions.last().unwrap());

    let page = log.read_all(AllRead { after: 0, max_count: 2, filter: EventFilter::default() }).await.unwrap();
    assert_eq!(page.events.len(), 2);
    assert!(!page.end_of_log);
    let rest = log
        .read_all(AllRead { after: page.next_position, max_count: 100, filter: EventFilter::default() })
        .await
        .unwrap();
    assert_eq!(rest.events.len(), 2);
    assert_eq!(rest.events[0].global_position, positions[2]);

    let orders = EventFilter { stream_prefixes: vec!["order-".into()], event_types: vec![] };
    let slice = log.read_all(AllRead { after: 0, max_count: 100, filter: orders }).await.unwrap();
    assert_eq!(
        slice.events.iter().map(|e| e.stream_id.as_str()).collect::<Vec<_>>(),
        vec!["order-1", "order-2", "order-2"]
    );

    let created = EventFilter { stream_prefixes: vec![], event_types: vec!["OrderCreated".into()] };
    let slice = log.read_all(AllRead { after: 0, max_count: 100, filter: created }).await.unwrap();
    assert_eq!(slice.events.len(), 2);
    assert!(slice.events.iter().all(|e| e.event_type == "OrderCreated"));

    // LIKE wildcards in a prefix are literal.
    let odd = EventFilter { stream_prefixes: vec!["order_".into()], event_types: vec![] };
    let slice = log.read_all(AllRead { after: 0, max_count: 100, filter: odd }).await.unwrap();
    assert!(slice.events.is_empty());
    assert!(slice.end_of_log);
}

pub async fn streams_are_listed_in_pages(log: Arc<dyn EventLog>) {
    for id in ["a-1", "a-2", "a-3", "b-1"] {
        fill(log.as_ref(), id, 1).await;
    }
    let page = log
        .list_streams(ListStreams { after: None, limit: 2, prefix: Some("a-".into()), show_deleted: false })
        .await
        .unwrap();
    assert_eq!(page.streams.iter().map(|s| s.stream_id.as_str()).collect::<Vec<_>>(), vec!["a-1", "a-2"]);
    assert_eq!(page.next_after.as_deref(), Some("a-2"));
    let page = log
        .list_streams(ListStreams { after: page.next_after, limit: 2, prefix: Some("a-".into()), show_deleted: false })
        .await
        .unwrap();
    assert_eq!(page.streams.iter().map(|s| s.stream_id.as_str()).collect::<Vec<_>>(), vec!["a-3"]);
    assert_eq!(page.next_after, None);
}

pub async fn deleted_streams_keep_history_but_answer_deleted(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "gone", 3).await;
    assert!(matches!(log.delete_stream("gone", Some(1)).await, Err(Error::WrongExpectedVersion { .. })));
    let info = log.delete_stream("gone", Some(2)).await.unwrap();
    assert!(info.deleted_at.is_some());
    assert!(matches!(log.read_stream(StreamRead::forwards("gone", 10)).await, Err(Error::StreamDeleted(_))));
    assert!(matches!(log.stream_info("gone").await, Err(Error::StreamDeleted(_))));
    assert!(matches!(
        log.append(append("gone", ExpectedVersion::Any, vec![event("E", 9)])).await,
        Err(Error::StreamDeleted(_))
    ));
    assert!(matches!(log.delete_stream("gone", None).await, Err(Error::StreamDeleted(_))));
    let hidden = log.list_streams(ListStreams { limit: 10, ..Default::default() }).await.unwrap();
    assert!(hidden.streams.iter().all(|s| s.stream_id != "gone"));
    let shown = log.list_streams(ListStreams { limit: 10, show_deleted: true, ..Default::default() }).await.unwrap();
    assert!(shown.streams.iter().any(|s| s.stream_id == "gone"));
    let history = log.read_all(AllRead { after: 0, max_count: 100, filter: EventFilter::default() }).await.unwrap();
    assert_eq!(history.events.len(), 3, "history is kept");
}

pub async fn branches_share_history_then_diverge(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "src", 10).await;
    let branch = log.branch_stream("src", 5, "src-whatif").await.unwrap();
    assert_eq!(branch.version, Some(5));
    assert_eq!(branch.parent, Some(("src".to_owned(), 5)));

    let slice = log.read_stream(StreamRead::forwards("src-whatif", 100)).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
    assert!(slice.events.iter().all(|e| e.stream_id == "src"));

    let own = log
        .append(append("src-whatif", ExpectedVersion::Exact(5), vec![event("WhatIf", 6), event("WhatIf", 7)]))
        .await
        .unwrap();
    assert_eq!((own.first_version, own.last_version), (6, 7));
    let slice = log.read_stream(StreamRead::forwards("src-whatif", 100)).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(slice.events[6].stream_id, "src-whatif");
    assert_eq!(slice.events[6].event_type, "WhatIf");

    let source = log.read_stream(StreamRead::forwards("src", 100)).await.unwrap();
    assert_eq!(source.events.len(), 10, "the source is unchanged");

    let report = log.verify_stream("src").await.unwrap();
    assert!(report.is_valid());
    assert_eq!(report.events_checked, 10);
    let report = log.verify_stream("src-whatif").await.unwrap();
    assert!(report.is_valid(), "{report:?}");
    assert_eq!(report.events_checked, 8);

    // A branch of a branch, inside the shared part.
    log.branch_stream("src-whatif", 6, "src-whatif-2").await.unwrap();
    let slice = log.read_stream(StreamRead::forwards("src-whatif-2", 100)).await.unwrap();
    assert_eq!(slice.events.len(), 7);
    assert!(log.verify_stream("src-whatif-2").await.unwrap().is_valid());

    assert!(matches!(log.branch_stream("src", 5, "src-whatif").await, Err(Error::StreamAlreadyExists(_))));
    assert!(matches!(log.branch_stream("src", 10, "nope").await, Err(Error::InvalidArgument(_))));
    assert!(matches!(log.branch_stream("missing", 0, "nope").await, Err(Error::StreamNotFound(_))));
    assert!(matches!(
        log.append(append("src-whatif", ExpectedVersion::Exact(5), vec![event("E", 0)])).await,
        Err(Error::WrongExpectedVersion { actual: Some(7), .. })
    ));
}

pub async fn snapshots_are_saved_and_loaded(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "snap", 10).await;
    let save = |version, schema_version| {
        let mut snapshot = Snapshot::new("snap", SnapshotNamespace::Client, version, json!({ "at": version }));
        snapshot.schema_version = schema_version;
        snapshot
    };
    log.save_snapshot(save(3, 1)).await.unwrap();
    log.save_snapshot(save(7, 1)).await.unwrap();
    log.save_snapshot(save(8, 2)).await.unwrap();
    let query = |max_version, schema_version| SnapshotQuery {
        stream_id: "snap".into(),
        namespace: SnapshotNamespace::Client,
        max_version,
        schema_version,
    };
    assert_eq!(log.load_snapshot(query(None, None)).await.unwrap().unwrap().version, 8);
    assert_eq!(log.load_snapshot(query(None, Some(1))).await.unwrap().unwrap().version, 7);
    assert_eq!(log.load_snapshot(query(Some(6), None)).await.unwrap().unwrap().state, json!({ "at": 3 }));
    assert!(log.load_snapshot(query(Some(2), None)).await.unwrap().is_none());
    assert!(log.load_snapshot(query(None, Some(3))).await.unwrap().is_none());
    assert!(matches!(log.save_snapshot(save(10, 1)).await, Err(Error::InvalidArgument(_))));
}

fn violation_fields(result: Result<impl std::fmt::Debug, Error>) -> Vec<String> {
    match result {
        Err(Error::InvalidArgument(violations)) => violations.into_iter().map(|v| v.field).collect(),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

/// Versions and positions beyond a PostgreSQL `bigint` are refused by
/// every adapter alike, and change nothing (issue 13: `u64 as i64` casts
/// turned them negative and skipped the checks on PostgreSQL).
pub async fn out_of_range_versions_and_positions_are_refused(log: Arc<dyn EventLog>) {
    let first = log.append(append("big", ExpectedVersion::NoStream, vec![event("E", 0)])).await.unwrap();
    for huge in [u64::MAX, 1 << 63, (1 << 63) + 1] {
        let fields =
            violation_fields(log.append(append("big", ExpectedVersion::Exact(huge), vec![event("E", 1)])).await);
        assert_eq!(fields, ["expected_version"], "expected version {huge}");
        for direction in [Direction::Forwards, Direction::Backwards] {
            let mut read = StreamRead::forwards("big", 10);
            read.direction = direction;
            read.from_version = Some(huge);
            assert_eq!(violation_fields(log.read_stream(read).await), ["from_version"]);
        }
        let mut read = StreamRead::forwards("big", 10);
        read.max_version = Some(huge);
        assert_eq!(violation_fields(log.read_stream(read).await), ["max_version"]);
        let read = AllRead { after: huge, max_count: 10, filter: EventFilter::default() };
        assert_eq!(violation_fields(log.read_all(read).await), ["from_position"]);
        let query = SnapshotQuery {
            stream_id: "big".into(),
            namespace: SnapshotNamespace::Client,
            max_version: Some(huge),
            schema_version: None,
        };
        assert_eq!(violation_fields(log.load_snapshot(query).await), ["max_version"]);
        let snapshot = Snapshot::new("big", SnapshotNamespace::Client, huge, json!({}));
        assert_eq!(violation_fields(log.save_snapshot(snapshot).await), ["version"]);
        assert_eq!(violation_fields(log.delete_stream("big", Some(huge)).await), ["expected_version"]);
        assert_eq!(violation_fields(log.branch_stream("big", huge, "big-branch").await), ["at_version"]);
    }
    let slice = log.read_stream(StreamRead::forwards("big", 10)).await.unwrap();
    assert_eq!(slice.events.len(), 1, "nothing was appended");
    assert_eq!(slice.events[0].global_position, first.positions[0]);
    assert!(matches!(log.stream_info("big-branch").await, Err(Error::StreamNotFound(_))));
    assert!(log.stream_info("big").await.unwrap().deleted_at.is_none());
}

/// Times outside the years 0001 to 9999 are refused, not sent to the
/// database (which answered "timestamp out of range") or wrapped.
pub async fn times_outside_the_years_1_to_9999_are_refused(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "when", 2).await;
    let year_10000 = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
    let before_year_1 = UNIX_EPOCH - Duration::from_secs(62_135_596_801);
    for (start, end, field) in [
        (Some(year_10000), None, "start_time"),
        (None, Some(year_10000), "end_time"),
        (Some(before_year_1), None, "start_time"),
    ] {
        let mut read = StreamRead::forwards("when", 10);
        read.start_time = start;
        read.end_time = end;
        assert_eq!(violation_fields(log.read_stream(read).await), [field]);
    }
    // The last second of 9999 is still a time.
    let mut read = StreamRead::forwards("when", 10);
    read.end_time = Some(UNIX_EPOCH + Duration::from_secs(253_402_300_799));
    assert_eq!(log.read_stream(read).await.unwrap().events.len(), 2);
}

/// Lists, ids and metadata have documented bounds.
pub async fn unbounded_input_is_refused(log: Arc<dyn EventLog>) {
    let prefixes: Vec<String> = (0..101).map(|i| format!("p{i}-")).collect();
    let read =
        AllRead { after: 0, max_count: 1, filter: EventFilter { stream_prefixes: prefixes, event_types: vec![] } };
    assert_eq!(violation_fields(log.read_all(read).await), ["filter.stream_prefixes"]);
    let read = AllRead {
        after: 0,
        max_count: 1,
        filter: EventFilter { stream_prefixes: vec![], event_types: vec!["T".repeat(257), String::new()] },
    };
    assert_eq!(violation_fields(log.read_all(read).await), ["filter.event_types[0]", "filter.event_types[1]"]);

    let with_metadata = |metadata: EventMetadata| {
        let mut e = event("E", 0);
        e.metadata = metadata;
        append("meta", ExpectedVersion::Any, vec![e])
    };
    let cases = [
        (
            EventMetadata { correlation_id: Some("c".repeat(12_000)), ..Default::default() },
            "events[0].metadata.correlation_id",
        ),
        (
            EventMetadata { causation_id: Some("has space".into()), ..Default::default() },
            "events[0].metadata.causation_id",
        ),
        (EventMetadata { user_id: Some("caf\u{e9}".into()), ..Default::default() }, "events[0].metadata.user_id"),
        (
            EventMetadata { custom: [("k".to_owned(), "line\nbreak".to_owned())].into(), ..Default::default() },
            "events[0].metadata.custom[k]",
        ),
        (
            EventMetadata { custom: [("big".to_owned(), "x".repeat(3 * 1024 * 1024))].into(), ..Default::default() },
            "events[0].data",
        ),
    ];
    for (metadata, field) in cases {
        assert_eq!(violation_fields(log.append(with_metadata(metadata)).await), [field]);
    }
    let mut request = append("meta", ExpectedVersion::Any, vec![event("E", 0)]);
    request.request_id = Some("id with\tcontrol".into());
    assert_eq!(violation_fields(log.append(request).await), ["request_id"]);
    assert!(matches!(log.stream_info("meta").await, Err(Error::StreamNotFound(_))), "nothing was stored");
}

/// AIP-155 per scope: a request id answers only the request it was first
/// used for; used for another request it is refused, never answered with
/// the first request's result, and another scope has ids of its own.
pub async fn request_ids_are_bound_to_their_request_and_scope(log: Arc<dyn EventLog>) {
    let request = |stream: &str, n: u64| {
        let mut r = append(stream, ExpectedVersion::Any, vec![event("E", n)]);
        r.request_id = Some("req-shared".into());
        r
    };
    let a = log.append(request("ra", 0)).await.unwrap();
    // The same id on another stream is another scope: a real append.
    let b = log.append(request("rb", 0)).await.unwrap();
    assert!(!b.duplicate);
    assert_eq!(b.stream_id, "rb");
    assert_eq!(log.read_stream(StreamRead::forwards("rb", 10)).await.unwrap().events.len(), 1);
    // The same id and stream with another payload: refused, nothing stored.
    match log.append(request("ra", 1)).await {
        Err(Error::RequestIdReused { request_id }) => assert_eq!(request_id, "req-shared"),
        other => panic!("expected REQUEST_ID_REUSED, got {other:?}"),
    }
    assert_eq!(log.read_stream(StreamRead::forwards("ra", 10)).await.unwrap().events.len(), 1);
    // A true repeat gets the first answer.
    let again = log.append(request("ra", 0)).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.stream_id.as_str(), &again.positions), ("ra", &a.positions));

    // A caller's own scope (the command side's: service and principal)
    // spans streams: the answer names the stream the id was used on.
    let scoped = |stream: &str, fingerprint: u8| {
        let mut r = append(stream, ExpectedVersion::Any, vec![event("E", 0)]);
        r.request_id = Some("cmd-1".into());
        r.request_scope = Some("command/orders/alice".into());
        r.fingerprint = Some([fingerprint; 32]);
        r
    };
    let first = log.append(scoped("rc", 1)).await.unwrap();
    let repeat = log.append(scoped("rd", 1)).await.unwrap();
    assert!(repeat.duplicate);
    assert_eq!((repeat.stream_id.as_str(), &repeat.positions), ("rc", &first.positions));
    assert!(matches!(log.stream_info("rd").await, Err(Error::StreamNotFound(_))), "no stream made for a repeat");
    assert!(matches!(log.append(scoped("rd", 2)).await, Err(Error::RequestIdReused { .. })));
    let key = scoped("rd", 2).request_key().unwrap();
    assert!(matches!(log.find_request(&key).await, Err(Error::RequestIdReused { .. })));
    let key = scoped("rd", 1).request_key().unwrap();
    assert_eq!(log.find_request(&key).await.unwrap().map(|o| o.stream_id), Some("rc".to_owned()));
}

/// A read page carries at most `MAX_PAGE_BYTES` of payload (and at least
/// one event); a filtered read returns only what matches and still moves on.
pub async fn read_pages_are_capped_in_bytes(log: Arc<dyn EventLog>) {
    let payload = "x".repeat(600 * 1024);
    let per_page = MAX_PAGE_BYTES / (600 * 1024 + 64);
    let events: Vec<NewEvent> = (0..10).map(|n| NewEvent::new("Big", json!({ "n": n, "blob": payload }))).collect();
    let outcome = log.append(append("heavy", ExpectedVersion::NoStream, events)).await.unwrap();
    let slice = log.read_stream(StreamRead::forwards("heavy", 100)).await.unwrap();
    assert_eq!(slice.events.len(), per_page, "a page holds what fits in {MAX_PAGE_BYTES} bytes");
    assert!(!slice.end_of_stream);
    let mut rest = StreamRead::forwards("heavy", 100);
    rest.from_version = Some(u64::try_from(per_page).unwrap());
    let slice = log.read_stream(rest).await.unwrap();
    assert_eq!(slice.events.len(), 10 - per_page);
    assert!(slice.end_of_stream);

    let before = outcome.positions[0] - 1;
    let all = |filter: EventFilter| AllRead { after: before, max_count: 100, filter };
    let page = log.read_all(all(EventFilter::default())).await.unwrap();
    assert_eq!(page.events.len(), per_page);
    assert!(!page.end_of_log);
    assert_eq!(page.next_position, outcome.positions[per_page - 1]);
    let nothing = EventFilter { stream_prefixes: vec![], event_types: vec!["NoSuchType".into()] };
    let page = log.read_all(all(nothing)).await.unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next_position, *outcome.positions.last().unwrap(), "unmatched rows are passed");
    let matching = EventFilter { stream_prefixes: vec!["heav".into()], event_types: vec![] };
    assert_eq!(log.read_all(all(matching)).await.unwrap().events.len(), per_page);
}

/// A snapshot carries the stream's own link at its version, whatever the
/// caller passed, and the namespaces are apart.
pub async fn snapshots_record_the_chain_link_and_keep_namespaces_apart(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "snapped", 3).await;
    let mut forged = Snapshot::new("snapped", SnapshotNamespace::Client, 1, json!({ "balance": 1_000_000 }));
    forged.head_hash = [7; 32];
    let saved = log.save_snapshot(forged).await.unwrap();
    let events = log.read_stream(StreamRead::forwards("snapped", 10)).await.unwrap().events;
    assert_eq!(saved.head_hash, events[1].hash);
    let query =
        |namespace| SnapshotQuery { stream_id: "snapped".into(), namespace, max_version: None, schema_version: None };
    let loaded = log.load_snapshot(query(SnapshotNamespace::Client)).await.unwrap().unwrap();
    assert_eq!(loaded.head_hash, events[1].hash);
    assert_eq!(log.load_snapshot(query(SnapshotNamespace::Aggregate)).await.unwrap(), None);
    let own = Snapshot::new("snapped", SnapshotNamespace::Aggregate, 2, json!({ "own": true }));
    log.save_snapshot(own).await.unwrap();
    let loaded = log.load_snapshot(query(SnapshotNamespace::Aggregate)).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.head_hash), (2, events[2].hash));
    assert_eq!(log.load_snapshot(query(SnapshotNamespace::Client)).await.unwrap().unwrap().version, 1);
}

pub async fn verify_accepts_an_intact_chain(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "chain", 5).await;
    fill(log.as_ref(), "chain", 5).await;
    let report = log.verify_stream("chain").await.unwrap();
    assert!(report.is_valid());
    assert_eq!(report.events_checked, 10);
    assert_eq!(report.head_hash, log.stream_info("chain").await.unwrap().head_hash);
}

pub async fn bad_requests_are_rejected_whole(log: Arc<dyn EventLog>) {
    let mut bad = vec![event("", 0), NewEvent::new("E", json!([1, 2]))];
    bad[1].schema_version = 0;
    match log.append(append("", ExpectedVersion::Any, bad)).await {
        Err(Error::InvalidArgument(violations)) => {
            let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
            assert!(fields.contains(&"stream_id"), "{fields:?}");
            assert!(fields.contains(&"events[0].event_type"), "{fields:?}");
            assert!(fields.contains(&"events[1].data"), "{fields:?}");
            assert!(fields.contains(&"events[1].schema_version"), "{fields:?}");
        }
        other => panic!("expected invalid argument, got {other:?}"),
    }
    assert!(matches!(log.append(append("x", ExpectedVersion::Any, vec![])).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(
        log.append(append("$all", ExpectedVersion::Any, vec![event("E", 0)])).await,
        Err(Error::InvalidArgument(_))
    ));
    let nul = NewEvent::new("E", json!({ "s": "a\u{0}b" }));
    assert!(matches!(log.append(append("x", ExpectedVersion::Any, vec![nul])).await, Err(Error::InvalidArgument(_))));
    assert_eq!(log.last_position().await.unwrap(), 0, "nothing was appended");
}

pub async fn event_ids_are_unique(log: Arc<dyn EventLog>) {
    let e = event("E", 0);
    log.append(append("u1", ExpectedVersion::Any, vec![e.clone()])).await.unwrap();
    assert!(matches!(
        log.append(append("u2", ExpectedVersion::Any, vec![e.clone()])).await,
        Err(Error::DuplicateEventId { .. })
    ));
    assert!(matches!(log.stream_info("u2").await, Err(Error::StreamNotFound(_))));
    assert!(matches!(
        log.append(append("u3", ExpectedVersion::Any, vec![event("E", 1), event("E", 2), e.clone()])).await,
        Err(Error::DuplicateEventId { .. })
    ));
    let mut twice = vec![event("E", 0)];
    twice.push(twice[0].clone());
    assert!(matches!(log.append(append("u4", ExpectedVersion::Any, twice)).await, Err(Error::InvalidArgument(_))));
}

pub async fn racing_writers_never_share_a_version(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "race", 1).await;
    let mut tasks = Vec::new();
    for n in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(append("race", ExpectedVersion::Exact(0), vec![event("Race", n)])).await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(outcome) => {
                wins += 1;
                assert_eq!(outcome.first_version, 1);
            }
            Err(Error::WrongExpectedVersion { actual: Some(1), .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(wins, 1);
}

pub async fn subscriptions_catch_up_then_go_live(log: Arc<dyn EventLog>) {
    fill(log.as_ref(), "sub-a", 5).await;
    let subscriptions = Subscriptions::new(log.clone(), SubscriptionOptions::default());
    let mut all = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 3);
    let mut one = subscriptions.subscribe(Target::Stream { stream_id: "sub-b".into(), after_version: None }, 1000);
    let filtered = EventFilter { stream_prefixes: vec!["sub-b".into()], event_types: vec![] };
    let mut only_b = subscriptions.subscribe(Target::All { after: Some(0), filter: filtered }, 1000);

    let mut history = Vec::new();
    let mut checkpoints = 0;
    loop {
        match recv(&mut all).await {
            SubscriptionMessage::Event(e) => history.push(e.global_position),
            SubscriptionMessage::Checkpoint(_) => checkpoints += 1,
            SubscriptionMessage::CaughtUp(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(history.len(), 5);
    assert!(checkpoints >= 1);

    fill(log.as_ref(), "sub-b", 3).await;
    fill(log.as_ref(), "sub-a", 2).await;
    let mut live = Vec::new();
    while live.len() < 5 {
        if let SubscriptionMessage::Event(e) = recv(&mut all).await {
            live.push(e);
        }
    }
    let positions: Vec<u64> = history.iter().copied().chain(live.iter().map(|e| e.global_position)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order, no repeats: {positions:?}");

    let mut versions = Vec::new();
    while versions.len() < 3 {
        if let SubscriptionMessage::Event(e) = recv(&mut one).await {
            assert_eq!(e.stream_id, "sub-b");
            versions.push(e.version);
        }
    }
    assert_eq!(versions, vec![0, 1, 2]);

    let mut only = Vec::new();
    while only.len() < 3 {
        if let SubscriptionMessage::Event(e) = recv(&mut only_b).await {
            only.push(e.stream_id);
        }
    }
    assert!(only.iter().all(|s| s == "sub-b"));

    // A subscription from the end sees only what comes next.
    let mut tail = subscriptions.subscribe(Target::All { after: None, filter: EventFilter::default() }, 1000);
    assert!(matches!(recv(&mut tail).await, SubscriptionMessage::CaughtUp(_)));
    fill(log.as_ref(), "sub-c", 1).await;
    match recv(&mut tail).await {
        SubscriptionMessage::Event(e) => assert_eq!(e.stream_id, "sub-c"),
        other => panic!("unexpected {other:?}"),
    }
}

pub async fn slow_subscribers_fall_behind_and_recover(log: Arc<dyn EventLog>) {
    let options = SubscriptionOptions { live_capacity: 2, subscriber_buffer: 1, page_size: 7, ..Default::default() };
    let subscriptions = Subscriptions::new(log.clone(), options);
    let mut slow = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1_000_000);
    assert!(matches!(recv(&mut slow).await, SubscriptionMessage::CaughtUp(_)));
    // Many separate appends while the subscriber does not read.
    for n in 0..60 {
        log.append(append(&format!("slow-{}", n % 4), ExpectedVersion::Any, vec![event("E", n)])).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut positions = Vec::new();
    let mut fell_behind = false;
    while positions.len() < 60 {
        match recv(&mut slow).await {
            SubscriptionMessage::Event(e) => positions.push(e.global_position),
            SubscriptionMessage::FellBehind(_) => fell_behind = true,
            _ => {}
        }
    }
    assert!(fell_behind, "a tiny live buffer must overflow");
    let expected: Vec<u64> = (1..=60).collect();
    assert_eq!(positions, expected, "every event exactly once, in order");
}

async fn recv(
    rx: &mut tokio::sync::mpsc::Receiver<eventfold_store::Result<SubscriptionMessage>>,
) -> SubscriptionMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("subscription message within 10 s")
        .expect("subscription open")
        .expect("no subscription error")
}

// Not every test file that shares `common` runs the suite.
#[allow(unused_macros)]
macro_rules! conformance {
    ($adapter:ident, $make:expr) => {
        mod $adapter {
            use super::*;

            conformance!(@tests $make;
                append_and_read_back,
                expected_versions_are_enforced,
                request_ids_make_appends_idempotent,
                failed_requests_are_not_remembered,
                reads_have_direction_bounds_and_limits,
                reads_filter_by_time,
                read_all_filters_and_continues,
                streams_are_listed_in_pages,
                deleted_streams_keep_history_but_answer_deleted,
                branches_share_history_then_diverge,
                snapshots_are_saved_and_loaded,
                verify_accepts_an_intact_chain,
                bad_requests_are_rejected_whole,
                event_ids_are_unique,
                racing_writers_never_share_a_version,
                subscriptions_catch_up_then_go_live,
                slow_subscribers_fall_behind_and_recover,
                out_of_range_versions_and_positions_are_refused,
                times_outside_the_years_1_to_9999_are_refused,
                unbounded_input_is_refused,
                request_ids_are_bound_to_their_request_and_scope,
                read_pages_are_capped_in_bytes,
                snapshots_record_the_chain_link_and_keep_namespaces_apart,
            );
        }
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                #[allow(clippy::redundant_closure_call)]
                let (_guard, log): (Box<dyn std::any::Any + Send>, Arc<dyn EventLog>) = ($make)().await;
                super::$name(log).await;
            }
        )*
    };
}

#[allow(unused_imports)]
pub(crate) use conformance;
