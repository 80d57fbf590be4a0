//! Where the sagas live, as the orchestrator and the `SagaService` use
//! them: in PostgreSQL (`saga.saga_instances`, see [`crate::store`]) or,
//! for the embedded `eventfold dev`, in memory beside the in-memory event
//! log.
//!
//! A saga is worked on through a [`Claim`]: it holds the saga (in
//! PostgreSQL a session advisory lock, see [`store::try_hold`]; a per-saga
//! lock in memory) until it is released or dropped, and every
//! [`Claim::save`] stores the saga with its lifecycle events (see
//! [`crate::events`]), in PostgreSQL in one short transaction, so the
//! state and the events commit together or not at all.
//!
//! No transaction stays open while a step runs: a transaction holding a
//! transaction id for the length of a step would hold back every gap-safe
//! reader of the event log (they wait for older transaction ids to finish,
//! see `eventfold_store::postgres`), and a step may take until its timeout.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use eventfold_store::{
    Database, EventLog, PgPool,
    pg::{PgConnection, pool_error},
};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::{
    error::{Error, Result},
    events,
    model::{Next, SagaState, SagaType, Status},
    store::{self, Cursor, SagaRecord, StepLog},
};

/// See the module documentation.
#[derive(Clone)]
pub enum Repository {
    Postgres(PgPool),
    Memory(Arc<MemorySagas>),
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Repository::Postgres(_) => "Repository::Postgres",
            Repository::Memory(_) => "Repository::Memory",
        })
    }
}

/// A claim's connection asked for after it went back to the pool (which
/// only `Held::release`, taking the claim, does).
fn released() -> Error {
    Error::Store(eventfold_store::Error::Internal("the claim's connection was already released".to_owned()))
}

impl Repository {
    /// The sagas of `database` (which holds the migrations and the event
    /// store). A claim holds one of its pooled connections from the claim
    /// to the release: the pool is to have one per saga worked on at once.
    pub fn postgres(database: Database) -> Repository {
        Repository::Postgres(database.pool().clone())
    }

    /// Whether the sagas can be reached.
    pub async fn check(&self) -> Result<()> {
        match self {
            Repository::Postgres(pool) => {
                let client = pool.get().await.map_err(pool_error)?;
                client.simple_query("SELECT 1 FROM saga.saga_instances LIMIT 1").await?;
                Ok(())
            }
            Repository::Memory(_) => Ok(()),
        }
    }

    /// Saga `saga_id`, if it exists.
    pub async fn load(&self, saga_id: &str) -> Result<Option<SagaRecord>> {
        match self {
            Repository::Postgres(pool) => store::load(&*pool.get().await.map_err(pool_error)?, saga_id).await,
            Repository::Memory(m) => Ok(m.entries().get(saga_id).map(|e| e.record.clone())),
        }
    }

    /// The versions of those of `saga_ids` that exist (what a watch
    /// compares to tell which sagas changed), in one read.
    pub async fn versions(&self, saga_ids: &[String]) -> Result<Vec<(String, i64)>> {
        match self {
            Repository::Postgres(pool) => store::versions(&*pool.get().await.map_err(pool_error)?, saga_ids).await,
            Repository::Memory(m) => {
                let entries = m.entries();
                Ok(saga_ids.iter().filter_map(|id| Some((id.clone(), entries.get(id)?.record.version))).collect())
            }
        }
    }

    /// The step history of saga `saga_id`, in order.
    pub async fn steps(&self, saga_id: &str) -> Result<Vec<StepLog>> {
        match self {
            Repository::Postgres(pool) => store::steps(&*pool.get().await.map_err(pool_error)?, saga_id).await,
            Repository::Memory(m) => Ok(m.entries().get(saga_id).map(|e| e.steps.clone()).unwrap_or_default()),
        }
    }

    /// Sagas newest first, optionally of one type and status, after
    /// `after`; each with its creation time (the next page's cursor).
    pub async fn list(
        &self,
        saga_type: Option<SagaType>,
        status: Option<Status>,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<(SagaRecord, SystemTime)>> {
        match self {
            Repository::Postgres(pool) => {
                store::list(&*pool.get().await.map_err(pool_error)?, saga_type, status, after, limit).await
            }
            Repository::Memory(m) => {
                let entries = m.entries();
                let mut found: Vec<(SagaRecord, SystemTime)> = entries
                    .values()
                    .filter(|e| saga_type.is_none_or(|t| e.record.state.saga_type == t))
                    .filter(|e| status.is_none_or(|s| e.record.state.status == s))
                    .filter(|e| after.is_none_or(|(at, id)| (e.created_at, &e.record.saga_id) < (*at, id)))
                    .map(|e| (e.record.clone(), e.created_at))
                    .collect();
                found.sort_by(|a, b| (b.1, &b.0.saga_id).cmp(&(a.1, &a.0.saga_id)));
                found.truncate(usize::try_from(limit).unwrap_or(0));
                Ok(found)
            }
        }
    }

    /// The unfinished saga due soonest by `now` that nobody else holds.
    pub async fn claim_due(&self, now: SystemTime) -> Result<Option<Claim>> {
        match self {
            Repository::Postgres(pool) => {
                let mut held = Held::connect(pool).await?;
                for candidate in store::due(held.client()?, now, DUE_CANDIDATES).await? {
                    held = match held.take(&candidate.saga_id, |r| r.is_due(now)).await? {
                        Ok(claim) => return Ok(Some(claim)),
                        Err(held) => held,
                    };
                }
                held.release().await?;
                Ok(None)
            }
            Repository::Memory(m) => Ok(m.claim(|entry| entry.record.is_due(now), false).await),
        }
    }

    /// Saga `saga_id` if it is unfinished and nobody else holds it.
    pub async fn claim(&self, saga_id: &str) -> Result<Option<Claim>> {
        let unfinished = |r: &SagaRecord| !r.state.status.is_final();
        match self {
            Repository::Postgres(pool) => match Held::connect(pool).await?.take(saga_id, unfinished).await? {
                Ok(claim) => Ok(Some(claim)),
                Err(held) => {
                    held.release().await?;
                    Ok(None)
                }
            },
            Repository::Memory(m) => {
                Ok(m.claim(|entry| entry.record.saga_id == saga_id && unfinished(&entry.record), false).await)
            }
        }
    }

    /// Saga `saga_id`, waiting for whoever holds it (an operator's change).
    pub async fn lock(&self, saga_id: &str) -> Result<Option<Claim>> {
        match self {
            Repository::Postgres(pool) => {
                let held = Held::connect(pool).await?;
                store::hold(held.client()?, saga_id).await?;
                match store::load(held.client()?, saga_id).await? {
                    Some(record) => Ok(Some(Claim::new(record, held))),
                    None => {
                        held.release().await?;
                        Ok(None)
                    }
                }
            }
            Repository::Memory(m) => Ok(m.claim(|entry| entry.record.saga_id == saga_id, true).await),
        }
    }

    /// An operator's retry of the refused compensations of saga `saga_id`
    /// (see [`SagaState::retry`]), due at once.
    pub async fn retry(&self, saga_id: &str) -> Result<()> {
        self.change(saga_id, SagaState::retry, |record| Error::NotRetryable {
            saga_id: record.saga_id.clone(),
            status: record.state.status,
        })
        .await
    }

    /// An operator's abort of saga `saga_id`: it compensates what it did
    /// (see [`SagaState::abort`]), at once.
    pub async fn abort(&self, saga_id: &str) -> Result<()> {
        self.change(saga_id, SagaState::abort, |record| Error::NotRunning {
            saga_id: record.saga_id.clone(),
            status: record.state.status,
        })
        .await
    }

    /// Applies an operator's change to saga `saga_id`, waiting for whoever
    /// holds it; `refused` when the change does not apply.
    async fn change(
        &self,
        saga_id: &str,
        change: impl FnOnce(&mut SagaState) -> Option<Next>,
        refused: impl FnOnce(&SagaRecord) -> Error,
    ) -> Result<()> {
        let mut claim = self.lock(saga_id).await?.ok_or_else(|| Error::NotFound { saga_id: saga_id.to_owned() })?;
        if change(&mut claim.record.state).is_none() {
            let error = refused(&claim.record);
            claim.release().await?;
            return Err(error);
        }
        claim.record.due_at = SystemTime::now();
        claim.record.deadline_at = None;
        claim.save(None).await?;
        claim.release().await
    }
}

/// How many of the due sagas a claim tries, soonest first, before it
/// finds them all held by others.
const DUE_CANDIDATES: i64 = 32;

/// A saga held for change; see the module documentation. Dropped without
/// [`Claim::release`], it is let go all the same (in PostgreSQL in the
/// background); what was saved stays saved.
pub struct Claim {
    /// The saga as held; [`Claim::save`] stores it.
    pub record: SagaRecord,
    /// The state as last stored (what the lifecycle events are relative to).
    stored: SagaState,
    held: Held,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("record", &self.record).finish_non_exhaustive()
    }
}

impl Claim {
    fn new(record: SagaRecord, held: Held) -> Claim {
        Claim { stored: record.state.clone(), record, held }
    }

    /// Stores the saga as it is now, with the step attempt that `ended`
    /// (and its attempt number) in its history, and the lifecycle events
    /// of the change since the last save: all of it or, on an error,
    /// nothing.
    pub async fn save(&mut self, ended: Option<(StepLog, u32)>) -> Result<()> {
        let started = self.record.version == 0;
        let events = events::lifecycle(&self.stored, &self.record, started, ended.as_ref().map(|(l, a)| (l, *a)));
        let log: Vec<StepLog> = ended.into_iter().map(|(log, _)| log).collect();
        match &mut self.held {
            Held::Postgres(conn) => {
                let conn = conn.as_mut().ok_or_else(released)?;
                let mut saved = self.record.clone();
                let tx = conn.transaction().await?;
                // A save is a handful of statements: a session stuck inside
                // one (its process hung) is ended rather than holding the
                // gap-safe readers of the log back.
                tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = 30000").await?;
                let position = store::save(&tx, &mut saved, &log, &events).await?;
                tx.commit().await?;
                self.record = saved;
                if let Some(position) = position {
                    // A lost wake-up only delays readers until their next poll.
                    if let Err(error) = eventfold_store::postgres::notify_appended(&**conn, position).await {
                        tracing::debug!(%error, "NOTIFY after a saga save failed; readers poll");
                    }
                }
            }
            Held::Memory { sagas, .. } => sagas.save(&mut self.record, log, &events).await?,
        }
        self.stored = self.record.state.clone();
        Ok(())
    }

    /// Lets go of the saga.
    pub async fn release(self) -> Result<()> {
        self.held.release().await
    }
}

/// How a claim holds its saga.
enum Held {
    /// A pooled connection (holding the saga's advisory lock, once taken).
    Postgres(Option<PgConnection<'static>>),
    Memory {
        sagas: Arc<MemorySagas>,
        _guard: OwnedMutexGuard<()>,
    },
}

impl Held {
    /// A connection to hold sagas with: from here on, dropping it lets go
    /// of whatever it holds.
    async fn connect(pool: &PgPool) -> Result<Held> {
        Ok(Held::Postgres(Some(pool.get_owned().await.map_err(pool_error)?)))
    }

    fn client(&self) -> Result<&tokio_postgres::Client> {
        match self {
            Held::Postgres(Some(conn)) => Ok(conn),
            Held::Postgres(None) => Err(released()),
            Held::Memory { .. } => unreachable!("only PostgreSQL claims have a client"),
        }
    }

    /// Saga `saga_id` as a claim, if nobody else holds it and, read under
    /// the hold, it is `wanted`; otherwise it is let go and the connection
    /// comes back for the next try.
    async fn take(self, saga_id: &str, wanted: impl Fn(&SagaRecord) -> bool) -> Result<Result<Claim, Held>> {
        let client = self.client()?;
        if !store::try_hold(client, saga_id).await? {
            return Ok(Err(self));
        }
        match store::load(client, saga_id).await? {
            Some(record) if wanted(&record) => Ok(Ok(Claim::new(record, self))),
            _ => {
                store::let_go(client).await?;
                Ok(Err(self))
            }
        }
    }

    /// Lets go of what is held and gives the connection back.
    async fn release(mut self) -> Result<()> {
        let Held::Postgres(conn) = &mut self else {
            return Ok(());
        };
        // Still held while the statement runs: dropped meanwhile (the task
        // aborted), the cleanup of `Drop` runs instead.
        store::let_go(&**conn.as_ref().ok_or_else(released)?).await?;
        conn.take();
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Held::Postgres(conn) = self else { return };
        let Some(conn) = conn.take() else { return };
        // The connection goes back to the pool only once it is outside any
        // transaction and holds no saga. Without a runtime (shutting down)
        // it is closed with the pool, which ends both.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let cleaned = async {
                    conn.batch_execute("ROLLBACK").await?;
                    store::let_go(&*conn).await
                };
                if let Err(error) = cleaned.await {
                    tracing::debug!(%error, "letting go of a dropped saga claim failed");
                }
            });
        }
    }
}

/// A saga in memory.
#[derive(Debug)]
struct Entry {
    record: SagaRecord,
    steps: Vec<StepLog>,
    created_at: SystemTime,
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// The sagas of the embedded `eventfold dev`: nothing survives the process,
/// like the in-memory event log they write their lifecycle events to.
pub struct MemorySagas {
    entries: Mutex<HashMap<String, Entry>>,
    log: Arc<dyn EventLog>,
    started: watch::Sender<u64>,
}

impl std::fmt::Debug for MemorySagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySagas").finish_non_exhaustive()
    }
}

impl MemorySagas {
    /// Sagas in memory, writing their lifecycle events to `log`.
    pub fn new(log: Arc<dyn EventLog>) -> Arc<MemorySagas> {
        Arc::new(MemorySagas { entries: Mutex::new(HashMap::new()), log, started: watch::channel(0).0 })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a new saga unless one of its type already exists for its
    /// correlation id: whether it was started now.
    pub fn start(&self, record: &SagaRecord) -> bool {
        let mut entries = self.entries();
        let taken = entries.values().any(|e| {
            e.record.state.saga_type == record.state.saga_type && e.record.correlation_id == record.correlation_id
        });
        if taken || entries.contains_key(&record.saga_id) {
            return false;
        }
        // Microseconds, as page cursors carry them.
        let now = SystemTime::now();
        let micros = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
        let created_at =
            UNIX_EPOCH.checked_add(Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))).unwrap_or(now);
        let entry = Entry { record: record.clone(), steps: Vec::new(), created_at, lock: Arc::default() };
        entries.insert(record.saga_id.clone(), entry);
        drop(entries);
        self.started.send_modify(|n| *n = n.saturating_add(1));
        true
    }

    /// Changes each time a saga is started (the orchestrator's wake-up).
    pub fn started(&self) -> watch::Receiver<u64> {
        self.started.subscribe()
    }

    /// The saga soonest due among those `wanted` that nobody holds (or,
    /// with `wait`, the first wanted one, once its holder lets go).
    async fn claim(self: &Arc<Self>, wanted: impl Fn(&Entry) -> bool, wait: bool) -> Option<Claim> {
        // A guard now, or (waiting) the lock to wait for.
        let (saga_id, held) = {
            let entries = self.entries();
            let mut candidates: Vec<&Entry> = entries.values().filter(|e| wanted(e)).collect();
            candidates.sort_by_key(|e| e.record.deadline_at.map_or(e.record.due_at, |d| d.min(e.record.due_at)));
            if wait {
                let entry = candidates.first()?;
                (entry.record.saga_id.clone(), Err(entry.lock.clone()))
            } else {
                candidates.iter().find_map(|e| {
                    e.lock.clone().try_lock_owned().ok().map(|guard| (e.record.saga_id.clone(), Ok(guard)))
                })?
            }
        };
        let guard = match held {
            Ok(guard) => guard,
            Err(lock) => lock.lock_owned().await,
        };
        // Read under the lock: what the last holder saved.
        let entries = self.entries();
        let entry = entries.get(&saga_id)?;
        if !wait && !wanted(entry) {
            return None;
        }
        let record = entry.record.clone();
        drop(entries);
        Some(Claim::new(record, Held::Memory { sagas: self.clone(), _guard: guard }))
    }

    /// Appends `events`, then stores `record` (held by the caller, read at
    /// `record.version`) with `log`.
    async fn save(
        &self,
        record: &mut SagaRecord,
        log: Vec<StepLog>,
        events: &[eventfold_domain::saga::SagaEvent],
    ) -> Result<()> {
        let stored = self.entries().get(&record.saga_id).map(|e| e.record.version);
        if stored != Some(record.version) {
            return Err(Error::Conflict { saga_id: record.saga_id.clone(), expected: record.version });
        }
        let version = store::next_version(record)?;
        if !events.is_empty() {
            self.log.append(events::append_request(record, events)).await?;
        }
        let mut entries = self.entries();
        let entry = entries
            .get_mut(&record.saga_id)
            .ok_or_else(|| Error::Conflict { saga_id: record.saga_id.clone(), expected: record.version })?;
        record.version = version;
        entry.record = record.clone();
        entry.steps.extend(log);
        Ok(())
    }
}
