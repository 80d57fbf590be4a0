//! `eventfold-bench append`: append throughput and latency of the event log
//! on PostgreSQL, next to the same workload as plain `INSERT`s on the same
//! server: into a table with a primary key and UNIQUE (stream_id, version)
//! (what any event store must enforce), and into one with the primary key
//! only.
//!
//! Absolute numbers say more about the machine (CPU, disk flush latency)
//! than about eventfold, so every row is measured twice in the same run,
//! against the same server, and the ratio eventfold / raw is the figure to
//! compare across machines.

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_store::{AppendRequest, EventLog, ExpectedVersion, NewEvent, PostgresConfig, PostgresEventLog};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

/// The raw tables, each with what it enforces beside its primary key: the
/// first as any event store must (the ratio), the second nothing more.
const RAW_TABLES: [(&str, &str); 2] = [("bench_raw", ",\n UNIQUE (stream_id, version)"), ("bench_raw_pk", "")];

/// Arguments of `eventfold-bench append`.
#[derive(Debug, clap::Args)]
pub(crate) struct AppendBenchArgs {
    /// PostgreSQL URL of a throw-away database: migrations are applied, the
    /// tables `bench_raw` and `bench_raw_pk` are created and dropped, and
    /// events are appended to (and deleted again from) streams named
    /// `bench-…`.
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,

    /// Measured seconds per row and system (after the warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration_secs: u64,

    /// Concurrent appenders, comma-separated; one table row per value and batch size.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,

    /// Events per append, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    batch_sizes: Vec<usize>,

    /// Unmeasured seconds before each measurement (connections, caches,
    /// plans and the group commit's steady state).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,

    /// Group-commit writers of the event log (each holds a connection);
    /// default: the store's default.
    #[arg(long)]
    writers: Option<usize>,
}

/// Run the append benchmark and print a markdown table to stdout (progress
/// goes to stderr so that stdout can be pasted as is).
pub(crate) async fn append(args: AppendBenchArgs) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs values of at least 1");
    }
    if args.batch_sizes.is_empty()
        || args.batch_sizes.iter().any(|&b| b == 0 || b > eventfold_store::MAX_EVENTS_PER_APPEND)
    {
        bail!("--batch-sizes needs values from 1 to {}", eventfold_store::MAX_EVENTS_PER_APPEND);
    }

    let (admin, machine) = migrated(&args.database_url).await?;

    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
    let database = eventfold_store::Database::open(
        &args.database_url,
        &eventfold_store::DatabaseOptions {
            pool_size: u32::try_from(max_concurrency).unwrap_or(u32::MAX).max(16),
            ..Default::default()
        },
    )?;
    let defaults = PostgresConfig::default();
    let config = PostgresConfig { writers: args.writers.unwrap_or(defaults.writers).max(1), ..defaults };
    let writers = config.writers;
    let log = Arc::new(PostgresEventLog::connect(database, config).await.context("opening the event log")?);

    // Streams of this invocation carry a random tag, so that a run never
    // appends to (or cleans up) streams of another run or of real users.
    let session = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let bench = Bench { args: &args, admin: &admin, log: &log, session: &session, writers };
    let result = bench.run(&machine).await;
    // Stop the log's writers before cleaning up behind them.
    drop(log);

    // Leave the database as found (up to the migrations), also after a
    // failure part-way: the raw table goes, bench streams are deleted.
    let drop: String = RAW_TABLES.iter().map(|(table, _)| format!("DROP TABLE IF EXISTS {table};")).collect();
    let mut cleanup = admin.batch_execute(&drop).await.context("dropping the raw tables");
    for &c in &args.concurrency {
        for &b in &args.batch_sizes {
            if cleanup.is_ok() {
                cleanup = delete_streams(&admin, &stream_ids(&session, c, b)).await;
            }
        }
    }
    result.and(cleanup)
}

/// What one benchmark invocation shares between its rows.
struct Bench<'a> {
    args: &'a AppendBenchArgs,
    admin: &'a Client,
    log: &'a Arc<PostgresEventLog>,
    session: &'a str,
    writers: usize,
}

impl Bench<'_> {
    async fn run(&self, machine: &str) -> anyhow::Result<()> {
        let mut ddl = String::new();
        for (table, constraint) in RAW_TABLES {
            ddl.push_str(&format!(
                "DROP TABLE IF EXISTS {table};
                 CREATE TABLE {table} (
                     global_position bigserial PRIMARY KEY,
                     stream_id       text,
                     version         bigint,
                     event_id        uuid,
                     event_type      text,
                     data            jsonb,
                     metadata        jsonb,
                     created_at      timestamptz DEFAULT now(){constraint}
                 );"
            ));
        }
        self.admin.batch_execute(&ddl).await.context("creating the raw tables")?;

        let args = self.args;
        println!("{machine}");
        println!();
        println!(
            "Each row: {}s warm-up, then {}s measured, for eventfold ({} group-commit writers) and for raw INSERTs \
             into a table with a primary key and UNIQUE (stream_id, version), as any event store must enforce \
             (ratio), and into one with the primary key only (ratio PK only).",
            args.warmup_secs, args.duration_secs, self.writers
        );
        println!();
        println!(
            "| concurrency | batch | eventfold events/s | raw events/s | ratio | raw PK only events/s | ratio PK only | \
             eventfold p50/p95/p99 ms | raw p50/p95/p99 ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &c in &args.concurrency {
            for &b in &args.batch_sizes {
                let streams = stream_ids(self.session, c, b);

                self.settle().await?;
                let eventfold = self.measure_eventfold(&streams, b).await?;
                eprintln!("eventfold c={c} b={b}: {}", eventfold.summary(b));
                // The next row starts from a store without this row's events.
                delete_streams(self.admin, &streams).await?;
                self.vacuum("eventstore.events, eventstore.streams").await;

                let mut raws = Vec::new();
                for (table, _) in RAW_TABLES {
                    self.admin
                        .batch_execute(&format!("TRUNCATE {table} RESTART IDENTITY"))
                        .await
                        .with_context(|| format!("truncating {table}"))?;
                    self.settle().await?;
                    let raw = self.measure_raw(table, &streams, b).await?;
                    eprintln!("{table:<12} c={c} b={b}: {}", raw.summary(b));
                    self.admin
                        .batch_execute(&format!("TRUNCATE {table} RESTART IDENTITY"))
                        .await
                        .with_context(|| format!("truncating {table}"))?;
                    raws.push(raw);
                }
                let (raw, raw_pk) = (&raws[0], &raws[1]);
                println!(
                    "| {c} | {b} | {} | {} | {:.2}x | {} | {:.2}x | {} | {} |",
                    thousands(eventfold.events_per_sec(b)),
                    thousands(raw.events_per_sec(b)),
                    eventfold.events_per_sec(b) / raw.events_per_sec(b),
                    thousands(raw_pk.events_per_sec(b)),
                    eventfold.events_per_sec(b) / raw_pk.events_per_sec(b),
                    eventfold.percentiles(),
                    raw.percentiles(),
                );
            }
        }
        Ok(())
    }

    /// Bring both systems to the same starting point: a checkpoint makes
    /// the first write of every page after it log a full page image, which
    /// should cost each measurement alike rather than whichever comes first.
    async fn settle(&self) -> anyhow::Result<()> {
        // Needs superuser or pg_checkpoint; without it the run is noisier,
        // not wrong.
        if let Err(e) = self.admin.batch_execute("CHECKPOINT").await {
            eprintln!("note: CHECKPOINT failed ({e}); rows may be noisier");
        }
        Ok(())
    }

    /// Clean up dead rows now rather than let autovacuum do it in the middle
    /// of the next measurement. Only owners may vacuum; then autovacuum it is.
    async fn vacuum(&self, tables: &str) {
        if let Err(e) = self.admin.batch_execute(&format!("VACUUM {tables}")).await {
            eprintln!("note: VACUUM {tables} failed ({e})");
        }
    }

    fn window(&self) -> Window {
        let measure_from = Instant::now() + Duration::from_secs(self.args.warmup_secs);
        Window { measure_from, until: measure_from + Duration::from_secs(self.args.duration_secs) }
    }

    async fn measure_eventfold(&self, streams: &[String], batch: usize) -> anyhow::Result<Measurement> {
        let targets = streams
            .iter()
            .map(|stream| Target::Eventfold { log: Arc::clone(self.log), stream: stream.clone() })
            .collect();
        drive(targets, batch, self.window()).await
    }

    async fn measure_raw(&self, table: &str, streams: &[String], batch: usize) -> anyhow::Result<Measurement> {
        // One connection per appender, as an application with a pool of c
        // connections would have; connected and prepared before the clock runs.
        let sql = if batch == 1 {
            format!(
                "INSERT INTO {table} (stream_id, version, event_id, event_type, data, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            )
        } else {
            format!(
                "INSERT INTO {table} (stream_id, version, event_id, event_type, data, metadata) \
                 SELECT $1, * FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[])"
            )
        };
        let sql = sql.as_str();
        let mut targets = Vec::with_capacity(streams.len());
        for stream in streams {
            let client = connect(&self.args.database_url).await?;
            let insert = client.prepare(sql).await.context("preparing the raw INSERT")?;
            targets.push(Target::Raw { client, insert, stream: stream.clone(), next_version: 0 });
        }
        drive(targets, batch, self.window()).await
    }
}

/// The streams of one row: one per appender, so appenders never contend
/// for a stream (the benchmark measures the log, not conflicts).
fn stream_ids(session: &str, concurrency: usize, batch: usize) -> Vec<String> {
    (0..concurrency).map(|task| format!("bench-{session}-c{concurrency}-b{batch}-{task}")).collect()
}

async fn delete_streams(admin: &Client, streams: &[String]) -> anyhow::Result<()> {
    // By exact id, so that only this run's streams can go, using the
    // (stream_id, version) index rather than a scan.
    admin
        .execute("DELETE FROM eventstore.events WHERE stream_id = ANY ($1)", &[&streams])
        .await
        .context("deleting bench events")?;
    admin
        .execute("DELETE FROM eventstore.streams WHERE stream_id = ANY ($1)", &[&streams])
        .await
        .context("deleting bench streams")?;
    Ok(())
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench connection closed: {e}");
        }
    });
    Ok(client)
}

/// An admin session on the throw-away database at `url`, with the
/// migrations applied, and the [`machine_line`] of the run.
pub(crate) async fn migrated(url: &str) -> anyhow::Result<(Client, String)> {
    let mut admin = connect(url).await?;
    eventfold_migrations::up(&mut admin).await.context("applying the migrations")?;
    let machine = machine_line(&admin).await?;
    Ok((admin, machine))
}

/// What the numbers depend on besides eventfold: cores (client and server
/// share them here) and whether commits wait for the disk.
async fn machine_line(admin: &Client) -> anyhow::Result<String> {
    let show = async |name: &str| -> anyhow::Result<String> {
        let rows = admin.simple_query(&format!("SHOW {name}")).await.with_context(|| format!("SHOW {name}"))?;
        Ok(rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_else(|| "?".to_owned()))
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned())
            })
        })
        .map_or_else(String::new, |model| format!(" ({model})"));
    Ok(format!(
        "Machine: nproc {cores}{cpu}, PostgreSQL {}, fsync={}, synchronous_commit={}",
        show("server_version").await?,
        show("fsync").await?,
        show("synchronous_commit").await?,
    ))
}

/// The measured span: appends that complete inside it count. Counting by
/// completion rather than start keeps the rate unbiased at both edges.
#[derive(Debug, Clone, Copy)]
struct Window {
    measure_from: Instant,
    until: Instant,
}

/// One appender's way of appending a batch.
enum Target {
    Eventfold { log: Arc<PostgresEventLog>, stream: String },
    Raw { client: Client, insert: Statement, stream: String, next_version: i64 },
}

impl Target {
    async fn append(&mut self, events: Vec<NewEvent>) -> anyhow::Result<()> {
        match self {
            Self::Eventfold { log, stream } => {
                log.append(AppendRequest::new(stream.as_str(), ExpectedVersion::Any, events)).await?;
            }
            Self::Raw { client, insert, stream, next_version } => {
                let first = *next_version;
                *next_version += events.len() as i64;
                let metadata: Vec<Value> = events.iter().map(|e| e.metadata.to_json()).collect();
                if let [event] = events.as_slice() {
                    client
                        .execute(
                            &*insert,
                            &[&*stream, &first, &event.event_id, &event.event_type, &event.data, &metadata[0]],
                        )
                        .await?;
                } else {
                    let versions: Vec<i64> = (first..*next_version).collect();
                    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
                    let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
                    client.execute(&*insert, &[&*stream, &versions, &ids, &types, &data, &metadata]).await?;
                }
            }
        }
        Ok(())
    }
}

/// Run every target as its own task until the window closes; gather the
/// latencies of the appends that completed inside it.
async fn drive(targets: Vec<Target>, batch: usize, window: Window) -> anyhow::Result<Measurement> {
    // A JoinSet aborts the other appenders when one fails and this returns
    // early, so none keeps appending while the caller cleans up.
    let mut tasks = tokio::task::JoinSet::new();
    for (task, mut target) in targets.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut payloads = Payloads::new(task as u64);
            let mut latencies = Vec::new();
            while Instant::now() < window.until {
                // Payloads are built before the clock starts: they are the
                // caller's work, identical for both systems.
                let events: Vec<NewEvent> = (0..batch).map(|_| payloads.next_event()).collect();
                let start = Instant::now();
                target.append(events).await?;
                let done = Instant::now();
                if done >= window.measure_from && done < window.until {
                    latencies.push(done - start);
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(task) = tasks.join_next().await {
        latencies.extend(task.context("bench task panicked")??);
    }
    latencies.sort_unstable();
    Ok(Measurement {
        latencies,
        seconds: (window.until - window.measure_from).as_secs_f64(),
        worst_per_second: Vec::new(),
    })
}

/// The appends of one system in one row.
pub(crate) struct Measurement {
    /// Sorted.
    pub(crate) latencies: Vec<Duration>,
    pub(crate) seconds: f64,
    /// Open-loop runs: the slowest latency of each second's sends, in
    /// order (where in the run the tail came from).
    pub(crate) worst_per_second: Vec<Duration>,
}

impl Measurement {
    fn appends_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    fn events_per_sec(&self, batch: usize) -> f64 {
        self.appends_per_sec() * batch as f64
    }

    /// Nearest-rank percentile in milliseconds (`p` to four decimals).
    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        // In whole millionths, so that the rank is exact: in floating point
        // 0.999 × 1000 is 999.0000000000001, whose ceiling would be the
        // maximum instead of the 999th.
        let millionths = (p * 10_000.0).round().clamp(0.0, 1_000_000.0) as u128;
        let rank = (millionths * self.latencies.len() as u128).div_ceil(1_000_000);
        let rank = usize::try_from(rank).unwrap_or(usize::MAX);
        self.latencies[rank.clamp(1, self.latencies.len()) - 1].as_secs_f64() * 1000.0
    }

    fn percentiles(&self) -> String {
        let [p50, p95, p99] = [50.0, 95.0, 99.0].map(|p| self.percentile_ms(p));
        format!("{} / {} / {}", ms(p50), ms(p95), ms(p99))
    }

    fn summary(&self, batch: usize) -> String {
        format!(
            "{} appends/s, {} events/s, p50/p95/p99 {} ms",
            thousands(self.appends_per_sec()),
            thousands(self.events_per_sec(batch)),
            self.percentiles()
        )
    }
}

/// Milliseconds with the precision that matters at that size.
pub(crate) fn ms(value: f64) -> String {
    if value < 10.0 { format!("{value:.2}") } else { format!("{value:.1}") }
}

/// A rate rounded to a whole number, with thousands separators.
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Order events of about 200 bytes of JSON, varied so that no layer (JSON
/// encoding, TOAST, compression) sees the same bytes twice.
struct Payloads {
    task: u64,
    sequence: u64,
    state: u64,
}

impl Payloads {
    fn new(task: u64) -> Self {
        Self { task, sequence: 0, state: 0x9E37_79B9_7F4A_7C15 ^ (task + 1) }
    }

    /// xorshift64: cheap, deterministic and good enough to vary payloads.
    fn random(&mut self, below: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % below
    }

    fn next_event(&mut self) -> NewEvent {
        self.sequence += 1;
        let (qty_a, qty_b) = (1 + self.random(5), 1 + self.random(3));
        let (price_a, price_b) = (199 + self.random(9800), 199 + self.random(9800));
        let mut order_id = String::with_capacity(24);
        let _ = write!(order_id, "ord-{:04}-{:010}", self.task, self.sequence);
        let data = json!({
            "order_id": order_id,
            "customer_id": format!("cus-{:06}", self.random(1_000_000)),
            "currency": "EUR",
            "country": "DE",
            "total_cents": qty_a * price_a + qty_b * price_b,
            "items": [
                { "sku": format!("SKU-{:05}", self.random(100_000)), "qty": qty_a, "unit_cents": price_a },
                { "sku": format!("SKU-{:05}", self.random(100_000)), "qty": qty_b, "unit_cents": price_b },
            ],
        });
        NewEvent::new("OrderPlaced", data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_about_200_bytes_of_json() {
        let mut payloads = Payloads::new(3);
        for _ in 0..100 {
            let len = serde_json::to_string(&payloads.next_event().data).unwrap().len();
            assert!((180..=240).contains(&len), "payload of {len} bytes");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let m = Measurement {
            latencies: (1..=100).map(Duration::from_millis).collect(),
            seconds: 1.0,
            worst_per_second: Vec::new(),
        };
        assert_eq!(m.percentile_ms(50.0), 50.0);
        assert_eq!(m.percentile_ms(99.0), 99.0);
        assert_eq!(m.percentile_ms(100.0), 100.0);
        assert_eq!(m.events_per_sec(10), 1000.0);
    }

    #[test]
    fn fractional_percentiles_take_the_exact_rank() {
        // 0.999 × 1000 is 999.0000000000001 in floating point: a rank
        // computed from it would be 1000, the maximum.
        for n in [1000u64, 10_000, 15_000, 30_000] {
            let m = Measurement {
                latencies: (1..=n).map(Duration::from_micros).collect(),
                seconds: 1.0,
                worst_per_second: Vec::new(),
            };
            let expect = |rank: u64| Duration::from_micros(rank).as_secs_f64() * 1000.0;
            assert_eq!(m.percentile_ms(99.9), expect(n / 1000 * 999), "p99.9 of {n}");
            assert_eq!(m.percentile_ms(99.0), expect(n / 100 * 99), "p99 of {n}");
            assert_eq!(m.percentile_ms(50.0), expect(n / 2), "p50 of {n}");
        }
        let one = Measurement { latencies: vec![Duration::from_millis(7)], seconds: 1.0, worst_per_second: Vec::new() };
        assert_eq!((one.percentile_ms(0.0), one.percentile_ms(99.9)), (7.0, 7.0));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn args_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: AppendBenchArgs,
        }
        let cli = Cli::try_parse_from(["bench", "--database-url", "postgresql://x@localhost/db"]).unwrap();
        assert_eq!(cli.args.concurrency, [1, 8, 32]);
        assert_eq!(cli.args.batch_sizes, [1, 10, 100]);
        assert_eq!((cli.args.duration_secs, cli.args.warmup_secs), (10, 2));
        let cli =
            Cli::try_parse_from(["bench", "--database-url", "u", "--concurrency", "2,4", "--batch-sizes=5"]).unwrap();
        assert_eq!((cli.args.concurrency, cli.args.batch_sizes), (vec![2, 4], vec![5]));
    }
}
