//! The relay against a real Kafka-protocol broker (tansu), PostgreSQL and
//! the Schema Registry stand-in, cut off from the broker while it
//! produces: it still puts every stored event on Kafka at least once, in
//! per-stream order, in the Confluent wire format with the registry's ids.
//! (The crash at the acknowledgement is in `crash.rs`.)

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use eventfold_platform::runtime::{CancellationToken, supervise};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_recovers_by_itself_from_a_broker_outage_while_it_produces() {
    let setup = common::setup().await;
    let relay = setup.relay().await;
    let stats = relay.stats();
    let probe = setup.relay().await;
    // As the process runs it: under the supervisor, which runs it again
    // after a failure.
    let stop = CancellationToken::new();
    let backoff = setup.config().backoff();
    let running = tokio::spawn(supervise("relay", stop.clone(), backoff, move |token| relay.clone().run(token)));

    // Orders are written without a break, before, during and after the
    // outage.
    let writing = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (log, writing, written) = (setup.log.clone(), writing.clone(), written.clone());
        async move {
            let mut o = 0;
            while writing.load(Ordering::Relaxed) {
                common::write_order(log.clone(), o).await;
                o += 1;
                written.store(o, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // The relay is producing: batches acknowledged, and more coming. (100
    // events: the streams of 50 orders, on every partition, so that the
    // relay has a client for each and its next request is a produce.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.events.load(Ordering::Relaxed) < 100 {
        assert!(tokio::time::Instant::now() < deadline, "the relay never produced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed_before = stats.failed_produces.load(Ordering::Relaxed);
    let written_at_pause = written.load(Ordering::Relaxed);
    setup.broker.pause();
    // An acknowledgement already on its way may still land; after that,
    // with the broker frozen, nothing can be acknowledged, so the
    // checkpoint must stand still while the appends go on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frozen_at = probe.position().await.unwrap();
    let mut max_lag = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let position = probe.position().await.unwrap();
        assert_eq!(position, frozen_at, "the checkpoint moved while the broker could acknowledge nothing");
        max_lag = max_lag.max(setup.log.last_position().await.unwrap().saturating_sub(position));
    }
    let written_in_pause = written.load(Ordering::Relaxed) - written_at_pause;
    let failed_in_pause = stats.failed_produces.load(Ordering::Relaxed) - failed_before;
    let batches_at_resume = stats.batches.load(Ordering::Relaxed);
    setup.broker.resume();

    // The outage overlapped produce traffic: orders were written during
    // it, the relay fell behind, and produce requests sent to the frozen
    // broker failed (timed out) rather than being taken as sent.
    assert!(written_in_pause >= 10, "only {written_in_pause} orders written during the 6 s outage");
    assert!(max_lag > 0, "the relay had nothing to send during the outage");
    assert!(failed_in_pause >= 1, "no produce request was in flight while the broker was frozen");

    // Appends go on after the outage, then stop; the relay catches up
    // without help.
    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    let (position, head) = setup.wait_caught_up(Duration::from_secs(60)).await;
    assert_eq!(position, head, "caught up without help; broker log:\n{}", setup.broker.log());
    assert!(
        stats.batches.load(Ordering::Relaxed) > batches_at_resume,
        "the same relay produced again after the outage"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running).await.expect("stops").unwrap();
    let duplicates = common::assert_delivered(&setup).await;
    eprintln!(
        "outage: {written_in_pause} orders written and {failed_in_pause} produce requests failed during it, \
         lag up to {max_lag} positions, {duplicates} duplicates"
    );
}
