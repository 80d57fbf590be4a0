//! Saga instances in PostgreSQL (`saga.saga_instances`, migration 0006):
//! started once per (type, correlation), saved after every step with the
//! version they were read at, and found again by due time, so that any
//! number of orchestrators share the work and a restart resumes each saga
//! where it stood.

use std::time::SystemTime;

use eventfold_domain::saga::SagaEvent;
use serde_json::Value;
use tokio_postgres::{GenericClient, Row, types::ToSql};

use crate::{
    error::{Error, Result},
    model::{SagaState, SagaType, Step},
};

/// A saga as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub saga_id: String,
    /// What it is about: the order id, the transfer id.
    pub correlation_id: String,
    pub state: SagaState,
    /// The saga's own data (items, payment token, what each step answered).
    pub data: Value,
    /// When the current step is due.
    pub due_at: SystemTime,
    /// When the current step times out.
    pub deadline_at: Option<SystemTime>,
    /// Bumped by every save.
    pub version: i64,
}

impl SagaRecord {
    /// Whether its current step is to run by `now`: it is unfinished and
    /// due, or past its deadline (it timed out while nobody ran it).
    pub fn is_due(&self, now: SystemTime) -> bool {
        !self.state.status.is_final() && (self.due_at <= now || self.deadline_at.is_some_and(|d| d <= now))
    }
}

/// How one step attempt ended, for the saga's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLog {
    pub step: Step,
    /// `DONE`, `REJECTED`, `TRANSIENT` or `TIMED_OUT`.
    pub outcome: String,
    pub detail: Option<String>,
    pub started_at: SystemTime,
    pub ended_at: SystemTime,
}

const COLUMNS: &str = "saga_id, correlation_id, state, data, due_at, deadline_at, version";

fn record(row: &Row) -> Result<SagaRecord> {
    let saga_id: String = row.get("saga_id");
    let state: Value = row.get("state");
    let state = serde_json::from_value(state)
        .map_err(|e| Error::Corrupt { saga_id: saga_id.clone(), message: format!("stored state unreadable: {e}") })?;
    Ok(SagaRecord {
        correlation_id: row.get("correlation_id"),
        state,
        data: row.get("data"),
        due_at: row.get("due_at"),
        deadline_at: row.get("deadline_at"),
        version: row.get("version"),
        saga_id,
    })
}

/// What [`start`] and [`save`] both write of a saga: status, current_step,
/// state, data, due_at and deadline_at.
struct Columns<'a> {
    record: &'a SagaRecord,
    status: &'static str,
    step: Option<&'static str>,
    state: Value,
}

impl<'a> Columns<'a> {
    fn of(record: &'a SagaRecord) -> Result<Self> {
        let state = serde_json::to_value(&record.state).map_err(|e| Error::Corrupt {
            saga_id: record.saga_id.clone(),
            message: format!("state not storable: {e}"),
        })?;
        Ok(Self { record, status: record.state.status.as_str(), step: record.state.step.map(Step::as_str), state })
    }

    /// The parameters of a statement: `first`, then the columns.
    fn after<'p>(&'p self, first: &[&'p (dyn ToSql + Sync)]) -> Vec<&'p (dyn ToSql + Sync)> {
        let record = self.record;
        let columns: [&'p (dyn ToSql + Sync); 6] =
            [&self.status, &self.step, &self.state, &record.data, &record.due_at, &record.deadline_at];
        first.iter().copied().chain(columns).collect()
    }
}

/// Stores a new saga unless one of its type already exists for its
/// correlation id: whether it was started now.
pub async fn start(client: &impl GenericClient, record: &SagaRecord) -> Result<bool> {
    let saga_type = record.state.saga_type.as_str();
    let columns = Columns::of(record)?;
    let inserted = client
        .execute(
            "INSERT INTO saga.saga_instances (saga_id, saga_type, correlation_id, status, current_step, state, data, \
                                              due_at, deadline_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            &columns.after(&[&record.saga_id, &saga_type, &record.correlation_id]),
        )
        .await?;
    Ok(inserted == 1)
}

/// [`start`] for each of `records`, in order, in one statement: the ids
/// of the sagas started now (a record whose saga exists, or which an
/// earlier record of the list started, starts nothing).
pub async fn start_many(client: &impl GenericClient, records: &[SagaRecord]) -> Result<Vec<String>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let columns = records.iter().map(Columns::of).collect::<Result<Vec<_>>>()?;
    let ids: Vec<&str> = records.iter().map(|r| r.saga_id.as_str()).collect();
    let types: Vec<&str> = records.iter().map(|r| r.state.saga_type.as_str()).collect();
    let correlations: Vec<&str> = records.iter().map(|r| r.correlation_id.as_str()).collect();
    let statuses: Vec<&str> = columns.iter().map(|c| c.status).collect();
    let steps: Vec<Option<&str>> = columns.iter().map(|c| c.step).collect();
    let states: Vec<&Value> = columns.iter().map(|c| &c.state).collect();
    let data: Vec<&Value> = records.iter().map(|r| &r.data).collect();
    let due: Vec<SystemTime> = records.iter().map(|r| r.due_at).collect();
    let deadlines: Vec<Option<SystemTime>> = records.iter().map(|r| r.deadline_at).collect();
    let rows = client
        .query(
            "INSERT INTO saga.saga_instances (saga_id, saga_type, correlation_id, status, current_step, state, data, \
                                              due_at, deadline_at) \
             SELECT saga_id, saga_type, correlation_id, status, current_step, state, data, due_at, deadline_at \
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[], \
                           $8::timestamptz[], $9::timestamptz[]) WITH ORDINALITY \
                    AS u(saga_id, saga_type, correlation_id, status, current_step, state, data, due_at, deadline_at, n) \
              ORDER BY n \
             ON CONFLICT DO NOTHING RETURNING saga_id",
            &[&ids, &types, &correlations, &statuses, &steps, &states, &data, &due, &deadlines],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The saga `saga_id`, if it exists.
pub async fn load(client: &impl GenericClient, saga_id: &str) -> Result<Option<SagaRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM saga.saga_instances WHERE saga_id = $1");
    client.query_opt(&sql, &[&saga_id]).await?.as_ref().map(record).transpose()
}

/// The saga of `saga_type` for `correlation_id`, if it exists.
pub async fn find(
    client: &impl GenericClient,
    saga_type: SagaType,
    correlation_id: &str,
) -> Result<Option<SagaRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM saga.saga_instances WHERE saga_type = $1 AND correlation_id = $2");
    client.query_opt(&sql, &[&saga_type.as_str(), &correlation_id]).await?.as_ref().map(record).transpose()
}

/// Saves `record` (read at `record.version`) with the attempts of `log`
/// and appends its lifecycle `events` to the event store, in the caller's
/// transaction, and bumps its version; the global position of the last
/// event appended, if any (the caller wakes readers with it after the
/// commit). A save by someone else since is an [`Error::Conflict`] and
/// changes nothing.
pub async fn save(
    client: &(impl GenericClient + Sync),
    record: &mut SagaRecord,
    log: &[StepLog],
    events: &[SagaEvent],
) -> Result<Option<u64>> {
    let version = next_version(record)?;
    let columns = Columns::of(record)?;
    let updated = client
        .execute(
            "UPDATE saga.saga_instances SET status = $3, current_step = $4, state = $5, data = $6, due_at = $7, \
                    deadline_at = $8, version = version + 1, updated_at = clock_timestamp() \
              WHERE saga_id = $1 AND version = $2",
            &columns.after(&[&record.saga_id, &record.version]),
        )
        .await?;
    if updated != 1 {
        return Err(Error::Conflict { saga_id: record.saga_id.clone(), expected: record.version });
    }
    // Failpoint `saga::after_state`: the state UPDATE ran, the step log and
    // the lifecycle events are not written yet, all in the caller's
    // transaction. A failure here must leave none of the save behind.
    eventfold_store::failpoint!("saga::after_state");
    for entry in log {
        client
            .execute(
                "INSERT INTO saga.saga_steps (saga_id, seq, step, outcome, detail, started_at, ended_at) \
                 SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, $4, $5, $6 FROM saga.saga_steps WHERE saga_id = $1",
                &[
                    &record.saga_id,
                    &entry.step.as_str(),
                    &entry.outcome,
                    &entry.detail,
                    &entry.started_at,
                    &entry.ended_at,
                ],
            )
            .await?;
    }
    let position = if events.is_empty() {
        None
    } else {
        let outcome =
            eventfold_store::postgres::append_in(client, &crate::events::append_request(record, events)).await?;
        Some(outcome.last_position())
    };
    record.version = version;
    Ok(position)
}

/// The version `record` gets when saved; `Corrupt` (nothing saved) past
/// the range of a `bigint`.
pub(crate) fn next_version(record: &SagaRecord) -> Result<i64> {
    record.version.checked_add(1).ok_or_else(|| Error::Corrupt {
        saga_id: record.saga_id.clone(),
        message: format!("version {} cannot be bumped", record.version),
    })
}

/// The unfinished sagas due by `now`, earliest first, at most `limit`
/// (the candidates of a claim: see [`try_hold`]).
pub async fn due(client: &impl GenericClient, now: SystemTime, limit: i64) -> Result<Vec<SagaRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM saga.saga_instances \
          WHERE status IN ('RUNNING', 'COMPENSATING') AND (due_at <= $1 OR deadline_at <= $1) \
          ORDER BY least(due_at, coalesce(deadline_at, due_at)) LIMIT $2"
    );
    client.query(&sql, &[&now, &limit]).await?.iter().map(record).collect()
}

/// The advisory lock class of sagas (the two-key form, whose keys never
/// meet the one-key form's); the second key is the hash of the saga id. A
/// hash collision makes two sagas wait for each other, nothing worse.
const LOCK_CLASS: i32 = 0x5a6a;

/// Takes saga `saga_id` for the session of `client` unless another session
/// holds it: whether it did. Several orchestrators share the work this way
/// without running a saga twice at once; a session that ends (its process
/// crashed) lets go of what it held. A session lock, unlike a row lock,
/// needs no open transaction while the step runs.
pub async fn try_hold(client: &impl GenericClient, saga_id: &str) -> Result<bool> {
    let row = client.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &saga_id]).await?;
    Ok(row.get(0))
}

/// Takes saga `saga_id` for the session of `client`, waiting for whoever
/// holds it (an operator's change).
pub async fn hold(client: &impl GenericClient, saga_id: &str) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &saga_id]).await?;
    Ok(())
}

/// Lets go of every saga the session of `client` holds.
pub async fn let_go(client: &impl GenericClient) -> Result<()> {
    client.batch_execute("SELECT pg_advisory_unlock_all()").await?;
    Ok(())
}

/// Where a page of [`list`] starts: after this (created_at, saga_id).
pub type Cursor = (SystemTime, String);

/// Sagas newest first, optionally of one type and status, after `after`;
/// each with its creation time (the next page's cursor).
pub async fn list(
    client: &impl GenericClient,
    saga_type: Option<SagaType>,
    status: Option<crate::model::Status>,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Vec<(SagaRecord, SystemTime)>> {
    let sql = format!(
        "SELECT {COLUMNS}, created_at FROM saga.saga_instances \
          WHERE ($1::text IS NULL OR saga_type = $1) AND ($2::text IS NULL OR status = $2) \
            AND ($3::timestamptz IS NULL OR (created_at, saga_id) < ($3, $4)) \
          ORDER BY created_at DESC, saga_id DESC LIMIT $5"
    );
    let (at, id) = match after {
        Some((at, id)) => (Some(*at), Some(id.as_str())),
        None => (None, None),
    };
    let rows =
        client.query(&sql, &[&saga_type.map(SagaType::as_str), &status.map(|s| s.as_str()), &at, &id, &limit]).await?;
    rows.iter().map(|r| Ok((record(r)?, r.get("created_at")))).collect()
}

/// The versions of those of `saga_ids` that exist: one statement for any
/// number of watched sagas.
pub async fn versions(client: &impl GenericClient, saga_ids: &[String]) -> Result<Vec<(String, i64)>> {
    let rows =
        client.query("SELECT saga_id, version FROM saga.saga_instances WHERE saga_id = ANY($1)", &[&saga_ids]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The history of saga `saga_id`, in order.
pub async fn steps(client: &impl GenericClient, saga_id: &str) -> Result<Vec<StepLog>> {
    let rows = client
        .query(
            "SELECT step, outcome, detail, started_at, ended_at FROM saga.saga_steps WHERE saga_id = $1 ORDER BY seq",
            &[&saga_id],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let name: String = r.get(0);
            let step = crate::model::step_named(&name).ok_or_else(|| Error::Corrupt {
                saga_id: saga_id.to_owned(),
                message: format!("unknown step {name} in its history"),
            })?;
            Ok(StepLog { step, outcome: r.get(1), detail: r.get(2), started_at: r.get(3), ended_at: r.get(4) })
        })
        .collect()
}
