//! The engine: batches of the global log applied in one transaction with
//! their checkpoint; poison events parked; versions built side by side and
//! switched atomically.

use std::{sync::Arc, time::Duration};
use tracing::Instrument;

use eventfold_platform::runtime::CancellationToken;
use eventfold_store::{
    AllRead, Backoff, Database, EventFilter, EventLog, EventSource, LogSource, RecordedEvent, source::Cursor,
};
use tokio_postgres::Transaction;

use crate::{ApplyError, Projection, Result, admin};

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
    /// The waits between the attempts of one event.
    pub retry: Backoff,
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
            retry: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
            idle_poll: Duration::from_millis(500),
        }
    }
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

/// Takes the checkpoint of `version` of projection `name` for the
/// transaction `tx`: one projector applies a batch at a time. An advisory
/// lock, not the row's: a row lock would give the transaction an id before
/// it reads the log, and the gap-safe reads of every process (its own
/// included) wait for older transaction ids to finish.
pub async fn lock_checkpoint(tx: &Transaction<'_>, name: &str, version: i32) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1), $2)", &[&name, &version]).await?;
    Ok(())
}

/// Runs one version of one projection. Clones share the database, the log
/// and the source: a clone runs the same projector again (under a
/// supervisor, say).
#[derive(Clone)]
pub struct Projector {
    database: Database,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    version: u32,
    options: ProjectorOptions,
    observer: Option<Arc<dyn CommitObserver>>,
    /// When the head of the log was last read for the lag gauge.
    head_read: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
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

impl Projector {
    /// A projector of `projection` at `version`, keeping its read model in
    /// `database` (which holds the migrations). A read-model commit lost in
    /// a server crash is applied again from the checkpoint it was committed
    /// with: a pool whose sessions do not wait for the WAL flush suits it
    /// (`Databases::workers` of the platform's runtime).
    pub fn new(
        database: Database,
        log: Arc<dyn EventLog>,
        projection: Arc<dyn Projection>,
        version: u32,
        options: ProjectorOptions,
    ) -> Self {
        let source: Arc<dyn EventSource> = Arc::new(LogSource::filtered(log.clone(), projection.event_filter()));
        Self {
            database,
            log,
            projection,
            version,
            options,
            observer: None,
            head_read: Arc::new(std::sync::Mutex::new(None)),
            source,
        }
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
        let mut client = self.database.get().await?;
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
        let mut client = self.database.get().await?;
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
        let mut client = self.database.get().await?;
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
        let at = Cursor { tx: &tx, consumer: &consumer, position: start };
        let pulled = self.source.pull(at, batch).await?;
        let caught_up = pulled.events.len() < batch;
        let events = &pulled.events;
        let mut applied = 0i64;
        let mut considered = 0;
        if self.apply_set_based(&tx, events).await? {
            applied = events.len() as i64;
            considered = events.len();
            // One span per event all the same, in the trace of each.
            for event in events {
                let _applied = self.apply_span(event).entered();
            }
        } else {
            for event in events {
                if considered > 0 && started.elapsed() >= self.options.batch_time {
                    break;
                }
                if self.apply_with_retries(&tx, event).instrument(self.apply_span(event)).await? {
                    applied += 1;
                }
                considered += 1;
            }
        }
        let complete = considered == events.len();
        let position = self.source.ack(at, &pulled, considered).await?;
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
        // Failpoint `projector::after_apply`: the batch is applied and the
        // checkpoint moved, both inside this transaction, not yet committed
        // (a crash here must leave neither, so that the batch applies once).
        eventfold_store::failpoint!("projector::after_apply");
        tx.commit().await?;
        let applied_events = &events[..considered];
        if let Some(observer) = &self.observer {
            observer
                .committed(Commit { projection: self.name(), version: self.version, position, events: applied_events })
                .await;
        }
        metrics::counter!("eventfold_projection_events_total", "projection" => self.name()).increment(applied as u64);
        metrics::histogram!("eventfold_projection_batch_seconds", "projection" => self.name())
            .record(started.elapsed());
        self.record_lag(position, caught_up && complete, applied_events.last()).await;
        Ok(considered.max(1))
    }

    /// The span of applying `event`: a child of the trace its metadata
    /// carries (the command that appended it, or the consumer that took it
    /// from Kafka).
    fn apply_span(&self, event: &RecordedEvent) -> tracing::Span {
        let span = tracing::info_span!(
            "projection.apply",
            otel.name = %format_args!("apply {}", self.name()),
            projection = self.name(),
            position = event.global_position,
            event_type = %event.event_type,
        );
        let traceparent = event.metadata.custom.get(eventfold_platform::trace::TRACEPARENT).map(String::as_str);
        eventfold_platform::trace::set_parent(&span, traceparent, None);
        span
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
        let mut retries = self.options.retry.start();
        loop {
            let attempt = retries.attempts() + 1;
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
                    retries.wait().await;
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
        // Counted when parked; a batch rolled back after this parks it again.
        metrics::counter!("eventfold_projection_parked_total", "projection" => self.name()).increment(1);
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
        let mut client = self.database.get().await?;
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
        admin::active_version(&self.database, self.name()).await
    }

    /// The checkpoint: every event up to here is applied or parked.
    pub async fn position(&self) -> Result<u64> {
        let client = self.database.get().await?;
        let row = client
            .query_one(
                "SELECT position FROM projections.checkpoints WHERE name = $1 AND version = $2",
                &[&self.name(), &self.version_param()],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Prepares, then follows the source until `token` is cancelled
    /// (`Ok`). Ends at the first failure (PostgreSQL away, …) with the
    /// error: whatever was not committed is applied again from the
    /// checkpoint by the next run, which a supervisor starts (see
    /// [`run_active`]).
    pub async fn run(self, token: CancellationToken) -> Result<()> {
        let mut wake = self.source.changed();
        self.prepare().await?;
        // Exported at zero until something parks (alerts see the series).
        metrics::counter!("eventfold_projection_parked_total", "projection" => self.name()).increment(0);
        while !token.is_cancelled() {
            if self.step().await? == 0 {
                tokio::select! {
                    _ = wake.changed() => {}
                    () = tokio::time::sleep(self.options.idle_poll) => {}
                    () = token.cancelled() => {}
                }
            }
        }
        Ok(())
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
/// yet) in `database`, from the attached source (default: the log), until
/// `token` is cancelled (`Ok`). When a rebuild activates another version,
/// the projector switches to it within `poll`. A failure of the projector
/// ends the run with the error: run it under the platform's supervisor
/// (`eventfold_platform::runtime::supervise`), which starts it again after
/// a backoff, from the checkpoint.
pub async fn run_active(
    database: Database,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    options: ProjectorOptions,
    attach: Attach,
    poll: Duration,
    token: CancellationToken,
) -> Result<()> {
    let name = projection.name();
    loop {
        let version = tokio::select! {
            active = admin::active_version(&database, name) => active?.unwrap_or(1),
            () = token.cancelled() => return Ok(()),
        };
        let mut projector = Projector::new(database.clone(), log.clone(), projection.clone(), version, options.clone());
        if let Some(observer) = &attach.observer {
            projector = projector.with_observer(observer.clone());
        }
        if let Some(source) = &attach.source {
            projector = projector.with_source(source.clone());
        }
        let stop = token.child_token();
        // Whoever drops this run (an aborted task) stops its projector too.
        let _stop_on_drop = stop.clone().drop_guard();
        let mut running = tokio::spawn(projector.run(stop.clone()));
        tracing::info!(projection = name, version, "projector running");
        loop {
            tokio::select! {
                // Cancelled (`Ok`) or failed: either way this run is over.
                finished = &mut running => return joined(finished),
                () = tokio::time::sleep(poll) => match admin::active_version(&database, name).await {
                    Ok(Some(active)) if active != version => {
                        tracing::info!(projection = name, from = version, to = active, "active version switched");
                        stop.cancel();
                        joined(running.await)?;
                        break;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(projection = name, %error, "active version unknown"),
                },
            }
        }
    }
}

/// The outcome of a projector's task; its panic goes on to the caller's
/// (the supervisor logs it and restarts).
fn joined(outcome: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match outcome {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled: the runtime is going away.
        Err(_) => Ok(()),
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
