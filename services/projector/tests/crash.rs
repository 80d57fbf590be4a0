//! Crashes at the instant that matters: the failpoint
//! `projector::after_apply` panics a supervised projector after a batch was
//! applied and its checkpoint moved inside the transaction, before the
//! commit. The supervisor starts it again from the committed checkpoint;
//! in the end every event is applied exactly once.
//!
//! The failpoint registry is process-wide: the tests of this binary are
//! the only ones that arm it, and they run one at a time.

mod common;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use eventfold_platform::runtime::{Backoff, CancellationToken, supervise};
use eventfold_projector::{Attach, OrderViews, Projection, Projector, run_active, status};
use eventfold_store::{Database, EventLog, failpoint};

use crate::common::{Tally, append_counted, log_positions, options, setup, wait_until_at, write_orders};

const AFTER_APPLY: &str = "projector::after_apply";

/// One test at a time: they arm the same failpoint.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the active version of `projection` under the platform's
/// supervisor (as `serve projector` does); counts its runs.
fn supervised(
    database: &Database,
    log: &Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    token: &CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    let task = tokio::spawn({
        let (database, log, runs) = (database.clone(), log.clone(), runs.clone());
        supervise(projection.name(), token.clone(), backoff, move |token| {
            runs.fetch_add(1, Ordering::SeqCst);
            run_active(
                database.clone(),
                log.clone(),
                projection.clone(),
                options(),
                Attach::default(),
                Duration::from_millis(50),
                token,
            )
        })
    });
    (task, runs)
}

/// Writes with `write` (the events numbered from its first argument, 20
/// at a time) until at least `at_least` are written and `enough` is
/// cancelled. Returns how many it wrote.
fn keep_writing<F, Fut>(at_least: usize, enough: CancellationToken, write: F) -> tokio::task::JoinHandle<usize>
where
    F: Fn(usize, usize) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut written = 0;
        while written < at_least || !enough.is_cancelled() {
            write(written, 20).await;
            written += 20;
        }
        written
    })
}

/// Arms `projector::after_apply` for one panic at a time, again and again,
/// until it fired `crashes` times; between two crashes the projector
/// commits a few batches. Returns how often it fired.
async fn crash_after_apply(crashes: u64) -> u64 {
    let start = failpoint::fired(AFTER_APPLY);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fired = failpoint::fired(AFTER_APPLY) - start;
        if fired >= crashes {
            return fired;
        }
        assert!(Instant::now() < deadline, "the failpoint fired only {fired} of {crashes} times within 60 s");
        let armed = failpoint::arm(AFTER_APPLY, "1*panic");
        while failpoint::fired(AFTER_APPLY) - start == fired && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(armed);
        // Some batches commit before the next crash.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

/// Tally writes a row per application into a table without a key: each
/// crash after the apply and before the commit must undo the batch and
/// its checkpoint together, so that the next run applies it once more and
/// only once. Every event of the log shows as exactly one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_apply_before_commit_neither_loses_nor_double_applies_an_event() {
    const CRASHES: u64 = 8;
    let _serial = SERIAL.lock().await;
    let (_db, database, log, client) = setup().await;
    let token = CancellationToken::new();
    let (supervisor, runs) = supervised(&database, &log, Arc::new(Tally), &token);
    let enough = CancellationToken::new();
    let writer = keep_writing(200, enough.clone(), {
        let log = log.clone();
        move |from, count| append_counted(log.clone(), from, count)
    });

    let hits_before = failpoint::hits(AFTER_APPLY);
    let fired = crash_after_apply(CRASHES).await;
    enough.cancel();
    let events = writer.await.expect("writer");
    assert!(fired >= CRASHES, "the window was hit {fired} times");

    let logged = log_positions(&log).await;
    assert_eq!(logged.len(), events, "each append is in the log once");
    let probe = Projector::new(database.clone(), log.clone(), Arc::new(Tally), 1, options());
    wait_until_at(&probe, *logged.last().expect("events") as u64).await;
    // What a crash rolled back was applied by a later run.
    let started = runs.load(Ordering::SeqCst);
    assert!(
        u64::from(started) > fired,
        "each crash failed the run and the supervisor started it again ({started} runs, {fired} crashes)"
    );
    assert!(
        failpoint::hits(AFTER_APPLY) - hits_before > fired,
        "batches also went through the failpoint without a crash and committed"
    );
    let applied: Vec<i64> = eventfold_tests::select(
        &client,
        "SELECT global_position FROM read.tally_v1 ORDER BY global_position",
        &[],
        |r| r.get(0),
    )
    .await;
    assert_eq!(applied.len(), logged.len(), "as many applications as events (none twice, none lost)");
    assert_eq!(applied, logged, "every event of the log applied exactly once");
    let tally: Vec<(u64, u64)> = status(&database)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "tally")
        .map(|s| (s.events_applied, s.parked))
        .collect();
    assert_eq!(tally, [(events as u64, 0)], "counted once each, none parked");

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), supervisor).await.expect("stops when cancelled").unwrap();
}

/// The order views (set-based batches) crashed after the apply while
/// orders are written: afterwards they equal a rebuild of the log, row for
/// row, and both versions counted the same events, none parked (an order
/// created twice would be parked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_views_crashed_after_apply_before_commit_equal_a_rebuild() {
    const CRASHES: u64 = 6;
    let _serial = SERIAL.lock().await;
    let (_db, database, log, client) = setup().await;
    let token = CancellationToken::new();
    let (supervisor, runs) = supervised(&database, &log, Arc::new(OrderViews), &token);
    let enough = CancellationToken::new();
    let writer = keep_writing(100, enough.clone(), {
        let log = log.clone();
        move |from, count| write_orders(log.clone(), from, count)
    });

    let fired = crash_after_apply(CRASHES).await;
    enough.cancel();
    let orders = writer.await.expect("writer");
    assert!(fired >= CRASHES, "the window was hit {fired} times");
    let logged = log_positions(&log).await;
    let head = *logged.last().expect("events") as u64;
    let events = logged.len() as u64;
    let v1 = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 1, options());
    wait_until_at(&v1, head).await;
    assert!(u64::from(runs.load(Ordering::SeqCst)) > fired, "the supervisor started it again after each crash");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), supervisor).await.expect("stops when cancelled").unwrap();

    let rebuild = Projector::new(database.clone(), log.clone(), Arc::new(OrderViews), 2, options());
    rebuild.prepare().await.unwrap();
    while rebuild.step().await.unwrap() > 0 {}
    let counted: Vec<(u32, u64, u64)> = status(&database)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "order_views")
        .map(|s| (s.version, s.events_applied, s.parked))
        .collect();
    assert_eq!(counted, [(1, events, 0), (2, events, 0)], "every event applied exactly once, none parked");
    let survived = eventfold_tests::table_rows(&client, "read.order_views_v1", "order_id").await;
    assert_eq!(survived.len(), orders, "one row per order");
    assert_eq!(
        survived,
        eventfold_tests::table_rows(&client, "read.order_views_v2", "order_id").await,
        "after the crashes, the read model equals a rebuild, row for row"
    );
}
