//! Black-box crash tests: the real `eventfold` binary (a test build, so it
//! has failpoints) is started with a failpoint armed through `FAILPOINTS`
//! (`NAME=pause`), the test waits for its `failpoint NAME paused` line on
//! stderr — the proof that the process stands at exactly the critical
//! instant — and kills it with SIGKILL there. The binary is then started
//! again on the same database without failpoints, and the test checks
//! that no acknowledged write was lost and that no effect happened twice.

mod common;

use std::{
    collections::BTreeMap,
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money,
    order::{CancelOrder, ConfirmOrder, OrderCommand, OrderItem},
};
use eventfold_proto::eventstore::{self as pb, event_store_service_client::EventStoreServiceClient};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use eventfold_tests::{
    TestDatabase, channel,
    orders::{self, eur},
};
use tokio::runtime::Runtime;
use tower::ServiceExt;

use crate::common::{DevServer, Guard, spawn_process};

/// The first stdout line of `eventfold dev` on PostgreSQL.
const DEV_ON_POSTGRES: &str = "eventfold: EventStoreService and the command and query services listening on ";
/// How long a test waits for an armed failpoint to be reached.
const PAUSE_WAIT: Duration = Duration::from_secs(20);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// `failpoint NAME paused`, as the binary prints it.
fn paused_line(failpoint: &str) -> String {
    format!("failpoint {failpoint} paused")
}

/// `eventfold dev --database-url` on `db` with `FAILPOINTS=failpoints` and
/// `env`.
fn dev(db: &TestDatabase, failpoints: &str, env: &[(&str, &str)]) -> DevServer {
    let mut all = vec![(eventfold_store::failpoint::ENV, failpoints)];
    all.extend_from_slice(env);
    let server = DevServer::start_env(&["--database-url", db.url()], &all, DEV_ON_POSTGRES);
    assert!(eventfold_store::failpoint::compiled_in(), "the binary under test is a test build, with failpoints");
    server
}

/// Waits for the paused line of `failpoint`; panics with the process's
/// stderr when it does not come.
fn wait_paused(process: &mut Guard, failpoint: &str) {
    let line = paused_line(failpoint);
    if !process.wait_for_stderr(&line, PAUSE_WAIT) {
        panic!(
            "no {line:?} within {PAUSE_WAIT:?}: the crash would not be at the critical instant; stderr:\n{}",
            process.stderr.lock().unwrap()
        );
    }
}

/// `eventfold serve SERVICE --database-url` on `db` (a worker: its first
/// line starts `eventfold: `) with `FAILPOINTS=failpoints` and `env`.
fn serve(service: &str, db: &TestDatabase, failpoints: &str, env: &[(&str, &str)]) -> Guard {
    let mut all = vec![(eventfold_store::failpoint::ENV, failpoints)];
    all.extend_from_slice(env);
    spawn_process(&["serve", service], &["--database-url", db.url()], &all, "eventfold: ").0
}

/// The event log of `db`, in this process, as the services read it.
async fn open_log(db: &TestDatabase) -> Arc<dyn EventLog> {
    let database = Database::from_url(db.url()).expect("a PostgreSQL URL");
    let store = PostgresEventLog::connect(database, PostgresConfig::default()).await.expect("connect the log");
    Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()))
}

async fn connect(db: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Orders `o-N` for N in `range` through the real command bus: created
/// (customer `c-{N % 3}`, one item of `sku-{N % 5}` at 2.50), then
/// cancelled when N is a multiple of 3, else confirmed.
async fn write_orders(log: &Arc<dyn EventLog>, range: Range<usize>) {
    let bus = eventfold_command::bus(log.clone(), eventfold_command::BusOptions::default());
    for o in range {
        let order_id = format!("o-{o}");
        let send = |command: OrderCommand| {
            let envelope = Envelope::new(Command::Order { order_id: order_id.clone(), command }, Meta::default());
            bus.clone().oneshot(envelope)
        };
        let items =
            vec![OrderItem { product_id: format!("sku-{}", o % 5), quantity: 1, unit_price: Money::new(250, eur()) }];
        send(orders::created(&order_id, &format!("c-{}", o % 3), items).into()).await.expect("CreateOrder");
        let next: OrderCommand =
            if o % 3 == 0 { CancelOrder { reason: "changed mind".into() }.into() } else { ConfirmOrder.into() };
        send(next).await.expect("ConfirmOrder or CancelOrder");
    }
}

// ---------------------------------------------------------------------------
// store::after_commit
// ---------------------------------------------------------------------------

/// A raw append of events typed `{prefix}0`, `{prefix}1`, … (event ids
/// left to the server: a retry draws new ones) with `request_id`.
fn probe_append(stream: &str, prefix: &str, events: usize, request_id: &str) -> pb::AppendRequest {
    pb::AppendRequest {
        stream_id: stream.to_owned(),
        events: (0..events)
            .map(|i| pb::ProposedEvent { event_type: format!("{prefix}{i}"), ..Default::default() })
            .collect(),
        request_id: request_id.to_owned(),
        ..Default::default()
    }
}

/// Every event of `stream`: event type → the global positions it is
/// stored at.
async fn stored_by_type(addr: &str, stream: &str) -> BTreeMap<String, Vec<u64>> {
    let mut client = EventStoreServiceClient::new(channel(addr).await);
    let read = pb::ReadStreamRequest { stream_id: stream.to_owned(), max_count: 10_000, ..Default::default() };
    let slice = client.read_stream(read).await.expect("ReadStream").into_inner();
    assert!(slice.end_of_stream, "the whole stream in one page");
    let mut by_type: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for event in slice.events {
        by_type.entry(event.event_type).or_default().push(event.global_position);
    }
    by_type
}

/// Killed after the group commit's transaction committed and before the
/// appender was answered: the append is stored, its client saw only a
/// broken call. Retried with the same request id after the restart, it
/// answers the stored positions (a duplicate) and appends nothing; an
/// append queued behind it (never committed) is appended by its retry;
/// every append acknowledged before the crashes is still there.
#[test]
fn an_append_committed_but_unanswered_at_a_kill_is_answered_once_by_its_retry() {
    const FAILPOINT: &str = "store::after_commit";
    const STREAM: &str = "crash-store";
    let rt = runtime();
    let db = rt.block_on(TestDatabase::create());
    // One writer: the paused batch holds every later append back.
    let one_writer = [("EVENTFOLD_DATABASE__WRITERS", "1")];

    // 1. Acknowledged appends, then a plain SIGKILL.
    let mut server = dev(&db, "", &one_writer);
    let acknowledged: BTreeMap<String, u64> = rt.block_on(async {
        let mut client = EventStoreServiceClient::new(channel(&server.addr).await);
        let mut acknowledged = BTreeMap::new();
        for n in 0..10 {
            let answer = client
                .append(probe_append(STREAM, &format!("Acked{n}."), 1, &format!("acked-{n}")))
                .await
                .expect("an append before the crash")
                .into_inner();
            assert!(!answer.duplicate);
            acknowledged.insert(format!("Acked{n}.0"), answer.last_position);
        }
        acknowledged
    });
    server.process.sigkill();

    // 2. Armed: the next batch commits and the writer stops before
    // answering. `lost` is sent first and alone, so it is that batch;
    // `queued` waits behind the stopped writer.
    let mut server = dev(&db, &format!("{FAILPOINT}=pause"), &one_writer);
    let lost = probe_append(STREAM, "Lost", 3, "lost-1");
    let queued = probe_append(STREAM, "Queued", 2, "queued-1");
    let addr = server.addr.clone();
    let lost_call = {
        let (addr, lost) = (addr.clone(), lost.clone());
        rt.spawn(async move { EventStoreServiceClient::new(channel(&addr).await).append(lost).await })
    };
    wait_paused(&mut server.process, FAILPOINT);
    let queued_call = {
        let (addr, queued) = (addr.clone(), queued.clone());
        rt.spawn(async move { EventStoreServiceClient::new(channel(&addr).await).append(queued).await })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!lost_call.is_finished(), "the paused append is not answered");
    assert!(!queued_call.is_finished(), "the queued append is not answered");
    server.process.sigkill();
    let lost_answer = rt.block_on(lost_call).expect("the call's task");
    assert!(lost_answer.is_err(), "the client never got the answer of the committed append: {lost_answer:?}");
    let queued_answer = rt.block_on(queued_call).expect("the call's task");
    assert!(queued_answer.is_err(), "the queued append was not answered: {queued_answer:?}");

    // 3. Restarted without failpoints.
    let server = dev(&db, "", &one_writer);
    rt.block_on(async {
        let before = stored_by_type(&server.addr, STREAM).await;
        // The commit happened: the lost append's events are stored, the
        // queued one's are not.
        let lost_positions: Vec<u64> = (0..3)
            .map(|i| {
                let at = before.get(&format!("Lost{i}")).unwrap_or_else(|| panic!("Lost{i} committed: {before:?}"));
                assert_eq!(at.len(), 1, "Lost{i} stored once: {before:?}");
                at[0]
            })
            .collect();
        assert!(before.keys().all(|t| !t.starts_with("Queued")), "the queued append never committed: {before:?}");

        let mut client = EventStoreServiceClient::new(channel(&server.addr).await);
        let retried = client.append(lost).await.expect("the retry of the lost append").into_inner();
        assert!(retried.duplicate, "the retry is answered as a repeat: {retried:?}");
        assert_eq!(retried.positions, lost_positions, "the retry answers the first append's positions");
        let retried_queued = client.append(queued).await.expect("the retry of the queued append").into_inner();
        assert!(!retried_queued.duplicate, "the queued append is new: {retried_queued:?}");
        assert_eq!(retried_queued.positions.len(), 2);

        let after = stored_by_type(&server.addr, STREAM).await;
        for (event_type, position) in &acknowledged {
            assert_eq!(after.get(event_type), Some(&vec![*position]), "acknowledged {event_type} kept: {after:?}");
        }
        for (i, position) in lost_positions.iter().enumerate() {
            assert_eq!(after.get(&format!("Lost{i}")), Some(&vec![*position]), "Lost{i} once: {after:?}");
        }
        for (i, position) in retried_queued.positions.iter().enumerate() {
            assert_eq!(after.get(&format!("Queued{i}")), Some(&vec![*position]), "Queued{i} once: {after:?}");
        }
        assert_eq!(after.values().map(Vec::len).sum::<usize>(), 10 + 3 + 2, "nothing else: {after:?}");
    });
}

/// What one appender of the random-kill test saw: the positions of its
/// acknowledged appends (append `n` is event type `E{n}` with request id
/// `{stream}-{n}`), and the append in flight when the process died.
struct Appender {
    stream: String,
    acknowledged: Vec<u64>,
    in_flight: Option<usize>,
}

/// `eventfold dev` killed with SIGKILL at a random moment while 8 clients
/// append: after the restart each client retries its unanswered append
/// with the same request id; every stream then holds each append exactly
/// once, acknowledged ones at their acknowledged positions.
#[test]
fn appends_survive_a_kill_at_a_random_moment_and_their_retries_apply_once() {
    const CLIENTS: usize = 8;
    let rt = runtime();
    let db = rt.block_on(TestDatabase::create());
    let mut server = dev(&db, "", &[]);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let kill_after = Duration::from_millis(300 + u64::from(seed % 900));
    // Acknowledged appends of all clients: the kill's clock starts at the
    // first, so that the kill lands while appends flow, however long the
    // first connection takes on a loaded machine.
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let appenders: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = server.addr.clone();
            let acked = acked.clone();
            rt.spawn(async move {
                let stream = format!("rk-{c}");
                let mut client = EventStoreServiceClient::new(channel(&addr).await);
                let mut acknowledged = Vec::new();
                for n in 0.. {
                    let append = probe_append(&stream, &format!("E{n}."), 1, &format!("{stream}-{n}"));
                    match tokio::time::timeout(Duration::from_secs(10), client.append(append)).await {
                        Ok(Ok(answer)) => {
                            acknowledged.push(answer.into_inner().last_position);
                            acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(Err(_)) | Err(_) => return Appender { stream, acknowledged, in_flight: Some(n) },
                    }
                }
                unreachable!("the loop ends with the process")
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no append was acknowledged within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(kill_after);
    server.process.sigkill();
    let appenders: Vec<Appender> = appenders.into_iter().map(|task| rt.block_on(task).expect("an appender")).collect();
    let total: usize = appenders.iter().map(|a| a.acknowledged.len()).sum();
    assert!(total >= CLIENTS, "appends were acknowledged before the kill, {kill_after:?} after the first ({total})");

    let server = dev(&db, "", &[]);
    rt.block_on(async {
        let mut client = EventStoreServiceClient::new(channel(&server.addr).await);
        for appender in &appenders {
            let mut expected = appender.acknowledged.clone();
            if let Some(n) = appender.in_flight {
                let stream = &appender.stream;
                let retry = probe_append(stream, &format!("E{n}."), 1, &format!("{stream}-{n}"));
                let answer = client.append(retry).await.expect("the retry of the unanswered append").into_inner();
                expected.push(answer.last_position);
            }
            let stored = stored_by_type(&server.addr, &appender.stream).await;
            let expected: BTreeMap<String, Vec<u64>> =
                expected.iter().enumerate().map(|(n, p)| (format!("E{n}.0"), vec![*p])).collect();
            assert_eq!(
                stored, expected,
                "{}: each append once, at its acknowledged position (killed after {kill_after:?})",
                appender.stream
            );
        }
    });
}

// ---------------------------------------------------------------------------
// projector::after_apply
// ---------------------------------------------------------------------------

/// The checkpoint of the active version of every projection.
async fn checkpoints(client: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    let rows = client
        .query(
            "SELECT c.name, c.position FROM projections.checkpoints c \
             JOIN projections.active a ON a.name = c.name AND a.version = c.version",
            &[],
        )
        .await
        .expect("read the checkpoints");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Waits until every projection's active checkpoint reached `head`.
async fn wait_caught_up(client: &tokio_postgres::Client, head: u64, process: &Guard) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let at = checkpoints(client).await;
        if !at.is_empty() && at.values().all(|p| u64::try_from(*p).unwrap() >= head) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the projectors did not reach {head} within 20 s: {at:?}; stderr:\n{}",
            process.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `eventfold serve projector` killed with a batch applied inside its
/// transaction, checkpoint moved, not committed: after the restart every
/// read model catches up and holds each event once — no event parked,
/// the order analytics' counters equal the orders, and every table equals
/// what `eventfold projections rebuild` builds from the log.
#[test]
fn a_projector_killed_before_its_commit_applies_the_batch_once_after_the_restart() {
    const FAILPOINT: &str = "projector::after_apply";
    const ORDERS: usize = 40;
    let rt = runtime();
    let db = rt.block_on(TestDatabase::migrated());
    let (log, client) = rt.block_on(async { (open_log(&db).await, connect(&db).await) });
    // Batches of 5: the kill leaves most of the log to apply.
    let small_batches = [("EVENTFOLD_PROJECTOR__BATCH_SIZE", "5")];

    // 1. Half the orders, applied and committed, then a plain SIGKILL.
    rt.block_on(write_orders(&log, 0..ORDERS / 2));
    let mut projector = serve("projector", &db, "", &small_batches);
    let first_head = rt.block_on(async {
        let head = log.last_position().await.expect("head");
        wait_caught_up(&client, head, &projector).await;
        head
    });
    projector.sigkill();

    // 2. The other half; the armed projectors stop each inside its first
    // batch's transaction, and are killed there.
    rt.block_on(write_orders(&log, ORDERS / 2..ORDERS));
    let head = rt.block_on(log.last_position()).expect("head");
    let mut projector = serve("projector", &db, &format!("{FAILPOINT}=pause"), &small_batches);
    wait_paused(&mut projector, FAILPOINT);
    projector.sigkill();
    let at_kill = rt.block_on(checkpoints(&client));
    assert!(
        at_kill.values().all(|p| u64::try_from(*p).unwrap() == first_head),
        "nothing of the paused batches committed (every checkpoint at {first_head}): {at_kill:?}"
    );

    // 3. Restarted without failpoints: caught up, each event once.
    let mut projector = serve("projector", &db, "", &small_batches);
    rt.block_on(wait_caught_up(&client, head, &projector));
    projector.sigkill();
    rt.block_on(async {
        let parked: i64 = client.query_one("SELECT count(*) FROM projections.parked", &[]).await.unwrap().get(0);
        assert_eq!(parked, 0, "no event was applied twice (a second OrderCreated or status change would park)");
        let cancelled = (0..ORDERS).filter(|o| o % 3 == 0).count();
        let row = client
            .query_one("SELECT sum(order_count)::bigint, sum(cancelled_count)::bigint FROM read.customer_orders", &[])
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (ORDERS as i64, cancelled as i64));
        let row = client
            .query_one("SELECT sum(orders_created)::bigint, sum(orders_cancelled)::bigint FROM read.daily_sales", &[])
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (ORDERS as i64, cancelled as i64));
        let row = client
            .query_one("SELECT count(*), count(*) FILTER (WHERE status = 'cancelled') FROM read.order_views", &[])
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (ORDERS as i64, cancelled as i64));
    });

    // The same as a rebuild from the log gives, table for table.
    for (projection, tables) in [
        ("order_analytics", &["order_facts", "customer_orders", "daily_sales", "daily_status", "product_sales"][..]),
        ("order_views", &["order_views"][..]),
    ] {
        let out = eventfold_rebuild(&db, projection);
        rt.block_on(async {
            for table in tables {
                let live = eventfold_tests::table_rows(&client, &format!("read.{table}_v1"), "1").await;
                let rebuilt = eventfold_tests::table_rows(&client, &format!("read.{table}_v2"), "1").await;
                assert!(!live.is_empty(), "{table} has rows");
                assert_eq!(live, rebuilt, "{table} equals its rebuild ({out})");
            }
        });
    }
}

/// `eventfold projections --database-url … rebuild NAME`; its output.
fn eventfold_rebuild(db: &TestDatabase, projection: &str) -> String {
    let output = common::eventfold()
        .args(["projections", "--database-url", db.url(), "rebuild", projection])
        .output()
        .expect("run eventfold projections rebuild");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "eventfold projections rebuild {projection} failed:\n{text}");
    text
}

// ---------------------------------------------------------------------------
// relay::after_ack
// ---------------------------------------------------------------------------

/// The event id of every record of `topic` on `broker`, over all its
/// partitions.
async fn delivered_ids(bootstrap: &str, topic: &str) -> Vec<String> {
    use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};
    let client = ClientBuilder::new(vec![bootstrap.to_owned()]).build().await.expect("a Kafka client");
    let Some(listed) = client.list_topics().await.expect("list topics").into_iter().find(|t| t.name == topic) else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for partition in listed.partitions {
        let pc = client.partition_client(topic, partition, UnknownTopicHandling::Retry).await.expect("partition");
        let mut offset = 0;
        loop {
            let (records, high_watermark) = pc.fetch_records(offset, 1..1_000_000, 100).await.expect("fetch");
            let from = offset;
            for r in records.into_iter().filter(|r| r.offset >= from) {
                offset = r.offset + 1;
                ids.push(String::from_utf8(r.record.headers["event_id"].clone()).expect("an event id"));
            }
            if offset >= high_watermark {
                break;
            }
        }
    }
    ids
}

/// `eventfold serve relay` killed after the broker acknowledged a batch
/// and before its checkpoint committed: the acknowledged records are on
/// Kafka with no checkpoint; after the restart every stored event is on
/// Kafka, the killed batch twice (at-least-once: duplicates, nothing lost).
#[test]
fn a_relay_killed_between_the_ack_and_the_checkpoint_loses_nothing_and_sends_the_batch_again() {
    const FAILPOINT: &str = "relay::after_ack";
    const TOPIC: &str = "eventfold.orders.v1";
    let rt = runtime();
    let db = rt.block_on(TestDatabase::migrated());
    let broker = eventfold_tests::kafka::Broker::start();
    let (log, client, registry) =
        rt.block_on(async { (open_log(&db).await, connect(&db).await, common::registry_with_catalog().await) });
    rt.block_on(write_orders(&log, 0..30));
    let stored: Vec<String> = rt.block_on(async {
        let read =
            eventfold_store::AllRead { after: 0, max_count: 1000, filter: eventfold_store::EventFilter::default() };
        log.read_all(read).await.expect("read the log").events.iter().map(|e| e.event_id.to_string()).collect()
    });
    assert_eq!(stored.len(), 60);
    let head = rt.block_on(log.last_position()).expect("head");
    let brokers = format!("[\"{}\"]", broker.bootstrap());
    let registry_url = registry.url();
    let env = [
        ("EVENTFOLD_RELAY__BROKERS", brokers.as_str()),
        ("EVENTFOLD_REGISTRY__URL", registry_url.as_str()),
        ("EVENTFOLD_RELAY__BATCH_SIZE", "25"),
        ("EVENTFOLD_RELAY__REQUEST_TIMEOUT_MS", "2000"),
        ("EVENTFOLD_RELAY__MAX_BACKOFF_MS", "500"),
    ];

    let mut relay = serve("relay", &db, &format!("{FAILPOINT}=pause"), &env);
    wait_paused(&mut relay, FAILPOINT);
    relay.sigkill();
    let checkpoint = rt.block_on(async {
        let row = client
            .query_opt("SELECT position FROM bus.relay_checkpoints", &[])
            .await
            .expect("read the relay checkpoint");
        row.map_or(0, |r| r.get::<_, i64>(0))
    });
    assert_eq!(checkpoint, 0, "the acknowledged batch's checkpoint never committed");
    let acknowledged = rt.block_on(delivered_ids(&broker.bootstrap(), TOPIC));
    assert_eq!(acknowledged.len(), 25, "the first batch was acknowledged before the kill: {acknowledged:?}");

    let mut relay = serve("relay", &db, "", &env);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row = client.query_opt("SELECT position FROM bus.relay_checkpoints", &[]).await.expect("checkpoint");
            if row.is_some_and(|r| u64::try_from(r.get::<_, i64>(0)).unwrap() >= head) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not reach {head} within 20 s; stderr:\n{}",
                relay.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    relay.sigkill();
    let delivered = rt.block_on(delivered_ids(&broker.bootstrap(), TOPIC));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &delivered {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in &stored {
        assert!(counts.contains_key(id.as_str()), "stored event {id} is on Kafka");
    }
    assert_eq!(counts.len(), stored.len(), "nothing but the stored events is on Kafka");
    let duplicates = delivered.len() - stored.len();
    assert!(duplicates > 0, "the batch acknowledged before the kill was sent again");
    assert_eq!(duplicates, acknowledged.len(), "exactly the killed batch is on Kafka twice");
    for id in &acknowledged {
        assert_eq!(counts[id.as_str()], 2, "{id} of the killed batch: twice");
    }
    drop(registry);
}

// ---------------------------------------------------------------------------
// saga::after_call
// ---------------------------------------------------------------------------

/// How often each event type is in the log.
async fn event_types(log: &Arc<dyn EventLog>) -> BTreeMap<String, usize> {
    let read = eventfold_store::AllRead { after: 0, max_count: 1000, filter: eventfold_store::EventFilter::default() };
    let mut types = BTreeMap::new();
    for event in log.read_all(read).await.expect("read the log").events {
        *types.entry(event.event_type).or_default() += 1;
    }
    types
}

/// `eventfold dev` killed after a saga step's call (the inventory
/// reservation, through the command side) returned and before its result
/// was saved: the effect is in the log, the saga does not know it. After
/// the restart the step runs again with the same idempotency key, the saga
/// completes once, and no effect is in the log twice.
#[test]
fn a_saga_killed_between_a_call_and_its_save_completes_once_with_each_effect_once() {
    const FAILPOINT: &str = "saga::after_call";
    let rt = runtime();
    let db = rt.block_on(TestDatabase::create());
    let mut server = dev(&db, &format!("{FAILPOINT}=pause"), &[]);
    let inventory = "eventfold.inventory.v1.InventoryCommandService";
    server.call(&format!("{inventory}/RegisterProduct"), &serde_json::json!({"productId": "sku-s", "name": "Kettle"}));
    server.call(&format!("{inventory}/ReplenishStock"), &serde_json::json!({"productId": "sku-s", "quantity": 5}));
    let create = serde_json::json!({
        "orderId": "s-1", "customerId": "c-1", "currency": "EUR", "paymentToken": "tok_visa", "carrier": "DHL",
        "items": [{ "productId": "sku-s", "quantity": 2, "unitPrice": { "minor": "1500", "currency": "EUR" } }],
    });
    server.call("eventfold.orders.v1.OrderCommandService/CreateOrder", &create);
    wait_paused(&mut server.process, FAILPOINT);

    // The window: the reservation is in the log, the saga saved no step.
    let (log, client) = rt.block_on(async { (open_log(&db).await, connect(&db).await) });
    rt.block_on(async {
        let types = event_types(&log).await;
        assert_eq!(types.get("InventoryReserved"), Some(&1), "the call's effect happened: {types:?}");
        let row = client.query_one("SELECT count(*) FROM saga.saga_steps", &[]).await.expect("count the steps");
        assert_eq!(row.get::<_, i64>(0), 0, "its result was not saved");
    });
    server.process.sigkill();

    let server = dev(&db, "", &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let saga = loop {
        let got = server.call("eventfold.sagas.v1.SagaService/GetSaga", &serde_json::json!({"sagaId": "fulfil-s-1"}));
        if got["saga"]["status"] == "SAGA_STATUS_COMPLETED" || got["saga"]["status"] == "SAGA_STATUS_FAILED" {
            break got;
        }
        assert!(Instant::now() < deadline, "the saga did not finish within 20 s after the restart: {got}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(saga["saga"]["status"], "SAGA_STATUS_COMPLETED", "the saga completed after the restart: {saga}");
    let steps: Vec<&str> =
        saga["saga"]["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["RESERVE_INVENTORY", "AUTHORIZE_PAYMENT", "CREATE_SHIPPING_LABEL", "CONFIRM_ORDER"], "{saga}");
    rt.block_on(async {
        let types = event_types(&log).await;
        for (event_type, count) in &types {
            let expected = if event_type == "SagaStepEnded" { 4 } else { 1 };
            assert_eq!(*count, expected, "{event_type} in the log {count} times: {types:?}");
        }
        for effect in ["InventoryReserved", "OrderConfirmed", "SagaCompleted"] {
            assert!(types.contains_key(effect), "{effect} is in the log: {types:?}");
        }
    });
}
