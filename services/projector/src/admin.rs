//! The operator's side of the projections (`eventfold projections …`):
//! where each version stands, stop and start, reset, rebuild beside the
//! active version, and the parked events with their replay.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use eventfold_store::{Database, EventLog, from_bigint};

use crate::{COMMIT_CHANNEL, Projection, Projector, ProjectorOptions, Result, lock_checkpoint};

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

/// An event a projection version could not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    pub version: u32,
    /// Its global position in the log.
    pub position: u64,
    pub stream_id: String,
    pub event_type: String,
    pub attempts: u32,
    /// The last attempt's error.
    pub error: String,
    /// Whether a replay has applied it since.
    pub replayed: bool,
}

/// Where a rebuild is, after each of its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The version being built.
    pub version: u32,
    pub position: u64,
    /// The head of the log when the batch ended.
    pub head: u64,
    pub elapsed: Duration,
    /// The batch found nothing new.
    pub idle: bool,
}

/// A finished rebuild: the version now active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub version: u32,
    pub elapsed: Duration,
    /// Events the new version parked.
    pub parked: u64,
}

/// A replay of the parked events of the active version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub version: u32,
    /// Parked events that applied this time.
    pub applied: usize,
    /// Parked events that still fail.
    pub left: u64,
}

/// Every version of every projection in the database.
pub async fn status(database: &Database) -> Result<Vec<Status>> {
    let client = database.get().await?;
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
            version: stored_u32(r.get(1)),
            position: from_bigint(r.get(2)),
            events_applied: from_bigint(r.get(3)),
            active: r.get(4),
            parked: from_bigint(r.get(5)),
            stopped: r.get(6),
        })
        .collect())
}

/// The version of projection `name` that the public views show, if any.
pub async fn active_version(database: &Database, name: &str) -> Result<Option<u32>> {
    let client = database.get().await?;
    let row = client.query_opt("SELECT version FROM projections.active WHERE name = $1", &[&name]).await?;
    Ok(row.map(|r| stored_u32(r.get(0))))
}

/// Stops (`true`) or starts every version of projection `name`; running
/// projectors notice at their next batch. Whether the projection exists.
pub async fn set_stopped(database: &Database, name: &str, stopped: bool) -> Result<bool> {
    let client = database.get().await?;
    let changed =
        client.execute("UPDATE projections.checkpoints SET stopped = $2 WHERE name = $1", &[&name, &stopped]).await?;
    client.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &name]).await?;
    Ok(changed > 0)
}

/// Empties the tables of the active version of `projection` and moves its
/// checkpoint back to 0, in one transaction: its projectors apply the whole
/// log again (the public views show the partial model meanwhile; a rebuild
/// avoids that). Parked events of the version are forgotten. The version
/// reset, if one is active.
pub async fn reset(database: &Database, projection: &dyn Projection) -> Result<Option<u32>> {
    let mut client = database.get().await?;
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
    let tables = projection.tables(stored_u32(version));
    // A projection that keeps no rebuildable tables (the saga intake) only
    // moves its checkpoint.
    if !tables.is_empty() {
        tx.batch_execute(&format!("TRUNCATE {}", tables.join(", "))).await?;
    }
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
    Ok(Some(stored_u32(version)))
}

/// The parked events of every version of projection `name`, replayed ones
/// included, by version and position.
pub async fn parked(database: &Database, name: &str) -> Result<Vec<ParkedEvent>> {
    let client = database.get().await?;
    let rows = client
        .query(
            "SELECT version, global_position, stream_id, event_type, attempts, error, replayed_at IS NOT NULL \
               FROM projections.parked WHERE name = $1 \
              ORDER BY version, global_position",
            &[&name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ParkedEvent {
            version: stored_u32(r.get(0)),
            position: from_bigint(r.get(1)),
            stream_id: r.get(2),
            event_type: r.get(3),
            attempts: stored_u32(r.get(4)),
            error: r.get(5),
            replayed: r.get(6),
        })
        .collect())
}

/// Builds the next version of `projection` from position 0 while the
/// active one keeps serving, up to the head of `log`, then activates it.
/// Large batches (2,000 events or 1 s per transaction): a rebuild is
/// throughput work; the rest of `options` applies. `progress` hears about
/// each batch.
pub async fn rebuild(
    database: &Database,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    options: ProjectorOptions,
    mut progress: impl FnMut(Progress),
) -> Result<Rebuilt> {
    let name = projection.name();
    let version = status(database).await?.iter().filter(|s| s.name == name).map(|s| s.version).max().unwrap_or(0) + 1;
    let options = ProjectorOptions { batch_size: 2000, batch_time: Duration::from_secs(1), ..options };
    let projector = Projector::new(database.clone(), log.clone(), projection, version, options);
    projector.prepare().await?;
    let started = Instant::now();
    loop {
        let considered = projector.step().await?;
        let position = projector.position().await?;
        let head = log.last_position().await?.max(position);
        let idle = considered == 0;
        progress(Progress { version, position, head, elapsed: started.elapsed(), idle });
        if idle && position >= head {
            break;
        }
    }
    projector.activate().await?;
    let parked = parked_of(database, name, version).await?;
    Ok(Rebuilt { version, elapsed: started.elapsed(), parked })
}

/// Applies the parked events of the active version of `projection` again
/// (after a fix), with `options`; see [`Projector::replay_parked`]. `None`
/// when no version is active.
pub async fn replay(
    database: &Database,
    log: Arc<dyn EventLog>,
    projection: Arc<dyn Projection>,
    options: ProjectorOptions,
) -> Result<Option<Replayed>> {
    let name = projection.name();
    let Some(version) = status(database).await?.into_iter().find(|s| s.name == name && s.active).map(|s| s.version)
    else {
        return Ok(None);
    };
    let projector = Projector::new(database.clone(), log, projection, version, options);
    let applied = projector.replay_parked().await?;
    let left = parked_of(database, name, version).await?;
    Ok(Some(Replayed { version, applied, left }))
}

/// Parked events of `version` of projection `name` not yet replayed.
async fn parked_of(database: &Database, name: &str, version: u32) -> Result<u64> {
    Ok(status(database).await?.into_iter().find(|s| s.name == name && s.version == version).map_or(0, |s| s.parked))
}

/// A stored `integer` that is never negative (versions, attempts), as `u32`
/// (0 if it were).
fn stored_u32(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}
