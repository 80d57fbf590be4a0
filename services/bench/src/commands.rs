//! `eventfold-bench commands`: `CreateOrder` end to end over gRPC (client,
//! command bus, aggregate load, decision, append on PostgreSQL) at fixed
//! arrival rates, open loop: requests are sent on schedule whether or not
//! earlier ones have answered, and latency counts from the scheduled send
//! time, so a stall shows up as latency instead of as a slower sender.
//!
//! Beside it, in the same run and at the same rates: raw PostgreSQL doing
//! the irreducible part of the same work, one `INSERT` of the order per
//! transaction through a pool of connections.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_proto::orders::{CreateOrderRequest, order_command_service_client::OrderCommandServiceClient};
use eventfold_store::{EventLog, Metered, PostgresConfig, PostgresEventLog, Upcasting};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_postgres::{Client, Statement};
use tonic::transport::Channel;
use uuid::Uuid;

use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};

use crate::{
    append::{Measurement, connect, migrated, ms, thousands},
    pacing::{create_order_request, delete_orders},
    stages::{Capture, percentile},
};

/// Arguments of `eventfold-bench commands`.
#[derive(Debug, clap::Args)]
pub(crate) struct CommandBenchArgs {
    /// PostgreSQL URL of a throw-away database: migrations are applied, the
    /// table `bench_orders_raw` is created and dropped, and orders
    /// `cbench-…` are created (and deleted again).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,

    /// Measured seconds per rate and system (after the warm-up).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    duration_secs: u64,

    /// Arrival rates in commands per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "250,500,750,1000")]
    rates: Vec<u32>,

    /// Unmeasured seconds at the rate before each measurement.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,

    /// The p99 bound, in milliseconds, of a "sustained" rate.
    #[arg(long, default_value_t = 10.0)]
    p99_bound_ms: f64,

    /// Group-commit writers of the event log; default: the store's default.
    #[arg(long)]
    writers: Option<usize>,
}

/// One system at one rate.
struct Run {
    rate: u32,
    measurement: Measurement,
    errors: usize,
    scheduled: usize,
}

impl Run {
    fn max_ms(&self) -> f64 {
        self.measurement.latencies.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }

    fn cell(&self) -> String {
        let [p50, p95, p99] = [50.0, 95.0, 99.0].map(|p| self.measurement.percentile_ms(p));
        format!(
            "{} | {} / {} / {} / {}{}",
            thousands(self.measurement.latencies.len() as f64 / self.measurement.seconds),
            ms(p50),
            ms(p95),
            ms(p99),
            ms(self.max_ms()),
            if self.errors > 0 { format!(" ({} errors)", self.errors) } else { String::new() }
        )
    }

    /// Every scheduled command answered without error, p99 within `bound`.
    fn sustained(&self, bound: f64) -> bool {
        self.errors == 0
            && self.measurement.latencies.len() == self.scheduled
            && self.measurement.percentile_ms(99.0) < bound
    }
}

pub(crate) async fn commands(args: CommandBenchArgs) -> anyhow::Result<()> {
    if args.rates.is_empty() || args.rates.contains(&0) {
        bail!("--rates needs values of at least 1");
    }
    // What the services record as they serve, for the stage table.
    let capture = Capture::install()?;
    let (admin, machine) = migrated(&args.database_url).await?;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS bench_orders_raw; \
             CREATE TABLE bench_orders_raw (id bigserial PRIMARY KEY, order_id text NOT NULL UNIQUE, \
             data jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .context("creating bench_orders_raw")?;

    // The command services, in this process, on a loopback port.
    let defaults = PostgresConfig::default();
    let config = PostgresConfig { writers: args.writers.unwrap_or(defaults.writers).max(1), ..defaults };
    let writers = config.writers;
    let store = PostgresEventLog::connect(eventfold_store::Database::from_url(&args.database_url)?, config).await?;
    let log: Arc<dyn EventLog> =
        Arc::new(Upcasting::new(Arc::new(Metered::new(store)), eventfold_command::upcasters()));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let command_config = eventfold_command::Config::default();
    let mut grpc = GrpcServer::new();
    let bus = eventfold_command::bus(log.clone(), command_config.bus_options());
    eventfold_command::host(&mut grpc, &command_config, log, bus);
    let server = tokio::spawn(grpc.serve(listener, stop.clone(), Duration::from_secs(1)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await.context("connecting")?;
        clients.push(OrderCommandServiceClient::new(channel));
    }
    let mut raw = Vec::new();
    for _ in 0..16 {
        let client = connect(&args.database_url).await?;
        let insert = client.prepare("INSERT INTO bench_orders_raw (order_id, data) VALUES ($1, $2)").await?;
        raw.push((client, insert));
    }
    let raw = Arc::new(raw);

    let session = Uuid::new_v4().simple().to_string()[..8].to_owned();
    println!("{machine}");
    println!();
    println!(
        "CreateOrder over gRPC, open loop: {}s warm-up, then {}s measured per rate and system; latency from the \
         scheduled send time. eventfold: {writers} group-commit writers. raw: one INSERT of the order per \
         transaction, 16 connections.",
        args.warmup_secs, args.duration_secs
    );
    println!();
    println!(
        "| rate/s | eventfold done/s | eventfold p50 / p95 / p99 / max ms | raw done/s | raw p50 / p95 / p99 / max ms \
         | p99 ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let warmup = Duration::from_secs(args.warmup_secs);
    let duration = Duration::from_secs(args.duration_secs);
    let mut best = (None, None);
    let mut stage_rows = Vec::new();
    let mut result = Ok(());
    for &rate in &args.rates {
        let clients = clients.clone();
        let tag = session.clone();
        let eventfold = open_loop(rate, warmup, duration, Some(&capture), move |i| {
            let mut client = clients[i % clients.len()].clone();
            let request = create_order(&tag, rate, i);
            async move { client.create_order(request).await.map(drop).map_err(anyhow::Error::from) }
        })
        .await;
        if let Ok(run) = &eventfold {
            stage_rows.push(stage_row(rate, &run.measurement, &capture));
        }
        let raw_pool = raw.clone();
        let tag = session.clone();
        let raw_run = open_loop(rate, warmup, duration, None, move |i| {
            let raw_pool = raw_pool.clone();
            let request = create_order(&tag, rate, i);
            async move {
                let (client, insert): &(Client, Statement) = &raw_pool[i % raw_pool.len()];
                let data = serde_json::json!({
                    "order_id": request.order_id,
                    "customer_id": request.customer_id,
                    "items": request.items.iter().map(|item| serde_json::json!({
                        "product_id": item.product_id,
                        "quantity": item.quantity,
                        "unit_price": item.unit_price.as_ref().map(|m| m.minor),
                    })).collect::<Vec<_>>(),
                });
                client.execute(insert, &[&request.order_id, &data]).await.map(drop).map_err(anyhow::Error::from)
            }
        })
        .await;
        let (ours, theirs) = match (eventfold, raw_run) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                result = Err(e);
                break;
            }
        };
        let ratio = ours.measurement.percentile_ms(99.0) / theirs.measurement.percentile_ms(99.0);
        println!("| {rate} | {} | {} | {ratio:.2}x |", ours.cell(), theirs.cell());
        if ours.sustained(args.p99_bound_ms) {
            best.0 = Some(ours.rate);
        }
        if theirs.sustained(args.p99_bound_ms) {
            best.1 = Some(theirs.rate);
        }
    }
    if result.is_ok() {
        println!();
        println!(
            "Where eventfold's time goes (p50 / p99 ms of each stage, as the services record it; each stage holds the \
             ones after it): end to end from the scheduled send; the gRPC server (from its metrics layer to the \
             status); the command bus (validation, idempotency, aggregate load, decision, append); the store's \
             append (queue wait and group commit); one group commit (its transaction of two round trips, with \
             retries); and appends per group commit."
        );
        println!();
        println!(
            "| rate/s | end to end | gRPC server | command bus | store append | group commit | appends per commit |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for row in &stage_rows {
            println!("{row}");
        }
        println!();
        let show = |r: Option<u32>| r.map_or_else(|| "none of the rates".to_owned(), |r| format!("{r}/s"));
        println!();
        println!(
            "Highest rate sustained with p99 < {} ms and no error: eventfold {}, raw {}.",
            args.p99_bound_ms,
            show(best.0),
            show(best.1)
        );
    }

    stop.cancel();
    let _ = server.await;
    let cleanup = async {
        admin.batch_execute("DROP TABLE IF EXISTS bench_orders_raw").await.context("dropping bench_orders_raw")?;
        delete_orders(&admin, &format!("order-cbench-{session}-%")).await
    };
    result.and(cleanup.await)
}

fn create_order(session: &str, rate: u32, i: usize) -> CreateOrderRequest {
    create_order_request(format!("cbench-{session}-{rate}-{i}"), i)
}

/// A row of the stage table: the percentiles of each stage the services
/// recorded during `rate`'s measured span.
fn stage_row(rate: u32, end_to_end: &Measurement, capture: &Capture) -> String {
    let seconds = |name: &str| {
        let values = capture.sorted(name);
        let at = |p| percentile(&values, p).map_or_else(|| "–".to_owned(), |s| ms(s * 1000.0));
        format!("{} / {}", at(50.0), at(99.0))
    };
    let size = capture.sorted("eventfold_store_group_commit_size");
    let appends = |p| percentile(&size, p).map_or_else(|| "–".to_owned(), |n| format!("{n:.0}"));
    format!(
        "| {rate} | {} / {} | {} | {} | {} | {} | {} / {} |",
        ms(end_to_end.percentile_ms(50.0)),
        ms(end_to_end.percentile_ms(99.0)),
        seconds(eventfold_platform::metrics::HANDLING_SECONDS),
        seconds("eventfold_command_duration_seconds"),
        seconds("eventfold_store_append_seconds"),
        seconds("eventfold_store_group_commit_seconds"),
        appends(50.0),
        appends(99.0),
    )
}

/// Sends `call(i)` at `rate` per second for `warmup + duration`; the
/// latencies of the calls scheduled inside the measured span. `capture`,
/// if given, is cleared when the measured span starts.
async fn open_loop<F, Fut>(
    rate: u32,
    warmup: Duration,
    duration: Duration,
    capture: Option<&Capture>,
    call: F,
) -> anyhow::Result<Run>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + duration;
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut latencies = Vec::new();
    let mut scheduled_in_window = 0;
    for i in 0.. {
        let scheduled = start + interval * u32::try_from(i).context("too many commands")?;
        if scheduled >= until {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let measured = scheduled >= measure_from;
        if measured && scheduled_in_window == 0 {
            capture.inspect(|c| c.clear());
        }
        scheduled_in_window += usize::from(measured);
        let future = call(i);
        let errors = errors.clone();
        tasks.spawn(async move {
            let ok = future.await.inspect_err(|e| {
                if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("first error at {rate}/s: {e:#}");
                }
            });
            (measured && ok.is_ok()).then(|| scheduled.elapsed())
        });
        while let Some(done) = tasks.try_join_next() {
            latencies.extend(done.context("bench task panicked")?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.context("bench task panicked")?);
    }
    latencies.sort_unstable();
    Ok(Run {
        rate,
        measurement: Measurement { latencies, seconds: duration.as_secs_f64(), worst_per_second: Vec::new() },
        errors: errors.load(Ordering::Relaxed),
        scheduled: scheduled_in_window,
    })
}
