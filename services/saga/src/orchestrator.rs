//! The orchestrator: runs the due steps of the stored sagas.
//!
//! Each saga is claimed (in PostgreSQL with a session advisory lock:
//! orchestrators share the work, and no saga runs twice at once; see
//! [`crate::repo`]). A step's deadline is saved before the step runs, so a
//! restart keeps it, and its outcome is saved, with the lifecycle events,
//! in one short transaction once it ends. An orchestrator that dies
//! mid-step lets go of the saga with its connection, and the next one runs
//! the step again with the same idempotency key (or times it out, past its
//! deadline).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tracing::Instrument;

use eventfold_platform::runtime::CancellationToken;
use eventfold_store::Database;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    model::{Next, Outcome, RetryPolicy, SagaType, Status, Step, jitter},
    repo::{Claim, Repository},
    steps::{Fulfilment, FulfilmentData, Transfer, TransferData},
    store::{SagaRecord, StepLog},
};

/// Settings of the orchestrator (`[saga]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// Longest a step may take before it counts as timed out.
    pub step_timeout_ms: u64,
    /// Sagas run at once (each holds a database connection meanwhile).
    pub concurrency: usize,
    /// Longest pause between looks for due sagas.
    pub poll_ms: u64,
    pub retry: RetryPolicy,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self { step_timeout_ms: 5_000, concurrency: 8, poll_ms: 100, retry: RetryPolicy::default() }
    }
}

/// See the module documentation. Clones share the sagas and the steps.
#[derive(Clone)]
pub struct Orchestrator {
    sagas: Repository,
    fulfilment: Arc<Fulfilment>,
    transfer: Transfer,
    config: OrchestratorConfig,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").field("config", &self.config).finish_non_exhaustive()
    }
}

fn outcome_name(outcome: &Outcome) -> (&'static str, Option<String>) {
    match outcome {
        Outcome::Done => ("DONE", None),
        Outcome::Rejected { reason } => ("REJECTED", Some(reason.clone())),
        Outcome::Transient { error } => ("TRANSIENT", Some(error.clone())),
        Outcome::TimedOut => ("TIMED_OUT", None),
    }
}

/// `pause` after `now`, or `now` itself should that be past what the clock
/// can represent (not with pauses and timeouts of milliseconds).
fn later(now: SystemTime, pause: Duration) -> SystemTime {
    now.checked_add(pause).unwrap_or(now)
}

impl Orchestrator {
    /// An orchestrator over the sagas of `database` (which holds the
    /// migrations); transfers use the fulfilment's command side. It has a
    /// pool of its own on that server, of `concurrency + 1` connections: a
    /// saga being worked on holds one for the length of its step.
    pub fn new(database: Database, fulfilment: Fulfilment, config: OrchestratorConfig) -> Self {
        let size = u32::try_from(config.concurrency.max(1).saturating_add(1)).unwrap_or(u32::MAX);
        Self::over(Repository::postgres(database.sized(size)), fulfilment, config)
    }

    /// An orchestrator over the sagas of `sagas`.
    pub fn over(sagas: Repository, fulfilment: Fulfilment, config: OrchestratorConfig) -> Self {
        let transfer = Transfer { commands: fulfilment.commands.clone() };
        Self { sagas, fulfilment: Arc::new(fulfilment), transfer, config }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.step_timeout_ms.max(1))
    }

    /// Runs one step of up to `concurrency` due sagas, at once; how many
    /// steps ran.
    pub async fn tick(&self) -> Result<usize> {
        let runs = (0..self.config.concurrency.max(1)).map(|_| self.run_one());
        let mut ran: usize = 0;
        for result in futures_util::future::join_all(runs).await {
            ran = ran.saturating_add(usize::from(result?));
        }
        Ok(ran)
    }

    /// Claims one due saga and runs its current step; whether one ran.
    async fn run_one(&self) -> Result<bool> {
        let now = SystemTime::now();
        let Some(mut claim) = self.sagas.claim_due(now).await? else {
            return Ok(false);
        };
        if claim.record.deadline_at.is_none() {
            // The deadline is on record before the step runs: a restart
            // keeps it.
            claim.record.deadline_at = Some(later(now, self.timeout()));
            claim.save(None).await?;
        }
        self.step(claim).await.map(|()| true)
    }

    /// Runs the current step of the held saga and saves how it ended, in a
    /// span of the trace that started the saga (the commands it sends join
    /// that trace too).
    async fn step(&self, claim: Claim) -> Result<()> {
        let step = claim.record.state.step.map_or("none", |s| s.as_str());
        let span = tracing::info_span!(
            "saga.step",
            otel.name = %format_args!("saga step {step}"),
            saga = %claim.record.saga_id,
            step,
        );
        let traceparent = claim.record.data.get(eventfold_platform::trace::TRACEPARENT).and_then(|v| v.as_str());
        eventfold_platform::trace::set_parent(&span, traceparent, None);
        self.run_step(claim).instrument(span).await
    }

    async fn run_step(&self, mut claim: Claim) -> Result<()> {
        let record = &mut claim.record;
        let Some(step) = record.state.step else {
            return Ok(());
        };
        let first_run = record.state.effects.is_empty()
            && record.state.status == Status::Running
            && record.state.failures == 0
            && Some(step) == record.state.saga_type.forward().first().copied();
        let deadline = record.deadline_at.unwrap_or_else(|| later(SystemTime::now(), self.timeout()));
        let started_at = SystemTime::now();
        let started = Instant::now();
        let left = deadline.duration_since(started_at).ok();
        let reason = record.state.reason.clone();
        let outcome = match record.state.saga_type {
            SagaType::OrderFulfilment => {
                let Some(mut data) = Self::data::<FulfilmentData>(record) else {
                    return self.park(claim, step).await;
                };
                tracing::debug!(saga = %record.saga_id, step = step.as_str(), ?data, "saga step");
                let outcome = match left {
                    None => Outcome::TimedOut,
                    Some(left) => {
                        let run = self.fulfilment.run(&record.saga_id, step, reason.as_deref(), &mut data);
                        tokio::time::timeout(left, run).await.unwrap_or(Outcome::TimedOut)
                    }
                };
                record.data = serde_json::to_value(&data).map_err(|e| Error::Corrupt {
                    saga_id: record.saga_id.clone(),
                    message: format!("data not storable: {e}"),
                })?;
                outcome
            }
            SagaType::MoneyTransfer => {
                let Some(data) = Self::data::<TransferData>(record) else {
                    return self.park(claim, step).await;
                };
                tracing::debug!(saga = %record.saga_id, step = step.as_str(), ?data, "saga step");
                match left {
                    None => Outcome::TimedOut,
                    Some(left) => {
                        let run = self.transfer.run(&record.saga_id, step, reason.as_deref(), &data);
                        tokio::time::timeout(left, run).await.unwrap_or(Outcome::TimedOut)
                    }
                }
            }
        };
        // Failpoint `saga::after_call`: the step's calls (payment provider,
        // carrier, command side) returned and their result is not saved
        // yet. A crash here loses the answer: the step runs again, with the
        // same idempotency keys, so its effects still happen once.
        eventfold_store::failpoint!("saga::after_call");
        metrics::histogram!("eventfold_saga_step_seconds", "step" => step.as_str()).record(started.elapsed());
        let (name, detail) = outcome_name(&outcome);
        if matches!(outcome, Outcome::Transient { .. } | Outcome::TimedOut) {
            metrics::counter!("eventfold_saga_retries_total", "step" => step.as_str()).increment(1);
        }
        let attempt = record.state.failures.saturating_add(1);
        let next = record.state.on_outcome(outcome, &self.config.retry, jitter(&record.saga_id, step, attempt));
        let now = SystemTime::now();
        record.deadline_at = None;
        record.due_at = match &next {
            Next::RetryAfter(_, pause) => later(now, *pause),
            Next::Run(_) | Next::Finished(_) => now,
        };
        let log = StepLog { step, outcome: name.to_owned(), detail, started_at, ended_at: now };
        claim.save(Some((log, attempt))).await?;
        let record = claim.record.clone();
        claim.release().await?;
        let saga_type = record.state.saga_type.as_str();
        if first_run {
            metrics::counter!("eventfold_sagas_started_total", "type" => saga_type).increment(1);
        }
        if let Next::Finished(status) = next {
            let outcome = match status {
                Status::Completed => "completed",
                _ if record.state.compensated() => "compensated",
                _ => "failed",
            };
            metrics::counter!("eventfold_sagas_finished_total", "type" => saga_type, "outcome" => outcome).increment(1);
            tracing::info!(saga = %record.saga_id, outcome, reason = ?record.state.reason, "saga finished");
        }
        Ok(())
    }

    /// The saga's data, if it can be read.
    fn data<T: serde::de::DeserializeOwned>(record: &SagaRecord) -> Option<T> {
        match serde_json::from_value(record.data.clone()) {
            Ok(data) => Some(data),
            Err(error) => {
                tracing::error!(saga = %record.saga_id, %error, "saga data unreadable; parked for an hour");
                None
            }
        }
    }

    /// Puts a saga that cannot run aside (due again in an hour), so it
    /// holds up no other: an operator sees it in ListSagas.
    async fn park(&self, mut claim: Claim, step: Step) -> Result<()> {
        metrics::counter!("eventfold_saga_parked_total").increment(1);
        claim.record.due_at = later(SystemTime::now(), Duration::from_secs(3600));
        claim.record.deadline_at = None;
        let log = StepLog {
            step,
            outcome: "PARKED".to_owned(),
            detail: Some("the saga's data cannot be read".to_owned()),
            started_at: SystemTime::now(),
            ended_at: SystemTime::now(),
        };
        let attempt = claim.record.state.failures.saturating_add(1);
        claim.save(Some((log, attempt))).await?;
        claim.release().await?;
        Ok(())
    }

    /// Runs due sagas until `token` is cancelled, looking again at once
    /// while there is work, else after `poll_ms` or when `wake` changes.
    /// A failure (PostgreSQL away) ends it with the error: its supervisor
    /// runs it again after a pause (see
    /// `eventfold_platform::runtime::supervise`). A step under way when the
    /// token is cancelled runs to its end (at most its timeout).
    pub async fn run(self, mut wake: watch::Receiver<u64>, token: CancellationToken) -> Result<()> {
        let poll = Duration::from_millis(self.config.poll_ms.max(1));
        while !token.is_cancelled() {
            if self.tick().await? > 0 {
                continue;
            }
            // A wake sender that is gone leaves the poll.
            let woken = async {
                if wake.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = woken => {}
                () = token.cancelled() => {}
            }
        }
        Ok(())
    }
}
