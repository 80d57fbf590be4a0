//! Integration tests of the PostgreSQL adapter that need a real server:
//! concurrency through the group commit, the gap-safe tail under an
//! out-of-order commit, tamper detection, conflict isolation within a batch,
//! behaviour without a server and JSON round trips through `jsonb`.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use eventfold_store::{
    AllRead, AppendOutcome, AppendRequest, Database, Error, EventFilter, EventLog, EventMetadata, ExpectedVersion,
    NewEvent, PostgresConfig, PostgresEventLog, RecordedEvent, StreamRead, SubscriptionMessage, SubscriptionOptions,
    Subscriptions, Target, hash,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Messages = mpsc::Receiver<eventfold_store::Result<SubscriptionMessage>>;

async fn recv(rx: &mut Messages) -> SubscriptionMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("subscription message within 10 s")
        .expect("subscription open")
        .expect("no subscription error")
}

/// The next event of a subscription, skipping checkpoints.
async fn next_event(rx: &mut Messages) -> RecordedEvent {
    loop {
        match recv(rx).await {
            SubscriptionMessage::Event(e) => return e,
            SubscriptionMessage::Checkpoint(_) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Wait until the subscription reports `CaughtUp`, returning the events
/// delivered before it.
async fn caught_up(rx: &mut Messages) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        match recv(rx).await {
            SubscriptionMessage::Event(e) => events.push(e),
            SubscriptionMessage::CaughtUp(_) => return events,
            SubscriptionMessage::Checkpoint(_) => {}
            other => panic!("expected catch-up, got {other:?}"),
        }
    }
}

/// Listen for `wait`: no event may arrive, and no checkpoint may claim a
/// position at or beyond `gap` (a position whose transaction is still open).
async fn assert_quiet(rx: &mut Messages, wait: Duration, gap: u64) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return,
            Ok(None) => panic!("subscription closed"),
            Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
            Ok(Some(Ok(SubscriptionMessage::Event(e)))) => panic!(
                "event at position {} delivered while position {gap} is held by an open transaction: {e:?}",
                e.global_position
            ),
            Ok(Some(Ok(SubscriptionMessage::Checkpoint(p)))) => {
                assert!(p < gap, "checkpoint {p} passes the open transaction's position {gap}")
            }
            Ok(Some(Ok(other))) => panic!("unexpected message {other:?}"),
        }
    }
}

/// Every event a subscription delivers within `wait`.
async fn drain(rx: &mut Messages, wait: Duration) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return events,
            Ok(Some(Ok(SubscriptionMessage::Event(e)))) => events.push(e),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("subscription ended: {other:?}"),
        }
    }
}

/// Every event of the global log, read forwards in pages from the start.
async fn read_everything(log: &dyn EventLog) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let slice =
            log.read_all(AllRead { after, max_count: 1000, filter: EventFilter::default() }).await.expect("read_all");
        assert!(slice.next_position >= after, "read_all went backwards");
        events.extend(slice.events);
        if slice.end_of_log {
            return events;
        }
        after = slice.next_position;
    }
}

/// Every event of one stream, read forwards in pages.
async fn read_stream_fully(log: &dyn EventLog, stream: &str) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = None;
    loop {
        let mut read = StreamRead::forwards(stream, 700);
        read.from_version = from;
        let slice = log.read_stream(read).await.expect("read_stream");
        let last = slice.events.last().map(|e| e.version);
        events.extend(slice.events);
        match last {
            Some(v) if !slice.end_of_stream => from = Some(v + 1),
            _ => return events,
        }
    }
}

fn expected_from(actual: Option<u64>) -> ExpectedVersion {
    actual.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.global_position).collect()
}

// ---------------------------------------------------------------------------
// 1. Concurrent writers on shared streams.

const WRITERS: usize = 32;
const STREAMS: usize = 8;
const PER_WRITER: usize = 625;
const TOTAL: usize = WRITERS * PER_WRITER;

/// One acknowledged append of the concurrency test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    stream: usize,
    version: u64,
    position: u64,
    task: usize,
    seq: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_shared_streams() {
    let started = Instant::now();
    let (db, log) = common::postgres().await;
    // Durability is not under test: without a WAL flush per commit the 2,500
    // group commits that must follow each other (four writers share each
    // stream) take seconds instead of a minute. New sessions only: the log
    // has not connected its writers and pool yet.
    common::client(db.url())
        .await
        .batch_execute(&format!(r#"ALTER DATABASE "{}" SET synchronous_commit = off"#, db.name()))
        .await
        .unwrap();

    let subscriptions = Subscriptions::new(log.clone(), SubscriptionOptions::default());
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1000);
    assert!(caught_up(&mut rx).await.is_empty(), "the log starts empty");
    // The subscriber gets 120 s in all, and at most 20 s once the writers are
    // done (then every event is committed and the tail has nothing to wait for).
    let writers_done = CancellationToken::new();
    let done = writers_done.clone();
    let collector = tokio::spawn(async move {
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut shortened = false;
        let mut events: Vec<(u64, Uuid)> = Vec::with_capacity(TOTAL);
        let mut fell_behind = 0;
        while events.len() < TOTAL {
            let message = tokio::select! {
                message = rx.recv() => message,
                () = done.cancelled(), if !shortened => {
                    deadline = deadline.min(tokio::time::Instant::now() + Duration::from_secs(20));
                    shortened = true;
                    continue;
                }
                () = tokio::time::sleep_until(deadline) => return (events, fell_behind),
            };
            let message = message.expect("subscription open").expect("no subscription error");
            match message {
                SubscriptionMessage::Event(e) => {
                    if let Some(&(last, _)) = events.last() {
                        assert!(e.global_position > last, "subscriber got position {} after {last}", e.global_position);
                    }
                    events.push((e.global_position, e.event_id));
                }
                SubscriptionMessage::FellBehind(_) => fell_behind += 1,
                SubscriptionMessage::Checkpoint(_) | SubscriptionMessage::CaughtUp(_) => {}
            }
        }
        // Nothing more may follow: every event exactly once.
        match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            Err(_) => {}
            Ok(Some(Ok(SubscriptionMessage::Event(e)))) => panic!("event beyond the {TOTAL} appended: {e:?}"),
            Ok(other) => assert!(
                matches!(other, Some(Ok(SubscriptionMessage::Checkpoint(_) | SubscriptionMessage::CaughtUp(_)))),
                "unexpected message {other:?}"
            ),
        }
        (events, fell_behind)
    });

    let mut writers = Vec::new();
    for task in 0..WRITERS {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            let stream_no = task % STREAMS;
            let stream = format!("conc-{stream_no}");
            let mut known: Option<u64> = None;
            let mut acks = Vec::with_capacity(PER_WRITER);
            let mut conflicts = 0u64;
            for seq in 0..PER_WRITER {
                let event = NewEvent::new("Written", json!({ "task": task, "seq": seq }));
                loop {
                    let request = AppendRequest::new(&stream, expected_from(known), vec![event.clone()]);
                    match log.append(request).await {
                        Ok(outcome) => {
                            assert_eq!(outcome.first_version, outcome.last_version);
                            assert_eq!(outcome.first_version, known.map_or(0, |v| v + 1));
                            assert_eq!(outcome.positions.len(), 1);
                            assert!(!outcome.duplicate);
                            known = Some(outcome.last_version);
                            acks.push((
                                event.event_id,
                                Ack {
                                    stream: stream_no,
                                    version: outcome.last_version,
                                    position: outcome.positions[0],
                                    task,
                                    seq,
                                },
                            ));
                            break;
                        }
                        Err(Error::WrongExpectedVersion { actual, expected, .. }) => {
                            assert_eq!(expected, expected_from(known));
                            assert_ne!(actual, known, "a conflict must report a different version");
                            known = actual;
                            conflicts += 1;
                        }
                        Err(e) => panic!("task {task}: append failed: {e}"),
                    }
                }
            }
            (acks, conflicts)
        }));
    }
    let mut acked: HashMap<Uuid, Ack> = HashMap::with_capacity(TOTAL);
    let mut conflicts = 0;
    for writer in writers {
        let (acks, c) = writer.await.expect("writer task");
        conflicts += c;
        for (id, ack) in acks {
            assert!(acked.insert(id, ack).is_none(), "event id {id} acknowledged twice");
        }
    }
    let written = started.elapsed();
    writers_done.cancel();
    assert_eq!(acked.len(), TOTAL);
    let acked_positions: HashSet<u64> = acked.values().map(|a| a.position).collect();
    assert_eq!(acked_positions.len(), TOTAL, "two acknowledged appends share a global position");

    // Per stream: versions 0..n-1, each task's events in its own order.
    let mut total = 0;
    for stream_no in 0..STREAMS {
        let stream = format!("conc-{stream_no}");
        let events = read_stream_fully(log.as_ref(), &stream).await;
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (0..events.len() as u64).collect::<Vec<_>>(), "versions of {stream}");
        assert_eq!(events.len(), PER_WRITER * WRITERS / STREAMS, "events of {stream}");
        let mut next_seq: BTreeMap<u64, u64> = BTreeMap::new();
        for e in &events {
            let ack = acked.get(&e.event_id).unwrap_or_else(|| panic!("unacknowledged event {e:?}"));
            assert_eq!((ack.stream, ack.version, ack.position), (stream_no, e.version, e.global_position));
            let (task, seq) = (e.data["task"].as_u64().unwrap(), e.data["seq"].as_u64().unwrap());
            assert_eq!((task as usize, seq as usize), (ack.task, ack.seq), "payload of {}", e.event_id);
            let expected_seq = next_seq.entry(task).or_default();
            assert_eq!(seq, *expected_seq, "task {task}'s events out of order in {stream}");
            *expected_seq += 1;
        }
        let info = log.stream_info(&stream).await.unwrap();
        assert_eq!(info.version, Some(events.len() as u64 - 1));
        assert!(log.verify_stream(&stream).await.unwrap().is_valid(), "chain of {stream}");
        total += events.len();
    }
    assert_eq!(total, TOTAL);

    // The global log holds exactly the acknowledged events, in order.
    let all = read_everything(log.as_ref()).await;
    assert!(positions(&all).windows(2).all(|w| w[0] < w[1]), "read_all is in strictly increasing order");
    assert_eq!(all.len(), TOTAL);
    for e in &all {
        let ack = acked.get(&e.event_id).unwrap_or_else(|| panic!("read_all returned an unacknowledged {e:?}"));
        assert_eq!(ack.position, e.global_position);
    }
    let stored: HashSet<Uuid> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(stored, acked.keys().copied().collect::<HashSet<_>>());

    // The subscriber saw every event exactly once, in position order.
    let (delivered, fell_behind) = collector.await.expect("collector task");
    eprintln!(
        "concurrent_writers_on_shared_streams: {TOTAL} appends ({conflicts} conflicts retried) in {written:?}, \
         subscriber fell behind {fell_behind} times, total {:?}",
        started.elapsed()
    );
    let delivered_positions: HashSet<u64> = delivered.iter().map(|(p, _)| *p).collect();
    let mut missing: Vec<u64> = acked_positions.difference(&delivered_positions).copied().collect();
    missing.sort_unstable();
    if !missing.is_empty() {
        panic!(
            "the subscriber never delivered {} acknowledged events (waited until 20 s after the writers \
             finished), at positions {:?}{}; {}",
            missing.len(),
            &missing[..missing.len().min(30)],
            if missing.len() > 30 { " …" } else { "" },
            explain_skips(db.url(), &missing).await
        );
    }
    assert_eq!(delivered.len(), TOTAL);
    let delivered_ids: HashSet<Uuid> = delivered.iter().map(|(_, id)| *id).collect();
    assert_eq!(delivered_ids.len(), TOTAL, "an event was delivered twice");
    assert_eq!(delivered_ids, stored);
    for (position, id) in &delivered {
        assert_eq!(acked[id].position, *position);
    }
}

/// How skipped positions relate to commit order: whether each was written by
/// a transaction with a later xid than one that wrote a higher position (the
/// out-of-order commit a gap-safe read must wait for).
async fn explain_skips(url: &str, missing: &[u64]) -> String {
    let client = common::client(url).await;
    let missing: Vec<i64> = missing.iter().map(|&p| p as i64).collect();
    let row = client
        .query_one(
            "WITH w AS (SELECT global_position, tx_id, min(tx_id) OVER (ORDER BY global_position DESC \
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS later_min FROM eventstore.events) \
             SELECT count(*) FILTER (WHERE global_position = ANY ($1) AND tx_id > later_min), \
                    count(*) FILTER (WHERE tx_id > later_min), count(*) FROM w",
            &[&missing],
        )
        .await
        .expect("diagnostic query");
    format!(
        "{} of the {} skipped positions were written by a transaction with a later xid than the writer of a higher \
         position (against {} of all {} events)",
        row.get::<_, i64>(0),
        missing.len(),
        row.get::<_, i64>(1),
        row.get::<_, i64>(2)
    )
}

// ---------------------------------------------------------------------------
// 2. Out-of-order commits.

/// One batch as the group commit runs it (`append_all_in`, inside `tx`),
/// for appends `(stream, expected, request id, event count)` with expected
/// -1 any, -2 no stream, -3 stream exists, else exact; each answer as
/// `(index from 1, status, first version, last version, actual version,
/// positions)`.
async fn append_batch(
    tx: &tokio_postgres::Transaction<'_>,
    appends: &[(&str, i64, &str, usize)],
    event_type: &str,
) -> Vec<Answer> {
    let requests: Vec<AppendRequest> = appends
        .iter()
        .map(|&(stream, expected, request_id, count)| {
            let expected = match expected {
                -1 => ExpectedVersion::Any,
                -2 => ExpectedVersion::NoStream,
                -3 => ExpectedVersion::StreamExists,
                v => ExpectedVersion::Exact(v as u64),
            };
            let events = (0..count).map(|_| NewEvent::new(event_type, json!({ "stream": stream }))).collect();
            let mut request = AppendRequest::new(stream, expected, events);
            request.request_id = (!request_id.is_empty()).then(|| request_id.to_owned());
            request
        })
        .collect();
    let answers = eventfold_store::postgres::append_all_in(tx, &requests).await.expect("the batch");
    answers
        .into_iter()
        .enumerate()
        .map(|(i, answer)| {
            let index = i as i32 + 1;
            match answer {
                Ok(o) => (
                    index,
                    if o.duplicate { "duplicate" } else { "ok" }.to_owned(),
                    Some(o.first_version as i64),
                    Some(o.last_version as i64),
                    None,
                    Some(o.positions.iter().map(|&p| p as i64).collect()),
                ),
                Err(Error::WrongExpectedVersion { actual, .. }) => {
                    (index, "wrong_version".to_owned(), None, None, Some(actual.map_or(-1, |a| a as i64)), None)
                }
                Err(e) => panic!("append {index} refused: {e}"),
            }
        })
        .collect()
}

/// index, status, first version, last version, actual version, positions
type Answer = (i32, String, Option<i64>, Option<i64>, Option<i64>, Option<Vec<i64>>);

/// One event to a new stream inside the caller's transaction, through the
/// `eventstore.append_batch` function: one statement, no savepoint, so that
/// the transaction ids these reader tests arrange are the only ones (a
/// savepoint's subtransaction id would move the snapshots' `xmax`).
/// Returns the event id and its position.
async fn raw_append(tx: &tokio_postgres::Transaction<'_>, stream: &str, event_type: &str) -> (Uuid, u64) {
    let id = Uuid::now_v7();
    let data = json!({ "stream": stream });
    let metadata = EventMetadata::default();
    let content = hash::content_digest(&id, event_type, 1, &data, &metadata).to_vec();
    let row = tx
        .query_one(
            "SELECT status, positions FROM eventstore.append_batch(ARRAY[$1], ARRAY[-2::bigint], ARRAY[''], \
             ARRAY[1], ARRAY[$2::uuid], ARRAY[$3], ARRAY[1], ARRAY[$4::jsonb], ARRAY[$5::jsonb], ARRAY[$6::bytea])",
            &[&stream, &id, &event_type, &data, &metadata.to_json(), &content],
        )
        .await
        .expect("append_batch");
    assert_eq!(row.get::<_, String>("status"), "ok");
    let positions: Vec<i64> = row.get("positions");
    assert_eq!(positions.len(), 1);
    (id, positions[0] as u64)
}

async fn append_one(log: &dyn EventLog, stream: &str) -> (Uuid, AppendOutcome) {
    let event = NewEvent::new("Appended", json!({ "stream": stream }));
    let id = event.event_id;
    let outcome = log.append(AppendRequest::new(stream, ExpectedVersion::Any, vec![event])).await.expect("append");
    (id, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_commit_is_never_skipped() {
    let (db, log) = common::postgres().await;
    let (w_id, w) = append_one(log.as_ref(), "ooo-w").await;

    let subscriptions = Subscriptions::new(log.clone(), SubscriptionOptions::default());
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1000);
    let history = caught_up(&mut rx).await;
    assert_eq!(history.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id]);

    // A takes a position and stays open.
    let mut raw = common::client(db.url()).await;
    let tx = raw.transaction().await.unwrap();
    let (a_id, a_pos) = raw_append(&tx, "ooo-a", "OutOfOrderA").await;
    assert!(a_pos > w.last_position());

    // B commits after A took its position: a higher position, visible first.
    let (b_id, b) = append_one(log.as_ref(), "ooo-b").await;
    let b_pos = b.last_position();
    assert!(a_pos < b_pos, "A ({a_pos}) took its position before B ({b_pos})");
    assert_eq!(log.stream_info("ooo-b").await.unwrap().last_position, Some(b_pos), "B is committed");

    assert_quiet(&mut rx, Duration::from_millis(500), a_pos).await;

    // read_all answers only what precedes the open position.
    let slice = log.read_all(AllRead { after: 0, max_count: 100, filter: EventFilter::default() }).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id]);
    assert!(slice.next_position < a_pos, "next_position {} passes the open position {a_pos}", slice.next_position);
    assert!(!slice.end_of_log, "B is stored beyond the gap: not the end of the log");
    let slice = log
        .read_all(AllRead { after: slice.next_position, max_count: 100, filter: EventFilter::default() })
        .await
        .unwrap();
    assert!(slice.events.is_empty(), "nothing may be read past the open position: {:?}", slice.events);
    assert!(slice.next_position < a_pos);

    tx.commit().await.unwrap();

    let first = next_event(&mut rx).await;
    let second = next_event(&mut rx).await;
    assert_eq!((first.event_id, first.global_position), (a_id, a_pos), "A first");
    assert_eq!((second.event_id, second.global_position), (b_id, b_pos), "then B");
    assert_quiet(&mut rx, Duration::from_millis(500), u64::MAX).await;

    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id, a_id, b_id]);
    assert!(log.verify_stream("ooo-a").await.unwrap().is_valid(), "the raw append built a valid chain");
}

/// The xid scheme of `read_all` misses a running transaction whose id is at
/// or above the snapshot's `xmax`: PostgreSQL sets `xmax` to the latest
/// *completed* xid + 1 and lists only running xids below it. Here R takes its
/// xid first, T takes a later xid and a lower position, R takes a higher
/// position and commits: every snapshot now has `xmax` = R + 1, T is not in
/// the in-progress list, and a reader that trusted the snapshot would treat
/// T's position as final.
///
/// A transaction of anyone else finishing with a later xid lists T again and
/// hides the bug, so the test runs on a server of its own (autovacuum off, and
/// a subscription that reads only when woken) and asserts that precondition
/// before the result: a snapshot taken after R's commit sees R's position,
/// not T's, and does not list T as running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_commit_with_a_later_transaction_id_is_never_skipped() {
    let server = tokio::task::spawn_blocking(eventfold_tests::OwnPostgres::start).await.unwrap();
    let admin = common::client(&server.url()).await;
    admin.batch_execute("ALTER SYSTEM SET autovacuum = off").await.unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    drop(admin);
    let db = server.migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let log = Arc::new(PostgresEventLog::connect(database, PostgresConfig::default()).await.expect("connect the log"));

    let (w_id, w) = append_one(log.as_ref(), "xid-w").await;
    // No poll: the subscription reads when an append of this log or a
    // notification wakes it (or while a gap holds it), so that no read of
    // its own takes a transaction id before the precondition is checked.
    let options = SubscriptionOptions { poll_interval: Duration::from_secs(3600), ..SubscriptionOptions::default() };
    let subscriptions = Subscriptions::new(log.clone(), options);
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1000);
    assert_eq!(caught_up(&mut rx).await.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id]);

    let mut r_conn = common::client(db.url()).await;
    let mut t_conn = common::client(db.url()).await;
    let observer = common::client(db.url()).await;
    let r = r_conn.transaction().await.unwrap();
    let r_xid: String = r.query_one("SELECT pg_current_xact_id()::text", &[]).await.unwrap().get(0);
    let t = t_conn.transaction().await.unwrap();
    let t_xid: String = t.query_one("SELECT pg_current_xact_id()::text", &[]).await.unwrap().get(0);
    let (r_xid, t_xid): (u64, u64) = (r_xid.parse().unwrap(), t_xid.parse().unwrap());
    let (t_id, t_pos) = raw_append(&t, "xid-t", "LaterXid").await;
    let (r_id, r_pos) = raw_append(&r, "xid-r", "EarlierXid").await;
    assert!(t_pos < r_pos && r_xid < t_xid);
    r.commit().await.unwrap();

    // The precondition, under one snapshot: R's position is visible and T's
    // is not, and T is not listed as running (its xid is at or above xmax).
    let row = observer
        .query_one(
            "SELECT pg_current_snapshot()::text, \
                    array(SELECT global_position FROM eventstore.events WHERE global_position > $1 ORDER BY 1)",
            &[&(w.last_position() as i64)],
        )
        .await
        .unwrap();
    let snapshot: String = row.get(0);
    let visible: Vec<i64> = row.get(1);
    let context =
        format!("R xid {r_xid} position {r_pos} committed, T xid {t_xid} position {t_pos} open, snapshot {snapshot}");
    let mut parts = snapshot.splitn(3, ':');
    let (_xmin, xmax): (u64, u64) = (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap());
    let running: Vec<u64> =
        parts.next().unwrap().split(',').filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect();
    assert_eq!(visible, vec![r_pos as i64], "precondition: a reader sees R's position and not T's ({context})");
    assert!(
        xmax <= t_xid && !running.contains(&t_xid),
        "precondition: the snapshot must not list T as running, else the bug is hidden ({context})"
    );

    let while_open = log
        .read_all(AllRead { after: w.last_position(), max_count: 100, filter: EventFilter::default() })
        .await
        .unwrap();
    // Wake the subscription while T is still open: an append of this log
    // (Z, after R).
    let (z_id, z) = append_one(log.as_ref(), "xid-z").await;
    let delivered_while_open = drain(&mut rx, Duration::from_millis(500)).await;
    t.commit().await.unwrap();
    let mut delivered = positions(&delivered_while_open);
    delivered.extend(positions(&drain(&mut rx, Duration::from_secs(2)).await));

    assert!(
        while_open.events.is_empty() && while_open.next_position < t_pos,
        "read_all passed the open position: got {:?}, next_position {} ({context})",
        positions(&while_open.events),
        while_open.next_position
    );
    assert_eq!(
        delivered,
        vec![t_pos, r_pos, z.last_position()],
        "the subscriber must deliver T, then R, then Z, each once ({context}); it delivered {:?} while T was open",
        positions(&delivered_while_open)
    );
    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id, t_id, r_id, z_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_positions_do_not_stall_readers() {
    let (db, log) = common::postgres().await;
    let (w_id, _) = append_one(log.as_ref(), "rb-w").await;

    let subscriptions = Subscriptions::new(log.clone(), SubscriptionOptions::default());
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1000);
    assert_eq!(caught_up(&mut rx).await.len(), 1);

    let mut raw = common::client(db.url()).await;
    let tx = raw.transaction().await.unwrap();
    let (_, c_pos) = raw_append(&tx, "rb-c", "RolledBack").await;
    let (d1_id, d1) = append_one(log.as_ref(), "rb-d").await;
    assert!(c_pos < d1.last_position());
    assert_quiet(&mut rx, Duration::from_millis(500), c_pos).await;

    tx.rollback().await.unwrap();

    let started = Instant::now();
    let delivered = next_event(&mut rx).await;
    assert_eq!((delivered.event_id, delivered.global_position), (d1_id, d1.last_position()));
    let (d2_id, d2) = append_one(log.as_ref(), "rb-d").await;
    let delivered = next_event(&mut rx).await;
    assert_eq!((delivered.event_id, delivered.global_position), (d2_id, d2.last_position()));
    assert!(started.elapsed() < Duration::from_secs(5), "the rolled-back position stalled the tail");
    assert_quiet(&mut rx, Duration::from_millis(300), u64::MAX).await;

    // Pages until the end: a single read may stop before C's position while
    // transactions of other databases of the cluster are running.
    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.iter().map(|e| e.event_id).collect::<Vec<_>>(), vec![w_id, d1_id, d2_id]);
    assert!(!positions(&all).contains(&c_pos));
    assert!(matches!(log.stream_info("rb-c").await, Err(Error::StreamNotFound(_))), "C left nothing behind");
}

/// A reader that holds a transaction id of its own around each read (a
/// projector locking its checkpoint row did) is older than the bound its
/// read takes for a gap. Were every read to take a new bound, a rolled-back
/// position would stall it for good; the log keeps a gap's first bound, so
/// the next read passes the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_position_is_passed_by_a_reader_holding_a_transaction_id() {
    let (db, log) = common::postgres().await;
    let (w_id, w) = append_one(log.as_ref(), "hole-w").await;
    let mut raw = common::client(db.url()).await;
    let tx = raw.transaction().await.unwrap();
    let (_, hole) = raw_append(&tx, "hole-c", "RolledBack").await;
    let (after_id, after) = append_one(log.as_ref(), "hole-d").await;
    tx.rollback().await.unwrap();
    assert!(w.last_position() < hole && hole < after.last_position());

    let mut reader = common::client(db.url()).await;
    let mut read = Vec::new();
    let mut next = 0;
    for _ in 0..20 {
        let held = reader.transaction().await.unwrap();
        held.query_one("SELECT pg_current_xact_id()", &[]).await.unwrap();
        let slice =
            log.read_all(AllRead { after: next, max_count: 100, filter: EventFilter::default() }).await.unwrap();
        held.commit().await.unwrap();
        read.extend(slice.events.iter().map(|e| e.event_id));
        next = slice.next_position;
        if next >= after.last_position() {
            break;
        }
    }
    assert_eq!(read, vec![w_id, after_id], "stalled at position {next}, the hole is at {hole}");
}

// ---------------------------------------------------------------------------
// 3. Tampering.

async fn tamper_setup(log: &dyn EventLog, stream: &str) -> Vec<RecordedEvent> {
    let events: Vec<NewEvent> = (0..6)
        .map(|n| {
            let mut e = NewEvent::new("Tracked", json!({ "n": n }));
            e.metadata.correlation_id = Some(format!("corr-{n}"));
            e
        })
        .collect();
    log.append(AppendRequest::new(stream, ExpectedVersion::NoStream, events)).await.unwrap();
    let report = log.verify_stream(stream).await.unwrap();
    assert!(report.is_valid());
    assert_eq!(report.events_checked, 6);
    let stored = read_stream_fully(log, stream).await;
    assert_eq!(report.head_hash, Some(stored[5].hash));
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected() {
    let (db, log) = common::postgres().await;
    let stored = tamper_setup(log.as_ref(), "tamper").await;
    let raw = common::client(db.url()).await;
    let changed = raw
        .execute(r#"UPDATE eventstore.events SET data = '{"n": 999}' WHERE stream_id = 'tamper' AND version = 3"#, &[])
        .await
        .unwrap();
    assert_eq!(changed, 1);

    let report = log.verify_stream("tamper").await.unwrap();
    assert!(!report.is_valid());
    let broken = report.first_broken.expect("a broken link");
    assert_eq!(broken.stream_id, "tamper");
    assert_eq!(broken.version, 3);
    assert_eq!(broken.global_position, stored[3].global_position);
    assert_eq!(broken.event_id, stored[3].event_id);
    assert_eq!(broken.stored, stored[3].hash);
    assert_ne!(broken.computed, broken.stored);
    assert_eq!(report.events_checked, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_tampering_is_detected() {
    let (db, log) = common::postgres().await;
    let stored = tamper_setup(log.as_ref(), "tamper-meta").await;
    let raw = common::client(db.url()).await;
    let changed = raw
        .execute(
            r#"UPDATE eventstore.events SET metadata = jsonb_set(metadata, '{correlation_id}', '"forged"')
               WHERE stream_id = 'tamper-meta' AND version = 1"#,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let read = log.read_stream(StreamRead::forwards("tamper-meta", 10)).await.unwrap();
    assert_eq!(read.events[1].metadata.correlation_id.as_deref(), Some("forged"), "the tampering took effect");

    let report = log.verify_stream("tamper-meta").await.unwrap();
    let broken = report.first_broken.expect("a broken link");
    assert_eq!(broken.version, 1);
    assert_eq!(broken.global_position, stored[1].global_position);
    assert_eq!(broken.event_id, stored[1].event_id);
    assert_eq!(broken.stored, stored[1].hash);
    assert_eq!(report.events_checked, 2);
}

// ---------------------------------------------------------------------------
// 4. Conflicts are isolated within the group commit.

/// Appends with a wrong expected version, interleaved with good ones in one
/// batch: each conflict fails only its own append.
///
/// One batch for sure: the log has a single writer, held inside the
/// `append_batch` call of a gate append (the gate stream's row is locked by
/// an open transaction) while the 60 appends are queued; each append's future
/// is polled once, which puts its job in the queue. Released, the writer takes
/// what is queued (far below its batch limits) in one call. Asserted: the
/// stored events of the first and the last queued append (both good) and of
/// all between carry one transaction id, so every conflict queued between
/// them shared their transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conflict_never_fails_another() {
    let db = eventfold_tests::TestDatabase::migrated().await;
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let config = PostgresConfig { writers: 1, ..PostgresConfig::default() };
    let log = PostgresEventLog::connect(database, config).await.expect("connect the log");
    let existing: Vec<NewEvent> = (0..3).map(|n| NewEvent::new("Existing", json!({ "n": n }))).collect();
    let existing_ids: Vec<Uuid> = existing.iter().map(|e| e.event_id).collect();
    log.append(AppendRequest::new("existing", ExpectedVersion::NoStream, existing)).await.unwrap();
    let gate_event = NewEvent::new("Gate", json!({}));
    let gate_id = gate_event.event_id;
    log.append(AppendRequest::new("gate", ExpectedVersion::NoStream, vec![NewEvent::new("Gate", json!({}))]))
        .await
        .unwrap();

    // Hold the only writer inside a batch: lock the gate's row, append to it
    // and wait until that append waits for the lock.
    let mut raw = common::client(db.url()).await;
    let observer = common::client(db.url()).await;
    let lock = raw.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM eventstore.streams WHERE stream_id = 'gate' FOR UPDATE", &[]).await.unwrap();
    let mut gate = log.append(AppendRequest::new("gate", ExpectedVersion::Exact(0), vec![gate_event]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(std::future::poll_fn(|cx| Poll::Ready(gate.as_mut().poll(cx))).await.is_pending());
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer never waited for the gate's lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Queue good and bad appends behind it, interleaved, first and last good.
    let mut appends = Vec::new();
    for i in 0..60 {
        let (stream, expected) = if i % 6 == 3 {
            ("existing".to_owned(), ExpectedVersion::Exact(7))
        } else {
            (format!("fresh-{i}"), ExpectedVersion::NoStream)
        };
        let event = NewEvent::new("Concurrent", json!({ "i": i }));
        let id = event.event_id;
        let mut append = log.append(AppendRequest::new(stream.clone(), expected, vec![event]));
        let first = std::future::poll_fn(|cx| Poll::Ready(append.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "append {i} is queued behind the gate, not answered: {first:?}");
        appends.push(async move { (stream, id, append.await) });
    }
    lock.commit().await.unwrap();
    gate.await.expect("the gate append");

    let mut succeeded = HashMap::new();
    let mut conflicts = 0;
    for (stream, id, result) in futures_util::future::join_all(appends).await {
        match result {
            Ok(outcome) => {
                assert!(stream.starts_with("fresh-"), "the wrong-version append to {stream} succeeded");
                assert_eq!((outcome.first_version, outcome.last_version), (0, 0));
                succeeded.insert(id, (stream, outcome.positions[0]));
            }
            Err(Error::WrongExpectedVersion { stream: s, expected, actual }) => {
                assert_eq!(s, "existing");
                assert_eq!(stream, "existing", "an append to {stream} failed because of another's conflict");
                assert_eq!(expected, ExpectedVersion::Exact(7));
                assert_eq!(actual, Some(2));
                conflicts += 1;
            }
            Err(e) => panic!("append to {stream} failed: {e}"),
        }
    }
    assert_eq!(succeeded.len(), 50);
    assert_eq!(conflicts, 10);

    // One batch: the 50 good appends were stored by one transaction, not the
    // gate's.
    let ids: Vec<Uuid> = succeeded.keys().copied().collect();
    let batches: Vec<String> = observer
        .query("SELECT DISTINCT tx_id::text FROM eventstore.events WHERE event_id = ANY ($1)", &[&ids])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(batches.len(), 1, "the queued appends were stored by one batch, not {batches:?}");
    let gate_batch: String = observer
        .query_one("SELECT tx_id::text FROM eventstore.events WHERE event_id = $1", &[&gate_id])
        .await
        .unwrap()
        .get(0);
    assert_ne!(batches[0], gate_batch, "the gate append went alone");

    let all = read_everything(&log).await;
    assert_eq!(all.len(), 55);
    assert_eq!(all[..3].iter().map(|e| e.event_id).collect::<Vec<_>>(), existing_ids);
    let mut queued = Vec::new();
    for e in &all[3..] {
        if e.stream_id == "gate" {
            continue;
        }
        let (stream, position) = succeeded.get(&e.event_id).unwrap_or_else(|| panic!("unexpected event {e:?}"));
        assert_eq!((&e.stream_id, e.global_position, e.version), (stream, *position, 0));
        queued.push(e.event_id);
    }
    assert_eq!(queued.iter().collect::<HashSet<_>>().len(), 50);
    assert_eq!(log.stream_info("existing").await.unwrap().version, Some(2));
    assert_eq!(log.stream_info("gate").await.unwrap().version, Some(1));
}

/// One batch, crafted: appends to one stream apply in batch order,
/// a request id repeated within the batch gets the answer of its successful
/// occurrence, and a failed append leaves neither a stream nor a request id
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_applies_its_appends_in_order() {
    let (db, log) = common::postgres().await;
    let mut client = common::client(db.url()).await;
    let batch = [
        ("a", -2, "", 2),   // ok: versions 0 and 1
        ("a", 1, "", 1),    // ok: version 2, after the append before it
        ("b", 4, "", 1),    // wrong version, on a stream that does not exist
        ("a", -1, "r1", 1), // ok: version 3
        ("a", -1, "r1", 1), // the same request: its first answer
        ("c", 3, "r2", 1),  // wrong version
        ("c", -2, "r2", 2), // ok: the failed occurrence is not an answer
        ("c", -2, "r2", 2), // the same request: the answer of the one before
    ];
    let tx = client.transaction().await.unwrap();
    let answers = append_batch(&tx, &batch, "Appended").await;
    tx.commit().await.unwrap();
    let statuses: Vec<&str> = answers.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(statuses, ["ok", "ok", "wrong_version", "ok", "duplicate", "wrong_version", "ok", "duplicate"]);
    assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let versions: Vec<(Option<i64>, Option<i64>)> = answers.iter().map(|a| (a.2, a.3)).collect();
    assert_eq!(versions[0], (Some(0), Some(1)));
    assert_eq!(versions[1], (Some(2), Some(2)));
    assert_eq!((versions[3], versions[4]), ((Some(3), Some(3)), (Some(3), Some(3))));
    assert_eq!((versions[6], versions[7]), ((Some(0), Some(1)), (Some(0), Some(1))));
    assert_eq!((answers[2].4, answers[5].4), (Some(-1), Some(-1)), "actual versions of the conflicts");
    let positions: Vec<i64> = [0, 1, 3, 6].iter().flat_map(|&i| answers[i].5.clone().unwrap()).collect();
    assert_eq!(positions.len(), 6);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions ascend through the batch: {positions:?}");
    assert_eq!(answers[4].5, answers[3].5);
    assert_eq!(answers[7].5, answers[6].5);

    let a = read_stream_fully(log.as_ref(), "a").await;
    assert_eq!(a.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(a.iter().map(|e| e.global_position as i64).collect::<Vec<_>>(), positions[..4]);
    assert!(log.verify_stream("a").await.unwrap().first_broken.is_none());
    assert!(log.verify_stream("c").await.unwrap().first_broken.is_none());
    assert!(matches!(log.stream_info("b").await, Err(Error::StreamNotFound(_))), "no placeholder stream left");

    // Retried alone, each request answers what it answered in the batch.
    // (The same requests: a request id with another request is refused.)
    let tx = client.transaction().await.unwrap();
    let retried = append_batch(&tx, &[("a", -1, "r1", 1), ("c", -2, "r2", 2)], "Appended").await;
    tx.commit().await.unwrap();
    for (answer, first) in retried.iter().zip([3, 6]) {
        assert_eq!(answer.1, "duplicate");
        assert_eq!(answer.5, answers[first].5);
    }
    assert_eq!(read_everything(log.as_ref()).await.len(), 6, "a retry appends nothing");
}

/// With the event-id check on, only the append holding a stored event id
/// fails; the others in the batch are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_event_id_fails_only_its_append() {
    let (_db, log) = common::postgres().await;
    let first = NewEvent::new("Appended", json!({ "n": 0 }));
    let stored = first.clone();
    log.append(AppendRequest::new("x", ExpectedVersion::NoStream, vec![first])).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let log = log.clone();
        let event = if i == 7 { stored.clone() } else { NewEvent::new("Appended", json!({ "n": i })) };
        tasks.push(tokio::spawn(async move {
            log.append(AppendRequest::new(format!("y-{i}"), ExpectedVersion::Any, vec![event])).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => assert_ne!(i, 7, "the stored event id was appended again"),
            Err(Error::DuplicateEventId { .. }) => assert_eq!(i, 7),
            Err(e) => panic!("append {i} failed: {e}"),
        }
    }
    assert_eq!(read_everything(log.as_ref()).await.len(), 20);
    assert!(matches!(log.stream_info("y-7").await, Err(Error::StreamNotFound(_))));
}

/// A live subscription of one process is woken by another process's append
/// through NOTIFY, not by its poll (set far beyond the test's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_append_wakes_live_subscribers() {
    let (db, writer) = common::postgres().await;
    let reader = std::sync::Arc::new(
        PostgresEventLog::connect(
            eventfold_store::Database::from_url(db.url()).expect("a PostgreSQL URL"),
            PostgresConfig::default(),
        )
        .await
        .unwrap(),
    );
    let options = SubscriptionOptions { poll_interval: Duration::from_secs(3600), ..SubscriptionOptions::default() };
    let subscriptions = Subscriptions::new(reader.clone(), options);
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1000);
    assert!(caught_up(&mut rx).await.is_empty());
    // The reader's LISTEN connection is made in the background: appends
    // before it listens wake nobody, so append until one gets through.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        append_one(writer.as_ref(), "elsewhere").await;
        match tokio::time::timeout(Duration::from_millis(500), next_event(&mut rx)).await {
            Ok(event) => break event,
            Err(_) => assert!(Instant::now() < deadline, "no NOTIFY reached the other process within 10 s"),
        }
    };
    assert_eq!(first.stream_id, "elsewhere");
    // Listening now: the next append arrives without a retry.
    let (id, _) = append_one(writer.as_ref(), "elsewhere").await;
    let mut seen = vec![first.event_id];
    while !seen.contains(&id) {
        seen.push(
            tokio::time::timeout(Duration::from_secs(5), next_event(&mut rx)).await.expect("woken by NOTIFY").event_id,
        );
    }
}

// ---------------------------------------------------------------------------
// 5. No server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_answers_unavailable() {
    let url = eventfold_tests::unreachable_database_url();
    let log = eventfold_tests::store::unanswered(&url).await;

    async fn unavailable<T: std::fmt::Debug>(
        what: &str,
        call: impl std::future::Future<Output = eventfold_store::Result<T>>,
    ) {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("{what} hung without a server"));
        assert!(matches!(result, Err(Error::Unavailable(_))), "{what}: expected Unavailable, got {result:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
    }
    unavailable("check_health", log.check_health()).await;
    unavailable(
        "append",
        log.append(AppendRequest::new("s", ExpectedVersion::Any, vec![NewEvent::new("E", json!({}))])),
    )
    .await;
    unavailable("read_stream", log.read_stream(StreamRead::forwards("s", 10))).await;
    unavailable("read_all", log.read_all(AllRead { after: 0, max_count: 10, filter: EventFilter::default() })).await;
    unavailable("last_position", log.last_position()).await;
    unavailable("stream_info", log.stream_info("s")).await;
}

// ---------------------------------------------------------------------------
// 6. JSON through jsonb.

async fn assert_round_trip(log: &dyn EventLog, stream: &str, payloads: Vec<Value>) {
    let events: Vec<NewEvent> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let mut e = NewEvent::new("Tricky", data);
            e.metadata = EventMetadata {
                // Ids are visible ASCII (quotes and backslashes included:
                // JSON escapes them); custom values may be any text but
                // control characters.
                correlation_id: Some(format!("corr-\"{i}\"-/")),
                causation_id: Some("caused\\by".into()),
                user_id: Some("user@example.org".into()),
                custom: [
                    ("zeta".to_owned(), "ω 🦀 ✓".to_owned()),
                    ("alpha".to_owned(), "caus\u{e9} \"q\" \\".to_owned()),
                ]
                .into(),
            };
            e
        })
        .collect();
    let count = events.len() as u64;
    log.append(AppendRequest::new(stream, ExpectedVersion::NoStream, events.clone())).await.expect("append");
    let stored = read_stream_fully(log, stream).await;
    assert_eq!(stored.len(), events.len());
    let changed: Vec<(u64, String, String)> = events
        .iter()
        .zip(&stored)
        .map(|(sent, got)| (got.version, hash::canonical_json(&sent.data), hash::canonical_json(&got.data)))
        .filter(|(_, sent, got)| sent != got)
        .collect();
    let report = log.verify_stream(stream).await.unwrap();
    assert_eq!(
        report.first_broken, None,
        "the chain of {stream} broke in the jsonb round trip; canonical data (version, appended, stored) changed: \
         {changed:?}"
    );
    assert!(changed.is_empty(), "canonical data changed without breaking the chain: {changed:?}");
    for (sent, got) in events.iter().zip(&stored) {
        assert_eq!(got.metadata, sent.metadata);
    }
    assert_eq!(report.events_checked, count);
    assert_eq!(report.head_hash, log.stream_info(stream).await.unwrap().head_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_round_trips_keep_the_chain_valid() {
    let (_db, log) = common::postgres().await;
    let parsed: Value = serde_json::from_str(
        r#"{"neg_zero": -0.0, "exp": 1e21, "tiny": 5e-324, "small": 1e-7, "escaped": "\u00e9\ud83d\ude80\"\\\/",
            "z": 1, "a": 2, "M": 3, "": 4, "é": 5, "10": 6, "9": 7}"#,
    )
    .unwrap();
    let payloads = vec![
        json!({ "text": "unicode: é ü 中文 🚀 \u{2028}\u{7f}", "quotes": "\"double\" 'single' \\ back\\slash / \n\r\t\u{1}" }),
        json!({ "f": 0.1, "big_exp": 1e21, "neg_zero": -0.0, "pi": std::f64::consts::PI, "half": 1.5, "one": 1.0,
                "min_pos": f64::MIN_POSITIVE, "neg": -2.5e-10, "thousand": 1000.0 }),
        json!({ "u64_max": u64::MAX, "i64_min": i64::MIN, "i64_max": i64::MAX, "zero": 0, "minus_one": -1 }),
        json!({ "zz": { "b": [3, 2, 1, [{ "y": null, "x": [] }]], "a": { "d": {}, "c": [[], [[]]] } },
                "aa": [true, false, null, "", {}], "mm": { "k10": 1, "k9": 2, "K": 3, "ä": 4 } }),
        json!({}),
        json!({ "empty_array": [], "empty_object": {}, "nested_empty": [{}, [], [{}]] }),
        parsed,
    ];
    assert_round_trip(log.as_ref(), "json", payloads).await;
}

/// Integral floats from 1e16 up to the 64-bit integer range: serde_json
/// writes them in exponent form (`1e16`), `jsonb` stores a `numeric` and
/// answers `10000000000000000`, which serde_json reads back as an integer, so
/// the canonical JSON (and with it the content digest) changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_integral_floats_keep_the_chain_valid() {
    let (_db, log) = common::postgres().await;
    let payloads = vec![json!({ "f": 1e16 }), json!({ "f": 1.5e17 }), json!({ "f": -1e18 })];
    assert_round_trip(log.as_ref(), "json-big-floats", payloads).await;
}

/// serde_json (built without its `float_roundtrip` feature) does not parse
/// every shortest float representation back to the same `f64` (about 7 % of
/// doubles in [1, 10) change in the last digit on a reparse). The stored
/// `jsonb` is reparsed on every read, so the canonical JSON changes and the
/// chain of such an event is broken from the moment it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventeen_digit_floats_keep_the_chain_valid() {
    let (_db, log) = common::postgres().await;
    let payloads = vec![
        json!({ "f": 1.5309576695984775 }),
        json!({ "f": 9.567604255623749 }),
        json!({ "f": 1.0715660391465826e-75 }),
    ];
    assert_round_trip(log.as_ref(), "json-17-digits", payloads).await;
}

/// `f64::MAX` passes validation and is stored, but `jsonb` answers it as a
/// 309-digit integer that serde_json reports as "number out of range";
/// `event_from_row` uses `Row::get`, which panics instead of returning an
/// error, so every read of the stream or of `$all` across it panics. (By the
/// code, the live tail task of `Subscriptions` would die the same way, and
/// live subscribers would then silently receive nothing more.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_payloads_stay_readable() {
    let (_db, log) = common::postgres().await;
    let appended = log
        .append(AppendRequest::new(
            "json-max",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Max", json!({ "f": f64::MAX }))],
        ))
        .await;
    if matches!(appended, Err(Error::InvalidArgument(_))) {
        return; // rejecting what cannot be read back is a correct answer
    }
    appended.expect("append");
    let reader = log.clone();
    let read = tokio::spawn(async move { reader.read_stream(StreamRead::forwards("json-max", 10)).await }).await;
    let read = read.unwrap_or_else(|e| panic!("read_stream of an accepted event panicked: {e}"));
    assert_eq!(read.expect("read_stream").events.len(), 1);
    let reader = log.clone();
    let all = tokio::spawn(async move {
        reader.read_all(AllRead { after: 0, max_count: 10, filter: EventFilter::default() }).await
    })
    .await
    .unwrap_or_else(|e| panic!("read_all across an accepted event panicked: {e}"));
    assert_eq!(all.expect("read_all").events.len(), 1);
    assert!(log.verify_stream("json-max").await.unwrap().is_valid());
}

/// Request ids are forgotten after their retention: then the id is free
/// again (the first answer is gone, a new request may use it). What the
/// background pruning runs, called at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_forgotten_after_their_retention() {
    let (_db, log) = common::postgres().await;
    let request = |n: u64| {
        let mut r = AppendRequest::new("expiring", ExpectedVersion::Any, vec![NewEvent::new("E", json!({ "n": n }))]);
        r.request_id = Some("req-expiring".into());
        r
    };
    log.append(request(0)).await.expect("first use");
    assert!(matches!(log.append(request(1)).await, Err(Error::RequestIdReused { .. })), "remembered");
    assert_eq!(log.forget_requests_older_than(Duration::from_secs(3600)).await.unwrap(), 0, "younger than an hour");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(log.forget_requests_older_than(Duration::from_millis(10)).await.unwrap(), 1);
    let again = log.append(request(1)).await.expect("a forgotten id is free");
    assert!(!again.duplicate);
    assert_eq!(again.first_version, 1);
}
