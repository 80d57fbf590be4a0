//! SIGTERM to `eventfold dev --database-url …` while 16 clients append and a
//! Subscribe stream is open: the process stops accepting, ends the stream,
//! drains within the grace period and exits 0, no task panics, and every
//! append it acknowledged is in the log afterwards.

mod common;

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use eventfold_proto::eventstore::{self as pb, event_store_service_client::EventStoreServiceClient};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, StreamRead};
use eventfold_tests::channel;

use crate::common::{DevServer, wait_timeout};

const CLIENTS: usize = 16;
/// `eventstore.shutdown_grace_secs` of the test's process.
const GRACE_SECS: u64 = 5;

#[test]
fn sigterm_drains_exits_zero_and_loses_no_acknowledged_append() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let mut server = DevServer::start_env(
        &["--database-url", db.url()],
        &[("EVENTFOLD_EVENTSTORE__SHUTDOWN_GRACE_SECS", "5"), ("EVENTFOLD_ADMIN__LISTEN", "127.0.0.1:0")],
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let pid = server.process.child.id();

    // What the server acknowledged: stream → its acknowledged event ids.
    let acked: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let (subscription_ended, refused_after_stop) = runtime.block_on(async {
        let mut subscriber = EventStoreServiceClient::new(channel(&server.addr).await);
        let mut live = subscriber
            .subscribe(pb::SubscribeRequest { from_position: 0, ..Default::default() })
            .await
            .expect("subscribe")
            .into_inner();
        let watcher = tokio::spawn(async move {
            let mut received = 0usize;
            loop {
                match live.message().await {
                    Ok(Some(_)) => received += 1,
                    // Ended by the server (OK or UNAVAILABLE while stopping).
                    Ok(None) | Err(_) => return received,
                }
            }
        });

        let mut appenders = Vec::new();
        for client in 0..CLIENTS {
            let addr = server.addr.clone();
            let acked = acked.clone();
            appenders.push(tokio::spawn(async move {
                let mut store = EventStoreServiceClient::new(channel(&addr).await);
                let stream = format!("shutdown-{client}");
                let mut refused = 0usize;
                for n in 0.. {
                    let event_id = uuid::Uuid::now_v7().to_string();
                    let append = pb::AppendRequest {
                        stream_id: stream.clone(),
                        events: vec![pb::ProposedEvent {
                            event_id: event_id.clone(),
                            event_type: "Appended".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    match tokio::time::timeout(Duration::from_secs(10), store.append(append)).await {
                        Ok(Ok(_)) => acked.lock().unwrap().entry(stream.clone()).or_default().push(event_id),
                        // Refused or cut off while stopping: not acknowledged.
                        Ok(Err(_)) | Err(_) => {
                            refused += 1;
                            if refused >= 3 {
                                return (n, refused);
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                unreachable!("the loop ends with the server")
            }));
        }

        // Let the appends run, then stop the process in the middle of them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = acked.lock().unwrap().values().map(Vec::len).sum::<usize>();
        assert!(before >= CLIENTS, "appends were running before SIGTERM (acknowledged: {before})");
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");

        let mut refused = 0;
        for appender in appenders {
            let (_, r) = appender.await.expect("appender");
            refused += r;
        }
        let received = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 10), watcher)
            .await
            .expect("the Subscribe stream ends when the process stops")
            .expect("watcher");
        (received, refused)
    });
    let stopped_at = Instant::now();
    let exit = wait_timeout(&mut server.process.child, Duration::from_secs(GRACE_SECS + 10))
        .expect("the process exits within the grace period");
    let stderr = server.process.stderr.lock().unwrap().clone();
    assert!(exit.success(), "exit status {exit:?}; stderr:\n{stderr}");
    assert!(stopped_at.elapsed() <= Duration::from_secs(GRACE_SECS + 10));
    assert!(!stderr.contains("panicked"), "a task panicked:\n{stderr}");
    assert!(stderr.contains("shutdown requested"), "the signal was seen:\n{stderr}");
    assert!(subscription_ended > 0, "the subscriber saw events before the stream ended");
    assert!(refused_after_stop >= CLIENTS, "every appender was refused once the process stopped");

    // After the process: every acknowledged append is in the log.
    runtime.block_on(async {
        let log = PostgresEventLog::connect(Database::from_url(db.url()).expect("url"), PostgresConfig::default())
            .await
            .expect("connect the log");
        let acked = acked.lock().unwrap().clone();
        let total: usize = acked.values().map(Vec::len).sum();
        assert!(total > CLIENTS, "appends were acknowledged ({total})");
        for (stream, ids) in &acked {
            let slice = log.read_stream(StreamRead::forwards(stream.clone(), 10_000)).await.expect("read the stream");
            let stored: Vec<String> = slice.events.iter().map(|e| e.event_id.to_string()).collect();
            for id in ids {
                assert!(stored.contains(id), "acknowledged event {id} of {stream} is missing after the restart");
            }
        }
    });
}
