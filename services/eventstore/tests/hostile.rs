//! Hostile requests at every RPC of the event store, over gRPC, on both
//! adapters (in memory and PostgreSQL): issue 13, "a property test drives
//! random requests at every RPC".
//!
//! The property: whatever a client sends — integers across the whole
//! u64/i64/i32 range, timestamps far outside 0001..9999 or with nanos out of
//! range, empty, long, unicode, control-character, NUL and `$`-prefixed
//! strings, filters of up to 150 entries, odd payloads and metadata — the
//! server
//!
//! - never panics and never answers INTERNAL, UNKNOWN or UNAVAILABLE: only
//!   INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS and ABORTED can be right for
//!   one sequential, well-behaved client of a healthy store;
//! - explains every error (AIP-193): an `ErrorInfo` in the domain
//!   `eventfold.dev`, and for INVALID_ARGUMENT a `BadRequest` whose field
//!   violations name only fields that really are invalid;
//! - never answers anything that contradicts the stored data.
//!
//! The last point is checked against a reference model kept by the test. A
//! fixture (`fix-a` with 5 events, `fix-b` with 3, `fix-c` with 2 and
//! `fix-br`, a branch of `fix-a` at version 2 with one own event) is written
//! and recorded before the property runs, and every accepted write is
//! recorded as the server answers it (then read back once, to learn the
//! hashes and times the server chose). Each answer is then compared with
//! what the model says it must be: whether the request is refused and why
//! (which fields are invalid, NOT_FOUND, WRONG_EXPECTED_VERSION, ...); for a
//! read, exactly which events come back, with the recorded versions,
//! positions, hashes, ids, times and payloads; for ReadAll, that
//! `next_position` never moves backwards and nothing up to it is skipped;
//! for appends with a random expected version, that only the right one
//! succeeds; for snapshots, that the latest matching one is loaded.
//!
//! Before the random cases, pinned requests run every time: the exact values
//! that broke the store before its hardening (ReadStreamAt at `i64::MAX`
//! seconds panicked; an expected version of 2^63 was appended on
//! PostgreSQL), and the ones this test found since.
//!
//! The server keeps its state from case to case (one server per adapter), so
//! shrinking is off (it would replay requests against another state) and a
//! failure names the exact request and the seed: `HOSTILE_SEED=<seed>`
//! replays a run, `PROPTEST_CASES` changes the number of cases (500).

mod common;

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use eventfold_eventstore::{Config, ERROR_DOMAIN};
use eventfold_platform::runtime::CancellationToken;
use eventfold_proto::eventstore::{
    self as pb, append_request::Expected, event_store_service_client::EventStoreServiceClient,
};
use eventfold_tests::{
    hostile::{self, MAX_TIME_SECS, fail, field_matches, nanos, short_text, show, timestamp, valid_id, valid_time},
    store::{Backend, memory, postgres},
};
use proptest::{
    collection::{btree_map, hash_map, vec},
    prelude::*,
    sample::{Index, select},
    test_runner::TestCaseError,
};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use tokio::task::JoinHandle;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

type Client = EventStoreServiceClient<Channel>;
type R<T> = Result<T, TestCaseError>;

/// The documented bounds, written out here rather than imported so that the
/// test does not share a mistake with the code it checks.
const MAX_BIGINT: u64 = i64::MAX as u64;
const MAX_NAME_BYTES: usize = 256;
const MAX_EVENTS: usize = 10_000;
const MAX_FILTER_ENTRIES: usize = 100;
const MAX_CUSTOM_METADATA: usize = 64;

const FIXTURE: [&str; 4] = ["fix-a", "fix-b", "fix-c", "fix-br"];
/// Streams that random writes share, so appends, branches, deletes and
/// request ids meet each other.
const HOT: [&str; 5] = ["h-0", "h-1", "h-2", "h-3", "h-4"];
/// A subscription is read for at most this many messages, each awaited at
/// most this long (then it is dropped).
const MAX_MESSAGES: usize = 16;
const MESSAGE_WAIT: Duration = Duration::from_millis(200);
const DEFAULT_CASES: u32 = 500;

// --- harness (tests/common, as tests/grpc.rs) ---------------------------------------

/// A running server and a client of it.
struct Server {
    client: Client,
    token: CancellationToken,
    handle: JoinHandle<Result<(), eventfold_platform::Error>>,
    _backend: Backend,
}

impl Server {
    async fn start(backend: Backend) -> Self {
        let (_, channel, token, handle) = common::serve(backend.log.clone(), &Config::default()).await;
        // Large reads (10 000 events of random payloads) must not fail in the
        // client's decoder: that would look like a server error.
        let client = EventStoreServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Server { client, token, handle, _backend: backend }
    }

    /// Signal shutdown; the server must end within a few seconds, cleanly.
    async fn stop(mut self) -> Result<(), String> {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await {
            Err(_) => Err("the server did not stop within 15 s of the shutdown signal".to_owned()),
            Ok(Err(e)) => Err(format!("the server task failed: {e}")),
            Ok(Ok(Err(e))) => Err(format!("the server failed: {e}")),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }
}

#[test]
fn memory_adapter() {
    hostile_requests("memory");
}

#[test]
fn postgres_adapter() {
    hostile_requests("postgres");
}

fn hostile_requests(adapter: &'static str) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let server = runtime.block_on(async {
        let backend = if adapter == "memory" { memory().await } else { postgres().await };
        Server::start(backend).await
    });
    let run = hostile::Run::from_env(DEFAULT_CASES);
    let (seed, cases) = (run.seed, run.cases);
    let started = Instant::now();

    let model = RefCell::new(Model::default());
    runtime
        .block_on(fixture(&server.client, &mut model.borrow_mut()))
        .unwrap_or_else(|e| panic!("{adapter}: the fixture could not be written: {e}"));
    // What the property must never change: the fixture's events as first read.
    let frozen: Vec<(u64, String)> = model.borrow().events.iter().map(|e| (e.position, e.hash.clone())).collect();

    let mut runner = run.runner();
    // Runs requests against the model (taken out of its cell meanwhile: the
    // runner's closure is `Fn`, and no borrow may be held across an await).
    let send = |ops: &[Op]| {
        let mut m = model.take();
        let result = runtime.block_on(async {
            for op in ops {
                run_op(&server.client, &mut m, op).await?;
            }
            Ok(())
        });
        model.replace(m);
        result
    };
    // The requests that broke the store before and the ones this test
    // found, every run, before the random ones.
    let outcome = send(&pinned())
        .map_err(|e| format!("pinned request: {e}"))
        .and_then(|()| runner.run(&vec(op(), 1..=4), |ops| send(&ops)).map_err(|e| e.to_string()));
    let property_time = started.elapsed();
    // After a failure the model may be half-updated: sweep only a clean run.
    let swept = match &outcome {
        Ok(()) => runtime.block_on(sweep(&server.client, &mut model.borrow_mut(), &frozen)),
        Err(_) => Ok(()),
    };
    let stopped = runtime.block_on(server.stop());

    let model = model.into_inner();
    let stats: Vec<String> = model.stats.iter().map(|(k, n)| format!("  {k:<40} {n}")).collect();
    eprintln!(
        "{adapter}: {} requests ({} pinned, then up to {cases} cases of 1 to 4) in {property_time:.1?} (seed {seed}), \
         {} events in {} streams at the end; answers:\n{}",
        model.stats.values().sum::<usize>(),
        pinned().len(),
        model.events.len(),
        model.streams.len(),
        stats.join("\n")
    );
    if let Err(e) = outcome {
        panic!("{adapter} (HOSTILE_SEED={seed}): {e}");
    }
    swept.unwrap_or_else(|e| panic!("{adapter} (HOSTILE_SEED={seed}): final sweep: {e}"));
    stopped.unwrap_or_else(|e| panic!("{adapter}: {e}"));
}

/// Requests sent in every run, first: exact values that broke the store.
fn pinned() -> Vec<Op> {
    let at = |point| {
        Op::ReadStreamAt(ReadStreamAtSpec {
            stream_id: "fix-a".to_owned(),
            point: Some(point),
            from_version: 0,
            max_count: 0,
        })
    };
    let append = |stream: &str, version| {
        let event = EventSpec {
            id: IdSpec::Empty,
            event_type: "Pinned".to_owned(),
            schema_version: 1,
            data: None,
            metadata: None,
        };
        Op::Append(AppendSpec {
            stream_id: stream.to_owned(),
            expected: Some(Expected::ExpectedVersion(version)),
            events: EventsSpec::List(vec![event]),
            request_id: String::new(),
        })
    };
    let read = |start, end| {
        Op::ReadStream(ReadStreamSpec {
            stream_id: "fix-a".to_owned(),
            direction: 0,
            from_version: None,
            max_count: 0,
            start,
            end,
        })
    };
    let filter = |stream_prefixes: &[&str], event_types: &[&str]| {
        let strings = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect();
        Some(pb::EventFilter { stream_prefixes: strings(stream_prefixes), event_types: strings(event_types) })
    };
    vec![
        // Before the hardening, a time this far out panicked the server...
        at(PointSpec::Time(TimeSpec::Raw(i64::MAX, 0))),
        at(PointSpec::Time(TimeSpec::Raw(i64::MIN, i32::MIN))),
        // ... and an expected version beyond a bigint was cast and appended
        // on PostgreSQL.
        append("fix-a", 1 << 63),
        append("h-0", 1 << 63),
        append("fix-a", u64::MAX),
        at(PointSpec::Version(1 << 63)),
        // The last valid instant, 9999-12-31T23:59:59.999999999Z.
        at(PointSpec::Time(TimeSpec::Raw(MAX_TIME_SECS, 999_999_999))),
        // Times between two microseconds, next to the fixture's events
        // (stored with microsecond precision).
        at(PointSpec::Time(TimeSpec::Near(0, -999))),
        at(PointSpec::Time(TimeSpec::Near(0, -1))),
        read(Some(TimeSpec::Near(0, 500)), None),
        read(None, Some(TimeSpec::Near(0, 500))),
        // U+0000 in strings that are not stream ids.
        Op::ListStreams(ListSpec {
            page_size: 0,
            token: TokenSpec::Empty,
            prefix: "\0".to_owned(),
            show_deleted: false,
        }),
        Op::ReadAll(pb::ReadAllRequest { from_position: 0, max_count: 0, filter: filter(&[], &["\0"]) }),
        Op::Subscribe(pb::SubscribeRequest { filter: filter(&["fix-\0"], &[]), ..Default::default() }),
        // The last version there is.
        Op::Subscribe(pb::SubscribeRequest {
            stream_id: "fix-a".to_owned(),
            from_version: Some(MAX_BIGINT),
            ..Default::default()
        }),
        // A branch of a branch, taken before the first one's fork point.
        Op::BranchStream(pb::BranchStreamRequest {
            source_stream_id: "fix-br".to_owned(),
            at_version: 1,
            branch_stream_id: "b-pinned".to_owned(),
        }),
        Op::ReadStream(ReadStreamSpec {
            stream_id: "b-pinned".to_owned(),
            direction: 0,
            from_version: None,
            max_count: 0,
            start: None,
            end: None,
        }),
    ]
}

/// The fixture, written through the same checked paths as random requests.
async fn fixture(client: &Client, model: &mut Model) -> R<()> {
    let streams: [(&str, &[&str]); 3] = [
        ("fix-a", &["Opened", "Changed", "Changed", "Changed", "Closed"]),
        ("fix-b", &["Opened", "Changed", "Closed"]),
        ("fix-c", &["Opened", "Closed"]),
    ];
    for (stream, types) in streams {
        let events = types
            .iter()
            .enumerate()
            .map(|(i, t)| pb::ProposedEvent {
                event_id: Uuid::new_v4().to_string(),
                event_type: (*t).to_owned(),
                schema_version: 1,
                data: Some(Struct { fields: [("n".to_owned(), kind(Kind::NumberValue(i as f64)))].into() }),
                metadata: None,
            })
            .collect();
        let request = pb::AppendRequest {
            stream_id: stream.to_owned(),
            expected: Some(Expected::ExpectedState(pb::ExpectedState::NoStream as i32)),
            events,
            request_id: String::new(),
        };
        append(&mut client.clone(), model, request).await?;
    }
    let branch = pb::BranchStreamRequest {
        source_stream_id: "fix-a".to_owned(),
        at_version: 2,
        branch_stream_id: "fix-br".to_owned(),
    };
    branch_stream(&mut client.clone(), model, branch).await?;
    let own = pb::AppendRequest {
        stream_id: "fix-br".to_owned(),
        expected: Some(Expected::ExpectedVersion(2)),
        events: vec![pb::ProposedEvent { event_type: "Forked".to_owned(), ..Default::default() }],
        request_id: String::new(),
    };
    append(&mut client.clone(), model, own).await?;
    for (stream, version) in [("fix-a", 4), ("fix-b", 2), ("fix-c", 1), ("fix-br", 3)] {
        prop_assert_eq!(model.version(stream), Some(version), "fixture stream {}", stream);
    }
    Ok(())
}

// --- the model --------------------------------------------------------------------

/// A stored event as the model knows it.
#[derive(Debug, Clone)]
struct MEvent {
    stream_id: String,
    version: u64,
    position: u64,
    event_type: String,
    schema_version: u32,
    // Learnt from the read that follows the append, then never allowed to
    // change (an empty string: not read yet).
    event_id: String,
    hash: String,
    create_time: Option<Timestamp>,
    data: Option<Struct>,
}

impl MEvent {
    fn time(&self) -> i128 {
        self.create_time.as_ref().map_or(0, nanos)
    }
}

#[derive(Debug, Default)]
struct MStream {
    /// Indexes into `Model::events` of the stream's own events.
    own: Vec<usize>,
    parent: Option<(String, u64)>,
    deleted: bool,
    snapshots: BTreeMap<u64, pb::Snapshot>,
}

/// What makes two appends with one request id the same request (AIP-155):
/// the expected version and the events' content, not their ids.
#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    expected: String,
    events: Vec<(String, u32, Struct, NormMeta)>,
}

type NormMeta = (Option<String>, Option<String>, Option<String>, BTreeMap<String, String>);

/// The expected version of an append, as the store reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exp {
    Any,
    NoStream,
    Exists,
    Exact(u64),
}

/// What the stored data says the answer must be.
#[derive(Debug, Clone)]
enum Verdict {
    Ok,
    /// A repeated request id: the first answer again.
    Duplicate(pb::AppendResponse),
    /// INVALID_ARGUMENT; the server may name any of these fields (field
    /// paths, `a.b` and `a[1]` below one count as it), and no other.
    Invalid(Vec<String>),
    Refused(Code, &'static str),
}

#[derive(Debug, Default)]
struct Model {
    /// Every stored event, in position order.
    events: Vec<MEvent>,
    by_position: HashMap<u64, usize>,
    streams: BTreeMap<String, MStream>,
    /// Successful appends with a request id, by (stream, request id).
    requests: HashMap<(String, String), (Fingerprint, pb::AppendResponse)>,
    replayable: Vec<pb::AppendRequest>,
    event_ids: HashSet<String>,
    known_ids: Vec<String>,
    /// Answers per RPC and code, for the report.
    stats: BTreeMap<String, usize>,
}

impl Model {
    fn last_position(&self) -> u64 {
        self.events.last().map_or(0, |e| e.position)
    }

    /// A stream's events in version order, shared history first.
    fn history(&self, stream_id: &str, upto: Option<u64>) -> Vec<&MEvent> {
        let Some(stream) = self.streams.get(stream_id) else { return Vec::new() };
        let mut out = match &stream.parent {
            Some((parent, at)) => self.history(parent, Some(upto.map_or(*at, |u| u.min(*at)))),
            None => Vec::new(),
        };
        out.extend(stream.own.iter().map(|&i| &self.events[i]).filter(|e| upto.is_none_or(|u| e.version <= u)));
        out
    }

    fn version(&self, stream_id: &str) -> Option<u64> {
        self.history(stream_id, None).last().map(|e| e.version)
    }

    /// NOT_FOUND unless the stream exists and is not deleted.
    fn live(&self, stream_id: &str) -> Result<(), Verdict> {
        match self.streams.get(stream_id) {
            None => Err(Verdict::Refused(Code::NotFound, "STREAM_NOT_FOUND")),
            Some(s) if s.deleted => Err(Verdict::Refused(Code::NotFound, "STREAM_DELETED")),
            Some(_) => Ok(()),
        }
    }

    fn count<T>(&mut self, rpc: &str, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?} {}", s.code(), s.get_details_error_info().map(|i| i.reason).unwrap_or_default()),
        };
        *self.stats.entry(format!("{rpc} {code}")).or_default() += 1;
    }

    /// Check a returned event against the log, learning what the log did not
    /// know yet (the server's hash, time, id and payload of a new event).
    fn observe(&mut self, e: &pb::RecordedEvent) -> Result<(), String> {
        let Some(&i) = self.by_position.get(&e.global_position) else {
            return Err(format!("an event at position {} that was never appended: {e:?}", e.global_position));
        };
        let known = &mut self.events[i];
        if (&known.stream_id, known.version, &known.event_type, known.schema_version)
            != (&e.stream_id, e.version, &e.event_type, e.schema_version)
        {
            return Err(format!(
                "position {} holds {:?} v{} {:?} (schema {}), answered {:?} v{} {:?} (schema {})",
                e.global_position,
                known.stream_id,
                known.version,
                known.event_type,
                known.schema_version,
                e.stream_id,
                e.version,
                e.event_type,
                e.schema_version
            ));
        }
        if e.hash.len() != 64 || !e.hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("event at {}: hash {:?} is not 64 lowercase hex digits", e.global_position, e.hash));
        }
        if e.create_time.is_none() || e.data.is_none() || Uuid::parse_str(&e.event_id).is_err() {
            return Err(format!("event at {} lacks a time, payload or UUID: {e:?}", e.global_position));
        }
        let first_sight = known.hash.is_empty();
        if first_sight {
            known.hash.clone_from(&e.hash);
            known.event_id.clone_from(&e.event_id);
            known.create_time = e.create_time;
            known.data.clone_from(&e.data);
            if self.event_ids.insert(e.event_id.clone()) {
                self.known_ids.push(e.event_id.clone());
            }
            return Ok(());
        }
        if known.hash != e.hash
            || known.event_id != e.event_id
            || known.create_time != e.create_time
            || known.data != e.data
        {
            return Err(format!(
                "event at {} changed: first read as id {} hash {} at {:?} with {:?}, now {} {} at {:?} with {:?}",
                e.global_position,
                known.event_id,
                known.hash,
                known.create_time,
                known.data,
                e.event_id,
                e.hash,
                e.create_time,
                e.data
            ));
        }
        Ok(())
    }

    /// Check a stream description against the log.
    fn check_info(&self, info: Option<&pb::StreamInfo>) -> Result<(), String> {
        let Some(info) = info else { return Err("no stream in the answer".to_owned()) };
        let Some(stream) = self.streams.get(&info.stream_id) else {
            return Err(format!("describes {:?}, which was never created", info.stream_id));
        };
        let history = self.history(&info.stream_id, None);
        let own: Vec<u64> = stream.own.iter().map(|&i| self.events[i].position).collect();
        let want = pb::StreamInfo {
            stream_id: info.stream_id.clone(),
            version: history.last().map(|e| e.version),
            first_position: own.first().copied().unwrap_or_default(),
            last_position: own.last().copied().unwrap_or_default(),
            create_time: info.create_time,
            update_time: info.update_time,
            delete_time: if stream.deleted { info.delete_time } else { None },
            parent_stream_id: stream.parent.as_ref().map(|(p, _)| p.clone()).unwrap_or_default(),
            parent_version: stream.parent.as_ref().map(|(_, v)| *v),
            head_hash: history.last().map(|e| e.hash.clone()).unwrap_or_default(),
        };
        if *info != want {
            return Err(format!("stream info {info:?}, the log says {want:?}"));
        }
        match (&info.create_time, &info.update_time) {
            (Some(c), Some(u)) if nanos(c) <= nanos(u) => {}
            _ => return Err(format!("create/update times missing or out of order: {info:?}")),
        }
        if stream.deleted && info.delete_time.is_none() {
            return Err(format!("deleted stream without delete_time: {info:?}"));
        }
        Ok(())
    }
}

// --- validity as documented ---------------------------------------------------------

fn valid_stream_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_NAME_BYTES && !id.starts_with('$') && !id.chars().any(char::is_control)
}

/// A payload is stored as JSON: numbers must be finite, and PostgreSQL
/// cannot store U+0000 in a string or key.
fn valid_struct(s: &Struct) -> bool {
    s.fields.iter().all(|(k, v)| !k.contains('\0') && valid_value(v))
}

fn valid_value(v: &Value) -> bool {
    match &v.kind {
        Some(Kind::NumberValue(n)) => n.is_finite(),
        Some(Kind::StringValue(s)) => !s.contains('\0'),
        Some(Kind::StructValue(s)) => valid_struct(s),
        Some(Kind::ListValue(l)) => l.values.iter().all(valid_value),
        None | Some(Kind::NullValue(_) | Kind::BoolValue(_)) => true,
    }
}

fn valid_metadata(m: &pb::EventMetadata) -> bool {
    [&m.correlation_id, &m.causation_id, &m.user_id].iter().all(|id| id.is_empty() || valid_id(id))
        && m.custom.len() <= MAX_CUSTOM_METADATA
        && m.custom.iter().all(|(k, v)| {
            !k.is_empty() && k.len() <= MAX_NAME_BYTES && !k.chars().chain(v.chars()).any(char::is_control)
        })
}

/// The payload as JSON sees it (what the fingerprint hashes): a missing
/// kind and any null are null, -0 is 0.
fn norm_struct(s: &Struct) -> Struct {
    Struct { fields: s.fields.iter().map(|(k, v)| (k.clone(), norm_value(v))).collect() }
}

fn norm_value(v: &Value) -> Value {
    kind(match &v.kind {
        None | Some(Kind::NullValue(_)) => Kind::NullValue(0),
        Some(Kind::NumberValue(n)) => Kind::NumberValue(if *n == 0.0 { 0.0 } else { *n }),
        Some(Kind::StructValue(s)) => Kind::StructValue(norm_struct(s)),
        Some(Kind::ListValue(l)) => Kind::ListValue(ListValue { values: l.values.iter().map(norm_value).collect() }),
        Some(other) => other.clone(),
    })
}

fn norm_meta(m: Option<&pb::EventMetadata>) -> NormMeta {
    let m = m.cloned().unwrap_or_default();
    let id = |s: String| (!s.is_empty()).then_some(s);
    (id(m.correlation_id), id(m.causation_id), id(m.user_id), m.custom.into_iter().collect())
}

/// Filter bounds: at most 100 entries per list, each 1 to 256 bytes without
/// control characters.
fn filter_violations(filter: Option<&pb::EventFilter>, invalid: &mut Vec<String>) {
    let Some(f) = filter else { return };
    for (name, entries) in [("stream_prefixes", &f.stream_prefixes), ("event_types", &f.event_types)] {
        if entries.len() > MAX_FILTER_ENTRIES {
            invalid.push(format!("filter.{name}"));
            continue;
        }
        for (i, entry) in entries.iter().enumerate() {
            if entry.is_empty() || entry.len() > MAX_NAME_BYTES || entry.chars().any(char::is_control) {
                invalid.push(format!("filter.{name}[{i}]"));
            }
        }
    }
}

fn filter_matches(filter: Option<&pb::EventFilter>, e: &MEvent) -> bool {
    let Some(f) = filter else { return true };
    (f.stream_prefixes.is_empty() || f.stream_prefixes.iter().any(|p| e.stream_id.starts_with(p.as_str())))
        && (f.event_types.is_empty() || f.event_types.contains(&e.event_type))
}

/// How many events a read returns: 0 means 500, at most 10 000.
fn read_count(requested: u32) -> usize {
    match requested {
        0 => 500,
        n => (n as usize).min(MAX_EVENTS),
    }
}

/// The stream id after which a ListStreams page token continues, if it is a
/// token of this listing (AIP-158: bound to the prefix and show_deleted).
fn decode_page_token(token: &str, prefix: &str, show_deleted: bool) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    if value["p"].as_str() != Some(prefix) || value["d"].as_bool() != Some(show_deleted) {
        return None;
    }
    value["a"].as_str().map(str::to_owned)
}

// --- answers ------------------------------------------------------------------------

/// The rules for every error, whatever the request: of the codes, only
/// those that can be right for one sequential, well-behaved client of a
/// healthy store.
fn check_status(status: &Status) -> Result<(), String> {
    hostile::check_status(status, ERROR_DOMAIN, |code, _| {
        matches!(code, Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::Aborted)
    })
}

/// The answer checked against the verdict; the response when it succeeded.
fn judge<'a, T>(result: &'a Result<tonic::Response<T>, Status>, verdict: &Verdict) -> Result<Option<&'a T>, String> {
    let status = match result {
        Ok(response) => {
            return match verdict {
                Verdict::Ok | Verdict::Duplicate(_) => Ok(Some(response.get_ref())),
                other => Err(format!("answered OK, but the stored data says {other:?}")),
            };
        }
        Err(status) => status,
    };
    check_status(status)?;
    match verdict {
        Verdict::Ok | Verdict::Duplicate(_) => {
            Err(format!("answered {}, but the stored data says it must succeed", show(status)))
        }
        Verdict::Invalid(fields) => {
            if status.code() != Code::InvalidArgument {
                return Err(format!("answered {}, but these fields are invalid: {fields:?}", show(status)));
            }
            let violations = status.get_details_bad_request().map(|b| b.field_violations).unwrap_or_default();
            match violations.iter().find(|v| !fields.iter().any(|f| field_matches(&v.field, f))) {
                Some(v) => Err(format!(
                    "refused field {:?}, which is valid (the invalid ones: {fields:?}): {}",
                    v.field,
                    show(status)
                )),
                None => Ok(None),
            }
        }
        Verdict::Refused(code, reason) => {
            let got = status.get_details_error_info().map(|i| i.reason).unwrap_or_default();
            if status.code() != *code || got != *reason {
                return Err(format!("answered {}, but the stored data says {code:?} {reason}", show(status)));
            }
            Ok(None)
        }
    }
}

/// WRONG_EXPECTED_VERSION must name the version the stream really has.
fn check_actual(status: &Status, actual: Option<u64>) -> Result<(), String> {
    let metadata = status.get_details_error_info().map(|i| i.metadata).unwrap_or_default();
    let want = actual.map_or_else(|| "no stream".to_owned(), |v| v.to_string());
    match metadata.get("actual") {
        Some(got) if *got == want => Ok(()),
        got => Err(format!("WRONG_EXPECTED_VERSION says the stream is at {got:?}, it is at {want}")),
    }
}

// --- the RPCs -----------------------------------------------------------------------

async fn run_op(client: &Client, m: &mut Model, op: &Op) -> R<()> {
    let c = &mut client.clone();
    match op {
        Op::Append(spec) => {
            let request = spec.build(m);
            append(c, m, request).await
        }
        Op::Replay(pick, change) => {
            if m.replayable.is_empty() {
                return Ok(());
            }
            let request = change.apply(m.replayable[pick.index(m.replayable.len())].clone());
            append(c, m, request).await
        }
        Op::ReadStream(spec) => {
            let request = pb::ReadStreamRequest {
                stream_id: spec.stream_id.clone(),
                direction: spec.direction,
                from_version: spec.from_version,
                max_count: spec.max_count,
                start_time: spec.start.as_ref().map(|t| t.resolve(m)),
                end_time: spec.end.as_ref().map(|t| t.resolve(m)),
            };
            read_stream(c, m, request).await
        }
        Op::ReadStreamAt(spec) => {
            let request = pb::ReadStreamAtRequest {
                stream_id: spec.stream_id.clone(),
                point: spec.point.as_ref().map(|p| match p {
                    PointSpec::Version(v) => pb::read_stream_at_request::Point::Version(*v),
                    PointSpec::Time(t) => pb::read_stream_at_request::Point::Time(t.resolve(m)),
                }),
                from_version: spec.from_version,
                max_count: spec.max_count,
            };
            read_stream_at(c, m, request).await
        }
        Op::ReadAll(request) => read_all(c, m, request.clone()).await,
        Op::Subscribe(request) => subscribe(c, m, request.clone()).await,
        Op::ListStreams(spec) => {
            let page_token = match &spec.token {
                TokenSpec::Empty => String::new(),
                TokenSpec::Raw(s) => s.clone(),
                TokenSpec::Junk(s) => URL_SAFE_NO_PAD.encode(s),
                TokenSpec::Crafted { after, same_prefix, same_deleted } => {
                    let prefix = if *same_prefix { spec.prefix.clone() } else { format!("{}x", spec.prefix) };
                    let raw = serde_json::json!({"a": after, "p": prefix, "d": spec.show_deleted == *same_deleted});
                    URL_SAFE_NO_PAD.encode(raw.to_string())
                }
            };
            let request = pb::ListStreamsRequest {
                page_size: spec.page_size,
                page_token,
                prefix: spec.prefix.clone(),
                show_deleted: spec.show_deleted,
            };
            list_streams(c, m, request, true).await
        }
        Op::GetStream(stream_id) => get_stream(c, m, pb::GetStreamRequest { stream_id: stream_id.clone() }).await,
        Op::DeleteStream(request) => delete_stream(c, m, request.clone()).await,
        Op::VerifyStream(stream_id) => {
            verify_stream(c, m, pb::VerifyStreamRequest { stream_id: stream_id.clone() }).await
        }
        Op::BranchStream(request) => branch_stream(c, m, request.clone()).await,
        Op::SaveSnapshot(request) => save_snapshot(c, m, request.clone()).await,
        Op::LoadSnapshot(request) => load_snapshot(c, m, request.clone()).await,
    }
}

fn expectation(request: &pb::AppendRequest) -> Option<Exp> {
    match request.expected {
        None | Some(Expected::ExpectedState(0 | 1)) => Some(Exp::Any),
        Some(Expected::ExpectedState(2)) => Some(Exp::NoStream),
        Some(Expected::ExpectedState(3)) => Some(Exp::Exists),
        Some(Expected::ExpectedState(_)) => None,
        Some(Expected::ExpectedVersion(v)) => Some(Exp::Exact(v)),
    }
}

fn fingerprint(request: &pb::AppendRequest, expected: Exp) -> Fingerprint {
    Fingerprint {
        expected: match expected {
            Exp::Any => "any".to_owned(),
            Exp::NoStream => "no stream".to_owned(),
            Exp::Exists => "stream exists".to_owned(),
            Exp::Exact(v) => v.to_string(),
        },
        events: request
            .events
            .iter()
            .map(|e| {
                let data = norm_struct(&e.data.clone().unwrap_or_default());
                (e.event_type.clone(), e.schema_version.max(1), data, norm_meta(e.metadata.as_ref()))
            })
            .collect(),
    }
}

impl Model {
    fn judge_append(&self, r: &pb::AppendRequest) -> Verdict {
        let mut invalid = Vec::new();
        if !valid_stream_id(&r.stream_id) {
            invalid.push("stream_id".to_owned());
        }
        let expected = expectation(r);
        match r.expected {
            Some(Expected::ExpectedState(_)) if expected.is_none() => invalid.push("expected_state".to_owned()),
            Some(Expected::ExpectedVersion(v)) if v > MAX_BIGINT => invalid.push("expected_version".to_owned()),
            _ => {}
        }
        if r.events.is_empty() || r.events.len() > MAX_EVENTS {
            invalid.push("events".to_owned());
        }
        if !r.request_id.is_empty() && !valid_id(&r.request_id) {
            invalid.push("request_id".to_owned());
        }
        let mut ids = HashSet::new();
        for (i, e) in r.events.iter().enumerate() {
            let field = |name: &str| format!("events[{i}].{name}");
            if !e.event_id.is_empty() {
                match Uuid::parse_str(&e.event_id) {
                    Ok(id) if !id.is_nil() && ids.insert(id.to_string()) => {}
                    // Not a UUID, the nil UUID, or twice in this request.
                    _ => invalid.push(field("event_id")),
                }
            }
            if e.event_type.is_empty()
                || e.event_type.len() > MAX_NAME_BYTES
                || e.event_type.chars().any(char::is_control)
            {
                invalid.push(field("event_type"));
            }
            if i32::try_from(e.schema_version).is_err() {
                invalid.push(field("schema_version"));
            }
            // (The 1 MiB bound of an event is out of reach of the generated
            // payloads.)
            if e.data.as_ref().is_some_and(|d| !valid_struct(d)) {
                invalid.push(field("data"));
            }
            if e.metadata.as_ref().is_some_and(|m| !valid_metadata(m)) {
                invalid.push(field("metadata"));
            }
        }
        let Some(expected) = expected.filter(|_| invalid.is_empty()) else { return Verdict::Invalid(invalid) };
        if !r.request_id.is_empty()
            && let Some((first, answer)) = self.requests.get(&(r.stream_id.clone(), r.request_id.clone()))
        {
            return if *first == fingerprint(r, expected) {
                Verdict::Duplicate(answer.clone())
            } else {
                Verdict::Refused(Code::AlreadyExists, "REQUEST_ID_REUSED")
            };
        }
        if self.streams.get(&r.stream_id).is_some_and(|s| s.deleted) {
            return Verdict::Refused(Code::NotFound, "STREAM_DELETED");
        }
        let current = self.version(&r.stream_id);
        let admitted = match expected {
            Exp::Any => true,
            Exp::NoStream => current.is_none(),
            Exp::Exists => current.is_some(),
            Exp::Exact(v) => current == Some(v),
        };
        if !admitted {
            return Verdict::Refused(Code::Aborted, "WRONG_EXPECTED_VERSION");
        }
        if ids.iter().any(|id| self.event_ids.contains(id)) {
            return Verdict::Refused(Code::AlreadyExists, "DUPLICATE_EVENT_ID");
        }
        Verdict::Ok
    }

    /// Record an accepted append, checking its answer against the log.
    fn record_append(&mut self, r: &pb::AppendRequest, answer: &pb::AppendResponse) -> Result<(), String> {
        let n = r.events.len() as u64;
        let first = self.version(&r.stream_id).map_or(0, |v| v + 1);
        let last = self.last_position();
        let ascending = answer.positions.windows(2).all(|w| w[0] < w[1]);
        if answer.stream_id != r.stream_id
            || answer.first_version != first
            || answer.next_expected_version != first + n - 1
            || answer.positions.len() as u64 != n
            || !ascending
            || answer.positions.first().is_none_or(|p| *p <= last)
            || answer.positions.last() != Some(&answer.last_position)
            || answer.duplicate
        {
            return Err(format!(
                "answer {answer:?} does not continue the log: versions from {first}, {n} positions after {last}"
            ));
        }
        let stream = self.streams.entry(r.stream_id.clone()).or_default();
        for (i, (e, &position)) in r.events.iter().zip(&answer.positions).enumerate() {
            stream.own.push(self.events.len());
            self.by_position.insert(position, self.events.len());
            self.events.push(MEvent {
                stream_id: r.stream_id.clone(),
                version: first + i as u64,
                position,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version.max(1),
                event_id: String::new(),
                hash: String::new(),
                create_time: None,
                data: None,
            });
        }
        if !r.request_id.is_empty() {
            let expected = expectation(r).ok_or("an accepted append with an unknown expected state")?;
            self.requests
                .insert((r.stream_id.clone(), r.request_id.clone()), (fingerprint(r, expected), answer.clone()));
            self.replayable.push(r.clone());
        }
        Ok(())
    }
}

async fn append(c: &mut Client, m: &mut Model, request: pb::AppendRequest) -> R<()> {
    let verdict = m.judge_append(&request);
    let current = m.version(&request.stream_id);
    let result = c.append(request.clone()).await;
    m.count("Append", &result);
    let answer = judge(&result, &verdict).map_err(|e| fail("Append", &request, e))?;
    if let (Err(status), Verdict::Refused(_, "WRONG_EXPECTED_VERSION")) = (&result, &verdict) {
        check_actual(status, current).map_err(|e| fail("Append", &request, e))?;
    }
    let Some(answer) = answer else { return Ok(()) };
    if let Verdict::Duplicate(first) = &verdict {
        let want = pb::AppendResponse { duplicate: true, ..first.clone() };
        if *answer != want {
            return Err(fail(
                "Append",
                &request,
                format!("a repeat answered {answer:?}, the first answer was {first:?}"),
            ));
        }
        return Ok(());
    }
    m.record_append(&request, answer).map_err(|e| fail("Append", &request, e))?;
    // Read the new events back once: the model learns the server's hashes,
    // times and ids, which every later answer must repeat.
    let read = pb::ReadStreamRequest {
        stream_id: request.stream_id.clone(),
        from_version: Some(answer.first_version),
        max_count: request.events.len() as u32,
        ..Default::default()
    };
    let back = c.read_stream(read.clone()).await.map_err(|s| fail("ReadStream", &read, show(&s)))?.into_inner();
    let got: Vec<u64> = back.events.iter().map(|e| e.global_position).collect();
    if got != answer.positions {
        return Err(fail("ReadStream", &read, format!("read back positions {got:?}, appended {:?}", answer.positions)));
    }
    for e in &back.events {
        m.observe(e).map_err(|err| fail("ReadStream", &read, err))?;
    }
    for (e, sent) in back.events.iter().zip(&request.events) {
        if !sent.event_id.is_empty()
            && Uuid::parse_str(&sent.event_id).map(|u| u.to_string()).ok() != Some(e.event_id.clone())
        {
            return Err(fail(
                "Append",
                &request,
                format!("sent event id {:?}, stored {:?}", sent.event_id, e.event_id),
            ));
        }
    }
    Ok(())
}

async fn read_stream(c: &mut Client, m: &mut Model, request: pb::ReadStreamRequest) -> R<()> {
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.stream_id) {
        invalid.push("stream_id".to_owned());
    }
    if !(0..=2).contains(&request.direction) {
        invalid.push("direction".to_owned());
    }
    let start = request.start_time.as_ref();
    let end = request.end_time.as_ref();
    if start.is_some_and(|t| !valid_time(t)) {
        invalid.push("start_time".to_owned());
    }
    if end.is_some_and(|t| !valid_time(t)) {
        invalid.push("end_time".to_owned());
    }
    if let (Some(s), Some(e)) = (start, end)
        && valid_time(s)
        && valid_time(e)
        && nanos(e) <= nanos(s)
    {
        invalid.push("end_time".to_owned());
    }
    if request.from_version.is_some_and(|v| v > MAX_BIGINT) {
        invalid.push("from_version".to_owned());
    }
    let verdict = if invalid.is_empty() {
        m.live(&request.stream_id).err().unwrap_or(Verdict::Ok)
    } else {
        Verdict::Invalid(invalid)
    };
    let result = c.read_stream(request.clone()).await;
    m.count("ReadStream", &result);
    let Some(r) = judge(&result, &verdict).map_err(|e| fail("ReadStream", &request, e))? else { return Ok(()) };

    let backwards = request.direction == 2;
    let (start, end) = (start.map(nanos), end.map(nanos));
    let history = m.history(&request.stream_id, None);
    let version = history.last().map(|e| e.version).unwrap_or_default();
    let mut admitted: Vec<&MEvent> = history
        .into_iter()
        .filter(|e| match (backwards, request.from_version) {
            (_, None) => true,
            (false, Some(from)) => e.version >= from,
            (true, Some(from)) => e.version <= from,
        })
        .filter(|e| start.is_none_or(|s| e.time() >= s) && end.is_none_or(|t| e.time() < t))
        .collect();
    if backwards {
        admitted.reverse();
    }
    let count = read_count(request.max_count);
    let want: Vec<(u64, u64)> = admitted.iter().take(count).map(|e| (e.version, e.position)).collect();
    let got: Vec<(u64, u64)> = r.events.iter().map(|e| (e.version, e.global_position)).collect();
    let end_of_stream = admitted.len() <= count;
    if got != want || r.end_of_stream != end_of_stream || r.stream_version != version {
        return Err(fail(
            "ReadStream",
            &request,
            format!(
                "answered (version, position) {got:?}, end {} at v{}; \
                 the log holds {want:?}, end {end_of_stream} at v{version}",
                r.end_of_stream, r.stream_version
            ),
        ));
    }
    for e in &r.events {
        m.observe(e).map_err(|err| fail("ReadStream", &request, err))?;
    }
    Ok(())
}

async fn read_stream_at(c: &mut Client, m: &mut Model, request: pb::ReadStreamAtRequest) -> R<()> {
    use pb::read_stream_at_request::Point;
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.stream_id) {
        invalid.push("stream_id".to_owned());
    }
    match &request.point {
        Some(Point::Time(t)) if !valid_time(t) => invalid.push("time".to_owned()),
        Some(Point::Version(v)) if *v > MAX_BIGINT => {
            invalid.push("version".to_owned());
            // The server reports the point version under the store's name
            // for it (not a field of this request; see the report).
            invalid.push("max_version".to_owned());
        }
        _ => {}
    }
    if request.from_version > MAX_BIGINT {
        invalid.push("from_version".to_owned());
    }
    let verdict = if invalid.is_empty() {
        m.live(&request.stream_id).err().unwrap_or(Verdict::Ok)
    } else {
        Verdict::Invalid(invalid)
    };
    let result = c.read_stream_at(request.clone()).await;
    m.count("ReadStreamAt", &result);
    let Some(r) = judge(&result, &verdict).map_err(|e| fail("ReadStreamAt", &request, e))? else { return Ok(()) };

    let history = m.history(&request.stream_id, None);
    let current = history.last().map(|e| e.version).unwrap_or_default();
    // "Events stored at or before this time" / "up to and including this
    // version".
    let at_point = |e: &MEvent| match &request.point {
        Some(Point::Version(v)) => e.version <= *v,
        Some(Point::Time(t)) => e.time() <= nanos(t),
        None => true,
    };
    let admitted: Vec<&MEvent> =
        history.iter().copied().filter(|e| e.version >= request.from_version && at_point(e)).collect();
    let count = read_count(request.max_count);
    let want: Vec<(u64, u64)> = admitted.iter().take(count).map(|e| (e.version, e.position)).collect();
    let got: Vec<(u64, u64)> = r.events.iter().map(|e| (e.version, e.global_position)).collect();
    let has_more = admitted.len() > count;
    let version_at = match &request.point {
        Some(Point::Version(v)) => Some(current.min(*v)),
        Some(Point::Time(_)) => history.iter().rev().find(|e| at_point(e)).map(|e| e.version),
        None => Some(current),
    };
    if got != want || r.has_more != has_more || r.version_at != version_at {
        return Err(fail(
            "ReadStreamAt",
            &request,
            format!(
                "answered (version, position) {got:?}, has_more {}, version_at {:?}; \
                 the log holds {want:?}, {has_more}, {version_at:?} (times {:?})",
                r.has_more,
                r.version_at,
                history.iter().map(|e| e.create_time.unwrap_or_default()).collect::<Vec<_>>()
            ),
        ));
    }
    for e in &r.events {
        m.observe(e).map_err(|err| fail("ReadStreamAt", &request, err))?;
    }
    Ok(())
}

async fn read_all(c: &mut Client, m: &mut Model, request: pb::ReadAllRequest) -> R<()> {
    let mut invalid = Vec::new();
    filter_violations(request.filter.as_ref(), &mut invalid);
    if request.from_position > MAX_BIGINT {
        invalid.push("from_position".to_owned());
    }
    let verdict = if invalid.is_empty() { Verdict::Ok } else { Verdict::Invalid(invalid) };
    let result = c.read_all(request.clone()).await;
    m.count("ReadAll", &result);
    let Some(r) = judge(&result, &verdict).map_err(|e| fail("ReadAll", &request, e))? else { return Ok(()) };

    let from = request.from_position;
    let last = m.last_position();
    let next = r.next_position;
    let err = |message: String| fail("ReadAll", &request, message);
    // "Continue from here: every event up to this position has been
    // considered": never backwards, never beyond the log, and everything
    // that matches up to it is in the answer, in order.
    if next < from || next > from.max(last) {
        return Err(err(format!("next_position {next} outside [{from}, {}]", from.max(last))));
    }
    if from < last && next == from {
        return Err(err(format!("no progress from {from}, the log ends at {last}")));
    }
    if r.end_of_log && next < last {
        return Err(err(format!("end_of_log at {next}, the log ends at {last}")));
    }
    let want: Vec<u64> = m
        .events
        .iter()
        .filter(|e| e.position > from && e.position <= next && filter_matches(request.filter.as_ref(), e))
        .map(|e| e.position)
        .collect();
    let got: Vec<u64> = r.events.iter().map(|e| e.global_position).collect();
    if got != want || got.len() > read_count(request.max_count) {
        return Err(err(format!("answered positions {got:?} up to {next}; the matching events up to it are {want:?}")));
    }
    for e in &r.events {
        m.observe(e).map_err(|error| fail("ReadAll", &request, error))?;
    }
    Ok(())
}

async fn subscribe(c: &mut Client, m: &mut Model, request: pb::SubscribeRequest) -> R<()> {
    use pb::subscribe_response::Message;
    let err = |message: String| fail("Subscribe", &request, message);
    let global = request.stream_id.is_empty();
    let filter = request.filter.as_ref();
    let mut invalid = Vec::new();
    filter_violations(filter, &mut invalid);
    if global {
        if request.from_version.is_some() {
            invalid.push("from_version".to_owned());
        }
        if request.from_end && request.from_position != 0 {
            invalid.push("from_end".to_owned());
        }
        if !request.from_end && request.from_position > MAX_BIGINT {
            invalid.push("from_position".to_owned());
        }
    } else {
        if !valid_stream_id(&request.stream_id) {
            invalid.push("stream_id".to_owned());
        }
        if filter.is_some_and(|f| !f.stream_prefixes.is_empty() || !f.event_types.is_empty()) {
            invalid.push("filter".to_owned());
        }
        if request.from_position != 0 || request.from_end {
            invalid.push("from_position".to_owned());
        }
        if request.from_version.is_some_and(|v| v > MAX_BIGINT) {
            invalid.push("from_version".to_owned());
        }
    }
    // A subscription to a deleted stream ends with STREAM_DELETED, at once
    // or as its first message; one to a missing stream waits for it.
    let doomed = invalid.is_empty() && !global && m.streams.get(&request.stream_id).is_some_and(|s| s.deleted);
    let verdict = if !invalid.is_empty() { Verdict::Invalid(invalid) } else { Verdict::Ok };
    let result = c.subscribe(request.clone()).await;
    m.count("Subscribe", &result);
    if doomed && result.is_err() {
        return judge(&result, &Verdict::Refused(Code::NotFound, "STREAM_DELETED")).map(drop).map_err(err);
    }
    if judge(&result, &verdict).map_err(err)?.is_none() {
        return Ok(());
    }
    let Ok(response) = result else { return Ok(()) };
    let mut stream = response.into_inner();

    let last = m.last_position();
    let floor = if request.from_end { last } else { request.from_position };
    let expected: Vec<u64> = if global {
        m.events.iter().filter(|e| e.position > floor && filter_matches(filter, e)).map(|e| e.position).collect()
    } else {
        m.history(&request.stream_id, None)
            .into_iter()
            .filter(|e| request.from_version.is_none_or(|v| e.version > v))
            .map(|e| e.position)
            .collect()
    };
    let mut delivered = 0;
    for _ in 0..MAX_MESSAGES {
        // The end of a subscription to a deleted stream is awaited longer: its
        // absence would be a contradiction, not a quiet stream.
        let wait = if doomed { Duration::from_secs(5) } else { MESSAGE_WAIT };
        let message = match tokio::time::timeout(wait, stream.message()).await {
            // Quiet: live with nothing to deliver (or a slow page).
            Err(_) => break,
            Ok(Ok(None)) => return Err(err("the subscription ended on its own".to_owned())),
            Ok(Err(status)) => {
                check_status(&status).map_err(err)?;
                let reason = status.get_details_error_info().map(|i| i.reason).unwrap_or_default();
                if doomed && status.code() == Code::NotFound && reason == "STREAM_DELETED" {
                    return Ok(());
                }
                return Err(err(format!("the subscription failed after {delivered} events: {}", show(&status))));
            }
            Ok(Ok(Some(message))) => message,
        };
        match message.message {
            Some(Message::Event(e)) => {
                if expected.get(delivered) != Some(&e.global_position) {
                    return Err(err(format!(
                        "delivered position {} as event {delivered}; the log says {:?}",
                        e.global_position,
                        expected.get(delivered)
                    )));
                }
                m.observe(&e).map_err(err)?;
                delivered += 1;
            }
            Some(Message::CaughtUp(p)) => {
                if delivered != expected.len() {
                    return Err(err(format!(
                        "caught up at {} after {delivered} of {} events",
                        p.position,
                        expected.len()
                    )));
                }
                let right = if global { p.position == floor.max(last) } else { p.position <= last };
                if !right {
                    return Err(err(format!("caught up at {}, the log ends at {last}", p.position)));
                }
                break;
            }
            Some(Message::Checkpoint(p)) => {
                let due = expected.iter().filter(|&&x| x <= p.position).count();
                if global && (p.position < floor || p.position > floor.max(last) || delivered != due) {
                    return Err(err(format!(
                        "checkpoint at {} after {delivered} events; {due} are due by then, the log ends at {last}",
                        p.position
                    )));
                }
            }
            other => return Err(err(format!("unexpected message {other:?} before catching up"))),
        }
    }
    if doomed {
        return Err(err("a subscription to a deleted stream did not fail".to_owned()));
    }
    Ok(())
}

async fn list_streams(c: &mut Client, m: &mut Model, request: pb::ListStreamsRequest, follow: bool) -> R<()> {
    let mut invalid = Vec::new();
    if request.page_size < 0 {
        invalid.push("page_size".to_owned());
    }
    // A prefix and a token's stream id are bounded like stream ids, with no
    // control characters.
    let bad = |s: &str| s.len() > MAX_NAME_BYTES || s.chars().any(char::is_control);
    if bad(&request.prefix) {
        invalid.push("prefix".to_owned());
    }
    let after = if request.page_token.is_empty() {
        None
    } else {
        let after = decode_page_token(&request.page_token, &request.prefix, request.show_deleted);
        if after.as_deref().is_none_or(bad) {
            invalid.push("page_token".to_owned());
        }
        after
    };
    let verdict = if invalid.is_empty() { Verdict::Ok } else { Verdict::Invalid(invalid) };
    let result = c.list_streams(request.clone()).await;
    m.count("ListStreams", &result);
    let Some(r) = judge(&result, &verdict).map_err(|e| fail("ListStreams", &request, e))? else { return Ok(()) };

    let limit = match request.page_size {
        0 => 100,
        n => (n as usize).min(1000),
    };
    let matching: Vec<&String> = m
        .streams
        .iter()
        .filter(|(id, s)| {
            after.as_ref().is_none_or(|a| id.as_str() > a.as_str())
                && id.starts_with(request.prefix.as_str())
                && (request.show_deleted || !s.deleted)
        })
        .map(|(id, _)| id)
        .collect();
    let want: Vec<&String> = matching.iter().copied().take(limit).collect();
    let got: Vec<&String> = r.streams.iter().map(|s| &s.stream_id).collect();
    let more = matching.len() > limit;
    if got != want || r.next_page_token.is_empty() == more {
        return Err(fail(
            "ListStreams",
            &request,
            format!("listed {got:?} (next page: {:?}); the log holds {want:?} (more: {more})", r.next_page_token),
        ));
    }
    for info in &r.streams {
        m.check_info(Some(info)).map_err(|e| fail("ListStreams", &request, e))?;
    }
    if more && follow {
        let next = pb::ListStreamsRequest { page_token: r.next_page_token.clone(), ..request };
        return Box::pin(list_streams(c, m, next, false)).await;
    }
    Ok(())
}

async fn get_stream(c: &mut Client, m: &mut Model, request: pb::GetStreamRequest) -> R<()> {
    let verdict = if valid_stream_id(&request.stream_id) {
        m.live(&request.stream_id).err().unwrap_or(Verdict::Ok)
    } else {
        Verdict::Invalid(vec!["stream_id".to_owned()])
    };
    let result = c.get_stream(request.clone()).await;
    m.count("GetStream", &result);
    if let Some(r) = judge(&result, &verdict).map_err(|e| fail("GetStream", &request, e))? {
        m.check_info(r.stream.as_ref()).map_err(|e| fail("GetStream", &request, e))?;
    }
    Ok(())
}

async fn delete_stream(c: &mut Client, m: &mut Model, request: pb::DeleteStreamRequest) -> R<()> {
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.stream_id) {
        invalid.push("stream_id".to_owned());
    }
    if request.expected_version.is_some_and(|v| v > MAX_BIGINT) {
        invalid.push("expected_version".to_owned());
    }
    let current = m.version(&request.stream_id);
    let verdict = if !invalid.is_empty() {
        Verdict::Invalid(invalid)
    } else if let Err(refused) = m.live(&request.stream_id) {
        refused
    } else if request.expected_version.is_some_and(|v| current != Some(v)) {
        Verdict::Refused(Code::Aborted, "WRONG_EXPECTED_VERSION")
    } else {
        Verdict::Ok
    };
    let result = c.delete_stream(request.clone()).await;
    m.count("DeleteStream", &result);
    let answer = judge(&result, &verdict).map_err(|e| fail("DeleteStream", &request, e))?;
    if let (Err(status), Verdict::Refused(_, "WRONG_EXPECTED_VERSION")) = (&result, &verdict) {
        check_actual(status, current).map_err(|e| fail("DeleteStream", &request, e))?;
    }
    if let Some(r) = answer {
        if let Some(s) = m.streams.get_mut(&request.stream_id) {
            s.deleted = true;
        }
        m.check_info(r.stream.as_ref()).map_err(|e| fail("DeleteStream", &request, e))?;
    }
    Ok(())
}

async fn verify_stream(c: &mut Client, m: &mut Model, request: pb::VerifyStreamRequest) -> R<()> {
    let verdict = if valid_stream_id(&request.stream_id) {
        m.live(&request.stream_id).err().unwrap_or(Verdict::Ok)
    } else {
        Verdict::Invalid(vec!["stream_id".to_owned()])
    };
    let result = c.verify_stream(request.clone()).await;
    m.count("VerifyStream", &result);
    if let Some(r) = judge(&result, &verdict).map_err(|e| fail("VerifyStream", &request, e))? {
        let history = m.history(&request.stream_id, None);
        let head = history.last().map(|e| e.hash.clone()).unwrap_or_default();
        if !r.valid || r.first_broken.is_some() || r.events_checked != history.len() as u64 || r.head_hash != head {
            return Err(fail(
                "VerifyStream",
                &request,
                format!("answered {r:?}; the chain has {} intact links ending at {head}", history.len()),
            ));
        }
    }
    Ok(())
}

async fn branch_stream(c: &mut Client, m: &mut Model, request: pb::BranchStreamRequest) -> R<()> {
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.source_stream_id) {
        invalid.push("source_stream_id".to_owned());
    }
    if !valid_stream_id(&request.branch_stream_id) {
        invalid.push("branch_stream_id".to_owned());
    }
    if request.at_version > MAX_BIGINT {
        invalid.push("at_version".to_owned());
    }
    let verdict = if !invalid.is_empty() {
        Verdict::Invalid(invalid)
    } else if let Err(refused) = m.live(&request.source_stream_id) {
        refused
    } else if m.version(&request.source_stream_id).is_none_or(|v| request.at_version > v) {
        Verdict::Invalid(vec!["at_version".to_owned()])
    } else if m.streams.contains_key(&request.branch_stream_id) {
        Verdict::Refused(Code::AlreadyExists, "STREAM_ALREADY_EXISTS")
    } else {
        Verdict::Ok
    };
    let result = c.branch_stream(request.clone()).await;
    m.count("BranchStream", &result);
    if let Some(r) = judge(&result, &verdict).map_err(|e| fail("BranchStream", &request, e))? {
        let branch =
            MStream { parent: Some((request.source_stream_id.clone(), request.at_version)), ..MStream::default() };
        m.streams.insert(request.branch_stream_id.clone(), branch);
        m.check_info(r.stream.as_ref()).map_err(|e| fail("BranchStream", &request, e))?;
    }
    Ok(())
}

async fn save_snapshot(c: &mut Client, m: &mut Model, request: pb::SaveSnapshotRequest) -> R<()> {
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.stream_id) {
        invalid.push("stream_id".to_owned());
    }
    if request.state.as_ref().is_none_or(|s| !valid_struct(s)) {
        invalid.push("state".to_owned());
    }
    if request.version > MAX_BIGINT {
        invalid.push("version".to_owned());
    }
    if i32::try_from(request.schema_version).is_err() {
        invalid.push("schema_version".to_owned());
    }
    let verdict = if !invalid.is_empty() {
        Verdict::Invalid(invalid)
    } else if let Err(refused) = m.live(&request.stream_id) {
        refused
    } else if m.version(&request.stream_id).is_none_or(|v| request.version > v) {
        Verdict::Invalid(vec!["version".to_owned()])
    } else {
        Verdict::Ok
    };
    let result = c.save_snapshot(request.clone()).await;
    m.count("SaveSnapshot", &result);
    if let Some(r) = judge(&result, &verdict).map_err(|e| fail("SaveSnapshot", &request, e))? {
        let Some(saved) = r.snapshot.clone() else { return Err(fail("SaveSnapshot", &request, "no snapshot")) };
        if saved.stream_id != request.stream_id
            || saved.version != request.version
            || saved.schema_version != request.schema_version.max(1)
            || saved.state.is_none()
            || saved.create_time.is_none()
        {
            return Err(fail("SaveSnapshot", &request, format!("saved {saved:?}")));
        }
        if let Some(s) = m.streams.get_mut(&request.stream_id) {
            s.snapshots.insert(saved.version, saved);
        }
    }
    Ok(())
}

async fn load_snapshot(c: &mut Client, m: &mut Model, request: pb::LoadSnapshotRequest) -> R<()> {
    let mut invalid = Vec::new();
    if !valid_stream_id(&request.stream_id) {
        invalid.push("stream_id".to_owned());
    }
    if request.max_version.is_some_and(|v| v > MAX_BIGINT) {
        invalid.push("max_version".to_owned());
    }
    if i32::try_from(request.schema_version).is_err() {
        invalid.push("schema_version".to_owned());
    }
    // The latest at or below max_version, of the schema version asked for.
    let latest = m.streams.get(&request.stream_id).and_then(|s| {
        s.snapshots
            .range(..=request.max_version.unwrap_or(u64::MAX))
            .rev()
            .map(|(_, snapshot)| snapshot)
            .find(|snapshot| request.schema_version == 0 || snapshot.schema_version == request.schema_version)
            .cloned()
    });
    let verdict = if !invalid.is_empty() {
        Verdict::Invalid(invalid)
    } else if let Err(refused) = m.live(&request.stream_id) {
        refused
    } else if latest.is_none() {
        Verdict::Refused(Code::NotFound, "SNAPSHOT_NOT_FOUND")
    } else {
        Verdict::Ok
    };
    let result = c.load_snapshot(request.clone()).await;
    m.count("LoadSnapshot", &result);
    if let Some(r) = judge(&result, &verdict).map_err(|e| fail("LoadSnapshot", &request, e))?
        && r.snapshot != latest
    {
        return Err(fail("LoadSnapshot", &request, format!("loaded {:?}, the latest match is {latest:?}", r.snapshot)));
    }
    Ok(())
}

/// After the property: the whole log, every stream and the fixture read
/// once more, plainly.
async fn sweep(client: &Client, m: &mut Model, frozen: &[(u64, String)]) -> Result<(), String> {
    let c = &mut client.clone();
    let mut from = 0;
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let r = c
            .read_all(pb::ReadAllRequest { from_position: from, max_count: 1000, filter: None })
            .await
            .map_err(|s| format!("ReadAll from {from}: {}", show(&s)))?
            .into_inner();
        for e in &r.events {
            m.observe(e)?;
            seen.push(e.global_position);
        }
        from = r.next_position;
        if r.end_of_log {
            break;
        }
    }
    let all: Vec<u64> = m.events.iter().map(|e| e.position).collect();
    if seen != all {
        return Err(format!("ReadAll paged through {} positions, the log holds {}", seen.len(), all.len()));
    }
    let ids: Vec<(String, bool)> = m.streams.iter().map(|(id, s)| (id.clone(), s.deleted)).collect();
    for (id, deleted) in ids {
        let read = pb::ReadStreamRequest { stream_id: id.clone(), max_count: 10_000, ..Default::default() };
        let got = c.read_stream(read).await;
        let info = c.get_stream(pb::GetStreamRequest { stream_id: id.clone() }).await;
        if deleted {
            for status in [got.err(), info.err()] {
                match status {
                    Some(s) if s.code() == Code::NotFound => {}
                    other => return Err(format!("deleted stream {id:?} answered {other:?}")),
                }
            }
            continue;
        }
        let got = got.map_err(|s| format!("ReadStream {id:?}: {}", show(&s)))?.into_inner();
        let want: Vec<u64> = m.history(&id, None).iter().map(|e| e.position).collect();
        let positions: Vec<u64> = got.events.iter().map(|e| e.global_position).collect();
        if positions != want {
            return Err(format!("stream {id:?} reads {positions:?}, the log holds {want:?}"));
        }
        for e in &got.events {
            m.observe(e)?;
        }
        let info = info.map_err(|s| format!("GetStream {id:?}: {}", show(&s)))?.into_inner();
        m.check_info(info.stream.as_ref())?;
        let verified = c
            .verify_stream(pb::VerifyStreamRequest { stream_id: id.clone() })
            .await
            .map_err(|s| format!("VerifyStream {id:?}: {}", show(&s)))?
            .into_inner();
        if !verified.valid || verified.events_checked != want.len() as u64 {
            return Err(format!("stream {id:?} does not verify: {verified:?}"));
        }
    }
    for (position, hash) in frozen {
        let e = &m.events[m.by_position[position]];
        if e.hash != *hash {
            return Err(format!("fixture event at {position} now has hash {}, recorded {hash}", e.hash));
        }
    }
    Ok(())
}

// --- generated requests -------------------------------------------------------------

/// One generated request. Choices that depend on the state (an event id that
/// is already stored, a time near a stored event, a request to repeat) are
/// resolved when the request is sent.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per request
enum Op {
    Append(AppendSpec),
    Replay(Index, Change),
    ReadStream(ReadStreamSpec),
    ReadStreamAt(ReadStreamAtSpec),
    ReadAll(pb::ReadAllRequest),
    Subscribe(pb::SubscribeRequest),
    ListStreams(ListSpec),
    GetStream(String),
    DeleteStream(pb::DeleteStreamRequest),
    VerifyStream(String),
    BranchStream(pb::BranchStreamRequest),
    SaveSnapshot(pb::SaveSnapshotRequest),
    LoadSnapshot(pb::LoadSnapshotRequest),
}

#[derive(Debug, Clone)]
struct AppendSpec {
    stream_id: String,
    expected: Option<Expected>,
    events: EventsSpec,
    request_id: String,
}

#[derive(Debug, Clone)]
enum EventsSpec {
    List(Vec<EventSpec>),
    /// This many minimal events (one more than an append may hold).
    Many(usize),
}

#[derive(Debug, Clone)]
struct EventSpec {
    id: IdSpec,
    event_type: String,
    schema_version: u32,
    data: Option<Struct>,
    metadata: Option<pb::EventMetadata>,
}

#[derive(Debug, Clone)]
enum IdSpec {
    Empty,
    Fresh(u128, IdForm),
    Nil,
    /// The id of an event already stored.
    Stored(Index),
    Garbage(String),
    /// The id of the previous event of the same request.
    Previous,
}

#[derive(Debug, Clone, Copy)]
enum IdForm {
    Hyphenated,
    Upper,
    Simple,
    Braced,
    Urn,
}

/// How a repeated request differs from its first send.
#[derive(Debug, Clone)]
enum Change {
    Same,
    /// New event ids only: still the same request.
    FreshIds(u128),
    OtherType,
    OtherExpected,
}

#[derive(Debug, Clone)]
struct ReadStreamSpec {
    stream_id: String,
    direction: i32,
    from_version: Option<u64>,
    max_count: u32,
    start: Option<TimeSpec>,
    end: Option<TimeSpec>,
}

#[derive(Debug, Clone)]
struct ReadStreamAtSpec {
    stream_id: String,
    point: Option<PointSpec>,
    from_version: u64,
    max_count: u32,
}

#[derive(Debug, Clone)]
enum PointSpec {
    Version(u64),
    Time(TimeSpec),
}

#[derive(Debug, Clone)]
enum TimeSpec {
    Raw(i64, i32),
    /// A stored event's time (of the event at this index, modulo their
    /// number) plus this many nanoseconds.
    Near(usize, i64),
}

#[derive(Debug, Clone)]
struct ListSpec {
    page_size: i32,
    token: TokenSpec,
    prefix: String,
    show_deleted: bool,
}

#[derive(Debug, Clone)]
enum TokenSpec {
    Empty,
    Raw(String),
    /// Base64 of arbitrary text.
    Junk(String),
    /// A well-formed token, for this listing or for another one.
    Crafted {
        after: String,
        same_prefix: bool,
        same_deleted: bool,
    },
}

impl TimeSpec {
    fn resolve(&self, m: &Model) -> Timestamp {
        match self {
            Self::Raw(seconds, nanos) => Timestamp { seconds: *seconds, nanos: *nanos },
            Self::Near(_, _) if m.events.is_empty() => Timestamp::default(),
            Self::Near(pick, offset) => timestamp(m.events[pick % m.events.len()].time() + i128::from(*offset)),
        }
    }
}

impl AppendSpec {
    fn build(&self, m: &Model) -> pb::AppendRequest {
        let events = match &self.events {
            EventsSpec::Many(n) => {
                (0..*n).map(|_| pb::ProposedEvent { event_type: "Bulk".to_owned(), ..Default::default() }).collect()
            }
            EventsSpec::List(specs) => {
                let mut events: Vec<pb::ProposedEvent> = Vec::new();
                for spec in specs {
                    let event_id = match &spec.id {
                        IdSpec::Empty => String::new(),
                        IdSpec::Nil => Uuid::nil().to_string(),
                        IdSpec::Garbage(s) => s.clone(),
                        IdSpec::Previous => events.last().map(|e| e.event_id.clone()).unwrap_or_default(),
                        IdSpec::Stored(_) if m.known_ids.is_empty() => String::new(),
                        IdSpec::Stored(pick) => m.known_ids[pick.index(m.known_ids.len())].clone(),
                        IdSpec::Fresh(n, form) => {
                            let id = Uuid::from_u128(*n);
                            match form {
                                IdForm::Hyphenated => id.hyphenated().to_string(),
                                IdForm::Upper => id.hyphenated().to_string().to_uppercase(),
                                IdForm::Simple => id.simple().to_string(),
                                IdForm::Braced => id.braced().to_string(),
                                IdForm::Urn => id.urn().to_string(),
                            }
                        }
                    };
                    events.push(pb::ProposedEvent {
                        event_id,
                        event_type: spec.event_type.clone(),
                        schema_version: spec.schema_version,
                        data: spec.data.clone(),
                        metadata: spec.metadata.clone(),
                    });
                }
                events
            }
        };
        pb::AppendRequest {
            stream_id: self.stream_id.clone(),
            expected: self.expected,
            events,
            request_id: self.request_id.clone(),
        }
    }
}

impl Change {
    fn apply(&self, mut request: pb::AppendRequest) -> pb::AppendRequest {
        match self {
            Self::Same => {}
            Self::FreshIds(seed) => {
                for (i, e) in request.events.iter_mut().enumerate() {
                    e.event_id = Uuid::from_u128(seed.wrapping_add(i as u128 + 1)).to_string();
                }
            }
            Self::OtherType => {
                if let Some(e) = request.events.first_mut() {
                    e.event_type.push('x');
                }
            }
            Self::OtherExpected => {
                request.expected = Some(match request.expected {
                    Some(Expected::ExpectedVersion(v)) => Expected::ExpectedVersion(v.wrapping_add(1)),
                    Some(Expected::ExpectedState(_)) => Expected::ExpectedVersion(0),
                    None => Expected::ExpectedState(pb::ExpectedState::StreamExists as i32),
                });
            }
        }
        request
    }
}

fn kind(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

/// Versions, positions and counts: the fixture's range, the bigint edge and
/// beyond, and anything.
fn u64_edge() -> BoxedStrategy<u64> {
    prop_oneof![
        4 => 0..12u64,
        1 => Just(MAX_BIGINT - 1),
        1 => Just(MAX_BIGINT),
        1 => Just(MAX_BIGINT + 1),
        1 => Just(u64::MAX - 1),
        1 => Just(u64::MAX),
        1 => Just(u64::from(u32::MAX) + 1),
        2 => any::<u64>(),
    ]
    .boxed()
}

fn position() -> BoxedStrategy<u64> {
    prop_oneof![3 => 0..64u64, 2 => u64_edge()].boxed()
}

fn u32_edge() -> BoxedStrategy<u32> {
    prop_oneof![
        3 => 0..6u32,
        1 => select(vec![500, 10_000, 10_001, i32::MAX as u32, 1 << 31, u32::MAX]),
        1 => any::<u32>(),
    ]
    .boxed()
}

fn schema_version() -> BoxedStrategy<u32> {
    prop_oneof![4 => Just(1u32), 1 => Just(0u32), 1 => Just(2u32), 1 => u32_edge()].boxed()
}

fn i32_edge() -> BoxedStrategy<i32> {
    prop_oneof![3 => 0..6i32, 1 => select(vec![-1, 1000, 1001, i32::MAX, i32::MIN]), 1 => any::<i32>()].boxed()
}

fn time() -> BoxedStrategy<TimeSpec> {
    hostile::time(2, TimeSpec::Raw, TimeSpec::Near)
}

fn opt_time() -> BoxedStrategy<Option<TimeSpec>> {
    prop::option::weighted(0.4, time()).boxed()
}

/// Strings: ordinary, empty, unicode, control characters, NUL, `$`-prefixed,
/// long, and just around the 256-byte bound (in 1-, 2- and 4-byte chars).
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        10 => short_text(),
        1 => "\\$[a-z]{0,6}",
        1 => "\\PC{200,1000}",
        1 => select(vec![
            "x".repeat(256),
            "x".repeat(257),
            "é".repeat(128),
            "é".repeat(129),
            "😀".repeat(64),
            "😀".repeat(65),
            "\u{2028}\u{200b}\u{feff}".to_owned(),
            "%_\\".to_owned(),
            "$all".to_owned(),
        ]),
    ]
    .boxed()
}

fn fixture_id() -> BoxedStrategy<String> {
    select(FIXTURE.to_vec()).prop_map(str::to_owned).boxed()
}

fn hot_id() -> BoxedStrategy<String> {
    select(HOT.to_vec()).prop_map(str::to_owned).boxed()
}

/// A stream to read: mostly the fixture.
fn read_id() -> BoxedStrategy<String> {
    prop_oneof![4 => fixture_id(), 2 => hot_id(), 1 => branch_id(), 2 => text()].boxed()
}

/// A stream to write: mostly not the fixture.
fn write_id() -> BoxedStrategy<String> {
    prop_oneof![1 => fixture_id(), 5 => hot_id(), 1 => branch_id(), 3 => text()].boxed()
}

/// Branches made by random requests come from a small pool, so that other
/// requests meet them.
fn branch_id() -> BoxedStrategy<String> {
    "b-[0-9]".boxed()
}

fn prefix() -> BoxedStrategy<String> {
    let known = select(vec!["fix-", "fix", "h-", "b-", "f", "fix-a", "fix-br"]).prop_map(str::to_owned);
    prop_oneof![2 => known, 2 => text()].boxed()
}

fn event_type() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(vec!["Opened", "Changed", "Closed", "Forked"]).prop_map(str::to_owned),
        2 => "[A-Z][a-z]{2,8}",
        2 => text(),
    ]
    .boxed()
}

/// Filters of 0..150 entries per list, around the bound of 100 too.
fn filter() -> BoxedStrategy<Option<pb::EventFilter>> {
    let make = |(stream_prefixes, event_types)| Some(pb::EventFilter { stream_prefixes, event_types });
    prop_oneof![
        3 => Just(None),
        4 => (vec(prefix(), 0..3), vec(event_type(), 0..3)).prop_map(make),
        1 => (vec(prefix(), 98..=102), vec(event_type(), 0..2)).prop_map(make),
        1 => (vec(prefix(), 0..150), vec(event_type(), 0..150)).prop_map(make),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<f64> {
    prop_oneof![
        2 => select(vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            0.1,
            1e21,
            1e308,
            -1e308,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            9_007_199_254_740_992.0,
            9.223_372_036_854_776e18,
            -9.223_372_036_854_776e18,
            1.844_674_407_370_955_2e19,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ]),
        1 => any::<f64>(),
        1 => (-1000i64..1000).prop_map(|n| n as f64),
    ]
    .boxed()
}

/// Small `Struct` payloads: every kind, nested twice at most.
fn payload() -> BoxedStrategy<Struct> {
    let leaf = prop_oneof![
        Just(Value { kind: None }),
        any::<i32>().prop_map(|n| kind(Kind::NullValue(n))),
        any::<bool>().prop_map(|b| kind(Kind::BoolValue(b))),
        number().prop_map(|n| kind(Kind::NumberValue(n))),
        text().prop_map(|s| kind(Kind::StringValue(s))),
    ];
    let value = leaf.prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(|values| kind(Kind::ListValue(ListValue { values }))),
            btree_map(text(), inner, 0..3).prop_map(|fields| kind(Kind::StructValue(Struct { fields }))),
        ]
    });
    btree_map(text(), value, 0..4).prop_map(|fields| Struct { fields }).boxed()
}

fn id_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => "[!-~]{1,16}",
        1 => select(vec!["a".repeat(128), "a".repeat(129)]),
        1 => "[a-z]{1,4} [a-z]{1,4}",
        1 => text(),
    ]
    .boxed()
}

fn metadata() -> BoxedStrategy<Option<pb::EventMetadata>> {
    let custom = prop_oneof![3 => hash_map(text(), text(), 0..3), 1 => hash_map("[a-z]{1,6}", "[a-z]{0,3}", 63..=66)];
    prop_oneof![
        3 => Just(None),
        2 => (id_text(), id_text(), id_text(), custom).prop_map(|(correlation_id, causation_id, user_id, custom)| {
            Some(pb::EventMetadata { correlation_id, causation_id, user_id, custom })
        }),
    ]
    .boxed()
}

/// Payloads a client would send, with a few odd but valid values.
fn plain_payload() -> BoxedStrategy<Struct> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(|b| kind(Kind::BoolValue(b))),
        (-1000i64..1000).prop_map(|n| kind(Kind::NumberValue(n as f64))),
        select(vec![0.5, -0.0, 1e21, 5e-324, f64::MAX, 9_007_199_254_740_993.0])
            .prop_map(|n| kind(Kind::NumberValue(n))),
        "\\PC{0,20}".prop_map(|s| kind(Kind::StringValue(s))),
        Just(kind(Kind::NullValue(0))),
    ];
    let value = leaf.prop_recursive(1, 6, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(|values| kind(Kind::ListValue(ListValue { values }))),
            btree_map("[a-z]{1,8}", inner, 0..3).prop_map(|fields| kind(Kind::StructValue(Struct { fields }))),
        ]
    });
    btree_map("[a-z]{1,8}", value, 0..4).prop_map(|fields| Struct { fields }).boxed()
}

/// Mostly events a client would send (so that the log grows and reads have
/// something to get wrong), some with every field hostile.
fn event_spec() -> BoxedStrategy<EventSpec> {
    let form = select(vec![IdForm::Hyphenated, IdForm::Upper, IdForm::Simple, IdForm::Braced, IdForm::Urn]);
    let plain_metadata = prop_oneof![
        2 => Just(None),
        1 => ("[a-z0-9-]{1,16}", "[!-~]{0,16}", "[a-z]{0,8}", hash_map("[a-z]{1,6}", "\\PC{0,8}", 0..3)).prop_map(
            |(correlation_id, causation_id, user_id, custom)| {
                Some(pb::EventMetadata { correlation_id, causation_id, user_id, custom })
            }
        ),
    ];
    let plain = (
        prop_oneof![1 => Just(IdSpec::Empty), 1 => any::<u128>().prop_map(|n| IdSpec::Fresh(n, IdForm::Hyphenated))],
        select(vec!["Opened", "Changed", "Closed", "Forked", "Noted"]).prop_map(str::to_owned),
        prop_oneof![4 => Just(1u32), 1 => Just(0u32), 1 => Just(2u32)],
        prop::option::weighted(0.8, plain_payload()),
        plain_metadata,
    )
        .prop_map(|(id, event_type, schema_version, data, metadata)| EventSpec {
            id,
            event_type,
            schema_version,
            data,
            metadata,
        });
    let id = prop_oneof![
        4 => Just(IdSpec::Empty),
        4 => (any::<u128>(), form).prop_map(|(n, form)| IdSpec::Fresh(n, form)),
        1 => Just(IdSpec::Nil),
        1 => any::<Index>().prop_map(IdSpec::Stored),
        1 => text().prop_map(IdSpec::Garbage),
        1 => Just(IdSpec::Previous),
    ];
    let hostile = (id, event_type(), schema_version(), prop::option::weighted(0.8, payload()), metadata()).prop_map(
        |(id, event_type, schema_version, data, metadata)| EventSpec { id, event_type, schema_version, data, metadata },
    );
    prop_oneof![4 => plain, 1 => hostile].boxed()
}

fn append_spec() -> BoxedStrategy<AppendSpec> {
    let expected = prop_oneof![
        3 => Just(None),
        2 => (0..=3i32).prop_map(|s| Some(Expected::ExpectedState(s))),
        1 => select(vec![-1, 4, i32::MAX, i32::MIN]).prop_map(|s| Some(Expected::ExpectedState(s))),
        4 => u64_edge().prop_map(|v| Some(Expected::ExpectedVersion(v))),
    ];
    let events = prop_oneof![
        12 => vec(event_spec(), 1..4).prop_map(EventsSpec::List),
        1 => Just(EventsSpec::List(Vec::new())),
        1 => Just(EventsSpec::Many(MAX_EVENTS + 1)),
    ];
    let request_id = prop_oneof![
        4 => Just(String::new()),
        3 => select(vec!["r-0", "r-1", "r-2"]).prop_map(str::to_owned),
        1 => id_text(),
    ];
    (write_id(), expected, events, request_id)
        .prop_map(|(stream_id, expected, events, request_id)| AppendSpec { stream_id, expected, events, request_id })
        .boxed()
}

fn op() -> BoxedStrategy<Op> {
    let change = prop_oneof![
        2 => Just(Change::Same),
        2 => any::<u128>().prop_map(Change::FreshIds),
        1 => Just(Change::OtherType),
        1 => Just(Change::OtherExpected),
    ];
    let direction = prop_oneof![6 => 0..=2i32, 1 => select(vec![-1, 3, i32::MAX, i32::MIN])];
    let read_stream =
        (read_id(), direction, prop::option::weighted(0.5, u64_edge()), u32_edge(), opt_time(), opt_time()).prop_map(
            |(stream_id, direction, from_version, max_count, start, end)| {
                Op::ReadStream(ReadStreamSpec { stream_id, direction, from_version, max_count, start, end })
            },
        );
    let point = prop::option::weighted(
        0.8,
        prop_oneof![u64_edge().prop_map(PointSpec::Version), time().prop_map(PointSpec::Time)],
    );
    let read_stream_at = (read_id(), point, prop_oneof![3 => Just(0u64), 2 => u64_edge()], u32_edge()).prop_map(
        |(stream_id, point, from_version, max_count)| {
            Op::ReadStreamAt(ReadStreamAtSpec { stream_id, point, from_version, max_count })
        },
    );
    let read_all = (position(), u32_edge(), filter()).prop_map(|(from_position, max_count, filter)| {
        Op::ReadAll(pb::ReadAllRequest { from_position, max_count, filter })
    });
    // The global log and single streams, each mostly with the fields that
    // belong to it.
    let subscribe = prop_oneof![
        (
            Just(String::new()),
            prop_oneof![3 => Just(0u64), 2 => position()],
            prop::option::weighted(0.1, u64_edge()),
            prop::bool::weighted(0.2),
            filter(),
            u32_edge(),
        ),
        (
            read_id(),
            prop_oneof![9 => Just(0u64), 1 => position()],
            prop::option::weighted(0.6, prop_oneof![3 => 0..6u64, 1 => u64_edge()]),
            prop::bool::weighted(0.1),
            prop_oneof![4 => Just(None), 1 => filter()],
            u32_edge(),
        ),
    ]
    .prop_map(|(stream_id, from_position, from_version, from_end, filter, checkpoint_interval)| {
        Op::Subscribe(pb::SubscribeRequest {
            stream_id,
            from_position,
            from_version,
            from_end,
            filter,
            checkpoint_interval,
        })
    });
    let token = prop_oneof![
        4 => Just(TokenSpec::Empty),
        1 => text().prop_map(TokenSpec::Raw),
        1 => text().prop_map(TokenSpec::Junk),
        2 => (read_id(), prop::bool::weighted(0.8), prop::bool::weighted(0.8)).prop_map(
            |(after, same_prefix, same_deleted)| TokenSpec::Crafted { after, same_prefix, same_deleted }
        ),
    ];
    let list = (i32_edge(), token, prop_oneof![2 => Just(String::new()), 3 => prefix()], any::<bool>()).prop_map(
        |(page_size, token, prefix, show_deleted)| Op::ListStreams(ListSpec { page_size, token, prefix, show_deleted }),
    );
    // Deletes aim at shared streams and `fix-c`; the rest of the fixture,
    // which should mostly stay readable, only with a random expected
    // version (only the right one may delete it).
    let delete = prop_oneof![
        8 => (
            prop_oneof![5 => hot_id(), 2 => branch_id(), 3 => text(), 1 => Just("fix-c".to_owned())],
            prop::option::weighted(0.6, u64_edge())
        ),
        1 => (fixture_id(), u64_edge().prop_map(Some)),
    ]
    .prop_map(|(stream_id, expected_version)| {
        Op::DeleteStream(pb::DeleteStreamRequest { stream_id, expected_version })
    });
    // Versions mostly within the streams' reach.
    let version = || prop_oneof![3 => 0..6u64, 1 => u64_edge()];
    let branch_id = prop_oneof![4 => branch_id(), 2 => hot_id(), 1 => fixture_id(), 2 => text()];
    let branch = (read_id(), version(), branch_id).prop_map(|(source_stream_id, at_version, branch_stream_id)| {
        Op::BranchStream(pb::BranchStreamRequest { source_stream_id, at_version, branch_stream_id })
    });
    let state = prop_oneof![3 => plain_payload(), 1 => payload()];
    let save = (read_id(), version(), schema_version(), prop::option::weighted(0.9, state)).prop_map(
        |(stream_id, version, schema_version, state)| {
            Op::SaveSnapshot(pb::SaveSnapshotRequest { stream_id, version, schema_version, state })
        },
    );
    let load = (read_id(), prop::option::weighted(0.6, version()), schema_version()).prop_map(
        |(stream_id, max_version, schema_version)| {
            Op::LoadSnapshot(pb::LoadSnapshotRequest { stream_id, max_version, schema_version })
        },
    );
    prop_oneof![
        6 => append_spec().prop_map(Op::Append),
        1 => (any::<Index>(), change).prop_map(|(pick, change)| Op::Replay(pick, change)),
        3 => read_stream,
        3 => read_stream_at,
        3 => read_all,
        2 => subscribe,
        2 => list,
        1 => read_id().prop_map(Op::GetStream),
        1 => delete,
        1 => read_id().prop_map(Op::VerifyStream),
        2 => branch,
        2 => save,
        2 => load,
    ]
    .boxed()
}
