//! The engine: batches of the global log applied in one transaction with
//! their checkpoint; poison events parked; versions built side by side and
//! switched atomically.

use std::{sync::Arc, time::Duration};

use bb8::Pool;
use bb8_postgres::PostgresConnectionManager;
use eventfold_store::{AllRead, EventFilter, EventLog, EventSource, LogSource, RecordedEvent};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::{ApplyError, Error, Projection, Result};

/// How a projector works through the log.
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Longest time one transaction keeps applying: a batch commits after
    /// `batch_size` events or this long, whichever comes first (and at
    /// once when the projection has caught up).
    pub batch_time: Duration,
    /// Attempts of one event before it is parked.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubled for each further one.
    pub retry_backoff: Duration,
    /// Longest sleep when caught up (appends of this process wake it
    /// sooner; those of other processes through NOTIFY).
    pub idle_poll: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            batch_time: Duration::from_millis(250),
            max_attempts: 3,
            retry_backoff: Duration::from_millis(10),
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// Where a projection version stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub version: u32,
    /// Every event up to here is applied or parked.
    pub position: u64,
    pub events_applied: u64,
    /// Whether the public views show this version.
    pub active: bool,
    /// Parked events not yet replayed.
    pub parked: u64,
    /// Stopped versions apply nothing until started again.
    pub stopped: bool,
}

/// The channel on which a projector announces each commit (payload
/// `name:version:position`), so query services wait for a position without
/// polling. Other changes (a version activated, stopped, reset) send a
/// payload without a position.
pub const COMMIT_CHANNEL: &str = "eventfold_projections";

/// One committed batch of a projector.
#[derive(Debug)]
pub struct Commit<'a> {
    pub projection: &'static str,
    pub version: u32,
    /// The checkpoint after the batch.
    pub position: u64,
    /// The events the batch applied.
    pub events: &'a [RecordedEvent],
}

/// Told about each batch after its transaction committed (e.g. to
/// invalidate cached query answers). It must not fail the projector: it
/// keeps what it could not do and does it later.
#[async_trait::async_trait]
pub trait CommitObserver: Send + Sync + 'static {
    async fn committed(&self, commit: Commit<'_>);
}

/// Every version of every projection in the database.
pub async fn status(client: &Client) -> Result<Vec<Status>> {
    let rows = client
        .query(
            "SELECT c.name, c.version, c.position, c.events_applied, a.version IS NOT NULL AS active, \
                    (SELECT count(*) FROM projections.parked p \
                      WHERE p.name = c.name AND p.version = c.version AND p.replayed_at IS NULL) AS parked, \
                    c.stopped \
               FROM projections.checkpoints c \
               LEFT JOIN projections.active a ON a.name = c.name AND a.version = c.version \
              ORDER BY c.name, c.version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Status {
            name: r.get(0),
            version: r.get::<_, i32>(1) as u32,
            position: r.get::<_, i64>(2) as u64,
            events_applied: r.get::<_, i64>(3) as u64,
            active: r.get(4),
            parked: r.get::<_, i64>(5) as u64,
            stopped: r.get(6),
        })
        .collect())
}

/// Stops (`true`) or starts every version of projection `name`; running
/// projectors notice at their next batch. Whether the projection exists.
pub async fn set_stopped(client: &Client, name: &str, stopped: bool) -> Result<bool> {
    let changed =
        client.execute("UPDATE projections.checkpoints SET stopped = $2 WHERE name = $1", &[&name, &stopped]).await?;
    client.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &name]).await?;
    Ok(changed > 0)
}

/// Takes the checkpoint of `version` of projection `name` for the
/// transaction `tx`: one projector applies a batch at a time. An advisory
/// lock, not the row's: a row lock would give the transaction an id before
/// it reads the log, and the gap-safe reads of every process (its own
/// included) wait for older transaction ids to finish.
pub async fn lock_checkpoint(tx: &Transaction<'_>, name: &str, version: i32) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1), $2)", &[&name, &version]).await?;
    Ok(())
}

/// Empties the tables of the active version of `projection` and moves its
/// checkpoint back to 0, in one transaction: its projectors apply the whole
/// log again (the public views show the partial model meanwhile; a rebuild
/// avoids that). Parked events of the version are forgotten. The version
/// reset, if one is active.
pub async fn reset(client: &mut Client, projection: &dyn Projection) -> Result<Option<u32>> {
    let tx = client.transaction().await?;
    let active = "SELECT c.version FROM projections.checkpoints c \
                    JOIN projections.active a ON a.name = c.name AND a.version = c.version \
                   WHERE c.name = $1";
    let Some(row) = tx.query_opt(active, &[&projection.name()]).await? else {
        return Ok(None);
    };
    let mut version: i32 = row.get(0);
    // The checkpoint's lock first, as a projector takes it, then the
    // version again under it (an activation may have come between).
    loop {
        lock_checkpoint(&tx, projection.name(), version).await?;
        let Some(row) = tx.query_opt(&format!("{active} FOR UPDATE OF c"), &[&projection.name()]).await? else {
            return Ok(None);
        };
        let now: i32 = row.get(0);
        if now == version {
            break;
        }
        version = now;
    }
    let tables = projection.tables(version as u32).join(", ");
    tx.batch_execute(&format!("TRUNCATE {tables}")).await?;
    tx.execute(
        "UPDATE projections.checkpoints SET position = 0, events_applied = 0, updated_at = clock_timestamp() \
          WHERE name = $1 AND version = $2",
        &[&projection.name(), &version],
    )
    .await?;
    tx.execute("DELETE FROM projections.parked WHERE name = $1 AND version = $2", &[&projection.name(), &version])
        .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &format!("{}:{version}:reset", projection.name())])
        .await?;
    tx.commit().await?;
    Ok(Some(version as u32))
}

/// Runs one version of one projection.
pub struct Projector {
    pool: Pool<PostgresConnectionManager<NoTls>>,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    version: u32,
    options: ProjectorOptions,
    observer: Option<Arc<dyn CommitObserver>>,
    /// When the head of the log was last read for the lag gauge.
    head_read: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where the events come from: the log (default) or another source.
    source: Arc<dyn EventSource>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("projection", &self.projection.name())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn pool_error(e: impl std::fmt::Display) -> Error {
    Error::Pool(e.to_string())
}

impl Projector {
    /// A projector of `projection` at `version`, keeping its read model in
    /// the database of `database_url` (which holds the migrations).
    pub async fn new(
        database_url: &str,
        log: Arc<dyn EventLog>,
        projection: Arc<dyn Projection>,
        version: u32,
        options: ProjectorOptions,
    ) -> Result<Self> {
        let mut config: tokio_postgres::Config = database_url.parse()?;
        // A read-model commit lost in a server crash is applied again from
        // the checkpoint it was committed with: waiting for the WAL flush
        // buys nothing here.
        eventfold_store::postgres::without_flush_wait(&mut config);
        let pool = Pool::builder()
            .max_size(2)
            .connection_timeout(Duration::from_secs(5))
            .build(PostgresConnectionManager::new(config, NoTls))
            .await
            .map_err(pool_error)?;
        let source: Arc<dyn EventSource> = Arc::new(LogSource::new(log.clone()));
        Ok(Self {
            pool,
            log,
            projection,
            version,
            options,
            observer: None,
            head_read: std::sync::Mutex::new(None),
            source,
        })
    }

    /// Tells `observer` about every committed batch.
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn CommitObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn version_param(&self) -> i32 {
        i32::try_from(self.version).unwrap_or(i32::MAX)
    }

    /// Creates this version's tables and checkpoint; activates it when no
    /// version of the projection is active yet.
    pub async fn prepare(&self) -> Result<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        // One preparer at a time per projection.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&self.name()]).await?;
        tx.batch_execute(&self.projection.create_sql(self.version)).await?;
        tx.execute(
            "INSERT INTO projections.checkpoints (name, version) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&self.name(), &self.version_param()],
        )
        .await?;
        let active = tx.query_opt("SELECT version FROM projections.active WHERE name = $1", &[&self.name()]).await?;
        if active.is_none() {
            activate_in(&tx, self.projection.as_ref(), self.version).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Points the public views at this version, atomically.
    pub async fn activate(&self) -> Result<()> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&self.name()]).await?;
        activate_in(&tx, self.projection.as_ref(), self.version).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies at most one batch: `batch_size` events or `batch_time`,
    /// whichever comes first. Returns how many events it considered; 0
    /// means caught up with what was visible (or stopped).
    pub async fn step(&self) -> Result<usize> {
        let started = std::time::Instant::now();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        // The checkpoint's lock keeps a second instance of this version
        // from applying the same batch.
        lock_checkpoint(&tx, self.name(), self.version_param()).await?;
        let row = tx
            .query_one(
                "SELECT position, stopped FROM projections.checkpoints WHERE name = $1 AND version = $2",
                &[&self.name(), &self.version_param()],
            )
            .await?;
        if row.get::<_, bool>(1) {
            return Ok(0);
        }
        let start = row.get::<_, i64>(0) as u64;
        let batch = self.options.batch_size.max(1);
        let consumer = self.consumer();
        let pulled = self.source.pull(&tx, &consumer, start, batch).await?;
        let caught_up = pulled.events.len() < batch;
        let events = &pulled.events;
        let mut applied = 0i64;
        let mut considered = 0;
        if self.apply_set_based(&tx, events).await? {
            applied = events.len() as i64;
            considered = events.len();
        } else {
            for event in events {
                if considered > 0 && started.elapsed() >= self.options.batch_time {
                    break;
                }
                if self.apply_with_retries(&tx, event).await? {
                    applied += 1;
                }
                considered += 1;
            }
        }
        let complete = considered == events.len();
        let position = self.source.ack(&tx, &consumer, start, &pulled, considered).await?;
        if considered == 0 && position <= start {
            // Nothing new for the projection; what the source skipped
            // (duplicates, dead letters) is acknowledged all the same.
            tx.commit().await?;
            self.record_lag(start, caught_up, None).await;
            return Ok(usize::from(pulled.skipped > 0));
        }
        tx.execute(
            "UPDATE projections.checkpoints SET position = $3, events_applied = events_applied + $4, \
                    updated_at = clock_timestamp() WHERE name = $1 AND version = $2",
            &[&self.name(), &self.version_param(), &(position as i64), &applied],
        )
        .await?;
        // Delivered at commit, only if it commits.
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&COMMIT_CHANNEL, &format!("{}:{}:{position}", self.name(), self.version)],
        )
        .await?;
        tx.commit().await?;
        let applied_events = &events[..considered];
        if let Some(observer) = &self.observer {
            observer
                .committed(Commit { projection: self.name(), version: self.version, position, events: applied_events })
                .await;
        }
        metrics::counter!("eventfold_projection_events_total", "projection" => self.name()).increment(applied as u64);
        self.record_lag(position, caught_up && complete, applied_events.last()).await;
        Ok(considered.max(1))
    }

    /// The name under which the source keeps this version's progress.
    fn consumer(&self) -> String {
        format!("projection:{}:v{}", self.name(), self.version)
    }

    /// Takes events from `source` instead of the log (e.g. Kafka).
    #[must_use]
    pub fn with_source(mut self, source: Arc<dyn EventSource>) -> Self {
        self.source = source;
        self
    }

    /// Position, lag in positions (head − checkpoint, the head read at most
    /// once a second) and lag in time (age of the last applied event).
    async fn record_lag(&self, position: u64, caught_up: bool, last: Option<&RecordedEvent>) {
        let version = self.version.to_string();
        let labels = [("projection", self.name().to_owned()), ("version", version)];
        metrics::gauge!("eventfold_projection_position", &labels).set(position as f64);
        if let Some(last) = last {
            let behind = std::time::SystemTime::now().duration_since(last.created_at).unwrap_or_default();
            metrics::gauge!("eventfold_projection_lag_seconds", &labels).set(behind.as_secs_f64());
        } else if caught_up {
            metrics::gauge!("eventfold_projection_lag_seconds", &labels).set(0.0);
        }
        if caught_up {
            metrics::gauge!("eventfold_projection_lag_positions", &labels).set(0.0);
            return;
        }
        let due = {
            let mut read = self.head_read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = read.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
            if due {
                *read = Some(std::time::Instant::now());
            }
            due
        };
        if due && let Ok(head) = self.log.last_position().await {
            metrics::gauge!("eventfold_projection_lag_positions", &labels).set(head.saturating_sub(position) as f64);
        }
    }

    /// The whole batch through [`Projection::apply_batch`], in a savepoint;
    /// whether it was applied (false: not supported, or failed and undone).
    async fn apply_set_based(&self, tx: &Transaction<'_>, events: &[RecordedEvent]) -> Result<bool> {
        if events.is_empty() {
            return Ok(false);
        }
        tx.batch_execute("SAVEPOINT apply_batch").await?;
        match self.projection.apply_batch(tx, self.version, events).await {
            Ok(true) => {
                tx.batch_execute("RELEASE SAVEPOINT apply_batch").await?;
                Ok(true)
            }
            Ok(false) => {
                tx.batch_execute("RELEASE SAVEPOINT apply_batch").await?;
                Ok(false)
            }
            Err(error) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT apply_batch").await?;
                tracing::debug!(projection = self.name(), %error, "batch failed; applying event by event");
                Ok(false)
            }
        }
    }

    /// One event in a savepoint, retried; parked (in the same transaction)
    /// when every attempt fails. Whether it was applied.
    async fn apply_with_retries(&self, tx: &Transaction<'_>, event: &RecordedEvent) -> Result<bool> {
        let mut pause = self.options.retry_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            tx.batch_execute("SAVEPOINT apply_event").await?;
            match self.projection.apply(tx, self.version, event).await {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT apply_event").await?;
                    return Ok(true);
                }
                Err(error) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT apply_event").await?;
                    if attempt >= self.options.max_attempts.max(1) {
                        self.park(tx, event, &error, attempt).await?;
                        return Ok(false);
                    }
                    tracing::debug!(projection = self.name(), position = event.global_position, %error, attempt, "retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }

    async fn park(&self, tx: &Transaction<'_>, event: &RecordedEvent, error: &ApplyError, attempts: u32) -> Result<()> {
        tracing::warn!(
            projection = self.name(),
            version = self.version,
            position = event.global_position,
            event_type = %event.event_type,
            %error,
            "event parked"
        );
        tx.execute(
            "INSERT INTO projections.parked (name, version, global_position, event_id, stream_id, event_type, error, \
                                             attempts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (name, version, global_position) DO UPDATE \
                SET error = EXCLUDED.error, attempts = projections.parked.attempts + EXCLUDED.attempts, \
                    parked_at = clock_timestamp(), replayed_at = NULL",
            &[
                &self.name(),
                &self.version_param(),
                &(event.global_position as i64),
                &event.event_id,
                &event.stream_id,
                &event.event_type,
                &error.to_string(),
                &(attempts as i32),
            ],
        )
        .await?;
        Ok(())
    }

    /// Applies the parked events of this version again (after a fix), in
    /// position order; those that apply are marked replayed, the others
    /// stay parked with their new error. Returns how many applied.
    pub async fn replay_parked(&self) -> Result<usize> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        lock_checkpoint(&tx, self.name(), self.version_param()).await?;
        let parked = tx
            .query(
                "SELECT global_position FROM projections.parked \
                  WHERE name = $1 AND version = $2 AND replayed_at IS NULL ORDER BY global_position",
                &[&self.name(), &self.version_param()],
            )
            .await?;
        let mut applied = 0;
        for row in parked {
            let position = row.get::<_, i64>(0) as u64;
            let read = AllRead { after: position - 1, max_count: 1, filter: EventFilter::default() };
            let Some(event) = self.log.read_all(read).await?.events.into_iter().find(|e| e.global_position == position)
            else {
                continue;
            };
            if self.apply_with_retries(&tx, &event).await? {
                tx.execute(
                    "UPDATE projections.parked SET replayed_at = clock_timestamp() \
                      WHERE name = $1 AND version = $2 AND global_position = $3",
                    &[&self.name(), &self.version_param(), &(position as i64)],
                )
                .await?;
                applied += 1;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// The version of this projection that the public views show, if any.
    pub async fn active_version(&self) -> Result<Option<u32>> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client.query_opt("SELECT version FROM projections.active WHERE name = $1", &[&self.name()]).await?;
        Ok(row.map(|r| r.get::<_, i32>(0) as u32))
    }

    /// The checkpoint: every event up to here is applied or parked.
    pub async fn position(&self) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                "SELECT position FROM projections.checkpoints WHERE name = $1 AND version = $2",
                &[&self.name(), &self.version_param()],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Prepares, then follows the log until `shutdown` turns true. Failures
    /// (PostgreSQL away, …) are logged and retried with backoff: whatever
    /// was not committed is applied again from the checkpoint.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut wake = self.source.changed();
        let mut backoff = Duration::from_millis(100);
        let mut prepared = false;
        while !*shutdown.borrow() {
            let result = if prepared { self.step().await } else { self.prepare().await.map(|()| 1) };
            match result {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = wake.changed() => {}
                        () = tokio::time::sleep(self.options.idle_poll) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Ok(_) => {
                    prepared = true;
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(projection = self.name(), version = self.version, error = %e, "projector failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// What [`run_active`] gives each projector it starts.
#[derive(Clone, Default)]
pub struct Attach {
    /// Told about each commit.
    pub observer: Option<Arc<dyn CommitObserver>>,
    /// Where the events come from (default: the log).
    pub source: Option<Arc<dyn EventSource>>,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("observer", &self.observer.is_some())
            .field("source", &self.source.is_some())
            .finish()
    }
}

/// Runs the active version of `projection` (version 1 if none is active
/// yet), from the attached source (default: the log), until `shutdown`
/// turns true. When a rebuild activates another
/// version, the projector switches to it within `poll`. Failures are logged
/// and retried.
pub async fn run_active(
    database_url: String,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    options: ProjectorOptions,
    attach: Attach,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Attach { observer, source } = attach;
    let name = projection.name();
    let mut backoff = Duration::from_millis(100);
    while !*shutdown.borrow() {
        let started = async {
            let probe = Projector::new(&database_url, log.clone(), projection.clone(), 1, options.clone()).await?;
            let version = probe.active_version().await?.unwrap_or(1);
            let mut projector =
                Projector::new(&database_url, log.clone(), projection.clone(), version, options.clone()).await?;
            if let Some(observer) = &observer {
                projector = projector.with_observer(observer.clone());
            }
            if let Some(source) = &source {
                projector = projector.with_source(source.clone());
            }
            Ok::<_, Error>((probe, version, projector))
        }
        .await;
        let (probe, version, projector) = match started {
            Ok(started) => started,
            Err(error) => {
                tracing::warn!(projection = name, %error, "projector cannot start; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let (stop_tx, stop) = watch::channel(false);
        let mut task = tokio::spawn(projector.run(stop));
        tracing::info!(projection = name, version, "projector running");
        let mut finished = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                () = tokio::time::sleep(poll) => {
                    match probe.active_version().await {
                        Ok(Some(active)) if active != version => {
                            tracing::info!(projection = name, from = version, to = active, "active version switched");
                            break;
                        }
                        Ok(_) => {}
                        Err(error) => tracing::debug!(projection = name, %error, "active version unknown"),
                    }
                }
                _ = &mut task => {
                    finished = true;
                    break;
                }
            }
        }
        let _ = stop_tx.send(true);
        if !finished {
            let _ = task.await;
        }
    }
}

async fn activate_in(tx: &Transaction<'_>, projection: &dyn Projection, version: u32) -> Result<()> {
    tx.batch_execute(&projection.activate_sql(version)).await?;
    tx.execute(
        "INSERT INTO projections.active (name, version) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, switched_at = clock_timestamp()",
        &[&projection.name(), &i32::try_from(version).unwrap_or(i32::MAX)],
    )
    .await?;
    // Followers re-read the active versions on a payload without position.
    tx.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &format!("{}:{version}:activated", projection.name())])
        .await?;
    Ok(())
}
