//! PostgreSQL stopped at once (`pg_ctl stop -m immediate`, as a crash) and
//! started again while clients keep sending commands to the command
//! service, hosted as `eventfold dev` hosts it over the PostgreSQL event log:
//! meanwhile commands answer UNAVAILABLE (nothing else, no driver text);
//! afterwards they succeed again without restarting anything; and every
//! command acknowledged OK is in the log exactly once, its request id
//! remembered across the crash.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use eventfold_command::Config;
use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::inventory::{
    self as inventory_pb, inventory_command_service_client::InventoryCommandServiceClient,
};
use eventfold_store::{Database, DatabaseOptions, EventLog, PostgresConfig, PostgresEventLog, StreamRead, Upcasting};
use eventfold_tests::OwnPostgres;
use tokio::net::TcpListener;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

/// Clients, each replenishing a product of its own (no conflicts between
/// them: every failure is the outage's).
const WORKERS: usize = 4;
/// Commands acknowledged before the outage begins.
const BEFORE: u64 = 40;

/// Where the run is; each answer is filed under the phase it arrived in.
const RUNNING: u8 = 0;
const DOWN: u8 = 1;
const RESTARTED: u8 = 2;

/// A command acknowledged OK: its request and the position of its event.
#[derive(Debug, Clone)]
struct Acked {
    request: inventory_pb::ReplenishStockRequest,
    position: u64,
    /// UNAVAILABLE answers before the OK (the same request id each time).
    unavailable_before: u32,
    phase: u8,
}

#[derive(Default)]
struct Record {
    acked: Vec<Acked>,
    unavailable: u64,
    /// Answers that are neither OK nor UNAVAILABLE, or UNAVAILABLE with
    /// driver text.
    wrong: Vec<String>,
}

/// Texts that must never reach a client while the database is away.
fn leaks(status: &Status, port: &str) -> Option<String> {
    let Some(info) = status.get_details_error_info() else {
        return Some(format!("no ErrorInfo: {status:?}"));
    };
    if info.reason != "STORAGE_UNAVAILABLE" {
        return Some(format!("reason {}: {status:?}", info.reason));
    }
    eventfold_tests::hostile::check_no_internal_text(status, &[port]).err()
}

fn replenish(worker: usize, n: u64) -> inventory_pb::ReplenishStockRequest {
    inventory_pb::ReplenishStockRequest {
        request_id: format!("r-{worker}-{n}"),
        product_id: format!("p-{worker}"),
        quantity: 1,
    }
}

/// One client: replenishes its product again and again, each with a new
/// request id; on UNAVAILABLE (outcome unknown) it sends the same request
/// again until it is answered.
async fn client(
    worker: usize,
    mut inventory: InventoryCommandServiceClient<Channel>,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    port: String,
) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let request = replenish(worker, n);
        let mut unavailable_before = 0;
        loop {
            let mut call = Request::new(request.clone());
            call.set_timeout(Duration::from_secs(20));
            match inventory.replenish_stock(call).await {
                Ok(answer) => {
                    let position = answer.into_inner().result.map_or(0, |r| r.global_position);
                    let acked = Acked { request, position, unavailable_before, phase: phase.load(Ordering::SeqCst) };
                    record.lock().unwrap().acked.push(acked);
                    break;
                }
                Err(status) if status.code() == Code::Unavailable => {
                    {
                        let mut record = record.lock().unwrap();
                        record.unavailable += 1;
                        if let Some(leak) = leaks(&status, &port) {
                            record.wrong.push(leak);
                        }
                    }
                    unavailable_before += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => {
                    record.lock().unwrap().wrong.push(format!("{}: {status:?}", request.request_id));
                    break;
                }
            }
        }
    }
}

/// Waits until `done` holds, checking every 20 ms, for at most `limit`.
async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load_answers_unavailable_recovers_alone_and_loses_nothing() {
    let postgres = OwnPostgres::start();
    let db = postgres.migrated().await;
    let port = postgres.url().rsplit(':').next().and_then(|p| p.split('/').next()).unwrap().to_owned();
    let options = DatabaseOptions { connect_timeout: Duration::from_secs(1), ..Default::default() };
    let database = Database::open(db.url(), &options).expect("a PostgreSQL URL");
    let config = PostgresConfig { append_timeout: Duration::from_secs(5), ..PostgresConfig::default() };
    let store = Arc::new(PostgresEventLog::connect(database, config).await.expect("connect the log"));
    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(store.clone(), eventfold_command::upcasters()));

    // The command services, as `eventfold dev` hosts them.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let _shutdown = token.clone().drop_guard();
    let mut server = GrpcServer::new();
    let bus = eventfold_command::bus(log.clone(), Config::default().bus_options());
    eventfold_command::host(&mut server, &Config::default(), log.clone(), bus);
    tokio::spawn(server.serve(listener, token, Duration::from_secs(5)));
    let inventory = InventoryCommandServiceClient::new(eventfold_tests::channel(addr).await);
    for worker in 0..WORKERS {
        let register = inventory_pb::RegisterProductRequest {
            request_id: format!("register-{worker}"),
            product_id: format!("p-{worker}"),
            name: "Widget".into(),
        };
        inventory.clone().register_product(register).await.expect("register");
    }

    let phase = Arc::new(AtomicU8::new(RUNNING));
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(Mutex::new(Record::default()));
    let clients: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (phase, stop, record) = (phase.clone(), stop.clone(), record.clone());
            tokio::spawn(client(worker, inventory.clone(), phase, stop, record, port.clone()))
        })
        .collect();
    let acked = || record.lock().unwrap().acked.len() as u64;
    until("load before the outage", Duration::from_secs(30), || acked() >= BEFORE).await;

    // The outage, under load.
    tokio::task::block_in_place(|| postgres.stop());
    phase.store(DOWN, Ordering::SeqCst);
    let down_at = Instant::now();
    let unavailable = || record.lock().unwrap().unavailable;
    until("UNAVAILABLE answers while PostgreSQL is down", Duration::from_secs(20), || unavailable() >= 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_in_outage = acked();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(acked(), acked_in_outage, "no command is acknowledged while PostgreSQL is down");
    let outage = down_at.elapsed();

    // Back: nothing is restarted on our side; every client gets through again.
    tokio::task::block_in_place(|| postgres.start_again());
    phase.store(RESTARTED, Ordering::SeqCst);
    let restarted = Instant::now();
    let recovered = || {
        let record = record.lock().unwrap();
        (0..WORKERS).all(|w| {
            record.acked.iter().filter(|a| a.phase == RESTARTED && a.request.product_id == format!("p-{w}")).count()
                >= 5
        })
    };
    until("every client succeeds again after the restart", Duration::from_secs(30), recovered).await;
    let recovery = restarted.elapsed();
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let record = std::mem::take(&mut *record.lock().unwrap());
    assert!(record.wrong.is_empty(), "{} wrong answers, e.g. {:?}", record.wrong.len(), record.wrong.first());
    assert!(record.unavailable > 0, "the outage was seen: UNAVAILABLE answers");
    let retried = record.acked.iter().filter(|a| a.unavailable_before > 0).count();
    assert!(retried > 0, "some commands were answered OK only after UNAVAILABLE answers (outcome unknown, retried)");
    eprintln!(
        "outage {outage:?}: {} acked, {} UNAVAILABLE, {retried} acked after retries; recovered in {recovery:?}",
        record.acked.len(),
        record.unavailable
    );

    // A client that lost any of those answers sends the request again: the
    // request id is remembered across the crash (stored with the events),
    // so the answer is the first one, and nothing is appended.
    let head = log.last_position().await.unwrap();
    for acked in &record.acked {
        let again = inventory.clone().replenish_stock(acked.request.clone()).await.expect("the repeat answers");
        let position = again.into_inner().result.map_or(0, |r| r.global_position);
        assert_eq!(
            position, acked.position,
            "{}: the repeat after the outage answers the first answer, not a new append",
            acked.request.request_id
        );
    }
    assert_eq!(log.last_position().await.unwrap(), head, "the repeats appended nothing");

    // The log: every acknowledged command's event, once, at the position
    // it was acknowledged with; nothing else.
    let mut expected: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for acked in &record.acked {
        expected
            .entry(acked.request.product_id.clone())
            .or_default()
            .insert(acked.request.request_id.clone(), acked.position);
    }
    for worker in 0..WORKERS {
        let product = format!("p-{worker}");
        let stream = format!("inventory-{product}");
        let mut stored: BTreeMap<String, u64> = BTreeMap::new();
        let mut twice = BTreeSet::new();
        let mut from = None;
        loop {
            let mut read = StreamRead::forwards(&stream, 500);
            read.from_version = from;
            let slice = store.read_stream(read).await.unwrap();
            for event in &slice.events {
                from = Some(event.version + 1);
                if event.event_type != "StockReplenished" {
                    continue;
                }
                let request_id = event.metadata.causation_id.clone().expect("the request id as causation id");
                if stored.insert(request_id.clone(), event.global_position).is_some() {
                    twice.insert(request_id);
                }
            }
            if slice.end_of_stream || slice.events.is_empty() {
                break;
            }
        }
        assert!(twice.is_empty(), "{product}: commands stored twice: {twice:?}");
        let expected = expected.remove(&product).unwrap_or_default();
        let lost: Vec<_> = expected.keys().filter(|id| !stored.contains_key(*id)).collect();
        assert!(lost.is_empty(), "{product}: acknowledged commands missing from the log: {lost:?}");
        assert_eq!(stored, expected, "{product}: the log holds exactly the acknowledged commands, where acknowledged");
    }
}
