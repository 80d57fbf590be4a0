//! The append path written in Rust (`postgres/append.rs`) against what it
//! replaced and against a reference model.
//!
//! 1. Random batches, the same ones on two databases: one through the
//!    `eventstore.append_batch` PL/pgSQL function as the old group commit
//!    called it, one through the new batch. Each append must get the same
//!    answer, and the two logs, stream rows and request ids must end equal
//!    (created_at aside, which each takes from the clock), with valid hash
//!    chains.
//! 2. Random concurrent appends through the log's group commit, with random
//!    expected versions, request ids (repeated, and reused for other
//!    requests) and duplicate event ids, while a gap-safe reader follows
//!    the log. Checked against a reference model: versions gap-free, every
//!    accepted append admitted by the stream as it stood when it was
//!    written, every refusal true of some state the stream had, repeats
//!    answered as the first time, and the reader saw every event, in order,
//!    none skipped.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use eventfold_store::{
    AllRead, AppendOutcome, AppendRequest, Error, EventFilter, EventLog, ExpectedVersion, NewEvent, PostgresEventLog,
    hash, postgres::append_all_in,
};
use serde_json::json;
use tokio::sync::Mutex;
use uuid::Uuid;

/// A small deterministic generator (SplitMix64): a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// An append's answer, as both implementations can give it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok { stream: String, first: i64, last: i64, positions: Vec<i64>, duplicate: bool },
    WrongVersion { actual: i64 },
    Deleted,
    DuplicateEventId,
    RequestReused,
}

impl Answer {
    fn of(result: &eventfold_store::Result<AppendOutcome>) -> Self {
        match result {
            Ok(o) => Self::Ok {
                stream: o.stream_id.clone(),
                first: o.first_version as i64,
                last: o.last_version as i64,
                positions: o.positions.iter().map(|&p| p as i64).collect(),
                duplicate: o.duplicate,
            },
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                Self::WrongVersion { actual: actual.map_or(-1, |a| a as i64) }
            }
            Err(Error::StreamDeleted(_)) => Self::Deleted,
            Err(Error::DuplicateEventId { .. }) => Self::DuplicateEventId,
            Err(Error::RequestIdReused { .. }) => Self::RequestReused,
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }

    /// A row of `eventstore.append_batch`.
    fn of_row(request: &AppendRequest, row: &tokio_postgres::Row) -> Self {
        match row.get::<_, &str>("status") {
            "ok" | "duplicate" => Self::Ok {
                stream: row.get::<_, Option<String>>("stored_stream").unwrap_or_else(|| request.stream_id.clone()),
                first: row.get::<_, Option<i64>>("first_version").unwrap_or(0),
                last: row.get::<_, Option<i64>>("last_version").unwrap_or(0),
                positions: row.get::<_, Option<Vec<i64>>>("positions").unwrap_or_default(),
                duplicate: row.get::<_, &str>("status") == "duplicate",
            },
            "wrong_version" => Self::WrongVersion { actual: row.get::<_, Option<i64>>("actual_version").unwrap_or(-1) },
            "deleted" => Self::Deleted,
            "duplicate_event_id" => Self::DuplicateEventId,
            "request_reused" => Self::RequestReused,
            other => panic!("unknown status {other}"),
        }
    }
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// The batch through the old function, as the old group commit called it:
/// autocommit, and on a unique violation again with the event-id check.
async fn old_batch(client: &tokio_postgres::Client, batch: &[AppendRequest]) -> Vec<Answer> {
    let keys: Vec<_> = batch.iter().map(AppendRequest::request_key).collect();
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for request in batch {
        for e in &request.events {
            columns.0.push(e.event_id);
            columns.1.push(e.event_type.as_str());
            columns.2.push(e.schema_version as i32);
            columns.3.push(e.data.clone());
            columns.4.push(e.metadata.to_json());
            columns.5.push(
                hash::content_digest(&e.event_id, &e.event_type, e.schema_version, &e.data, &e.metadata).to_vec(),
            );
        }
    }
    let streams: Vec<&str> = batch.iter().map(|r| r.stream_id.as_str()).collect();
    let expected: Vec<i64> = batch
        .iter()
        .map(|r| match r.expected {
            ExpectedVersion::Any => -1,
            ExpectedVersion::NoStream => -2,
            ExpectedVersion::StreamExists => -3,
            ExpectedVersion::Exact(v) => v as i64,
        })
        .collect();
    let request_ids: Vec<&str> = keys.iter().map(|k| k.as_ref().map_or("", |k| k.request_id.as_str())).collect();
    let counts: Vec<i32> = batch.iter().map(|r| r.events.len() as i32).collect();
    let scopes: Vec<Option<&str>> = keys.iter().map(|k| k.as_ref().map(|k| k.scope.as_str())).collect();
    let prints: Vec<Option<&[u8]>> = keys.iter().map(|k| k.as_ref().map(|k| &k.fingerprint[..])).collect();
    for check in [false, true] {
        let rows = client
            .query(
                "SELECT * FROM eventstore.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &[
                    &streams,
                    &expected,
                    &request_ids,
                    &counts,
                    &columns.0,
                    &columns.1,
                    &columns.2,
                    &columns.3,
                    &columns.4,
                    &columns.5,
                    &check,
                    &scopes,
                    &prints,
                ],
            )
            .await;
        match rows {
            Ok(rows) => return batch.iter().zip(&rows).map(|(r, row)| Answer::of_row(r, row)).collect(),
            Err(e) if !check && is_unique_violation(&e) => continue,
            Err(e) => panic!("append_batch failed: {e:?}"),
        }
    }
    unreachable!("the second try returns or panics")
}

/// A correction of the function, found by this comparison: it stores a
/// request id's claim with the fingerprint and stream of the key's first
/// occurrence in the batch, and keeps them when a later occurrence (the
/// first one refused) is the one written and answered; a retry of that
/// request was then refused as a reuse. The new batch stores the answered
/// append's. The function is reference only, so its rows are corrected
/// here rather than it in a migration.
async fn store_the_answered_fingerprints(client: &tokio_postgres::Client, batch: &[AppendRequest], answers: &[Answer]) {
    for (request, answer) in batch.iter().zip(answers) {
        if let (Some(key), Answer::Ok { duplicate: false, .. }) = (request.request_key(), answer) {
            client
                .execute(
                    "UPDATE eventstore.append_requests SET fingerprint = $3, stream_id = $4 \
                      WHERE scope = $1 AND request_id = $2",
                    &[&key.scope, &key.request_id, &&key.fingerprint[..], &request.stream_id],
                )
                .await
                .expect("correcting the function's claim");
        }
    }
}

/// The batch through the new path, in a transaction of its own.
async fn new_batch(client: &mut tokio_postgres::Client, batch: &[AppendRequest]) -> Vec<Answer> {
    let tx = client.transaction().await.expect("begin");
    let answers = append_all_in(&tx, batch).await.expect("the batch as a whole succeeds");
    tx.commit().await.expect("commit");
    answers.iter().map(Answer::of).collect()
}

/// What the generator remembers to make repeats, stale versions and
/// duplicate ids likely.
#[derive(Default)]
struct Memory {
    versions: HashMap<String, i64>,
    requests: HashMap<String, AppendRequest>,
    event_ids: Vec<Uuid>,
    counter: u64,
}

impl Memory {
    fn append(&mut self, rng: &mut Rng, streams: &[&str], batch_no: u64) -> AppendRequest {
        let with_id = rng.chance(50);
        // Ids from a small pool (mostly answered by earlier batches), or new
        // ones that meet again only within this batch.
        let request_id =
            if rng.chance(50) { format!("r{}", rng.below(6)) } else { format!("b{batch_no}-{}", rng.below(2)) };
        if with_id
            && rng.chance(50)
            && let Some(first) = self.requests.get(&request_id)
        {
            // The same request again: its first answer.
            return first.clone();
        }
        let stream = streams[rng.below(streams.len() as u64) as usize].to_owned();
        let version = self.versions.get(&stream).copied().unwrap_or(-1);
        let expected = match rng.below(6) {
            0 => ExpectedVersion::Any,
            1 => ExpectedVersion::NoStream,
            2 => ExpectedVersion::StreamExists,
            // Often right, sometimes stale or ahead.
            _ => ExpectedVersion::Exact(
                u64::try_from(version.saturating_add(rng.below(3) as i64).saturating_sub(1)).unwrap_or(0),
            ),
        };
        // Ids of earlier appends are reused now and then (an id twice in one
        // request is refused before any of this runs).
        let earlier = self.event_ids.len();
        let events = (0..=rng.below(3))
            .map(|_| {
                self.counter += 1;
                let mut event =
                    NewEvent::new("Tested", json!({ "n": self.counter, "text": "x".repeat(rng.below(40) as usize) }));
                if earlier > 0 && rng.chance(8) {
                    event.event_id = self.event_ids[rng.below(earlier as u64) as usize];
                }
                self.event_ids.push(event.event_id);
                event
            })
            .collect();
        let mut request = AppendRequest::new(stream, expected, events);
        if with_id {
            request.request_id = Some(request_id.clone());
            // Some ids are scoped like the command side's: shared across streams.
            if rng.chance(40) {
                request.request_scope = Some("command/test/alice".to_owned());
            }
            self.requests.entry(request_id).or_insert_with(|| request.clone());
        }
        request
    }

    fn learn(&mut self, request: &AppendRequest, answer: &Answer) {
        match answer {
            Answer::Ok { stream, last, .. } => {
                let v = self.versions.entry(stream.clone()).or_insert(-1);
                *v = (*v).max(*last);
            }
            Answer::WrongVersion { actual } => {
                self.versions.insert(request.stream_id.clone(), *actual);
            }
            _ => {}
        }
    }
}

/// Every stream's chain recomputes from what is stored, and its row's head
/// is its last event's link.
async fn assert_chains_valid(log: &PostgresEventLog, client: &tokio_postgres::Client, what: &str) {
    // (A deleted stream is not verified: it answers that it is deleted.)
    for row in
        client.query("SELECT stream_id, head_hash FROM eventstore.streams WHERE deleted_at IS NULL", &[]).await.unwrap()
    {
        let stream: String = row.get(0);
        let head: Option<Vec<u8>> = row.get(1);
        let report = log.verify_stream(&stream).await.unwrap();
        assert!(report.is_valid(), "{what}: the chain of {stream} is broken: {report:?}");
        assert_eq!(report.head_hash.map(|h| h.to_vec()), head, "{what}: the head of {stream} is its last link");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rewritten_batch_decides_as_the_function_did() {
    let (old_db, _, old_log) = eventfold_tests::store::migrated().await;
    let (new_db, _, new_log) = eventfold_tests::store::migrated().await;
    let old = common::client(old_db.url()).await;
    let mut new = common::client(new_db.url()).await;
    let streams = ["s0", "s1", "s2", "s3", "s4"];
    let mut seen = BTreeMap::<&str, usize>::new();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed);
        let mut memory = Memory::default();
        let streams: Vec<String> = streams.iter().map(|s| format!("{s}-{seed}")).collect();
        let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
        for batch_no in 0..40u64 {
            if rng.chance(2) {
                let stream = streams[rng.below(streams.len() as u64) as usize];
                let a = old_log.delete_stream(stream, None).await.map(|i| i.version);
                let b = new_log.delete_stream(stream, None).await.map(|i| i.version);
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "seed {seed}: deleting {stream}");
            }
            let batch: Vec<AppendRequest> =
                (0..=rng.below(8)).map(|_| memory.append(&mut rng, &streams, batch_no)).collect();
            let expected = old_batch(&old, &batch).await;
            store_the_answered_fingerprints(&old, &batch, &expected).await;
            let actual = new_batch(&mut new, &batch).await;
            for (i, (e, a)) in expected.iter().zip(&actual).enumerate() {
                assert_eq!(
                    a,
                    e,
                    "seed {seed}, batch {batch_no}, append {i} of {}: {:?} expecting {:?} (request {:?})",
                    batch.len(),
                    batch[i].stream_id,
                    batch[i].expected,
                    batch[i].request_id
                );
            }
            assert_eq!(actual.len(), expected.len());
            for table @ (what, _, _) in TABLES {
                let (a, b) = (rows(&old, table).await, rows(&new, table).await);
                if a != b {
                    for (r, e) in batch.iter().zip(&expected) {
                        eprintln!(
                            "{} {:?} {:?} {:?} {} events: {e:?}",
                            r.stream_id,
                            r.expected,
                            r.request_scope,
                            r.request_id,
                            r.events.len()
                        );
                    }
                }
                assert_eq!(b, a, "seed {seed}, batch {batch_no}: {what} differ between the function and the new path");
            }
            for (i, (request, answer)) in batch.iter().zip(&expected).enumerate() {
                memory.learn(request, answer);
                let key = request.request_key().map(|k| (k.scope, k.request_id));
                if key.is_some() && batch[..i].iter().any(|b| b.request_key().map(|k| (k.scope, k.request_id)) == key) {
                    match answer {
                        Answer::Ok { duplicate: true, .. } => *seen.entry("repeat within its batch").or_default() += 1,
                        Answer::RequestReused => *seen.entry("reused within its batch").or_default() += 1,
                        _ => {}
                    }
                }
                let kind = match answer {
                    Answer::Ok { duplicate: false, .. } => "written",
                    Answer::Ok { duplicate: true, .. } => "repeat answered",
                    Answer::WrongVersion { .. } => "wrong version",
                    Answer::Deleted => "deleted",
                    Answer::DuplicateEventId => "duplicate event id",
                    Answer::RequestReused => "request id reused",
                };
                *seen.entry(kind).or_default() += 1;
            }
        }
    }
    // The generator reached every answer.
    eprintln!("answers: {seen:?}");
    for kind in [
        "written",
        "repeat answered",
        "wrong version",
        "deleted",
        "duplicate event id",
        "request id reused",
        "repeat within its batch",
        "reused within its batch",
    ] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 3, "the workload gave too few '{kind}' answers: {seen:?}");
    }

    // The same log, stream rows and request ids.
    for table @ (what, _, _) in TABLES {
        let (a, b) = (rows(&old, table).await, rows(&new, table).await);
        assert!(!a.is_empty(), "{what}: nothing stored");
        assert_eq!(b, a, "{what} differ between the function and the new path");
    }
    assert_chains_valid(&old_log, &old, "function").await;
    assert_chains_valid(&new_log, &new, "new path").await;
}

/// What the two databases must hold alike (`created_at` and links aside).
const TABLES: [(&str, &str, &str); 3] = [
    (
        "events",
        "(SELECT global_position, stream_id, version, event_id, event_type, schema_version, data, metadata \
            FROM eventstore.events)",
        "global_position",
    ),
    (
        "streams",
        "(SELECT stream_id, version, first_position, last_position, deleted_at IS NOT NULL AS deleted, \
                 parent_stream_id FROM eventstore.streams)",
        "stream_id",
    ),
    (
        "request ids",
        "(SELECT scope, request_id, stream_id, result, fingerprint FROM eventstore.append_requests)",
        "scope, request_id",
    ),
];

/// The rows of one of [`TABLES`] on `client`, as JSON text.
async fn rows(client: &tokio_postgres::Client, (_, columns, order_by): (&str, &str, &str)) -> Vec<String> {
    eventfold_tests::table_rows(client, columns, order_by).await
}

/// One append of the concurrent run and what it was answered.
struct Done {
    request: AppendRequest,
    answer: Answer,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_keep_the_reference_model() {
    let (db, _, log) = eventfold_tests::store::migrated().await;
    let client = common::client(db.url()).await;
    let log = Arc::new(log);
    let streams = ["c0", "c1", "c2", "c3"];
    let event_ids = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let stop = tokio_util::sync::CancellationToken::new();

    // The gap-safe reader: follows the global log page by page while the
    // writers run, and once more after they stop.
    let reader = {
        let (log, stop) = (Arc::clone(&log), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(u64, Uuid)> = Vec::new();
            let mut after = 0;
            loop {
                let done = stop.is_cancelled();
                loop {
                    let page =
                        log.read_all(AllRead { after, max_count: 50, filter: EventFilter::default() }).await.unwrap();
                    seen.extend(page.events.iter().map(|e| (e.global_position, e.event_id)));
                    after = page.next_position;
                    if page.end_of_log {
                        break;
                    }
                }
                if done {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u64 {
        let (log, event_ids) = (Arc::clone(&log), Arc::clone(&event_ids));
        tasks.spawn(async move {
            let mut rng = Rng(1000 + task);
            let mut done = Vec::new();
            for n in 0..60 {
                let stream = streams[rng.below(streams.len() as u64) as usize];
                let current = log.stream_info(stream).await.map(|i| i.version).unwrap_or(None);
                let expected = match rng.below(5) {
                    0 => ExpectedVersion::Any,
                    1 => ExpectedVersion::NoStream,
                    2 => ExpectedVersion::StreamExists,
                    _ => current.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact),
                };
                let mut events = Vec::new();
                let mut ids = event_ids.lock().await;
                let earlier = ids.len();
                for i in 0..=rng.below(2) {
                    let mut event = NewEvent::new("Raced", json!({ "task": task, "n": n, "i": i }));
                    if earlier > 0 && rng.chance(5) && i == 0 {
                        event.event_id = ids[rng.below(earlier as u64) as usize];
                    }
                    ids.push(event.event_id);
                    events.push(event);
                }
                drop(ids);
                let mut request = AppendRequest::new(stream, expected, events);
                if rng.chance(30) {
                    request.request_id = Some(format!("t{task}-{}", rng.below(10)));
                }
                let answer = Answer::of(&log.append(request.clone()).await);
                // A retry of the same request: the same answer, as a repeat.
                if request.request_id.is_some() && rng.chance(30) {
                    let again = Answer::of(&log.append(request.clone()).await);
                    match (&answer, &again) {
                        (
                            Answer::Ok { first, last, positions, .. },
                            Answer::Ok { first: f, last: l, positions: p, duplicate, .. },
                        ) => {
                            assert!(duplicate, "a retry of an accepted request is a repeat");
                            assert_eq!((first, last, positions), (f, l, p), "a retry is answered as the first time");
                        }
                        (Answer::Ok { .. }, other) => panic!("a retry of an accepted request was answered {other:?}"),
                        // Refused the first time: the retry is decided anew.
                        _ => done.push(Done { request: request.clone(), answer: again }),
                    }
                }
                done.push(Done { request, answer });
            }
            done
        });
    }
    let mut all: Vec<Done> = Vec::new();
    while let Some(task) = tasks.join_next().await {
        all.extend(task.expect("task"));
    }
    stop.cancel();
    let seen = reader.await.expect("reader");

    // The log as stored.
    let stored: Vec<(i64, String, i64, Uuid)> = client
        .query("SELECT global_position, stream_id, version, event_id FROM eventstore.events ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();

    // The reader saw every event, in order, none skipped.
    let stored_pairs: Vec<(u64, Uuid)> = stored.iter().map(|e| (e.0 as u64, e.3)).collect();
    assert_eq!(seen, stored_pairs, "the gap-safe reader saw the log exactly as stored");

    // Versions per stream are gap-free; event ids unique.
    let mut per_stream: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for e in &stored {
        per_stream.entry(&e.1).or_default().push(e.2);
    }
    for (stream, versions) in &per_stream {
        assert_eq!(*versions, (0..versions.len() as i64).collect::<Vec<_>>(), "{stream}: versions gap-free");
    }
    assert_eq!(stored.iter().map(|e| e.3).collect::<HashSet<_>>().len(), stored.len(), "event ids unique");

    // Every first acceptance is in the log at its answered positions with
    // its events; refused appends left nothing.
    let by_id: HashMap<Uuid, &(i64, String, i64, Uuid)> = stored.iter().map(|e| (e.3, e)).collect();
    let mut accepted = Vec::new();
    let mut kinds = BTreeMap::<&str, usize>::new();
    for d in &all {
        match &d.answer {
            Answer::Ok { stream, first, last, positions, duplicate: false } => {
                assert_eq!(stream, &d.request.stream_id);
                assert_eq!(positions.len(), d.request.events.len());
                for (i, (e, p)) in d.request.events.iter().zip(positions).enumerate() {
                    let row = by_id.get(&e.event_id).expect("an accepted event is stored");
                    assert_eq!((row.0, &row.1, row.2), (*p, stream, first + i as i64));
                }
                assert_eq!(*last, first + d.request.events.len() as i64 - 1);
                accepted.push((positions[0], d));
                *kinds.entry("written").or_default() += 1;
            }
            Answer::Ok { duplicate: true, .. } => *kinds.entry("repeat").or_default() += 1,
            refused => {
                // Its events are stored only if another append stored the same ids.
                *kinds
                    .entry(match refused {
                        Answer::WrongVersion { .. } => "wrong version",
                        Answer::DuplicateEventId => "duplicate event id",
                        Answer::RequestReused => "request id reused",
                        _ => "other",
                    })
                    .or_default() += 1;
            }
        }
    }
    let written: HashSet<Uuid> =
        accepted.iter().flat_map(|(_, d)| d.request.events.iter().map(|e| e.event_id)).collect();
    assert_eq!(written.len(), stored.len(), "the log holds exactly the accepted appends' events");
    for kind in ["written", "wrong version", "duplicate event id"] {
        assert!(kinds.get(kind).copied().unwrap_or(0) >= 3, "too few '{kind}' answers: {kinds:?}");
    }

    // Replayed in log order, each accepted append was admitted by its
    // stream as it stood; each wrong-version answer names a version the
    // stream had, and one its expectation does not admit.
    accepted.sort_by_key(|(p, _)| *p);
    let mut version: HashMap<&str, i64> = HashMap::new();
    let mut history: HashMap<&str, HashSet<i64>> = streams.iter().map(|s| (*s, HashSet::from([-1]))).collect();
    for (_, d) in &accepted {
        let v = version.entry(d.request.stream_id.as_str()).or_insert(-1);
        let admitted = match d.request.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => *v == -1,
            ExpectedVersion::StreamExists => *v >= 0,
            ExpectedVersion::Exact(e) => e as i64 == *v,
        };
        assert!(admitted, "{:?} accepted at version {v} of {}", d.request.expected, d.request.stream_id);
        *v += d.request.events.len() as i64;
        history.get_mut(d.request.stream_id.as_str()).unwrap().insert(*v);
    }
    for d in &all {
        if let Answer::WrongVersion { actual } = d.answer {
            assert!(history[d.request.stream_id.as_str()].contains(&actual), "{actual} was never a version");
            let admits = match d.request.expected {
                ExpectedVersion::Any => true,
                ExpectedVersion::NoStream => actual == -1,
                ExpectedVersion::StreamExists => actual >= 0,
                ExpectedVersion::Exact(e) => e as i64 == actual,
            };
            assert!(!admits, "{:?} refused at version {actual}", d.request.expected);
        }
    }
    assert_chains_valid(&log, &client, "concurrent").await;
}

/// `append_in` runs inside the caller's transaction only (its two round
/// trips would otherwise commit apart), and a batch that fails as a whole
/// rolls back to where it began, leaving the caller's transaction usable:
/// here a stored event id, which the retry with the check turns into that
/// append's own refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_in_needs_a_transaction_and_leaves_it_usable() {
    let (db, _, log) = eventfold_tests::store::migrated().await;
    let mut client = common::client(db.url()).await;
    let stored = NewEvent::new("Stored", json!({}));
    log.append(AppendRequest::new("first", ExpectedVersion::NoStream, vec![stored.clone()])).await.unwrap();

    let outside = eventfold_store::postgres::append_in(
        &client,
        &AppendRequest::new("outside", ExpectedVersion::NoStream, vec![NewEvent::new("Lost", json!({}))]),
    )
    .await;
    assert!(matches!(outside, Err(Error::Internal(ref m)) if m.contains("transaction")), "{outside:?}");
    let streams: i64 = client.query_one("SELECT count(*) FROM eventstore.streams", &[]).await.unwrap().get(0);
    assert_eq!(streams, 1, "nothing of the refused append is stored");

    let tx = client.transaction().await.unwrap();
    tx.execute("CREATE TABLE caller_owned (n int)", &[]).await.unwrap();
    let answers = append_all_in(
        &tx,
        &[
            AppendRequest::new("second", ExpectedVersion::NoStream, vec![NewEvent::new("Kept", json!({}))]),
            AppendRequest::new("third", ExpectedVersion::NoStream, vec![stored]),
        ],
    )
    .await
    .expect("the batch");
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(matches!(answers[1], Err(Error::DuplicateEventId { .. })), "{:?}", answers[1]);
    tx.execute("INSERT INTO caller_owned VALUES (1)", &[]).await.expect("the caller's transaction goes on");
    tx.commit().await.unwrap();
    let kept: Vec<String> = client
        .query("SELECT stream_id FROM eventstore.events ORDER BY global_position", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, ["first", "second"]);
    let owned: i64 = client.query_one("SELECT count(*) FROM caller_owned", &[]).await.unwrap().get(0);
    assert_eq!(owned, 1);
}
