//! The relay crashed at the instant that matters: the broker acknowledged
//! a batch, the checkpoint is not yet committed (failpoint
//! `relay::after_ack`). Its own test binary: the failpoint registry is
//! process-wide, and the relays of other tests pass through that point.

mod common;

use std::time::Duration;

use eventfold_platform::runtime::{CancellationToken, supervise};
use eventfold_store::failpoint;

const AFTER_ACK: &str = "relay::after_ack";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_producing_and_checkpointing_loses_nothing_and_keeps_stream_order() {
    let setup = common::setup().await;
    let relay = setup.relay().await;
    let stats = relay.stats();
    // As the process runs it: under the supervisor, which restarts it
    // after a panic (the in-process crash) from its checkpoint.
    let stop = CancellationToken::new();
    let running =
        tokio::spawn(supervise("relay", stop.clone(), setup.config().backoff(), move |token| relay.clone().run(token)));
    let writer = tokio::spawn(common::write_orders(setup.log.clone(), 0, 300, Duration::from_millis(10)));

    // Five crashes while orders are written, each exactly after a
    // broker's acknowledgement and before the checkpoint commit.
    const CRASHES: u64 = 5;
    for crash in 1..=CRASHES {
        let armed = failpoint::arm(AFTER_ACK, "1*panic");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while failpoint::fired(AFTER_ACK) < crash {
            assert!(tokio::time::Instant::now() < deadline, "crash {crash}: the relay never reached {AFTER_ACK}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(armed);
        // Let the restarted relay send a batch or two before the next crash.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(!writer.is_finished(), "the crashes came while orders were being written");
    writer.await.unwrap();

    let (position, head) = setup.wait_caught_up(Duration::from_secs(60)).await;
    assert_eq!(position, head, "the supervised relay caught up after its crashes; broker log:\n{}", setup.broker.log());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running).await.expect("stops").unwrap();

    // The window was hit: each crash came after an acknowledged produce.
    assert_eq!(failpoint::fired(AFTER_ACK), CRASHES, "every armed crash fired");
    assert!(failpoint::hits(AFTER_ACK) > CRASHES, "the relay acknowledged batches after its crashes too");
    let duplicates = common::assert_delivered(&setup).await;
    // A crash after the acknowledgement sends its batch again: at least
    // one duplicate per crash, else the crash did not land in the window.
    assert!(
        duplicates as u64 >= CRASHES,
        "{duplicates} duplicates on Kafka for {CRASHES} crashes after the acknowledgement"
    );
    eprintln!(
        "crash: {} crashes at {AFTER_ACK} in {} hits, {duplicates} duplicates, {} batches acknowledged",
        failpoint::fired(AFTER_ACK),
        failpoint::hits(AFTER_ACK),
        stats.batches.load(std::sync::atomic::Ordering::Relaxed)
    );
}
