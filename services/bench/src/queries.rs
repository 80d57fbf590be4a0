//! `eventfold-bench queries` and `eventfold-bench projection-lag`: the read
//! side measured beside raw PostgreSQL doing the same work in the same run.
//!
//! - queries: GetOrder over gRPC, uncached (PostgreSQL behind the query
//!   service) and cached (Redis), against a prepared `SELECT` of the same
//!   row on a direct connection.
//! - projection-lag: events appended at a fixed rate; the lag from the
//!   append's acknowledgement until the order view's checkpoint (as the
//!   query side sees it) covers it, against an `INSERT` + `NOTIFY` seen by a
//!   `LISTEN`ing connection. Then a rebuild of the order views from position
//!   0, in events/s (events counted), against one set-based `INSERT …
//!   SELECT` of the same rows into an ordinary logged table with the read
//!   model's primary key and indexes (`LIKE … INCLUDING ALL`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Currency, Money,
    order::{CreateOrder, OrderItem},
};
use eventfold_platform::{
    runtime::{CancellationToken, DropGuard},
    server::GrpcServer,
};
use eventfold_projector::{OrderViews, Projector, ProjectorOptions};
use eventfold_proto::query::{GetOrderRequest, order_query_service_client::OrderQueryServiceClient};
use eventfold_store::{Database, EventLog, PostgresConfig, PostgresEventLog, Upcasting};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tower::ServiceExt;
use uuid::Uuid;

use crate::append::{Measurement, connect, migrated, ms, thousands};

/// Arguments of `eventfold-bench queries`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryBenchArgs {
    /// PostgreSQL URL of a throw-away database (migrated; orders
    /// `qbench-…` are created in it).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,
    /// Redis URL for the cached run.
    #[arg(long)]
    redis_url: String,
    /// Orders to create and query.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Measured GetOrder calls per system (one at a time).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
}

/// Arguments of `eventfold-bench projection-lag`.
#[derive(Debug, clap::Args)]
pub(crate) struct LagBenchArgs {
    /// PostgreSQL URL of a throw-away database.
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,
    /// Appends per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
}

/// What the benches of the read side start from.
pub(crate) struct ReadSide {
    /// An admin session on the migrated database.
    pub(crate) admin: tokio_postgres::Client,
    pub(crate) machine: String,
    pub(crate) database: Database,
    pub(crate) log: Arc<dyn EventLog>,
    /// Sessions that do not wait for the WAL flush: projectors write
    /// through them, as `eventfold serve projector` does.
    pub(crate) workers: Database,
}

impl ReadSide {
    pub(crate) async fn open(url: &str) -> anyhow::Result<Self> {
        let (admin, machine) = migrated(url).await?;
        let database = Database::from_url(url)?;
        let store = PostgresEventLog::connect(database.clone(), PostgresConfig::default()).await?;
        let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(Arc::new(store), eventfold_command::upcasters()));
        let workers = database.without_flush_wait(2);
        Ok(Self { admin, machine, database, log, workers })
    }
}

pub(crate) async fn create_orders(log: Arc<dyn EventLog>, tag: &str, count: usize) -> anyhow::Result<()> {
    let bus = eventfold_command::bus(log, eventfold_command::Config::default().bus_options());
    let eur: Currency = "EUR".parse().map_err(anyhow::Error::msg)?;
    let mut pending = futures_util::stream::iter(0..count)
        .map(|i| {
            let bus = bus.clone();
            let order_id = format!("{tag}-{i}");
            let create = CreateOrder {
                order_id: order_id.clone(),
                customer_id: format!("customer-{}", i % 100),
                currency: eur,
                items: vec![OrderItem {
                    product_id: format!("sku-{}", i % 50),
                    quantity: 2,
                    unit_price: Money::new(1250, eur),
                }],
                payment_token: None,
                carrier: None,
            };
            async move {
                bus.oneshot(Envelope::new(Command::Order { order_id, command: create.into() }, Meta::default())).await
            }
        })
        .buffer_unordered(8);
    while let Some(result) = pending.next().await {
        result.map_err(|e| anyhow::anyhow!("CreateOrder failed: {e:?}"))?;
    }
    Ok(())
}

/// CreateOrder `order_id` (one item) through `bus`, as the lag benches
/// send it: the global position of the last event it wrote.
pub(crate) async fn create_order(bus: eventfold_command::Bus, order_id: String) -> anyhow::Result<u64> {
    let eur: Currency = "EUR".parse().map_err(anyhow::Error::msg)?;
    let create = CreateOrder {
        order_id: order_id.clone(),
        customer_id: "c".into(),
        currency: eur,
        items: vec![OrderItem { product_id: "sku".into(), quantity: 1, unit_price: Money::new(100, eur) }],
        payment_token: None,
        carrier: None,
    };
    let written = bus
        .oneshot(Envelope::new(Command::Order { order_id, command: create.into() }, Meta::default()))
        .await
        .map_err(|e| anyhow::anyhow!("CreateOrder: {e:?}"))?;
    Ok(written.writes.iter().map(|w| w.global_position).max().unwrap_or(0))
}

/// The version of the order views that serves queries (1 when none has
/// been built yet): the one whose projector the bench must run.
pub(crate) async fn active_order_views(database: &Database) -> anyhow::Result<u32> {
    let statuses = eventfold_projector::status(database).await?;
    Ok(statuses.iter().find(|s| s.name == "order_views" && s.active).map_or(1, |s| s.version))
}

/// Builds `projector` up to the log's head.
pub(crate) async fn catch_up(projector: &Projector, log: &Arc<dyn EventLog>) -> anyhow::Result<()> {
    projector.prepare().await?;
    let head = log.last_position().await?;
    while projector.position().await? < head {
        projector.step().await?;
    }
    Ok(())
}

async fn serve(
    database: &Database,
    log: Arc<dyn EventLog>,
    cache_url: Option<String>,
) -> anyhow::Result<(OrderQueryServiceClient<Channel>, Arc<eventfold_query::Query>, DropGuard)> {
    let mut config = eventfold_query::Config::default();
    config.cache.url = cache_url;
    config.cache.warm_orders = 0;
    config.cache.key_prefix = format!("qbench-{}:", &Uuid::new_v4().simple().to_string()[..8]);
    let cache = match config.cache.redis() {
        Some(options) => {
            Some(eventfold_query::Cache::new(eventfold_platform::runtime::redis(&options)?, config.cache.clone()).await)
        }
        None => None,
    };
    let query = eventfold_query::Query::connect(&config, database.sized(config.pool_size), cache, log).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = CancellationToken::new();
    let mut server = GrpcServer::new();
    eventfold_query::host(&mut server, &config, query.clone(), token.clone());
    tokio::spawn(server.serve(listener, token.clone(), Duration::from_secs(1)));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await.context("connecting")?;
    // The positions follower needs its first read.
    for _ in 0..100 {
        if query.positions().get("order_views").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((OrderQueryServiceClient::new(channel), query, token.drop_guard()))
}

async fn measure<F, Fut>(requests: usize, mut call: F) -> anyhow::Result<Measurement>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // Warm-up: one pass over a tenth.
    for i in 0..requests / 10 {
        call(i).await?;
    }
    let mut latencies = Vec::with_capacity(requests);
    let started = Instant::now();
    for i in 0..requests {
        let t = Instant::now();
        call(i).await?;
        latencies.push(t.elapsed());
    }
    latencies.sort_unstable();
    Ok(Measurement { latencies, seconds: started.elapsed().as_secs_f64(), worst_per_second: Vec::new() })
}

fn row(name: &str, m: &Measurement, raw: &Measurement) -> String {
    let [p50, p99] = [50.0, 99.0].map(|p| m.percentile_ms(p));
    format!(
        "| {name} | {} | {} | {} | {:.2}x |",
        thousands(m.latencies.len() as f64 / m.seconds),
        ms(p50),
        ms(p99),
        p99 / raw.percentile_ms(99.0)
    )
}

pub(crate) async fn queries(args: QueryBenchArgs) -> anyhow::Result<()> {
    if args.orders == 0 || args.requests == 0 {
        bail!("--orders and --requests need values of at least 1");
    }
    let ReadSide { admin: _admin, machine, database, log, workers } = ReadSide::open(&args.database_url).await?;
    let tag = format!("qbench-{}", &Uuid::new_v4().simple().to_string()[..8]);
    create_orders(log.clone(), &tag, args.orders).await?;
    let version = active_order_views(&database).await?;
    let projector =
        Projector::new(workers.clone(), log.clone(), Arc::new(OrderViews), version, ProjectorOptions::default());
    catch_up(&projector, &log).await?;

    let ids: Vec<String> = (0..args.orders).map(|i| format!("{tag}-{i}")).collect();
    let raw_client = connect(&args.database_url).await?;
    let select = raw_client
        .prepare(
            "SELECT order_id, customer_id, status, currency, total_minor, items, payment_id, carrier, \
                    tracking_number, cancel_reason, created_at, updated_at, stream_version, last_position \
               FROM read.order_views WHERE order_id = $1",
        )
        .await?;
    let raw = measure(args.requests, |i| {
        let (client, select, id) = (&raw_client, &select, &ids[i % ids.len()]);
        async move { client.query_one(select, &[id]).await.map(drop).map_err(anyhow::Error::from) }
    })
    .await?;
    let call = |client: &OrderQueryServiceClient<Channel>, id: &str| {
        let mut client = client.clone();
        let request = GetOrderRequest { order_id: id.to_owned(), min_position: 0 };
        async move { client.get_order(request).await.map(drop).map_err(anyhow::Error::from) }
    };
    let (uncached_client, _, stop_uncached) = serve(&database, log.clone(), None).await?;
    let uncached = measure(args.requests, |i| call(&uncached_client, &ids[i % ids.len()])).await?;
    drop(stop_uncached);
    let (cached_client, cached_query, stop_cached) =
        serve(&database, log.clone(), Some(args.redis_url.clone())).await?;
    // Fill the cache, then measure.
    for id in &ids {
        call(&cached_client, id).await?;
    }
    let cached = measure(args.requests, |i| call(&cached_client, &ids[i % ids.len()])).await?;
    let stats = cached_query.cache().map(|c| c.stats());
    drop(stop_cached);

    println!("{machine}");
    println!();
    println!(
        "GetOrder, one call at a time, {} orders, {} measured calls per system (after {} warm-up calls).",
        args.orders,
        args.requests,
        args.requests / 10
    );
    println!();
    println!("| system | calls/s | p50 ms | p99 ms | p99 ÷ raw |");
    println!("|---|---:|---:|---:|---:|");
    println!("{}", row("raw prepared SELECT (no gRPC)", &raw, &raw));
    println!("{}", row("eventfold GetOrder, uncached", &uncached, &raw));
    println!("{}", row("eventfold GetOrder, cached (Redis)", &cached, &raw));
    if let Some(stats) = stats {
        println!();
        println!("cache: {} hits, {} misses", stats.hits, stats.misses);
    }
    Ok(())
}

pub(crate) async fn lag(args: LagBenchArgs) -> anyhow::Result<()> {
    if args.rate == 0 {
        bail!("--rate needs a value of at least 1");
    }
    let ReadSide { admin, machine, database, log, workers } = ReadSide::open(&args.database_url).await?;
    let tag = format!("lbench-{}", &Uuid::new_v4().simple().to_string()[..8]);

    // eventfold: the order views projector follows the log; the query
    // side's position follower says when an event is visible.
    let options = ProjectorOptions { batch_time: Duration::from_millis(20), ..ProjectorOptions::default() };
    let version = active_order_views(&database).await?;
    let projector = Projector::new(workers.clone(), log.clone(), Arc::new(OrderViews), version, options.clone());
    catch_up(&projector, &log).await?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(projector.run(stop.clone()));
    let positions = eventfold_query::Positions::spawn(database.clone(), Duration::from_secs(1));
    let ours = open_loop_lag(args.rate, args.duration_secs, |i| {
        let log = log.clone();
        let positions = positions.clone();
        let tag = tag.clone();
        async move {
            let bus = eventfold_command::bus(log, eventfold_command::Config::default().bus_options());
            let position = create_order(bus, format!("{tag}-{i}")).await?;
            let acked = Instant::now();
            positions
                .wait("order_views", position, Duration::from_secs(30))
                .await
                .map_err(|at| anyhow::anyhow!("not visible within 30 s (at {})", at.position))?;
            Ok(acked.elapsed())
        }
    })
    .await?;
    stop.cancel();
    let _ = running.await;

    // raw: INSERT + NOTIFY in one transaction, seen by a LISTENing session.
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS bench_lag_raw; \
             CREATE TABLE bench_lag_raw (id bigserial PRIMARY KEY, order_id text NOT NULL, data jsonb NOT NULL)",
        )
        .await?;
    let seen = Arc::new(tokio::sync::watch::channel(0i64).0);
    let (listen_client, mut connection) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls).await?;
    let seen_tx = seen.clone();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let id = n.payload().parse().unwrap_or(0);
                seen_tx.send_modify(|s| *s = (*s).max(id));
            }
        }
    });
    listen_client.batch_execute("LISTEN bench_lag_raw").await?;
    let mut writers = Vec::new();
    for _ in 0..8 {
        writers.push(Arc::new(connect(&args.database_url).await?));
    }
    let raw = open_loop_lag(args.rate, args.duration_secs, |i| {
        let client = writers[i % writers.len()].clone();
        let mut seen = seen.subscribe();
        async move {
            let row = client
                .query_one(
                    "WITH ins AS (INSERT INTO bench_lag_raw (order_id, data) VALUES ($1, $2) RETURNING id) \
                     SELECT id, pg_notify('bench_lag_raw', id::text) FROM ins",
                    &[&format!("raw-{i}"), &serde_json::json!({"customer_id": "c", "quantity": 1})],
                )
                .await?;
            let id: i64 = row.get(0);
            let acked = Instant::now();
            tokio::time::timeout(Duration::from_secs(30), seen.wait_for(|s| *s >= id)).await??;
            Ok(acked.elapsed())
        }
    })
    .await?;
    admin.batch_execute("DROP TABLE IF EXISTS bench_lag_raw").await?;

    // Rebuild speed: the whole log into a fresh version, against one
    // INSERT … SELECT of the same order rows into an ordinary (logged)
    // table made like the read model's (same primary key and indexes).
    let status = eventfold_projector::status(&database).await?;
    let next = status.iter().filter(|s| s.name == "order_views").map(|s| s.version).max().unwrap_or(1) + 1;
    let rebuild_options = ProjectorOptions { batch_size: 2000, batch_time: Duration::from_secs(1), ..options };
    let rebuild = Projector::new(workers.clone(), log.clone(), Arc::new(OrderViews), next, rebuild_options);
    let started = Instant::now();
    catch_up(&rebuild, &log).await?;
    let rebuild_secs = started.elapsed().as_secs_f64();
    // Rates count events: those the rebuild went through (the log up to
    // its checkpoint), not the position it reached (positions have gaps).
    let rebuilt_to = rebuild.position().await?;
    let rebuilt: i64 = admin
        .query_one("SELECT count(*) FROM eventstore.events WHERE global_position <= $1", &[&(rebuilt_to as i64)])
        .await?
        .get(0);
    // What reading the log alone costs (the projector reads the same way).
    let started = Instant::now();
    let (mut after, mut read_events) = (0, 0usize);
    loop {
        let read = eventfold_store::AllRead { after, max_count: 2000, filter: eventfold_store::EventFilter::default() };
        let slice = log.read_all(read).await?;
        if slice.events.is_empty() {
            break;
        }
        read_events += slice.events.len();
        after = slice.next_position;
    }
    let read_secs = started.elapsed().as_secs_f64();
    // raw: the same rows the rebuild wrote for the OrderCreated events,
    // into a logged table with the read model's primary key and indexes
    // (`LIKE … INCLUDING ALL`), committed like the read model's
    // transactions (without waiting for the WAL flush).
    let table = format!("read.order_views_v{next}");
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS public.bench_rebuild_raw; \
             CREATE TABLE public.bench_rebuild_raw (LIKE {table} INCLUDING ALL)"
        ))
        .await?;
    let started = Instant::now();
    let copied = admin
        .execute(
            "WITH _ AS (SELECT set_config('synchronous_commit', 'off', true)) \
             INSERT INTO public.bench_rebuild_raw (order_id, customer_id, status, currency, total_minor, items, \
                    created_at, updated_at, stream_version, last_position) \
             SELECT data->>'order_id', data->>'customer_id', 'created', data->>'currency', \
                    (data->'total'->>'minor')::bigint, data->'items', created_at, created_at, version, \
                    global_position \
               FROM eventstore.events \
              WHERE event_type = 'OrderCreated' AND stream_id LIKE 'order-%' AND global_position <= $1",
            &[&(rebuilt_to as i64)],
        )
        .await?;
    let raw_rebuild_secs = started.elapsed().as_secs_f64();
    let views: i64 = admin.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await?.get(0);
    admin.batch_execute("DROP TABLE public.bench_rebuild_raw").await?;
    let eventfold_rebuild = rebuilt as f64 / rebuild_secs;
    let raw_rows = copied as f64 / raw_rebuild_secs;

    println!("{machine}");
    println!();
    println!(
        "Append → visible lag at {}/s for {}s (eventfold: CreateOrder through the command bus, then until the \
         order_views checkpoint covers it as the query side sees it; raw: INSERT + NOTIFY, until a LISTENing \
         session gets it).",
        args.rate, args.duration_secs
    );
    println!();
    println!("| system | done | p50 ms | p99 ms | max ms | p99 ÷ raw |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, m) in [("eventfold", &ours), ("raw", &raw)] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}x |",
            m.latencies.len(),
            ms(m.percentile_ms(50.0)),
            ms(m.percentile_ms(99.0)),
            ms(m.latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)),
            m.percentile_ms(99.0) / raw.percentile_ms(99.0)
        );
    }
    println!();
    println!(
        "Rebuild of order_views v{next} from position 0: {rebuilt} events (counted; {views} order rows) in \
         {rebuild_secs:.2}s = {} events/s; raw INSERT … SELECT of the {copied} OrderCreated events' rows into a \
         logged table LIKE {table} INCLUDING ALL (same primary key and indexes): {} rows/s in {raw_rebuild_secs:.3}s; \
         ratio {:.3}x.",
        thousands(eventfold_rebuild),
        thousands(raw_rows),
        eventfold_rebuild / raw_rows
    );
    println!(
        "Reading the log alone (read_all, 2,000 per call): {read_events} events in {read_secs:.2}s = {} events/s — \
         the ceiling of any projection.",
        thousands(read_events as f64 / read_secs)
    );
    Ok(())
}

/// Starts `call(i)` at `rate` per second for `duration_secs`; each returns
/// its own lag.
pub(crate) async fn open_loop_lag<F, Fut>(rate: u32, duration_secs: u64, call: F) -> anyhow::Result<Measurement>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let until = start + Duration::from_secs(duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0.. {
        let at = start + interval * u32::try_from(i)?;
        if at >= until {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let f = call(i);
        tasks.spawn(async move { f.await.map(|d| (i, d)) });
    }
    let mut latencies = Vec::new();
    let mut timeline = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, d) = done??;
        timeline.push((i, d));
        latencies.push(d);
    }
    // In send order: the slowest of each second's sends.
    timeline.sort_unstable();
    let worst_per_second = timeline
        .chunks(rate.max(1) as usize)
        .map(|second| second.iter().map(|(_, d)| *d).max().unwrap_or_default())
        .collect();
    latencies.sort_unstable();
    Ok(Measurement { latencies, seconds: duration_secs as f64, worst_per_second })
}
