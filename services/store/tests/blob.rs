//! The Azure Blob Storage adapter on Azurite: the conformance suite, and
//! two writers (two logs, as two processes would have) racing on one log.

mod common;

use std::{collections::HashSet, sync::Arc};

use common::conformance::*;
use eventfold_store::{AllRead, BlobConfig, BlobEventLog, Error, EventLog, ExpectedVersion, StreamRead};
use eventfold_tests::azurite::TestContainer;

async fn open(container: &TestContainer, prefix: &str) -> BlobEventLog {
    let config = BlobConfig::new(container.connection_string(), container.name(), prefix);
    BlobEventLog::open(config).await.expect("open a blob log on Azurite")
}

conformance!(blob, || async {
    let container = TestContainer::create();
    let log: Arc<dyn EventLog> = Arc::new(open(&container, "log").await);
    let guard: Box<dyn std::any::Any + Send> = Box::new(container);
    (guard, log)
});

/// Two writers race for the same commits: with exact expected versions
/// exactly one append of each round wins; with `Any` every append lands,
/// each at offsets of its own, and both writers read the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_never_both_win_the_same_offset() {
    let container = TestContainer::create();
    let (a, b) = (Arc::new(open(&container, "topic").await), Arc::new(open(&container, "topic").await));

    // Exact expected versions: one winner per version.
    let mut wins = 0;
    for version in 0..10u64 {
        let expected = version.checked_sub(1).map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let race = |log: Arc<BlobEventLog>, n: u64| async move {
            log.append(append("contested", expected, vec![event("Raced", n)])).await
        };
        let (left, right) = tokio::join!(race(a.clone(), version * 2), race(b.clone(), version * 2 + 1));
        let outcomes = [&left, &right];
        let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {version}: exactly one writer wins: {left:?} / {right:?}");
        assert_eq!(won[0].first_version, version);
        let lost = outcomes.iter().find_map(|o| o.as_ref().err()).expect("a loser");
        assert!(matches!(lost, Error::WrongExpectedVersion { .. }), "the loser hears why: {lost:?}");
        wins += 1;
    }
    assert_eq!(wins, 10);

    // `Any`: 2 × 20 appends race; all land, no offset twice.
    let writer = |log: Arc<BlobEventLog>, name: &'static str| async move {
        let mut positions = Vec::new();
        for n in 0..20 {
            let outcome = log.append(append("free", ExpectedVersion::Any, vec![event(name, n)])).await.expect("append");
            positions.extend(outcome.positions);
        }
        positions
    };
    let (left, right) = tokio::join!(writer(a.clone(), "A"), writer(b.clone(), "B"));
    let all: HashSet<u64> = left.iter().chain(&right).copied().collect();
    assert_eq!(all.len(), 40, "40 appends, 40 offsets: {left:?} / {right:?}");

    // Both writers see one log: same events at the same offsets, versions
    // without gap, an intact chain.
    let read = |log: Arc<BlobEventLog>| async move {
        log.read_all(AllRead { after: 0, max_count: 1000, filter: Default::default() }).await.expect("read all").events
    };
    let (seen_a, seen_b) = tokio::join!(read(a.clone()), read(b.clone()));
    assert_eq!(seen_a, seen_b);
    assert_eq!(seen_a.len(), 50);
    let stream = a.read_stream(StreamRead::forwards("free", 100)).await.expect("read");
    assert_eq!(stream.events.iter().map(|e| e.version).collect::<Vec<_>>(), (0..40).collect::<Vec<_>>());
    assert!(b.verify_stream("free").await.expect("verify").is_valid());
    assert!(a.verify_stream("contested").await.expect("verify").is_valid());
}

/// A missing container is a clear error at open, not an empty log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_container_is_refused_at_open() {
    let container = TestContainer::create();
    let config = BlobConfig::new(container.connection_string(), "no-such-container", "log");
    let refused = BlobEventLog::open(config).await.expect_err("refused");
    assert!(matches!(&refused, Error::Unavailable(m) if m.contains("listing the container")), "{refused}");
    assert!(!refused.to_string().contains("Eby8vdM02"), "no key in the error: {refused}");
}
