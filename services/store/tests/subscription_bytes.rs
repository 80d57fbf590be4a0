//! Subscribers whose readers stop reading hold a bounded number of bytes,
//! catching up and live, and still deliver every event exactly once, in
//! order, once read again. On the in-memory log: no database needed.

use std::{sync::Arc, time::Duration};

use eventfold_store::{
    AppendRequest, Error, EventFilter, EventLog, ExpectedVersion, MAX_BIGINT, MemoryEventLog, NewEvent,
    SubscriptionMessage, SubscriptionOptions, Subscriptions, Target,
};
use serde_json::json;
use tokio::sync::mpsc;

type Messages = mpsc::Receiver<eventfold_store::Result<SubscriptionMessage>>;

/// Payload bytes of each event: big enough that a few fill a buffer.
const EVENT_BYTES: usize = 256 * 1024;
const EVENTS: u64 = 150;
const EVENT_COUNT: usize = 150;
const SUBSCRIBERS: usize = 4;
/// How long the readers do not read.
const PAUSE: Duration = Duration::from_millis(800);

fn big_event(n: u64) -> NewEvent {
    NewEvent::new("Big", json!({ "n": n, "blob": "x".repeat(EVENT_BYTES) }))
}

/// Append the events `from..to`, ten per append, over a few streams.
async fn append_big(log: &dyn EventLog, from: u64, to: u64) {
    let mut n = from;
    while n < to {
        let end = (n + 10).min(to);
        let events = (n..end).map(big_event).collect();
        let stream = format!("big-{}", n % 3);
        log.append(AppendRequest::new(stream, ExpectedVersion::Any, events)).await.expect("append");
        n = end;
    }
}

async fn recv(rx: &mut Messages) -> SubscriptionMessage {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("subscription message within 20 s")
        .expect("subscription open")
        .expect("no subscription error")
}

/// Read until `count` events arrived; their payload numbers, and whether
/// the subscriber reported falling behind.
async fn read_events(rx: &mut Messages, count: usize) -> (Vec<u64>, bool) {
    let mut seen = Vec::new();
    let mut fell_behind = false;
    while seen.len() < count {
        match recv(rx).await {
            SubscriptionMessage::Event(e) => seen.push(e.data["n"].as_u64().expect("n")),
            SubscriptionMessage::FellBehind(_) => fell_behind = true,
            SubscriptionMessage::CaughtUp(_) | SubscriptionMessage::Checkpoint(_) => {}
        }
    }
    (seen, fell_behind)
}

/// Watch the subscribers while nobody reads, until `writer` is done, every
/// buffer holds at least `fill` messages (or a generous time passed: debug
/// builds serialize slowly) and [`PAUSE`] more passed: the largest byte count
/// the subscriptions report, and the most messages any channel held.
async fn watch_paused(
    subscriptions: &Subscriptions,
    receivers: &[Messages],
    fill: usize,
    mut writer: tokio::task::JoinHandle<()>,
) -> (usize, usize) {
    let (mut max_bytes, mut max_queued) = (0, 0);
    let mut written = None;
    let mut filled = None;
    loop {
        max_bytes = max_bytes.max(subscriptions.buffered_bytes());
        max_queued = receivers.iter().map(mpsc::Receiver::len).fold(max_queued, usize::max);
        let now = tokio::time::Instant::now();
        match (written, filled) {
            (None, _) => {
                if let Ok(done) = tokio::time::timeout(Duration::from_millis(5), &mut writer).await {
                    done.expect("writer");
                    written = Some(now);
                }
                continue;
            }
            (Some(_), None) if receivers.iter().all(|rx| rx.len() >= fill) => filled = Some(now),
            (Some(at), None) if now > at + Duration::from_secs(20) => return (max_bytes, max_queued),
            (_, Some(at)) if now > at + PAUSE => return (max_bytes, max_queued),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many events a full buffer of `budget` bytes holds at least.
fn fill(budget: usize) -> usize {
    budget / EVENT_BYTES - 1
}

/// How many events fit a buffer of `budget` bytes, plus the notices that may
/// sit beside them (a `CaughtUp`, a `FellBehind`, the message being taken).
fn max_messages(budget: usize) -> usize {
    budget / EVENT_BYTES + 3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_catch_up_subscribers_hold_bounded_bytes() {
    let log = Arc::new(MemoryEventLog::new());
    append_big(log.as_ref(), 0, EVENTS).await;
    let options = SubscriptionOptions::default();
    let budget = options.subscriber_buffer_bytes;
    assert!(EVENT_COUNT * EVENT_BYTES > 4 * budget, "the log must dwarf a buffer for the test to mean anything");
    let subscriptions = Subscriptions::new(log.clone(), options);
    let mut receivers: Vec<Messages> = (0..SUBSCRIBERS)
        .map(|_| subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1_000_000))
        .collect();

    let (max_bytes, max_queued) = watch_paused(&subscriptions, &receivers, fill(budget), tokio::spawn(async {})).await;
    assert!(max_bytes <= SUBSCRIBERS * budget, "{max_bytes} bytes buffered for {SUBSCRIBERS} paused subscribers");
    assert!(max_queued <= max_messages(budget), "{max_queued} messages queued for a paused subscriber");
    // The buffers did fill up to their bound: the bound, not idleness, held
    // them back.
    assert!(max_bytes >= SUBSCRIBERS * (budget - 2 * EVENT_BYTES), "only {max_bytes} bytes were buffered");

    for rx in &mut receivers {
        let (seen, _) = read_events(rx, EVENT_COUNT).await;
        assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "every event exactly once, in order");
        assert!(matches!(recv(rx).await, SubscriptionMessage::CaughtUp(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_live_subscribers_let_go_and_catch_up() {
    let log = Arc::new(MemoryEventLog::new());
    append_big(log.as_ref(), 0, 2).await;
    let options = SubscriptionOptions::default();
    let budget = options.subscriber_buffer_bytes;
    let subscriptions = Subscriptions::new(log.clone(), options);
    let mut receivers: Vec<Messages> = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 1_000_000);
        let (seen, _) = read_events(&mut rx, 2).await;
        assert_eq!(seen, vec![0, 1]);
        assert!(matches!(recv(&mut rx).await, SubscriptionMessage::CaughtUp(_)), "live before the burst");
        receivers.push(rx);
    }

    // The burst arrives live while nobody reads.
    let writer = {
        let log = log.clone();
        tokio::spawn(async move { append_big(log.as_ref(), 2, EVENTS).await })
    };
    let (max_bytes, max_queued) = watch_paused(&subscriptions, &receivers, fill(budget), writer).await;
    assert!(max_bytes <= SUBSCRIBERS * budget, "{max_bytes} bytes buffered for {SUBSCRIBERS} paused subscribers");
    assert!(max_queued <= max_messages(budget), "{max_queued} messages queued for a paused subscriber");
    assert!(max_bytes >= SUBSCRIBERS * (budget - 2 * EVENT_BYTES), "only {max_bytes} bytes were buffered");

    for rx in &mut receivers {
        let (seen, fell_behind) = read_events(rx, EVENT_COUNT - 2).await;
        assert_eq!(seen, (2..EVENTS).collect::<Vec<_>>(), "every event exactly once, in order");
        assert!(fell_behind, "a full buffer while live sends the subscriber back to reads");
    }
    // Once the readers took everything, a subscriber that sends again
    // counts only what it just queued.
    append_big(log.as_ref(), EVENTS, EVENTS + 1).await;
    for rx in &mut receivers {
        assert_eq!(read_events(rx, 1).await.0, vec![EVENTS]);
    }
    let left = subscriptions.buffered_bytes();
    assert!(left <= SUBSCRIBERS * (EVENT_BYTES + 64), "{left} bytes still counted");
}

fn violated_fields(error: &Error) -> Vec<&str> {
    match error {
        Error::InvalidArgument(violations) => violations.iter().map(|v| v.field.as_str()).collect(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test]
async fn out_of_range_targets_are_refused_first() {
    let log = Arc::new(MemoryEventLog::new());
    let subscriptions = Subscriptions::new(log, SubscriptionOptions::default());

    let stream = Target::Stream { stream_id: "order-1".into(), after_version: Some(u64::MAX) };
    assert_eq!(violated_fields(&stream.validate().expect_err("refused")), vec!["from_version"]);
    let mut rx = subscriptions.subscribe(stream, 1);
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("answer").expect("an item");
    assert_eq!(violated_fields(&first.expect_err("an error")), vec!["from_version"]);
    assert!(rx.recv().await.is_none(), "the error is the only item");

    let all = Target::All { after: Some(u64::MAX), filter: EventFilter::default() };
    let mut rx = subscriptions.subscribe(all, 1);
    let first = rx.recv().await.expect("an item");
    assert_eq!(violated_fields(&first.expect_err("an error")), vec!["from_position"]);
    assert!(rx.recv().await.is_none(), "the error is the only item");

    let bad = Target::Stream { stream_id: "$all".into(), after_version: None };
    assert_eq!(violated_fields(&bad.validate().expect_err("refused")), vec!["stream_id"]);
    let fine = Target::Stream { stream_id: "order-1".into(), after_version: Some(MAX_BIGINT) };
    assert!(fine.validate().is_ok());
}
