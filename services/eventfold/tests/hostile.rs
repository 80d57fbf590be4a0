//! Hostile clients against the real binary (`eventfold dev` on PostgreSQL):
//! requests that used to panic a handler or reset the connection, and the
//! memory attacks of issue 13 — 150 events of 1 MB, then filtered reads
//! that match nothing and subscribers that stop reading — measured as the
//! server process's resident memory, while another client keeps being
//! served.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use eventfold_proto::{
    eventstore::{self as pb, event_store_service_client::EventStoreServiceClient},
    query::{GetOrderAtRequest, order_query_service_client::OrderQueryServiceClient},
};
use eventfold_tests::channel;
use prost_types::{Struct, Timestamp, Value, value::Kind};
use tonic::Code;

use crate::common::DevServer;

/// The bound the server's resident memory must stay under while attacked.
const RSS_BOUND_MB: u64 = 200;

fn start() -> (DevServer, eventfold_tests::TestDatabase) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let server = DevServer::start_with(
        &["--database-url", db.url()],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    (server, db)
}

/// Resident memory of `pid`, in MB (`VmRSS` of /proc).
fn rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kb / 1024
}

/// Samples the resident memory of `pid` every 50 ms until stopped; the peak.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_mb(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_mb(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        });
        Self { peak, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn megabyte_event(n: usize) -> pb::ProposedEvent {
    let blob = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(1_000_000 / 36);
    let fields = [
        ("n".to_owned(), Value { kind: Some(Kind::NumberValue(n as f64)) }),
        ("blob".to_owned(), Value { kind: Some(Kind::StringValue(format!("{n}{blob}"))) }),
    ];
    pb::ProposedEvent {
        event_type: "Heavy".into(),
        data: Some(Struct { fields: fields.into_iter().collect() }),
        ..Default::default()
    }
}

#[test]
fn memory_stays_bounded_under_large_reads_and_stalled_subscribers() {
    let (server, _db) = start();
    let pid = server.process.child.id();
    // The server restarted itself with glibc's mmap threshold fixed, so that
    // freed large buffers leave the process (heap.rs); without it the peak
    // below was seen at 186–204 MB.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the server's environment");
    assert!(
        environ.split(|b| *b == 0).any(|entry| entry == b"MALLOC_MMAP_THRESHOLD_=131072"),
        "the server runs with MALLOC_MMAP_THRESHOLD_=131072"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let mut store = EventStoreServiceClient::new(channel(&server.addr).await);
        for n in 0..150 {
            let append = pb::AppendRequest {
                stream_id: format!("heavy-{}", n % 10),
                events: vec![megabyte_event(n)],
                ..Default::default()
            };
            store.append(append).await.unwrap_or_else(|s| panic!("append {n}: {s:?}"));
        }
        let light = pb::AppendRequest {
            stream_id: "light".into(),
            events: vec![pb::ProposedEvent { event_type: "Small".into(), ..Default::default() }],
            ..Default::default()
        };
        store.append(light).await.expect("append a small event");
        let before = rss_mb(pid);
        let sampler = RssSampler::start(pid);

        // Four subscribers from position 0 on their own connections, that
        // never read a message.
        let stalled_at = Instant::now();
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut client = EventStoreServiceClient::new(channel(&server.addr).await);
            let request = pb::SubscribeRequest { from_position: 0, ..Default::default() };
            stalled.push(client.subscribe(request).await.expect("subscribe").into_inner());
        }
        // Six filtered reads at once that match nothing, several times, and
        // unfiltered pages as large as a client may ask for.
        let mut readers = Vec::new();
        for i in 0..6 {
            let mut client = EventStoreServiceClient::new(channel(&server.addr).await);
            readers.push(tokio::spawn(async move {
                for _ in 0..3 {
                    let filter = pb::EventFilter { event_types: vec!["NoSuchType".into()], ..Default::default() };
                    let read = pb::ReadAllRequest { from_position: 0, max_count: 1, filter: Some(filter) };
                    let page = client.read_all(read).await.expect("filtered read").into_inner();
                    assert!(page.events.is_empty(), "reader {i}: nothing matches");
                    let read = pb::ReadAllRequest { from_position: 0, max_count: 10_000, filter: None };
                    let page = client.read_all(read).await.expect("unfiltered read").into_inner();
                    let bytes: usize = page.events.iter().map(prost::Message::encoded_len).sum();
                    assert!(bytes <= 8 * 1024 * 1024, "reader {i}: a page of {bytes} bytes");
                    assert!(!page.events.is_empty() && !page.end_of_log, "reader {i}: a capped page, more to come");
                }
            }));
        }
        // Meanwhile another client is served, promptly.
        let mut other = EventStoreServiceClient::new(channel(&server.addr).await);
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let read = pb::ReadStreamRequest { stream_id: "light".into(), ..Default::default() };
            let slice = other.read_stream(read).await.expect("another client is served").into_inner();
            assert_eq!(slice.events.len(), 1);
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for reader in readers {
            reader.await.expect("reader task");
        }
        // Give the subscribers' catch-up time to fill whatever it may hold
        // (a debug build reads 1 MB events slowly), then take the peak.
        tokio::time::sleep(stalled_at.saturating_duration_since(Instant::now()) + Duration::from_secs(15)).await;
        let peak = sampler.finish();
        println!(
            "server RSS: {before} MB before the attack, peak {peak} MB during it (bound {RSS_BOUND_MB} MB); \
             slowest read of another client {slowest:?}"
        );
        assert!(peak < RSS_BOUND_MB, "peak resident memory {peak} MB exceeds {RSS_BOUND_MB} MB");
        assert!(slowest < Duration::from_secs(5), "another client waited {slowest:?}");
        // The stalled subscribers still get every event once they read.
        let mut first = stalled.remove(0);
        let mut seen = 0;
        while seen < 151 {
            let message = tokio::time::timeout(Duration::from_secs(30), first.message())
                .await
                .expect("the stalled subscriber resumes")
                .expect("a message")
                .expect("not the end");
            if let Some(pb::subscribe_response::Message::Event(e)) = message.message {
                seen += 1;
                assert_eq!(e.global_position, seen, "every event once, in order");
            }
        }
    });
}

#[test]
fn requests_that_used_to_panic_are_answered_and_the_connection_lives() {
    let (server, _db) = start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let channel = channel(&server.addr).await;
        let mut store = EventStoreServiceClient::new(channel.clone());
        let mut orders = OrderQueryServiceClient::new(channel);
        let append = pb::AppendRequest {
            stream_id: "t-1".into(),
            events: vec![pb::ProposedEvent { event_type: "E".into(), ..Default::default() }],
            ..Default::default()
        };
        store.append(append).await.expect("append");
        for seconds in [i64::MAX, i64::MIN, 253_402_300_800] {
            let time = Timestamp { seconds, nanos: 0 };
            let at = pb::ReadStreamAtRequest {
                stream_id: "t-1".into(),
                point: Some(pb::read_stream_at_request::Point::Time(time)),
                ..Default::default()
            };
            let status = store.read_stream_at(at).await.expect_err("out of range");
            assert_eq!(status.code(), Code::InvalidArgument, "ReadStreamAt at {seconds}: {status:?}");
            let at = GetOrderAtRequest { order_id: "o-1".into(), time: Some(time), ..Default::default() };
            let status = orders.get_order_at(at).await.expect_err("out of range");
            assert_eq!(status.code(), Code::InvalidArgument, "GetOrderAt at {seconds}: {status:?}");
        }
        let append = pb::AppendRequest {
            stream_id: "t-1".into(),
            events: vec![pb::ProposedEvent { event_type: "E".into(), ..Default::default() }],
            expected: Some(pb::append_request::Expected::ExpectedVersion(u64::MAX)),
            ..Default::default()
        };
        let status = store.append(append).await.expect_err("expected version beyond a bigint");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let read = pb::ReadStreamRequest { stream_id: "t-1".into(), ..Default::default() };
        let slice = store.read_stream(read).await.expect("the connection still serves").into_inner();
        assert_eq!(slice.events.len(), 1, "nothing was appended");
    });
}
